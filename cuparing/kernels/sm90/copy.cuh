// cp.async copies of a tile into the 128-byte-swizzled box layout the sm90 kernels' wgmma
// descriptors describe (see traits.cuh), by a producer warpgroup: the forward's cp.async
// producer and the backward's.
#pragma once
#include "../common/params.cuh"
#include "../common/ptx.cuh"

namespace cuparing {

// Copy rows [0, rows_valid) x chunks [0, d_chunks) of a (kRows, kHeadDim) tile from global memory
// into the swizzled box layout of traits.cuh, by the producer's threads (ptid 0..127); everything
// else in the tile is zero-filled, so padded keys, queries and head-dim columns contribute 0.
template <class Tr, int kRows>
__device__ __forceinline__ void load_tile_sm90(u32 smem, const u16* __restrict__ gmem,
                                               i64 row_stride, int rows_valid, int d_chunks,
                                               int ptid) {
  constexpr int kRowStep = Tr::kProducerThreads / Tr::kLoadChunks;
  static_assert(kRows % kRowStep == 0, "whole row groups per tile");
  const int row0 = ptid / Tr::kLoadChunks;
  const i64 src_step = kRowStep * row_stride;
#pragma unroll
  for (int cc = 0; cc < Tr::kChunks / Tr::kLoadChunks; ++cc) {
    const int chunk = ptid % Tr::kLoadChunks + cc * Tr::kLoadChunks;
    const bool chunk_ok = chunk < d_chunks;
    const u32 dst = smem + Tr::template offset<kRows>(row0, chunk);
    const u16* src = gmem + row0 * row_stride + chunk * 8;
#pragma unroll
    for (int i = 0; i < kRows / kRowStep; ++i) {
      const bool ok = chunk_ok && row0 + i * kRowStep < rows_valid;
      cp_async_16(dst + i * kRowStep * Tr::kBoxRowBytes, src + i * src_step, ok ? 16 : 0);
    }
  }
}

}  // namespace cuparing
