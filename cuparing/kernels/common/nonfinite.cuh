// Keeping a NaN or inf away from the rows (or keys) that never meet it.
//
// A tensor-core product multiplies every pair of its operands: where the mask hides a pair, its
// weight is 0 (P in the forward, P or dS in the backward), yet the product still forms 0 * x, and
// 0 * NaN = 0 * inf = NaN. Dense attention never forms that product. Tiles the mask leaves whole
// are exact as they are. For the others the kernels
//   1. learn cheaply whether the tile's operand holds any non-finite value at all: each thread
//      checks the 16-byte chunks it copied into shared memory itself (`chunk_nonfinite`), and
//      the answer is OR-ed over the CTA by the barrier the loop has anyway (__syncthreads_or),
//      or by the producer warps in the Hopper kernel;
//   2. only then (rare) replace those values by 0 in shared memory (`zero_nonfinite_chunk`),
//      before any product reads the tile, so the products' code is unchanged, and
//   3. add, to each row, the non-finite values of the keys the mask lets it see
//      (`add_nonfinite_values`): a weight p > 0 times inf is inf of the same sign, times NaN is
//      NaN, so adding the value itself gives what dense attention gives. A visible pair whose
//      weight is exactly 0 (an underflow, a -inf logit) has no single right answer in 0 * inf;
//      it counts as p > 0 here (README, Numerics). Adding a non-finite value a row already
//      holds changes nothing (inf + inf = inf, NaN + x = NaN), so the kernels do this once after
//      their main loop, over every tile that may have been zeroed, with the accumulators of the
//      loop dead and no later rescaling to meet the inf.
// The forward kernels do this for V (P V), the backward for dO (dV += P^T dO). The backward's Q
// and K may not be rewritten so (an infinite element can make a visible logit -inf, which a zero
// would turn finite): it recomputes those tiles pair by pair (sm80/bwd.cuh, bwd_exact_tile).
#pragma once
#include "ptx.cuh"

namespace cuparing {

// Exponent bits of two packed 16-bit halves: all ones means inf or NaN.
template <bool kBf16>
__device__ __forceinline__ constexpr u32 exponent_mask2() {
  return kBf16 ? 0x7f807f80u : 0x7c007c00u;
}

// Bit 15 of each 16-bit half of x that holds a NaN or inf (other bits 0), in four integer
// operations: t = (x & mask) ^ mask has a zero half exactly where x's half is non-finite, and
// (t - 0x00010001) & ~t & 0x80008000 marks exactly those halves: a non-zero half of t is a
// multiple of the lowest exponent bit (>= 0x80), so minus 1 (and a borrow out of a zero low
// half) leaves its bit 15 clear, while a zero half becomes 0xffff or 0xfffe.
template <bool kBf16>
__device__ __forceinline__ u32 nonfinite_bits(u32 x) {
  constexpr u32 kMask = exponent_mask2<kBf16>();
  const u32 t = (x & kMask) ^ kMask;
  return (t - 0x00010001u) & ~t & 0x80008000u;
}

// 0xffff in each 16-bit half of x that holds a NaN or inf, 0 in the others.
template <bool kBf16>
__device__ __forceinline__ u32 nonfinite_halves(u32 x) {
  return (nonfinite_bits<kBf16>(x) >> 15) * 0xffffu;
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

// Does any of four packed words hold a NaN or inf? (non-zero: yes)
template <bool kBf16>
__device__ __forceinline__ u32 words_nonfinite(const u32 (&x)[4]) {
  return nonfinite_bits<kBf16>(x[0]) | nonfinite_bits<kBf16>(x[1]) |
         nonfinite_bits<kBf16>(x[2]) | nonfinite_bits<kBf16>(x[3]);
}

// Does the 16-byte shared-memory chunk at addr hold a NaN or inf? (non-zero: yes)
template <bool kBf16>
__device__ __forceinline__ u32 chunk_nonfinite(u32 addr) {
  u32 x[4];
  ld_shared_v4(addr, x);
  return words_nonfinite<kBf16>(x);
}

// Same as chunk_nonfinite, and if so the chunk's NaN / inf halves are replaced by +0 in place.
template <bool kBf16>
__device__ __forceinline__ u32 zero_nonfinite_chunk(u32 addr) {
  u32 x[4];
  ld_shared_v4(addr, x);
  const u32 bad = words_nonfinite<kBf16>(x);
  if (bad) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      x[i] &= ~nonfinite_halves<kBf16>(x[i]);
    }
    st_shared_v4(addr, x);
  }
  return bad;
}

// Running per-half maximum of |x| bits over the four words of a chunk (sm_90: max.u16x2, two
// instructions per word): a half of the result at or above the exponent mask means some element
// was NaN or inf (`magnitudes_nonfinite`). Cheaper per chunk than `chunk_nonfinite`, for a scan
// that must keep up with the copies of a whole tile.
template <bool kBf16>
__device__ __forceinline__ u32 max_magnitudes(u32 m, const u32 (&x)[4]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    asm("max.u16x2 %0, %0, %1;\n" : "+r"(m) : "r"(x[i] & 0x7fff7fffu));
  }
  return m;
}

template <bool kBf16>
__device__ __forceinline__ bool magnitudes_nonfinite(u32 m) {
  constexpr u32 kMask = exponent_mask2<kBf16>() & 0xffffu;
  return (m & 0xffffu) >= kMask || (m >> 16) >= kMask;
}

// One thread's share of a scan of [base, base + bytes) of shared memory, kThreads threads
// (tid 0..kThreads-1) taking every kThreads-th 16-byte chunk: the running maximum of its
// magnitudes (`magnitudes_nonfinite` tells whether it saw a NaN / inf; the caller ORs the
// threads' answers).
template <bool kBf16, int kThreads>
__device__ __forceinline__ u32 region_magnitudes(u32 base, int bytes, int tid) {
  u32 m = 0;
#pragma unroll 1  // (a producer with 24 registers runs it too)
  for (int chunk = tid; chunk < bytes / 16; chunk += kThreads) {
    u32 x[4];
    ld_shared_v4(base + 16 * chunk, x);
    m = max_magnitudes<kBf16>(m, x);
  }
  return m;
}

// A 32-bit global load the compiler keeps in program order (asm volatile): the rare path below
// reads up to 32 column pairs per row next to the accumulators, and hoisting those loads would
// take as many registers.
__device__ __forceinline__ u32 load_u32_in_order(const u16* p) {
  u32 x;
  asm volatile("ld.global.u32 %0, [%1];\n" : "=r"(x) : "l"(p));
  return x;
}

// acc (kFrags m16 fragments x kDTiles n8 tiles, the mma accumulator layout: lane (g, t) holds
// rows g and g+8 of each fragment, columns 8j + 2t + {0, 1}) += the non-finite values of the
// rows of `values` that each accumulator row meets. `values`: a (rows <= kRows, cols) tile in
// global memory (row stride in elements, rows 16-byte aligned, cols a multiple of 8). For every
// row k of it that holds a NaN or inf (found 32 rows at a time, lane l reading row 32w + l) and
// every row half r of fragment f with meets(f, r, k), the NaN / inf elements of row k are added
// to that accumulator row. Call with the whole warp converged; meets may differ between lanes.
// Rare path, written for registers: the n8 tiles are the outer (unrolled) loop and the bad rows
// the inner one, so only one tile's accumulators are touched at a time (the other order spilled
// the Hopper consumers at d=256).
template <bool kBf16, int kFrags, int kDTiles, int kRows, class Meets>
__device__ __forceinline__ void add_nonfinite_values(float (&acc)[kFrags][kDTiles][4],
                                                     const Meets& meets,
                                                     const u16* __restrict__ values,
                                                     i64 row_stride, int rows, int cols,
                                                     int lane) {
  const int t = lane & 3;
#pragma unroll 1
  for (int w = 0; w < (kRows + 31) / 32; ++w) {
    u32 bad = 0;
    if (32 * w + lane < rows) {
      const uint4* chunks = reinterpret_cast<const uint4*>(values + (32 * w + lane) * row_stride);
#pragma unroll 1
      for (int c = 0; c < cols / 8; ++c) {
        const uint4 x = chunks[c];
        bad |= nonfinite_bits<kBf16>(x.x) | nonfinite_bits<kBf16>(x.y) |
               nonfinite_bits<kBf16>(x.z) | nonfinite_bits<kBf16>(x.w);
      }
    }
    const u32 bad_rows = __ballot_sync(0xffffffffu, bad != 0);
#pragma unroll
    for (int j = 0; j < kDTiles; ++j) {
      if (8 * j >= cols) break;
#pragma unroll 1
      for (u32 m = bad_rows; m != 0; m &= m - 1) {
        const int k = 32 * w + __ffs(m) - 1;
        const u32 pair = load_u32_in_order(values + k * row_stride + 8 * j + 2 * t);
        const u32 bad_halves = nonfinite_halves<kBf16>(pair);
        const float v0 = from_half_bits<kBf16>(u16(pair & 0xffffu));
        const float v1 = from_half_bits<kBf16>(u16(pair >> 16));
#pragma unroll
        for (int f = 0; f < kFrags; ++f) {
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            // branch-free, and rows that add nothing keep their value bit for bit (-0 stays -0)
            const bool meet = meets(f, r, k);
            float& a0 = acc[f][j][2 * r];
            float& a1 = acc[f][j][2 * r + 1];
            a0 = meet && (bad_halves & 0xffffu) ? a0 + v0 : a0;
            a1 = meet && (bad_halves >> 16) ? a1 + v1 : a1;
          }
        }
      }
    }
  }
}

}  // namespace cuparing
