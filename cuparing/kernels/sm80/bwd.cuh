// Backward attention for one (key tile, query head, batch): FlashAttention-2 structure on mma.sync.
//
// CTA = kNWarps warps over a (kBlockN, kHeadDim) key/value tile loaded once; warp w owns
// kKFrags m16 fragments of its keys (rows [w*kWarpKeys, (w+1)*kWarpKeys)) and sweeps the query
// tiles (kBlockM queries) that some key of the CTA can see. Per query tile, everything in the
// TRANSPOSED orientation (rows = this warp's keys, columns = queries), so the key-major gradients
// dK, dV stay in the warp's registers for the CTA's life and P^T / dS^T are already MMA A operands:
//   S^T  = K Q^T          A: K rows from smem (ldmatrix), B: Q rows (ldmatrix, as K in the fwd)
//   P^T  = 2^(S^T * scale*log2e - lse*log2e)   lse per query column, from smem (+inf for rows
//                          that see no key or lie past Sq: P = 0 exactly there)
//   dV  += P^T dO         A: P^T packed from the S^T accumulators (never touches smem),
//                          B: dO by ldmatrix.trans ([query][d] is the row-major K x N operand)
//   dP^T = V dO^T         as S^T
//   dS^T = P^T * (dP^T - delta)   delta per query column, from smem
//   dK  += dS^T Q         A: dS^T packed from registers, B: Q by ldmatrix.trans
//   dQ  += scale * dS K   dS^T is also stored to smem ([key][query], swizzled); after a barrier
//                          the warps split the (kBlockM, kHeadDim) dQ tile, read dS as the A
//                          operand with ldmatrix.trans and K as B with ldmatrix.trans, and add
//                          their part into the float32 dq accumulator with red.global.add.
// At the end dK (times scale) and dV are added into the float32 dk / dv accumulators with
// red.global.add as well: with GQA several query heads (CTAs) share one kv head.
//
// Head dims above 128 would need 2 * kHeadDim / 2 accumulator registers per thread for dK and dV
// together; those instantiations run as two launches (kSplit): mode kBwdDv computes dV only,
// mode kBwdDkDq dK and dQ (S / P are recomputed once more, +1 GEMM of 6).
//
// Q / dO / lse / delta of the query tiles stream through 2 shared-memory stages (cp.async for the
// tiles), so tile i+1 loads while tile i computes; two barriers per query tile (stage reuse,
// and dS written before dQ reads it).
//
// NaN / inf: a hidden pair has P = dS = 0, but the products dV += P^T dO, dK += dS^T Q and
// dQ += dS K still form 0 * x, which is NaN for a non-finite dO, Q or K row the pair never meets.
// On query tiles the mask does not leave whole for the CTA, each thread checks the Q / dO chunks
// it copied and the loop's first barrier ORs the answer (K: once per CTA, one extra barrier).
// Only on a find (rare, CTA-uniform):
//   - dO alone: its NaN / inf become 0 in shared memory and dV adds the visible ones back after
//     the loop (common/nonfinite.cuh), cheap enough for an fp16 loss scale that overflowed;
//   - Q: the tile is neutralised (lse +inf, so every P and dS is exactly 0; Q's and dO's
//     non-finite values 0, so every product is 0) and recomputed after the loop pair by pair
//     (bwd_exact_tile), hidden pairs never touched. Zeroing alone is not exact for Q or K: an
//     infinite element may make a visible logit -inf (the key hidden from that row), and a zero
//     would turn it into a finite score;
//   - K: the partial tiles' dQ stores are dropped and bwd_exact_tile adds their dQ.
// A non-finite Q or K means the forward already met it; that path is slow (float32, one pair at
// a time) but touches only the tiles next to a mask edge.
#pragma once
#include "../common/dq_tiles.cuh"
#include "../common/mask.cuh"
#include "../common/nonfinite.cuh"
#include "../common/params.cuh"
#include "../common/ptx.cuh"

#ifndef CUPARING_BWD_CONFIGS
#error "CUPARING_BWD_CONFIGS must be defined by the loader (cuparing/kernels/loader.py)"
#endif

namespace cuparing {

enum BwdMode : int {
  kBwdAll = 0,   // dV, dK and dQ in one pass (head dim <= 128)
  kBwdDv = 1,    // dV only                   (first launch of a split instantiation)
  kBwdDkDq = 2,  // dK and dQ                 (second launch)
  kBwdRedo = 3,  // as kBwdAll, for the CTAs the sm90 kernel marked only, from the row it left
                 // undone (params.cuh BwdParams::redo); its own instantiation, so the others
                 // carry none of its code
};

template <int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_, bool kSplit_, int kMinBlocks_>
struct BwdTraitsBase {
  static constexpr int kHeadDim = kHeadDim_;  // padded head dim this instantiation runs
  static constexpr int kBlockM = kBlockM_;    // queries per inner tile
  static constexpr int kBlockN = kBlockN_;    // keys per CTA
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kNThreads = kNWarps * 32;
  static constexpr bool kSplit = kSplit_;      // two launches (kBwdDv, kBwdDkDq) instead of one
  static constexpr int kMinBlocks = kMinBlocks_;
  static constexpr int kStages = 2;            // query tiles in flight

  static constexpr int kKFrags = kBlockN / (16 * kNWarps);  // key m16 fragments per warp
  static constexpr int kWarpKeys = 16 * kKFrags;
  static constexpr int kQTiles = kBlockM / 8;   // n8 tiles of S^T (queries) per warp
  static constexpr int kQSteps = kBlockM / 16;  // k16 steps over queries (dV, dK)
  static constexpr int kDTiles = kHeadDim / 8;  // n8 tiles of dK / dV per warp
  static constexpr int kKSteps = kHeadDim / 16; // k16 steps over d (S^T, dP^T)
  static constexpr int kNSteps = kBlockN / 16;  // k16 steps over keys (dQ)

  // (rows, kHeadDim) tiles: the forward's swizzle (see traits.cuh).
  static constexpr int kChunks = kHeadDim / 8;
  static constexpr int kSmemChunks = kChunks == 4 ? 4 : (kChunks + 7) / 8 * 8;
  static constexpr int kRowBytes = kSmemChunks * 16;
  static constexpr int kLoadChunks = kChunks <= 4 ? 4 : kChunks <= 8 ? 8 : kChunks <= 16 ? 16 : 32;
  static __device__ __forceinline__ int swizzle_key(int row) {
    return kChunks == 4 ? ((row >> 1) & 3) : (row & 7);
  }
  static __device__ __forceinline__ int offset(int row, int chunk) {
    return row * kRowBytes + ((chunk ^ swizzle_key(row)) << 4);
  }

  // dS^T tile: (kBlockN keys, kBlockM queries) 16-bit, same swizzle scheme on kBlockM/8 chunks.
  static constexpr int kSChunks = kBlockM / 8;
  static constexpr int kSRowBytes = kSChunks * 16;  // kBlockM in {32, 64, 128}: no padding
  static __device__ __forceinline__ int ds_key(int row) {
    return kSChunks == 4 ? ((row >> 1) & 3) : (row & 7);
  }

  // Shared memory: K, V, kStages x (Q, dO), dS^T, kStages x (lse*log2e, delta) float vectors.
  static constexpr int kKVBytes = kBlockN * kRowBytes;
  static constexpr int kQBytes = kBlockM * kRowBytes;
  static constexpr int kDsBytes = kBlockN * kSRowBytes;
  static constexpr int kVecBytes = kBlockM * 4;
  static constexpr int kOffK = 0;
  static constexpr int kOffV = kOffK + kKVBytes;
  static constexpr int kOffQ = kOffV + kKVBytes;
  static constexpr int kOffDo = kOffQ + kStages * kQBytes;
  static constexpr int kOffDs = kOffDo + kStages * kQBytes;
  static constexpr int kOffLse = kOffDs + kDsBytes;
  static constexpr int kOffDelta = kOffLse + kStages * kVecBytes;
  static constexpr int kSmemBytes = kOffDelta + kStages * kVecBytes;

  // dQ tile (kBlockM, kHeadDim) over the warps: kDqWarpsM x kDqWarpsN, each warp kDqMFrags m16
  // fragments x kDqPairs 16-column pairs, accumulated kDqChunkPairs pairs at a time.
  static constexpr int kDqWarpsM = kNWarps < kBlockM / 16 ? kNWarps : kBlockM / 16;
  static constexpr int kDqMFrags = kBlockM / 16 / kDqWarpsM;
  static constexpr int kDqWarpsN = kNWarps / kDqWarpsM;
  static constexpr int kDqPairs = kHeadDim / 16 / kDqWarpsN;
  static constexpr int kDqChunkPairs = 4;

  static_assert(kHeadDim % 32 == 0 && kHeadDim >= 32 && kHeadDim <= 256, "head dim 32..256");
  static_assert(kNWarps == 4 || kNWarps == 8, "4 or 8 warps");
  static_assert(kBlockN == kNWarps * kWarpKeys && (kKFrags == 1 || kKFrags == 2),
                "each warp owns 1 or 2 whole m16 fragments of keys");
  static_assert(kBlockM == 32 || kBlockM == 64 || kBlockM == 128, "query tile 32, 64 or 128");
  static_assert(kDqWarpsN * kDqWarpsM == kNWarps && kDqMFrags * kDqWarpsM * 16 == kBlockM,
                "dQ warp grid covers the query tile");
  static_assert(kDqPairs * kDqWarpsN * 16 == kHeadDim, "dQ columns split in 16-column pairs");
  static_assert(kSmemBytes <= 227 * 1024, "more shared memory than any sm_80/sm_90 CTA can have");
  // Live accumulators per thread in the main loop: dK + dV (or one of them) + S^T + dP^T.
  static constexpr int kAccRegs =
      kKFrags * ((kSplit ? 1 : 2) * kDTiles * 4 + 2 * kQTiles * 4);
  static_assert(kAccRegs <= 200, "accumulators alone would exhaust the 255-register budget");
};

template <int kHeadDim>
struct BwdTraits;  // only the rows of CUPARING_BWD_CONFIGS exist

#define CUPARING_DEFINE_BWD_TRAITS(D, BM, BN, W, SPLIT, MINB, SMEM)                   \
  template <>                                                                         \
  struct BwdTraits<D> : BwdTraitsBase<D, BM, BN, W, (SPLIT) != 0, MINB> {};           \
  static_assert(BwdTraits<D>::kSmemBytes == (SMEM), "loader bwd smem formula disagrees (D=" #D ")");
CUPARING_BWD_CONFIGS(CUPARING_DEFINE_BWD_TRAITS)
#undef CUPARING_DEFINE_BWD_TRAITS

// Copy rows [0, rows_valid) x chunks [0, d_chunks) of a (kRows, kHeadDim) tile into swizzled shared
// memory, zero-filling the rest (padded rows and head-dim columns contribute exactly 0). Like the
// forward's load_tile, but the swizzle key is recomputed per row, so any row step works (the
// backward's 4-warp, d > 128 tiles have a row step of 4).
template <class Tr, int kRows>
__device__ __forceinline__ void bwd_load_tile(u32 smem, const u16* __restrict__ gmem,
                                              i64 row_stride, int rows_valid, int d_chunks,
                                              int tid) {
  constexpr int kRowStep = Tr::kNThreads / Tr::kLoadChunks;
  constexpr int kIters = (kRows + kRowStep - 1) / kRowStep;
  const int chunk = tid % Tr::kLoadChunks;
  const int row0 = tid / Tr::kLoadChunks;
  if (Tr::kLoadChunks != Tr::kChunks && chunk >= Tr::kChunks) return;  // beyond the row
  const bool chunk_ok = chunk < d_chunks;
  const u16* src = gmem + row0 * row_stride + chunk * 8;
  const i64 src_step = kRowStep * row_stride;
#pragma unroll
  for (int i = 0; i < kIters; ++i) {
    const int row = row0 + i * kRowStep;
    if (kRows % kRowStep != 0 && row >= kRows) break;
    const bool ok = chunk_ok && row < rows_valid;
    cp_async_16(smem + Tr::offset(row, chunk), src + i * src_step, ok ? 16 : 0);
  }
}

// Whether the chunks this thread copied with bwd_load_tile (same assignment) into a (kRows,
// kHeadDim) tile hold a NaN or inf; with kZero those values are also replaced by 0 in place.
// Valid once the thread's own copies have landed (cp.async.wait_group makes them visible to it);
// zero-filled chunks are finite.
template <class Tr, int kRows, bool kBf16, bool kZero = false>
__device__ __forceinline__ bool bwd_own_chunks_nonfinite(u32 smem, int tid) {
  constexpr int kRowStep = Tr::kNThreads / Tr::kLoadChunks;
  constexpr int kIters = (kRows + kRowStep - 1) / kRowStep;
  const int chunk = tid % Tr::kLoadChunks;
  const int row0 = tid / Tr::kLoadChunks;
  if (Tr::kLoadChunks != Tr::kChunks && chunk >= Tr::kChunks) return false;
  u32 bad = 0;
#pragma unroll
  for (int i = 0; i < kIters; ++i) {
    const int row = row0 + i * kRowStep;
    if (kRows % kRowStep != 0 && row >= kRows) break;
    const u32 addr = smem + Tr::offset(row, chunk);
    bad |= kZero ? zero_nonfinite_chunk<kBf16>(addr) : chunk_nonfinite<kBf16>(addr);
  }
  return bad != 0;
}

// Hide S^T where the pair is invisible, the key is past Sk or the query past Sq. acc_s holds this
// warp's (kWarpKeys, kBlockM) block in the m16n8 accumulator layout: lane (g, t) has key rows
// g and g+8 of each fragment, query columns 8j + 2t + {0, 1}.
template <class Tr>
__device__ __forceinline__ void apply_mask_bwd(float (&acc_s)[Tr::kKFrags][Tr::kQTiles][4],
                                               const int (&k_pos_row)[Tr::kKFrags][2],
                                               int warp_key0, const int* __restrict__ q_pos,
                                               int m0, int seqlen_q, int seqlen_k, int lo, int hi,
                                               int lane) {
  const int g = lane >> 2;
  const int t = lane & 3;
#pragma unroll
  for (int j = 0; j < Tr::kQTiles; ++j) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int col = m0 + 8 * j + 2 * t + e;
      const bool in_range = col < seqlen_q;
      const int qp = in_range ? __ldg(q_pos + col) : 0;
#pragma unroll
      for (int kf = 0; kf < Tr::kKFrags; ++kf) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int key = warp_key0 + kf * 16 + g + 8 * r;
          const int delta = k_pos_row[kf][r] - qp;
          const bool visible = in_range && key < seqlen_k && delta >= lo && delta <= hi;
          if (!visible) acc_s[kf][j][2 * r + e] = neg_inf();
        }
      }
    }
  }
}

// acc (kKFrags, kQTiles) += A (this warp's key rows of a (kBlockN, kHeadDim) tile) times
// B^T (a (kBlockM, kHeadDim) tile): S^T = K Q^T and dP^T = V dO^T.
template <class Tr, bool kBf16>
__device__ __forceinline__ void gemm_keys_by_queries(float (&acc)[Tr::kKFrags][Tr::kQTiles][4],
                                                     u32 a_warp, u32 b_tile,
                                                     const u32 (&lane_off)[4],
                                                     const u32 (&k_lane_off)[4]) {
#pragma unroll
  for (int kf = 0; kf < Tr::kKFrags; ++kf) {
#pragma unroll
    for (int j = 0; j < Tr::kQTiles; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[kf][j][e] = 0.f;
    }
  }
#define CUPARING_STEP_OFF(step) (((step) >> 2) << 7)
#pragma unroll
  for (int kk = 0; kk < Tr::kKSteps; ++kk) {
    u32 a[Tr::kKFrags][4];
#pragma unroll
    for (int kf = 0; kf < Tr::kKFrags; ++kf) {
      ldmatrix_x4(a[kf], a_warp + lane_off[kk & 3] + kf * 16 * Tr::kRowBytes + CUPARING_STEP_OFF(kk));
    }
#pragma unroll
    for (int nn = 0; nn < Tr::kQTiles / 2; ++nn) {
      u32 b[4];
      ldmatrix_x4(b, b_tile + k_lane_off[kk & 3] + nn * 16 * Tr::kRowBytes + CUPARING_STEP_OFF(kk));
#pragma unroll
      for (int kf = 0; kf < Tr::kKFrags; ++kf) {
        mma_16816<kBf16>(acc[kf][2 * nn], a[kf], b[0], b[1]);
        mma_16816<kBf16>(acc[kf][2 * nn + 1], a[kf], b[2], b[3]);
      }
    }
  }
#undef CUPARING_STEP_OFF
}

// A fragments of k16 step kk (queries 16kk..16kk+15) from a (kKFrags, kQTiles) accumulator: n8
// tiles (2kk, 2kk+1) are exactly the m16n8k16 A layout (as P in the forward), rounded to 16 bits.
template <class Tr, bool kBf16>
__device__ __forceinline__ void pack_a(u32 (&a)[Tr::kKFrags][4],
                                       const float (&acc)[Tr::kKFrags][Tr::kQTiles][4], int kk) {
#pragma unroll
  for (int kf = 0; kf < Tr::kKFrags; ++kf) {
    a[kf][0] = pack2<kBf16>(acc[kf][2 * kk][0], acc[kf][2 * kk][1]);
    a[kf][1] = pack2<kBf16>(acc[kf][2 * kk][2], acc[kf][2 * kk][3]);
    a[kf][2] = pack2<kBf16>(acc[kf][2 * kk + 1][0], acc[kf][2 * kk + 1][1]);
    a[kf][3] = pack2<kBf16>(acc[kf][2 * kk + 1][2], acc[kf][2 * kk + 1][3]);
  }
}

// acc (kKFrags, kDTiles) += A (k16 step kk of the queries) times the (kBlockM, kHeadDim) tile
// b_tile as the row-major K x N operand (ldmatrix.trans): dV += P^T dO, dK += dS^T Q.
template <class Tr, bool kBf16>
__device__ __forceinline__ void gemm_acc_d(float (&acc)[Tr::kKFrags][Tr::kDTiles][4],
                                           const u32 (&a)[Tr::kKFrags][4], u32 b_tile, int kk,
                                           const u32 (&lane_off)[4]) {
#define CUPARING_STEP_OFF(step) (((step) >> 2) << 7)
#pragma unroll
  for (int dd = 0; dd < Tr::kDTiles / 2; ++dd) {
    u32 b[4];
    ldmatrix_x4_trans(b, b_tile + lane_off[dd & 3] + kk * 16 * Tr::kRowBytes + CUPARING_STEP_OFF(dd));
#pragma unroll
    for (int kf = 0; kf < Tr::kKFrags; ++kf) {
      mma_16816<kBf16>(acc[kf][2 * dd], a[kf], b[0], b[1]);
      mma_16816<kBf16>(acc[kf][2 * dd + 1], a[kf], b[2], b[3]);
    }
  }
#undef CUPARING_STEP_OFF
}

// Add a (kKFrags, kDTiles) accumulator (times mul) into float32 rows [key][d] of stride
// row_stride (elements), for keys < seqlen_k and columns < d.
template <class Tr>
__device__ __forceinline__ void red_add_key_rows(float* base, i64 row_stride,
                                                 const float (&acc)[Tr::kKFrags][Tr::kDTiles][4],
                                                 float mul, int warp_key0, int seqlen_k, int d,
                                                 int lane) {
  const int g = lane >> 2;
  const int t = lane & 3;
#pragma unroll
  for (int kf = 0; kf < Tr::kKFrags; ++kf) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int key = warp_key0 + kf * 16 + g + 8 * r;
      if (key >= seqlen_k) continue;
      float* row = base + key * row_stride;
#pragma unroll
      for (int j = 0; j < Tr::kDTiles; ++j) {
        const int col = 8 * j + 2 * t;
        if (col < d) red_add_f32x2(row + col, acc[kf][j][2 * r] * mul, acc[kf][j][2 * r + 1] * mul);
      }
    }
  }
}

// sum + x . y over the 8 elements of two 16-byte chunks, in float32.
template <bool kBf16>
__device__ __forceinline__ float fma_chunk(const uint4& x, const uint4& y, float sum) {
  const u32 xs[4] = {x.x, x.y, x.z, x.w};
  const u32 ys[4] = {y.x, y.y, y.z, y.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    sum = fmaf(from_half_bits<kBf16>(static_cast<u16>(xs[i] & 0xffffu)),
               from_half_bits<kBf16>(static_cast<u16>(ys[i] & 0xffffu)), sum);
    sum = fmaf(from_half_bits<kBf16>(static_cast<u16>(xs[i] >> 16)),
               from_half_bits<kBf16>(static_cast<u16>(ys[i] >> 16)), sum);
  }
  return sum;
}

// x . y over d elements (a multiple of 8; rows 16-byte aligned), in float32.
template <bool kBf16>
__device__ __forceinline__ float dot_rows(const u16* __restrict__ x, const u16* __restrict__ y,
                                          int d) {
  float sum = 0.f;
#pragma unroll 2
  for (int c = 0; c < d; c += 8) {
    sum = fma_chunk<kBf16>(__ldg(reinterpret_cast<const uint4*>(x + c)),
                           __ldg(reinterpret_cast<const uint4*>(y + c)), sum);
  }
  return sum;
}

// Query rows per pass of bwd_exact_tile: the largest power of two up to kBlockM whose P and dS
// (float32, kBlockN keys per row) fit the kernel's shared memory.
template <class Tr>
__host__ __device__ constexpr int exact_tile_rows() {
  int rows = Tr::kBlockM;
  while (rows > 1 && 2 * rows * Tr::kBlockN * 4 > Tr::kSmemBytes) rows /= 2;
  return rows;
}

// bwd_exact_tile's mark for a hidden pair in its P and dS arrays: a NaN payload no arithmetic
// produces (the GPU's float operations return the canonical NaN 0x7fffffff), so one shared
// load tells a hidden pair from every value a visible pair can have, NaN included.
constexpr u32 kHiddenPair = 0x7f800001u;

// Rare path: one query tile (rows [m0, m0 + rows)) against the CTA's keys [n0, n0 + keys_valid),
// pair by pair in float32. The main loop skips a tile the mask leaves partial for the CTA when
// its Q or dO, or the CTA's K, hold a NaN or inf: there a hidden pair's P or dS of 0 would meet
// that value in a tensor-core product (0 * x = NaN), a product dense attention never forms, and
// no rewrite of the operand is exact for an infinite Q or K element (it may make a visible logit
// -inf, which zeroing would turn finite). Here hidden pairs are never touched and visible pairs
// use plain IEEE arithmetic, as dense attention does; the gradients go straight into the
// float32 accumulators: dV += P^T dO, dK += scale dS^T Q, dQ += scale dS K (only dQ with
// dq_only: a tile whose K alone holds the value, where the loop adds dV and dK). P and dS of
// exact_tile_rows() queries at a time live in shared memory, which the caller has freed (every
// warp past the main loop). The sums run 4 terms at a time with their loads issued together:
// an overflowing fp16 loss scale (inf in dO) can send many tiles here at once. Call with the
// whole CTA; returns after a barrier.
template <class Tr, bool kBf16, int kMode>
__device__ void bwd_exact_tile(const BwdParams& p, float* smem, int b, int h, int hk, int n0,
                               int keys_valid, int m0, int rows, bool dq_only, int tid) {
  constexpr bool kDoDv = kMode != kBwdDkDq;
  constexpr bool kDoDk = kMode != kBwdDv;
  constexpr int kRows = exact_tile_rows<Tr>();
  constexpr int kKeys = Tr::kBlockN;
  constexpr float kLog2e = 1.4426950408889634f;
  const int d = p.headdim;
  const u16* q_rows = p.q + b * p.q_batch_stride + h * p.q_head_stride;
  const u16* do_rows = p.dout + b * p.do_batch_stride + h * p.do_head_stride;
  const u16* k_rows = p.k + b * p.k_batch_stride + hk * p.k_head_stride + n0 * p.k_row_stride;
  const u16* v_rows = p.v + b * p.v_batch_stride + hk * p.v_head_stride + n0 * p.v_row_stride;
  const i64 bh = static_cast<i64>(b) * p.nheads + h;
  const float* lse = p.lse + bh * p.seqlen_q;
  const float* delta = p.delta + bh * p.seqlen_q;
  const i64 q_grad_stride = static_cast<i64>(p.nheads) * d;
  float* dq_rows = p.dq + (static_cast<i64>(b) * p.seqlen_q * p.nheads + h) * d;
  const i64 kv_grad_stride = static_cast<i64>(p.nheads_kv) * d;
  const i64 kv_grad0 = (static_cast<i64>(b) * p.seqlen_k * p.nheads_kv + hk) * d +
                       n0 * kv_grad_stride;
  float* p_s = smem;                   // [kRows][kKeys]
  float* ds_s = smem + kRows * kKeys;  // [kRows][kKeys]
  // the array that marks hidden pairs for a sum (dV's P, else dS: both carry the mark)
  const float* mark_s = kDoDv ? p_s : ds_s;

#pragma unroll 1
  for (int r0 = 0; r0 < rows; r0 += kRows) {
    const int n_rows = min(kRows, rows - r0);
    // P and dS of every pair, kHiddenPair where the mask hides it
#pragma unroll 1
    for (int idx = tid; idx < kRows * kKeys; idx += Tr::kNThreads) {
      const int i = idx / kKeys, key = idx % kKeys;
      const int row = m0 + r0 + i;
      float pv = __uint_as_float(kHiddenPair), dsv = pv;
      if (i < n_rows && key < keys_valid) {
        const int gap = __ldg(p.k_pos + n0 + key) - __ldg(p.q_pos + row);
        if (gap >= p.lo && gap <= p.hi) {
          const float l = __ldg(lse + row);
          const float l2 = l == neg_inf() ? pos_inf() : l * kLog2e;  // as the main loop
          const float s = dot_rows<kBf16>(q_rows + row * p.q_row_stride,
                                          k_rows + key * p.k_row_stride, d);
          pv = exp2f(fmaf(s, p.scale_log2, -l2));
          if constexpr (kDoDk) {
            const float dp = dot_rows<kBf16>(do_rows + row * p.do_row_stride,
                                             v_rows + key * p.v_row_stride, d);
            dsv = pv * (dp - __ldg(delta + row));
          }
        }
      }
      p_s[idx] = pv;
      ds_s[idx] = dsv;
    }
    __syncthreads();
    // dV and dK: one (key, column) element per thread and step, summed over the visible queries
#pragma unroll 1
    for (int idx = tid; idx < (dq_only ? 0 : keys_valid * d); idx += Tr::kNThreads) {
      const int key = idx / d, e = idx % d;
      const u16* do_col = do_rows + (m0 + r0) * p.do_row_stride + e;
      const u16* q_col = q_rows + (m0 + r0) * p.q_row_stride + e;
      float dv = 0.f, dk = 0.f;
      bool any = false;
#pragma unroll 4
      for (int i = 0; i < n_rows; ++i) {
        const bool seen = __float_as_uint(mark_s[i * kKeys + key]) != kHiddenPair;
        any = any || seen;
        if constexpr (kDoDv) {
          const float x = from_half_bits<kBf16>(__ldg(do_col + i * p.do_row_stride));
          dv = seen ? fmaf(p_s[i * kKeys + key], x, dv) : dv;
        }
        if constexpr (kDoDk) {
          const float x = from_half_bits<kBf16>(__ldg(q_col + i * p.q_row_stride));
          dk = seen ? fmaf(ds_s[i * kKeys + key], x, dk) : dk;
        }
      }
      if (any) {
        const i64 at = kv_grad0 + key * kv_grad_stride + e;
        if constexpr (kDoDv) red_add_f32(p.dv + at, dv);
        if constexpr (kDoDk) red_add_f32(p.dk + at, dk * p.scale);
      }
    }
    // dQ: one (query, column) element per thread and step, summed over the visible keys
    if constexpr (kDoDk) {
#pragma unroll 1
      for (int idx = tid; idx < n_rows * d; idx += Tr::kNThreads) {
        const int i = idx / d, e = idx % d;
        const u16* k_col = k_rows + e;
        float dq = 0.f;
        bool any = false;
#pragma unroll 4
        for (int key = 0; key < keys_valid; ++key) {
          const float ds = ds_s[i * kKeys + key];
          const bool seen = __float_as_uint(ds) != kHiddenPair;
          any = any || seen;
          const float x = from_half_bits<kBf16>(__ldg(k_col + key * p.k_row_stride));
          dq = seen ? fmaf(ds, x, dq) : dq;
        }
        if (!any) continue;
        if constexpr (kMode == kBwdRedo) {  // the sm90 backward's accumulator: dq tiles
          red_add_f32(p.dq + DqTiles(p).element(b, h, m0 + r0 + i, e), dq * p.scale);
        } else {
          red_add_f32(dq_rows + (m0 + r0 + i) * q_grad_stride + e, dq * p.scale);
        }
      }
    }
    __syncthreads();  // P and dS are read: the next pass (or the caller) may overwrite them
  }
}

template <class Tr, bool kBf16, int kMode>
__device__ __forceinline__ void bwd_block(const BwdParams& p) {
  constexpr bool kDoDv = kMode != kBwdDkDq;
  constexpr bool kDoDk = kMode != kBwdDv;  // dK and dQ
  constexpr float kLog2e = 1.4426950408889634f;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int g = lane >> 2;
  const int t = lane & 3;

  const int h = blockIdx.x;
  const int b = blockIdx.y;
  const int n_block = blockIdx.z;
  const int hk = h / (p.nheads / p.nheads_kv);
  const int sq = p.seqlen_q;
  const int sk = p.seqlen_k;
  const int n0 = n_block * Tr::kBlockN;
  const int keys_valid = min(Tr::kBlockN, sk - n0);
  const int d_chunks = p.headdim >> 3;
  const int lo = p.lo, hi = p.hi;

  // ---- which query tiles can any key of this CTA see? queries with q_pos in
  // [k_min - hi, k_max - lo]: one contiguous index range (positions ascending)
  const int m_tiles_total = (sq + Tr::kBlockM - 1) / Tr::kBlockM;
  int m_first = 0, m_count = m_tiles_total;
  int cta_k_min = 0, cta_k_max = 0;  // also classify each query tile for the whole CTA
  if (!p.block_full) {
    // The redo pass (params.cuh BwdParams::redo): only the query tiles from the first row the
    // sm90 kernel left undone, if it left any (it marks CTAs of partly masked launches only, so
    // block_full launches never meet this).
    int first_undone_row = 0;
    if constexpr (kMode == kBwdRedo) {
      static_assert(64 % Tr::kBlockM == 0, "the sm90 kernel's 64-row tiles start on our tiles");
      first_undone_row = p.redo[(n_block * gridDim.y + b) * gridDim.x + h] - 1;
      if (first_undone_row < 0) return;  // CTA-uniform, before any barrier: nothing left
    }
    cta_k_min = __ldg(p.k_pos + n0);
    cta_k_max = __ldg(p.k_pos + n0 + keys_valid - 1);
    seeing_query_tiles<Tr::kBlockM, kMode == kBwdRedo>(p.q_pos, sq, cta_k_min, cta_k_max, lo, hi,
                                                       lane, m_first, m_count, first_undone_row);
  } else if constexpr (kMode == kBwdRedo) {
    return;
  }
  if (m_count == 0) return;  // CTA-uniform, before any barrier: nothing to add

  // ---- keys of this warp and of this thread
  const int warp_key0 = n0 + warp * Tr::kWarpKeys;  // global key index
  const int warp_keys = min(Tr::kWarpKeys, sk - warp_key0);  // <= 0: the warp is past Sk
  int warp_k_min = 0, warp_k_max = 0;
  if (warp_keys > 0) {
    warp_k_min = __ldg(p.k_pos + warp_key0);
    warp_k_max = __ldg(p.k_pos + warp_key0 + warp_keys - 1);
  }
  int k_pos_row[Tr::kKFrags][2];
#pragma unroll
  for (int kf = 0; kf < Tr::kKFrags; ++kf) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      k_pos_row[kf][r] = __ldg(p.k_pos + min(warp_key0 + kf * 16 + g + 8 * r, sk - 1));
    }
  }

  // ---- shared memory
  const u32 s_base = smem_addr(smem_raw);
  const u32 s_k = s_base + Tr::kOffK;
  const u32 s_v = s_base + Tr::kOffV;
  const u32 s_q0 = s_base + Tr::kOffQ;
  const u32 s_do0 = s_base + Tr::kOffDo;
  const u32 s_ds = s_base + Tr::kOffDs;
  float* lse_s = reinterpret_cast<float*>(smem_raw + Tr::kOffLse);
  float* delta_s = reinterpret_cast<float*>(smem_raw + Tr::kOffDelta);

  const u16* k_tile = p.k + b * p.k_batch_stride + hk * p.k_head_stride + n0 * p.k_row_stride;
  const u16* v_tile = p.v + b * p.v_batch_stride + hk * p.v_head_stride + n0 * p.v_row_stride;
  const u16* q_head = p.q + b * p.q_batch_stride + h * p.q_head_stride;
  const u16* do_head = p.dout + b * p.do_batch_stride + h * p.do_head_stride;
  const i64 bh = static_cast<i64>(b) * p.nheads + h;
  const float* lse_head = p.lse + bh * sq;
  const float* delta_head = p.delta + bh * sq;

  // Q, dO tiles by cp.async; lse (as log2, +inf where the row sees no key or is past Sq, so
  // P = 2^-inf = 0 there) and delta by plain loads and stores (visible after the next barrier).
  auto load_q_tile = [&](int tile, int stage) {
    const int m0 = (m_first + tile) * Tr::kBlockM;
    const int rows = min(Tr::kBlockM, sq - m0);
    bwd_load_tile<Tr, Tr::kBlockM>(s_q0 + stage * Tr::kQBytes, q_head + m0 * p.q_row_stride,
                                   p.q_row_stride, rows, d_chunks, tid);
    bwd_load_tile<Tr, Tr::kBlockM>(s_do0 + stage * Tr::kQBytes, do_head + m0 * p.do_row_stride,
                                   p.do_row_stride, rows, d_chunks, tid);
    for (int i = tid; i < Tr::kBlockM; i += Tr::kNThreads) {
      const int row = m0 + i;
      const float l = row < sq ? __ldg(lse_head + row) : neg_inf();
      lse_s[stage * Tr::kBlockM + i] = l == neg_inf() ? pos_inf() : l * kLog2e;
      if constexpr (kDoDk) delta_s[stage * Tr::kBlockM + i] = row < sq ? __ldg(delta_head + row) : 0.f;
    }
  };

  // prologue: K (and V) and the first query tile in commit group 0
  bwd_load_tile<Tr, Tr::kBlockN>(s_k, k_tile, p.k_row_stride, keys_valid, d_chunks, tid);
  if constexpr (kDoDk) {
    bwd_load_tile<Tr, Tr::kBlockN>(s_v, v_tile, p.v_row_stride, keys_valid, d_chunks, tid);
  }
  load_q_tile(0, 0);
  cp_async_commit();

  // ---- per-lane ldmatrix offsets (see fwd.cuh): lane_off reads 16-row slabs as
  // (rows 0-7, c0), (rows 8-15, c0), (rows 0-7, c1), (rows 8-15, c1): the A operand from a
  // row-major tile, or (.trans) the B operand from a row-major K x N tile. k_lane_off reads
  // (rows 0-7, c0), (rows 0-7, c1), (rows 8-15, c0), (rows 8-15, c1): the B operand from an
  // N x K tile (b0, b1 of n8 tile 0, then of n8 tile 1), or (.trans) the A operand from a
  // K x M tile -- which is how dQ reads dS from the [key][query] dS^T tile.
  u32 lane_off[4], k_lane_off[4];
  {
    const int row = lane & 15;
    const int x = (lane >> 4) ^ Tr::swizzle_key(row);
    const int krow = (lane & 7) | ((lane >> 4) << 3);
    const int kx = ((lane >> 3) & 1) ^ Tr::swizzle_key(krow);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      lane_off[i] = row * Tr::kRowBytes + (((2 * i) ^ x) << 4);
      k_lane_off[i] = krow * Tr::kRowBytes + (((2 * i) ^ kx) << 4);
    }
  }
  const u32 k_warp = s_k + warp * Tr::kWarpKeys * Tr::kRowBytes;
  const u32 v_warp = s_v + warp * Tr::kWarpKeys * Tr::kRowBytes;

  // dS^T stores: this thread's key rows (g, g+8 of each fragment), columns 2t of chunk c at
  // ds_row[kf] + ((c ^ ds_key) << 4) + 4t; rows g and g+8 share the swizzle key.
  const int ds_key = Tr::ds_key(g);
  const u32 ds_row = s_ds + (warp * Tr::kWarpKeys + g) * Tr::kSRowBytes + 4 * t;

  // dQ phase: this warp's m16 fragments (dS A operand via .trans, k_lane_off-style rows) and
  // 16-column pairs (K B operand via .trans, lane_off-style rows).
  const int dq_wm = warp % Tr::kDqWarpsM;
  const int dq_wn = warp / Tr::kDqWarpsM;
  u32 ds_a_off[Tr::kDqMFrags];
  {
    const int krow = (lane & 7) | ((lane >> 4) << 3);
#pragma unroll
    for (int mf = 0; mf < Tr::kDqMFrags; ++mf) {
      const int mq = dq_wm * Tr::kDqMFrags + mf;
      ds_a_off[mf] = s_ds + krow * Tr::kSRowBytes +
                     (((2 * mq + ((lane >> 3) & 1)) ^ Tr::ds_key(krow)) << 4);
    }
  }
  const int kb_row_off = (lane & 15) * Tr::kRowBytes;
  const int kb_x = (lane >> 4) ^ Tr::swizzle_key(lane & 15);

  constexpr int kDvFrags = kDoDv ? Tr::kKFrags : 1;
  constexpr int kDvTiles = kDoDv ? Tr::kDTiles : 1;
  constexpr int kDkFrags = kDoDk ? Tr::kKFrags : 1;
  constexpr int kDkTiles = kDoDk ? Tr::kDTiles : 1;
  float acc_dv[kDvFrags][kDvTiles][4];
  float acc_dk[kDkFrags][kDkTiles][4];
#pragma unroll
  for (int kf = 0; kf < kDvFrags; ++kf) {
#pragma unroll
    for (int j = 0; j < kDvTiles; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_dv[kf][j][e] = 0.f;
    }
  }
#pragma unroll
  for (int kf = 0; kf < kDkFrags; ++kf) {
#pragma unroll
    for (int j = 0; j < kDkTiles; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_dk[kf][j][e] = 0.f;
    }
  }

  const float scale_log2 = p.scale_log2;
  const float scale = p.scale;
  const int d = p.headdim;

  // Does the CTA's K hold a NaN or inf that a hidden pair's dQ product would meet? (K landed in
  // commit group 0.) Each thread checks its own copies; one extra barrier per CTA ORs them.
  bool k_bad = false;
  if constexpr (kDoDk) {
    if (!p.block_full) {  // CTA-uniform; a block_full launch hides no pair
      cp_async_wait<0>();
      k_bad = __syncthreads_or(bwd_own_chunks_nonfinite<Tr, Tr::kBlockN, kBf16>(s_k, tid));
    }
  }
  bool skipped_any = false;  // some tile was left to bwd_exact_tile (rare, CTA-uniform)
  bool do_zeroed = false;    // some dO tile had its NaN / inf replaced by 0 (rare, CTA-uniform)

  for (int it = 0; it < m_count; ++it) {
    const int m0 = (m_first + it) * Tr::kBlockM;
    const int rows = min(Tr::kBlockM, sq - m0);
    const int q_min = __ldg(p.q_pos + m0);
    const int q_max = __ldg(p.q_pos + m0 + rows - 1);
    const int stage = it & 1;
    const u32 s_q = s_q0 + stage * Tr::kQBytes;
    const u32 s_do = s_do0 + stage * Tr::kQBytes;

    cp_async_wait<0>();  // tile `it` (and K, V) landed for this thread...
    // A tile some key of the CTA sees only in part: may its dO (for dV) or Q (for dK), or K (for
    // dQ), hold a NaN or inf that a hidden pair would meet? Each thread checks its own copies;
    // the barrier ORs them. A NaN or inf in Q or K sends the tile to bwd_exact_tile after the
    // loop; one in dO alone is replaced by 0 here (before any product reads it) and dV adds it
    // back after the loop, which is cheap and exact enough for dO (README, Numerics): an fp16
    // loss scale that overflows puts inf in many dO rows at once.
    const bool partial = !p.block_full && classify_tile(q_min, q_max, cta_k_min, cta_k_max, lo,
                                                        hi) != kTileFull;
    bool own_q = false, own_do = false;
    if (partial) {
      if constexpr (kDoDv) own_do = bwd_own_chunks_nonfinite<Tr, Tr::kBlockM, kBf16>(s_do, tid);
      if constexpr (kDoDk) {
        own_q = bwd_own_chunks_nonfinite<Tr, Tr::kBlockM, kBf16>(s_q, tid);
      }
    }
    // K's NaN / inf: the partial tile's dQ stores are dropped (below), bwd_exact_tile adds dQ
    const bool drop_dq = partial && k_bad;
    skipped_any = drop_dq || skipped_any;
    if (__syncthreads_or(own_q || own_do)) {  // ...for all; the previous stage and dS are free
      if (__syncthreads_or(own_q)) {
        // Q's NaN / inf: the tile must add nothing here (bwd_exact_tile adds it all). With its
        // lse +inf every P is exactly 0, so is every dS, and with Q's and dO's non-finite
        // values 0 every product is 0 (dQ's too: K is finite, or drop_dq drops it).
        if constexpr (kDoDv) bwd_own_chunks_nonfinite<Tr, Tr::kBlockM, kBf16, true>(s_do, tid);
        bwd_own_chunks_nonfinite<Tr, Tr::kBlockM, kBf16, true>(s_q, tid);
        for (int i = tid; i < Tr::kBlockM; i += Tr::kNThreads) {
          lse_s[stage * Tr::kBlockM + i] = pos_inf();
        }
        skipped_any = true;
      } else {  // dO alone: its values are added back after the loop (zeroing dO once before
                // this if/else reads simpler but spills d=96 on sm_90a)
        if constexpr (kDoDv) bwd_own_chunks_nonfinite<Tr, Tr::kBlockM, kBf16, true>(s_do, tid);
        do_zeroed = true;
      }
      __syncthreads();  // the zeros are in place for every warp
    }
    if (it + 1 < m_count) load_q_tile(it + 1, (it + 1) & 1);
    cp_async_commit();

    int kind = p.block_full ? kTileFull
                            : classify_tile(q_min, q_max, warp_k_min, warp_k_max, lo, hi);
    if (warp_keys < Tr::kWarpKeys && kind == kTileFull) kind = kTilePartial;  // Sk tail
    if (warp_keys <= 0) kind = kTileEmpty;

    const float* lse_t = lse_s + stage * Tr::kBlockM;
    const float* delta_t = delta_s + stage * Tr::kBlockM;

    if (kind != kTileEmpty) {  // warp-uniform
      // ---- S^T = K Q^T, then P^T in place
      float acc_s[Tr::kKFrags][Tr::kQTiles][4];
      gemm_keys_by_queries<Tr, kBf16>(acc_s, k_warp, s_q, lane_off, k_lane_off);
      if (kind == kTilePartial) {
        apply_mask_bwd<Tr>(acc_s, k_pos_row, warp_key0, p.q_pos, m0, sq, sk, lo, hi, lane);
      }
#pragma unroll
      for (int j = 0; j < Tr::kQTiles; ++j) {
        const float2 l = *reinterpret_cast<const float2*>(lse_t + 8 * j + 2 * t);
#pragma unroll
        for (int kf = 0; kf < Tr::kKFrags; ++kf) {
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            // a hidden pair (-inf) is exactly 0, also next to a NaN lse (a NaN row must not
            // reach the keys it does not see)
            const float s0 = acc_s[kf][j][2 * r], s1 = acc_s[kf][j][2 * r + 1];
            acc_s[kf][j][2 * r] = s0 == neg_inf() ? 0.f : exp2_approx(fmaf(s0, scale_log2, -l.x));
            acc_s[kf][j][2 * r + 1] =
                s1 == neg_inf() ? 0.f : exp2_approx(fmaf(s1, scale_log2, -l.y));
          }
        }
      }

      // ---- dV += P^T dO
      if constexpr (kDoDv) {
#pragma unroll
        for (int kk = 0; kk < Tr::kQSteps; ++kk) {
          u32 a[Tr::kKFrags][4];
          pack_a<Tr, kBf16>(a, acc_s, kk);
          gemm_acc_d<Tr, kBf16>(acc_dv, a, s_do, kk, lane_off);
        }
      }

      if constexpr (kDoDk) {
        // ---- dP^T = V dO^T; dS^T = P^T (dP^T - delta) in place
        float acc_dp[Tr::kKFrags][Tr::kQTiles][4];
        gemm_keys_by_queries<Tr, kBf16>(acc_dp, v_warp, s_do, lane_off, k_lane_off);
#pragma unroll
        for (int j = 0; j < Tr::kQTiles; ++j) {
          const float2 dl = *reinterpret_cast<const float2*>(delta_t + 8 * j + 2 * t);
#pragma unroll
          for (int kf = 0; kf < Tr::kKFrags; ++kf) {
#pragma unroll
            for (int r = 0; r < 2; ++r) {
              // P == 0 (a hidden pair) gives dS = 0 even when dP or delta is NaN: a NaN row or
              // a hidden NaN value must not reach the gradients of pairs that never met
              const float p0 = acc_s[kf][j][2 * r], p1 = acc_s[kf][j][2 * r + 1];
              acc_dp[kf][j][2 * r] = p0 == 0.f ? 0.f : p0 * (acc_dp[kf][j][2 * r] - dl.x);
              acc_dp[kf][j][2 * r + 1] = p1 == 0.f ? 0.f : p1 * (acc_dp[kf][j][2 * r + 1] - dl.y);
            }
          }
        }
        // ---- dS^T to shared memory (for dQ) and dK += dS^T Q
#pragma unroll
        for (int kk = 0; kk < Tr::kQSteps; ++kk) {
          u32 a[Tr::kKFrags][4];
          pack_a<Tr, kBf16>(a, acc_dp, kk);
#pragma unroll
          for (int kf = 0; kf < Tr::kKFrags; ++kf) {
            const u32 row = ds_row + kf * 16 * Tr::kSRowBytes;
            const u32 c0 = static_cast<u32>(((2 * kk) ^ ds_key) << 4);
            const u32 c1 = static_cast<u32>(((2 * kk + 1) ^ ds_key) << 4);
            st_shared_u32(row + c0, a[kf][0]);
            st_shared_u32(row + 8 * Tr::kSRowBytes + c0, a[kf][1]);
            st_shared_u32(row + c1, a[kf][2]);
            st_shared_u32(row + 8 * Tr::kSRowBytes + c1, a[kf][3]);
          }
          gemm_acc_d<Tr, kBf16>(acc_dk, a, s_q, kk, lane_off);
        }
      }
    } else if constexpr (kDoDk) {
      // nothing visible to this warp's keys: its dS^T rows are zero for the dQ product
#pragma unroll
      for (int kk = 0; kk < Tr::kQSteps; ++kk) {
#pragma unroll
        for (int kf = 0; kf < Tr::kKFrags; ++kf) {
          const u32 row = ds_row + kf * 16 * Tr::kSRowBytes;
          const u32 c0 = static_cast<u32>(((2 * kk) ^ ds_key) << 4);
          const u32 c1 = static_cast<u32>(((2 * kk + 1) ^ ds_key) << 4);
          st_shared_u32(row + c0, 0u);
          st_shared_u32(row + 8 * Tr::kSRowBytes + c0, 0u);
          st_shared_u32(row + c1, 0u);
          st_shared_u32(row + 8 * Tr::kSRowBytes + c1, 0u);
        }
      }
    }

    if constexpr (kDoDk) {
      // ---- dQ (this tile's kBlockM queries) += scale * dS K, split over the warps
      __syncthreads();  // every warp's dS^T rows are in shared memory
#pragma unroll
      for (int c0 = 0; c0 < Tr::kDqPairs; c0 += Tr::kDqChunkPairs) {
        constexpr int kChunk = Tr::kDqChunkPairs;
        const int npairs = min(kChunk, Tr::kDqPairs - c0);  // compile-time after unrolling
        u32 kb_off[kChunk];
#pragma unroll
        for (int pp = 0; pp < kChunk; ++pp) {
          const int dd = dq_wn * Tr::kDqPairs + c0 + pp;
          kb_off[pp] = s_k + kb_row_off + (((2 * dd) ^ kb_x) << 4);
        }
        float acc_dq[Tr::kDqMFrags][2 * kChunk][4];
#pragma unroll
        for (int mf = 0; mf < Tr::kDqMFrags; ++mf) {
#pragma unroll
          for (int j = 0; j < 2 * kChunk; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) acc_dq[mf][j][e] = 0.f;
          }
        }
#pragma unroll
        for (int kk = 0; kk < Tr::kNSteps; ++kk) {
          u32 a[Tr::kDqMFrags][4];
#pragma unroll
          for (int mf = 0; mf < Tr::kDqMFrags; ++mf) {
            ldmatrix_x4_trans(a[mf], ds_a_off[mf] + kk * 16 * Tr::kSRowBytes);
          }
#pragma unroll
          for (int pp = 0; pp < kChunk; ++pp) {
            if (pp < npairs) {
              u32 bk[4];
              ldmatrix_x4_trans(bk, kb_off[pp] + kk * 16 * Tr::kRowBytes);
#pragma unroll
              for (int mf = 0; mf < Tr::kDqMFrags; ++mf) {
                mma_16816<kBf16>(acc_dq[mf][2 * pp], a[mf], bk[0], bk[1]);
                mma_16816<kBf16>(acc_dq[mf][2 * pp + 1], a[mf], bk[2], bk[3]);
              }
            }
          }
        }
#pragma unroll
        for (int mf = 0; mf < Tr::kDqMFrags; ++mf) {
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const int row = m0 + (dq_wm * Tr::kDqMFrags + mf) * 16 + g + 8 * r;
            if (row >= sq || drop_dq) continue;
            float* dq_row = p.dq + ((static_cast<i64>(b) * sq + row) * p.nheads + h) * d;
#pragma unroll
            for (int pp = 0; pp < kChunk; ++pp) {
              if (pp < npairs) {
#pragma unroll
                for (int half = 0; half < 2; ++half) {
                  const int col = 16 * (dq_wn * Tr::kDqPairs + c0 + pp) + 8 * half + 2 * t;
                  if (col < d) {
                    // the redo pass adds into the sm90 backward's dq tiles (a pair stays a pair)
                    float* at = kMode == kBwdRedo ? p.dq + DqTiles(p).element(b, h, row, col)
                                                  : dq_row + col;
                    red_add_f32x2(at, acc_dq[mf][2 * pp + half][2 * r] * scale,
                                  acc_dq[mf][2 * pp + half][2 * r + 1] * scale);
                  }
                }
              }
            }
          }
        }
      }
    }
  }

  // ---- epilogue: add this CTA's dK (times scale) and dV into the float32 accumulators
  const i64 kv_row_stride = static_cast<i64>(p.nheads_kv) * d;
  const i64 kv_base = (static_cast<i64>(b) * sk * p.nheads_kv + hk) * d;
  if constexpr (kDoDv) {
    red_add_key_rows<Tr>(p.dv + kv_base, kv_row_stride, acc_dv, 1.f, warp_key0, sk, d, lane);
  }
  if constexpr (kDoDk) {
    red_add_key_rows<Tr>(p.dk + kv_base, kv_row_stride, acc_dk, scale, warp_key0, sk, d, lane);
  }

  // Query tile `it` of the CTA's range: its first row, its rows, and whether some key of the CTA
  // sees it only in part (the only tiles the rare paths below touch).
  const auto partial_tile = [&](int it, int& m0, int& rows) {
    m0 = (m_first + it) * Tr::kBlockM;
    rows = min(Tr::kBlockM, sq - m0);
    return classify_tile(__ldg(p.q_pos + m0), __ldg(p.q_pos + m0 + rows - 1), cta_k_min,
                         cta_k_max, lo, hi) != kTileFull;
  };

  // Rare: some dO tile had its NaN / inf zeroed. Each key row now adds the non-finite dO values
  // of the queries it sees, in every tile the CTA sees in part (only those were ever zeroed),
  // gathered in the dV registers (free again) and added to dv like the rest. Adding a
  // non-finite value a sum already holds changes nothing (inf + inf, NaN + x), so tiles that
  // kept their values (or went to bwd_exact_tile) may be walked again.
  if constexpr (kDoDv) {
    if (do_zeroed && warp_keys > 0) {  // warp-uniform
#pragma unroll
      for (int kf = 0; kf < Tr::kKFrags; ++kf) {
#pragma unroll
        for (int j = 0; j < Tr::kDTiles; ++j) {
#pragma unroll
          for (int e = 0; e < 4; ++e) acc_dv[kf][j][e] = 0.f;
        }
      }
#pragma unroll 1
      for (int it = 0; it < m_count; ++it) {
        int m0, rows;
        if (!partial_tile(it, m0, rows)) continue;
        const auto sees_query = [&](int f, int r, int i) {  // key row (f, r) sees query i
          const int gap = k_pos_row[f][r] - __ldg(p.q_pos + m0 + i);
          return gap >= lo && gap <= hi;
        };
        add_nonfinite_values<kBf16, Tr::kKFrags, Tr::kDTiles, Tr::kBlockM>(
            acc_dv, sees_query, do_head + m0 * p.do_row_stride, p.do_row_stride, rows, d, lane);
      }
      red_add_key_rows<Tr>(p.dv + kv_base, kv_row_stride, acc_dv, 1.f, warp_key0, sk, d, lane);
    }
  }

  // Rare: the tiles the loop left out (a NaN or inf in Q: all of it; in K: its dQ), found again
  // exactly as it found them (same copies, same checks), then computed pair by pair.
  if (kDoDk && skipped_any) {  // CTA-uniform
    cp_async_wait<0>();
    __syncthreads();  // every warp is past the loop: shared memory is free
#pragma unroll 1
    for (int it = 0; it < m_count; ++it) {
      int m0, rows;
      if (!partial_tile(it, m0, rows)) continue;
      bwd_load_tile<Tr, Tr::kBlockM>(s_q0, q_head + m0 * p.q_row_stride, p.q_row_stride, rows,
                                     d_chunks, tid);
      cp_async_commit();
      cp_async_wait<0>();
      const bool own_q = bwd_own_chunks_nonfinite<Tr, Tr::kBlockM, kBf16>(s_q0, tid);
      const bool q_bad = __syncthreads_or(own_q);
      if (q_bad || k_bad) {  // the whole tile, or (K alone) its dQ
        bwd_exact_tile<Tr, kBf16, kMode>(p, reinterpret_cast<float*>(smem_raw), b, h, hk, n0,
                                         keys_valid, m0, rows, !q_bad, tid);
      }
    }
  }
}

// D = rowsum(dO * O) in float32, one warp per (batch, query, head) row; inputs fp16/bf16 with
// element strides (last axis contiguous, rows 16-byte aligned: headdim % 8 == 0).
template <bool kBf16>
__device__ __forceinline__ void bwd_delta_rows(const u16* __restrict__ dout,
                                               const u16* __restrict__ out,
                                               float* __restrict__ delta, i64 do_bs, i64 do_rs,
                                               i64 do_hs, i64 o_bs, i64 o_rs, i64 o_hs, int batch,
                                               int seqlen, int nheads, int headdim) {
  const int lane = threadIdx.x & 31;
  const i64 warps = static_cast<i64>(gridDim.x) * (blockDim.x >> 5);
  const i64 n_rows = static_cast<i64>(batch) * seqlen * nheads;
  for (i64 r = static_cast<i64>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5); r < n_rows;
       r += warps) {
    const int h = static_cast<int>(r % nheads);
    const i64 bs = r / nheads;
    const int s = static_cast<int>(bs % seqlen);
    const int b = static_cast<int>(bs / seqlen);
    const u16* x = dout + b * do_bs + s * do_rs + h * do_hs;
    const u16* y = out + b * o_bs + s * o_rs + h * o_hs;
    float sum = 0.f;
    for (int c = lane * 8; c < headdim; c += 32 * 8) {
      sum = fma_chunk<kBf16>(*reinterpret_cast<const uint4*>(x + c),
                             *reinterpret_cast<const uint4*>(y + c), sum);
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    if (lane == 0) delta[(static_cast<i64>(b) * nheads + h) * seqlen + s] = sum;
  }
}

}  // namespace cuparing
