// __global__ entry points of the sm_90a family (compiled only for sm_90a; loader.py names every
// instantiation):
//   cuparing_fwd_sm90<D, bf16, tma>: grid (section, ceil(Sq / kBlockM), B H / section) (below),
//       block Sm90FwdTraits<D, tma>::kNThreads (a producer warpgroup and two or three consumers:
//       kBlockM 128 or 192 query rows), dynamic smem Sm90FwdTraits<D, tma>::kSmemBytes; same
//       FwdParams and results as the sm80 family's cuparing_fwd, plus the Q/K/V tensor maps
//       (read only when tma is true; the false instantiation copies with cp.async).
//   cuparing_bwd_sm90<D, bf16, ordered>: grid (section, ceil(Sk / 128), B H / section), block
//       384, dynamic smem Sm90BwdTraits<D>::kSmemBytes; the sm80 family's BwdParams and
//       contract (adds one ring block's dq, dk, dv into the float32 accumulators), head dims 64
//       and 128; ordered: the deterministic mode (adds in a fixed order through BwdParams' turn
//       counters).
// Both deal their CTAs' (batch, head) pairs in L2-sized sections of `section` pairs
// (common/launch_order.cuh, kernels/launch_order.py); the ordered backward gets one section of
// every pair (the plain order).
#include "bwd.cuh"
#include "fwd.cuh"

template <int kHeadDim, bool kBf16, bool kTma>
__global__ void __launch_bounds__(cuparing::Sm90FwdTraits<kHeadDim, kTma>::kNThreads, 1)
    cuparing_fwd_sm90(const __grid_constant__ cuparing::FwdParams params,
                      const __grid_constant__ cuparing::Sm90Maps maps) {
  cuparing::fwd_block_sm90<cuparing::Sm90FwdTraits<kHeadDim, kTma>, kBf16, kTma>(params, maps);
}

template <int kHeadDim, bool kBf16, bool kOrdered>
__global__ void __launch_bounds__(cuparing::Sm90BwdTraits<kHeadDim>::kNThreads, 1)
    cuparing_bwd_sm90(const __grid_constant__ cuparing::BwdParams params) {
  cuparing::bwd_block_sm90<cuparing::Sm90BwdTraits<kHeadDim>, kBf16, kOrdered>(params);
}
