// Keeping a NaN or inf away from the rows that do not see it.
//
// A tensor-core product multiplies every pair of its operands: a row whose weight for key j is 0
// (the pair is hidden by the mask) still forms 0 * v_j, which is NaN when v_j is NaN or inf, and
// dense attention never forms that product. Tiles where every pair is visible are safe as they
// are. In the others the kernels scan the operand tile for non-finite values (one bit per key row,
// `flag_nonfinite_rows_*`); only when a bit is set, the product runs on the operand with every
// non-finite element replaced by 0, and each row then adds, for the keys the mask lets it see,
// the values the product skipped (`add_nonfinite_values`): a weight p > 0 times inf is inf of the
// same sign and times NaN is NaN, so adding the value itself gives what dense attention gives.
// (A visible pair whose weight is exactly 0 -- an underflow, a -inf logit -- has no one right
// answer in 0 * inf; here it counts as p > 0.)
//
// The scan is the only cost when nothing is found: a few 16-byte shared-memory loads per thread
// in tiles that are not FULL (the causal diagonal, window edges, document boundaries).
#pragma once
#include "ptx.cuh"

namespace cuparing {

// Exponent bits of two packed halves: all ones means inf or NaN.
template <bool kBf16>
__device__ __forceinline__ constexpr u32 exponent_mask2() {
  return kBf16 ? 0x7f807f80u : 0x7c007c00u;
}

// 0xffff in each 16-bit half of x that holds a NaN or inf, 0 in the others.
template <bool kBf16>
__device__ __forceinline__ u32 nonfinite_halves(u32 x) {
  constexpr u32 kMask = exponent_mask2<kBf16>();
  const u32 e = x & kMask;
  return ((e & 0xffffu) == (kMask & 0xffffu) ? 0xffffu : 0u) |
         ((e >> 16) == (kMask >> 16) ? 0xffff0000u : 0u);
}

template <bool kBf16>
__device__ __forceinline__ bool is_nonfinite(u16 x) {
  constexpr u32 kMask = exponent_mask2<kBf16>() & 0xffffu;
  return (x & kMask) == kMask;
}

// x with its non-finite halves replaced by +0.
template <bool kBf16>
__device__ __forceinline__ u32 zero_nonfinite(u32 x) {
  return x & ~nonfinite_halves<kBf16>(x);
}

__device__ __forceinline__ void ld_shared_v4(u32 addr, u32 (&r)[4]) {
  asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

__device__ __forceinline__ void st_shared_v4(u32 addr, const u32 (&r)[4]) {
  asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(r[0]), "r"(r[1]),
               "r"(r[2]), "r"(r[3])
               : "memory");
}

__device__ __forceinline__ u32 ld_shared_u32(u32 addr) {
  u32 r;
  asm volatile("ld.shared.b32 %0, [%1];\n" : "=r"(r) : "r"(addr) : "memory");
  return r;
}

// Does row `row` (chunks [0, kChunks) at chunk_addr(row, c)) hold a NaN or inf?
template <bool kBf16, int kChunks, class ChunkAddr>
__device__ __forceinline__ bool row_has_nonfinite(const ChunkAddr& chunk_addr, int row) {
  u32 found = 0;
#pragma unroll 1  // one load at a time: wide rows must not take registers from the accumulators
  for (int c = 0; c < kChunks; ++c) {
    u32 x[4];
    ld_shared_v4(chunk_addr(row, c), x);
#pragma unroll
    for (int i = 0; i < 4; ++i) found |= nonfinite_halves<kBf16>(x[i]);
  }
  return found != 0;
}

// Words of kRows bits, bit k of word w set when tile row 32w + k holds a NaN or inf.
template <int kRows>
struct RowBits {
  static constexpr int kWords = (kRows + 31) / 32;
};

// Warp-level scan: the whole warp reads the (kRows, kChunks x 16 bytes) tile (lane l: rows l,
// l + 32, ...) and every lane gets all the words. Returns whether any bit is set.
template <bool kBf16, int kRows, int kChunks, class ChunkAddr>
__device__ __forceinline__ bool flag_nonfinite_rows_warp(const ChunkAddr& chunk_addr, int lane,
                                                         u32 (&bits)[RowBits<kRows>::kWords]) {
  u32 any = 0;
#pragma unroll
  for (int w = 0; w < RowBits<kRows>::kWords; ++w) {
    const int row = 32 * w + lane;
    const bool found = row < kRows && row_has_nonfinite<kBf16, kChunks>(chunk_addr, row);
    bits[w] = __ballot_sync(0xffffffffu, found);
    any |= bits[w];
  }
  return any != 0;
}

// Warpgroup-level scan: thread i (0..127) of the warpgroup reads rows i, i + 128, ...; each warp
// stores its words (w = warp + 4j) to shared memory at s_words + 4w. Follow with a barrier over
// the warpgroup before reading them.
template <bool kBf16, int kRows, int kChunks, class ChunkAddr>
__device__ __forceinline__ void flag_nonfinite_rows_warpgroup(const ChunkAddr& chunk_addr,
                                                              int wg_tid, u32 s_words) {
  static_assert(kRows <= 256, "at most 8 words");
#pragma unroll
  for (int j = 0; j < (kRows + 127) / 128; ++j) {
    const int row = wg_tid + 128 * j;
    const bool found = row < kRows && row_has_nonfinite<kBf16, kChunks>(chunk_addr, row);
    const u32 word = __ballot_sync(0xffffffffu, found);
    const int w = (wg_tid >> 5) + 4 * j;
    if ((wg_tid & 31) == 0 && 32 * w < kRows) st_shared_u32(s_words + 4u * w, word);
  }
}

// Replace the non-finite elements of the rows a warpgroup scanned (same row split) by +0.
template <bool kBf16, int kRows, int kChunks, class ChunkAddr>
__device__ __forceinline__ void zero_nonfinite_rows_warpgroup(const ChunkAddr& chunk_addr,
                                                              int wg_tid) {
#pragma unroll
  for (int j = 0; j < (kRows + 127) / 128; ++j) {
    const int row = wg_tid + 128 * j;
    if (row >= kRows) break;
#pragma unroll 1
    for (int c = 0; c < kChunks; ++c) {
      u32 x[4];
      const u32 addr = chunk_addr(row, c);
      ld_shared_v4(addr, x);
      u32 bad = 0;
#pragma unroll
      for (int i = 0; i < 4; ++i) bad |= nonfinite_halves<kBf16>(x[i]);
      if (bad) {
#pragma unroll
        for (int i = 0; i < 4; ++i) x[i] = zero_nonfinite<kBf16>(x[i]);
        st_shared_v4(addr, x);
      }
    }
  }
}

// acc (16 kMFrags rows x kDTiles n8 tiles, mma accumulator layout) += the non-finite values of
// the keys each row sees: for every key k whose bad bit is set and that row half r of fragment
// mf sees (visible(mf, r, k): the mask's rule), row k of `values` (global memory, row stride in
// elements, `cols` valid columns) is read and its NaN / inf elements are added. Call after the
// tile's rescaling (an inf times a correction of 0 would be NaN), before or after the product.
template <bool kBf16, int kMFrags, int kDTiles, int kKeys, class Visible>
__device__ __forceinline__ void add_nonfinite_values(float (&acc)[kMFrags][kDTiles][4],
                                                     const Visible& visible,
                                                     const u32 (&bad)[RowBits<kKeys>::kWords],
                                                     const u16* __restrict__ values,
                                                     i64 row_stride, int cols, int lane) {
  const int t = lane & 3;
#pragma unroll
  for (int w = 0; w < RowBits<kKeys>::kWords; ++w) {
    for (u32 m = bad[w]; m != 0; m &= m - 1) {  // warp-uniform: the words come from a ballot
      const int key = 32 * w + __ffs(m) - 1;
      const u16* row = values + key * row_stride;
#pragma unroll
      for (int mf = 0; mf < kMFrags; ++mf) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          if (!visible(mf, r, key)) continue;
#pragma unroll 1
          for (int dt = 0; dt < kDTiles; ++dt) {  // one column pair at a time: few registers
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int col = 8 * dt + 2 * t + e;
              const u16 x = col < cols ? row[col] : u16(0);
              if (is_nonfinite<kBf16>(x)) {
                const float value = from_half_bits<kBf16>(x);
#pragma unroll
                for (int d = 0; d < kDTiles; ++d) {  // acc[mf][dt] without dynamic indexing
                  if (d == dt) acc[mf][d][2 * r + e] += value;
                }
              }
            }
          }
        }
      }
    }
  }
}

}  // namespace cuparing
