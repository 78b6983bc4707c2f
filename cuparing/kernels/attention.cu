// Thin __global__ entry points; every instantiation is named by loader.py (name expressions), so
// NVRTC compiles exactly the kernels a call needs. Grid and block come from the traits table:
//   cuparing_fwd<D, bf16>: grid (H, B, ceil(Sq / kBlockM)), block kNThreads, dynamic smem
//                          kSmemBytes; the z index is walked backwards (heaviest tiles first).
//   cuparing_cast_*:       elementwise fp32 <-> fp16/bf16 over n contiguous elements.
#include "fwd.cuh"

template <int kHeadDim, bool kBf16>
__global__ void __launch_bounds__(cuparing::FwdTraits<kHeadDim>::kNThreads,
                                  cuparing::FwdTraits<kHeadDim>::kMinBlocks)
    cuparing_fwd(const cuparing::FwdParams params) {
  cuparing::fwd_block<cuparing::FwdTraits<kHeadDim>, kBf16>(params);
}

// fp32 -> fp16/bf16 bits, round to nearest even (the final cast of the ring's fp32 accumulator).
template <bool kBf16>
__global__ void cuparing_cast_from_f32(const float* __restrict__ x, cuparing::u16* __restrict__ y,
                                       long long n) {
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    y[i] = cuparing::to_half_bits<kBf16>(x[i]);
  }
}

// fp16/bf16 bits -> fp32 (exact).
template <bool kBf16>
__global__ void cuparing_cast_to_f32(const cuparing::u16* __restrict__ x, float* __restrict__ y,
                                     long long n) {
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    y[i] = cuparing::from_half_bits<kBf16>(x[i]);
  }
}
