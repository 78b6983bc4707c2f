// __global__ entry points of the sm_90a family (compiled only for sm_90a; loader.py names every
// instantiation):
//   cuparing_fwd_sm90<D, bf16>: grid (H, B, ceil(Sq / 128)), block 384 (three warpgroups), dynamic
//                               smem Sm90FwdTraits<D>::kSmemBytes; same FwdParams and results as
//                               the sm80 family's cuparing_fwd.
#include "fwd.cuh"

template <int kHeadDim, bool kBf16>
__global__ void __launch_bounds__(cuparing::Sm90FwdTraits<kHeadDim>::kNThreads, 1)
    cuparing_fwd_sm90(const cuparing::FwdParams params) {
  cuparing::fwd_block_sm90<cuparing::Sm90FwdTraits<kHeadDim>, kBf16>(params);
}
