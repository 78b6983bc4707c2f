// Thin __global__ entry points; every instantiation is named by loader.py (name expressions), so
// NVRTC compiles exactly the kernels a call needs. Grid and block come from the traits table:
//   cuparing_fwd<D, bf16>: grid (H, B, ceil(Sq / kBlockM)), block kNThreads, dynamic smem
//                          kSmemBytes; the z index is walked backwards (heaviest tiles first).
//   cuparing_bwd<D, bf16, mode>: grid (H, B, ceil(Sk / kBlockN)), block kNThreads, dynamic smem
//                          kSmemBytes; adds one ring block's dq, dk, dv (BwdMode: all, or the
//                          dV / dK+dQ halves of a split instantiation, two launches; or
//                          the sm90 backward's redo pass, BwdMode kBwdRedo).
//   cuparing_bwd_delta<bf16>: delta = rowsum(dO * O) float32 [B, H, S], one warp per row.
//   cuparing_cast_*:       elementwise fp32 <-> fp16/bf16 over n contiguous elements.
//   cuparing_dq_from_tiles<bf16>: the sm90 backward's dq accumulator -> dq (common/dq_tiles.cuh).
//   cuparing_copy_pair:    two device-to-device copies in one launch (grid (x, 2)).
//   cuparing_direct_rows<bf16>: after the sm90 backward's redo pass, with direct gradients, the
//                          dK / dV rows of the CTAs it finished into the gradients (common/
//                          direct_grads.cuh): grid (H, B, ceil(Sk / 128)), up to 256 threads.
//   cuparing_gather_rows:  a gathered ring call's K/V rows in position order, or its dK / dV
//                          rows back in shard order (common/gather_rows.cuh): grid
//                          (ceil(L / 4), B), 128 threads.
//   cuparing_add_f32:      acc += x over n float32 elements (grid-stride).
//   cuparing_add_cast_f32<bf16>: y = fp16/bf16(acc + x) over n float32 elements (grid-stride).
//   cuparing_copy_u16:     y = x over n 2-byte elements (grid-stride).
#include "../common/direct_grads.cuh"
#include "../common/gather_rows.cuh"
#include "bwd.cuh"
#include "fwd.cuh"

template <int kHeadDim, bool kBf16>
__global__ void __launch_bounds__(cuparing::FwdTraits<kHeadDim>::kNThreads,
                                  cuparing::FwdTraits<kHeadDim>::kMinBlocks)
    cuparing_fwd(const cuparing::FwdParams params) {
  cuparing::fwd_block<cuparing::FwdTraits<kHeadDim>, kBf16>(params);
}

template <int kHeadDim, bool kBf16, int kMode>
__global__ void __launch_bounds__(cuparing::BwdTraits<kHeadDim>::kNThreads,
                                  cuparing::BwdTraits<kHeadDim>::kMinBlocks)
    cuparing_bwd(const cuparing::BwdParams params) {
  static_assert((kMode == cuparing::kBwdAll || kMode == cuparing::kBwdRedo) !=
                    cuparing::BwdTraits<kHeadDim>::kSplit,
                "split instantiations run as kBwdDv + kBwdDkDq, the others as kBwdAll (or the "
                "sm90 kernel's redo pass, kBwdRedo)");
  cuparing::bwd_block<cuparing::BwdTraits<kHeadDim>, kBf16, kMode>(params);
}

template <bool kBf16>
__global__ void __launch_bounds__(256)
    cuparing_bwd_delta(const cuparing::u16* __restrict__ dout, const cuparing::u16* __restrict__ out,
                       float* __restrict__ delta, long long do_bs, long long do_rs, long long do_hs,
                       long long o_bs, long long o_rs, long long o_hs, int batch, int seqlen,
                       int nheads, int headdim) {
  cuparing::bwd_delta_rows<kBf16>(dout, out, delta, do_bs, do_rs, do_hs, o_bs, o_rs, o_hs, batch,
                                  seqlen, nheads, headdim);
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

template <bool kBf16>
__global__ void __launch_bounds__(256)
    cuparing_direct_rows(const cuparing::BwdParams params) {
  cuparing::direct_rows_after_redo<kBf16, 128>(params);
}

// Two copies in one launch: blockIdx.y 0 copies a_bytes from a_src to a_dst, 1 copies b_bytes
// from b_src to b_dst (a replayed ring call's K/V into its graph's own copies, one graph node
// whose source addresses a replay rewrites). Every pointer 16-byte aligned; 16-byte words, then
// the tail bytes.
__global__ void __launch_bounds__(256)
    cuparing_copy_pair(const uint4* __restrict__ a_src, uint4* __restrict__ a_dst,
                       long long a_bytes, const uint4* __restrict__ b_src,
                       uint4* __restrict__ b_dst, long long b_bytes) {
  const uint4* src = blockIdx.y == 0 ? a_src : b_src;
  uint4* dst = blockIdx.y == 0 ? a_dst : b_dst;
  const long long bytes = blockIdx.y == 0 ? a_bytes : b_bytes;
  const long long words = bytes / 16;
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  const long long first = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (long long i = first; i < words; i += stride) {
    dst[i] = src[i];
  }
  const long long tail = words * 16 + first;
  if (tail < bytes && first < 16) {
    reinterpret_cast<unsigned char*>(dst)[tail] = reinterpret_cast<const unsigned char*>(src)[tail];
  }
}

// acc += x over n float32 elements (a ring backward step's dK / dV, added into those that arrived
// from the rank before while it computed; a gathered ring backward's dK / dV rows, received from
// the ranks that computed them, added in step order).
__global__ void __launch_bounds__(256) cuparing_add_f32(const float* __restrict__ x, float* __restrict__ acc,
                                 long long n) {
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    acc[i] += x[i];
  }
}

// y = fp16/bf16 bits of (acc + x), round to nearest even, over n float32 elements: a ring
// backward's last step adds its dK / dV into those that arrived and casts the whole gradient in
// one pass, so it travels home in its own dtype (half the bytes of float32 on the one transfer
// no compute hides) and the owner only copies it out.
template <bool kBf16>
__global__ void __launch_bounds__(256)
    cuparing_add_cast_f32(const float* __restrict__ x, const float* __restrict__ acc,
                          cuparing::u16* __restrict__ y, long long n) {
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    y[i] = cuparing::to_half_bits<kBf16>(acc[i] + x[i]);
  }
}

// y = x over n 2-byte elements: dK / dV that came home in their dtype, copied into the caller's
// gradients (a kernel, not a memcpy, so that a replayed graph can point it at new ones).
__global__ void __launch_bounds__(256)
    cuparing_copy_u16(const cuparing::u16* __restrict__ x, cuparing::u16* __restrict__ y,
                      long long n) {
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    y[i] = x[i];
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

// The sm90 backward's dq accumulator (dq tiles, common/dq_tiles.cuh) -> dq [B, Sq, H, D] as
// fp16/bf16 bits, contiguous (4-byte aligned), rounded to nearest even: one float pair per
// thread, read in the tiles' order (coalesced); pairs past Sq or D are dropped.
template <bool kBf16>
__global__ void cuparing_dq_from_tiles(const float2* __restrict__ tiles, unsigned* __restrict__ dq,
                                       int batch, int seqlen, int nheads, int headdim) {
  const cuparing::DqTiles layout(nheads, seqlen, headdim);
  const long long pairs = static_cast<long long>(batch) * nheads * layout.query_tiles *
                          layout.boxes * (cuparing::kDqChunkFloats / 2);
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < pairs;
       i += stride) {
    int b, h, row, col;
    layout.pair_position(i, b, h, row, col);
    if (row < seqlen && col < headdim) {
      const float2 x = tiles[i];
      dq[((static_cast<long long>(b) * seqlen + row) * nheads + h) * (headdim / 2) + col / 2] =
          cuparing::to_half_bits<kBf16>(x.x) |
          (static_cast<unsigned>(cuparing::to_half_bits<kBf16>(x.y)) << 16);
    }
  }
}

__global__ void __launch_bounds__(cuparing::kGatherThreads)
    cuparing_gather_rows(const __grid_constant__ cuparing::GatherRowsParams params) {
  cuparing::gather_rows(params);
}
