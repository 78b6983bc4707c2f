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
// NaN / inf (common/nonfinite.cuh): a hidden pair has P = dS = 0, but the products dV += P^T dO,
// dK += dS^T Q and dQ += dS K still form 0 * x, which is NaN for a non-finite dO, Q or K row the
// pair never meets. On query tiles the mask does not leave whole for the CTA, each thread checks
// the Q / dO chunks it copied and the loop's first barrier ORs the answer (K: once per CTA, one
// extra barrier). Only then are they replaced by 0 in shared memory, before any product reads
// them, so the products' code is unchanged: dO's NaN and inf, Q's and K's NaN only. Exact: a row
// that meets a NaN in Q or K had a NaN logit in the forward, so its LSE is NaN and its P and dS
// stay NaN whatever the recomputed scores; a non-finite dO row leaves its delta non-finite, so
// dS stays non-finite (an infinite dO element can turn dense attention's NaN into an inf there).
// dV adds back, after the loop, the non-finite dO values each key sees. An infinite Q or K
// element cannot be zeroed so: it gives some rows a -inf logit, which hides the key from them,
// and a zeroed operand would turn that into a finite score. So a hidden *infinite* Q or K element
// still meets its zero dS in the dK or dQ product: the gap left (PERF.md, non-finite values);
// and a row holding both a NaN and an inf can lose its NaN score there (best effort).
#pragma once
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
template <class Tr, int kRows, bool kBf16, bool kZero, bool kNanOnly = false>
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
    bad |= kZero ? zero_nonfinite_chunk<kBf16, kNanOnly>(addr) : chunk_nonfinite<kBf16>(addr);
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
    cta_k_min = __ldg(p.k_pos + n0);
    cta_k_max = __ldg(p.k_pos + n0 + keys_valid - 1);
    seeing_query_tiles<Tr::kBlockM>(p.q_pos, sq, cta_k_min, cta_k_max, lo, hi, lane, m_first,
                                    m_count);
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

  // May K hold a NaN that a hidden pair's dQ product would meet? (K landed in commit group 0.)
  // Each thread checks its own copies, one extra barrier per CTA ORs them; only then its NaN
  // (not inf: see the header) become 0, exactly: every row that sees a NaN key had a NaN logit,
  // so its LSE is NaN and its P and dS stay NaN whatever the score.
  if constexpr (kDoDk) {
    if (!p.block_full) {  // CTA-uniform; a block_full launch hides no pair
      cp_async_wait<0>();
      if (__syncthreads_or(bwd_own_chunks_nonfinite<Tr, Tr::kBlockN, kBf16, false>(s_k, tid))) {
        bwd_own_chunks_nonfinite<Tr, Tr::kBlockN, kBf16, true, true>(s_k, tid);
        // the next barrier (the loop's) orders the zeros before any read
      }
    }
  }
  bool do_zeroed = false;  // some dO tile had its NaN / inf replaced by 0 (rare)

  for (int it = 0; it < m_count; ++it) {
    const int m0 = (m_first + it) * Tr::kBlockM;
    const int rows = min(Tr::kBlockM, sq - m0);
    const int q_min = __ldg(p.q_pos + m0);
    const int q_max = __ldg(p.q_pos + m0 + rows - 1);
    const int stage = it & 1;
    const u32 s_q = s_q0 + stage * Tr::kQBytes;
    const u32 s_do = s_do0 + stage * Tr::kQBytes;

    cp_async_wait<0>();  // tile `it` (and K, V) landed for this thread...
    // A tile some key of the CTA sees only in part: may its dO (for dV) or Q (for dK, dQ) hold
    // a NaN or inf that a hidden pair would meet? Each thread checks its own copies; the barrier
    // ORs them. Only then they become 0 (rare, CTA-uniform), before any product reads them.
    bool own_bad = false;
    if (!p.block_full && classify_tile(q_min, q_max, cta_k_min, cta_k_max, lo, hi) != kTileFull) {
      if constexpr (kDoDv) {
        own_bad = bwd_own_chunks_nonfinite<Tr, Tr::kBlockM, kBf16, false>(s_do, tid);
      }
      if constexpr (kDoDk) {
        own_bad = bwd_own_chunks_nonfinite<Tr, Tr::kBlockM, kBf16, false>(s_q, tid) || own_bad;
      }
    }
    if (__syncthreads_or(own_bad)) {  // ...for all; the previous stage and dS are free again
      bool own_do = false;
      if constexpr (kDoDv) own_do = bwd_own_chunks_nonfinite<Tr, Tr::kBlockM, kBf16, true>(s_do, tid);
      if constexpr (kDoDk) bwd_own_chunks_nonfinite<Tr, Tr::kBlockM, kBf16, true, true>(s_q, tid);
      // the zeros are in place for every warp; did dO (whose values dV adds back) hold any?
      do_zeroed = __syncthreads_or(own_do) || do_zeroed;
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
            if (row >= sq) continue;
            float* dq_row = p.dq + ((static_cast<i64>(b) * sq + row) * p.nheads + h) * d;
#pragma unroll
            for (int pp = 0; pp < kChunk; ++pp) {
              if (pp < npairs) {
#pragma unroll
                for (int half = 0; half < 2; ++half) {
                  const int col = 16 * (dq_wn * Tr::kDqPairs + c0 + pp) + 8 * half + 2 * t;
                  if (col < d) {
                    red_add_f32x2(dq_row + col, acc_dq[mf][2 * pp + half][2 * r] * scale,
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

  // Rare: some dO tile had its NaN / inf zeroed. Each key row now adds the non-finite dO values
  // of the queries it sees, in every tile the CTA sees in part (only those were ever zeroed),
  // gathered in the dV registers (free again) and added to dv like the rest. Adding a
  // non-finite value a sum already holds changes nothing (inf + inf, NaN + x), so tiles that
  // kept their values may be walked again; done once, after everything else.
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
        const int m0 = (m_first + it) * Tr::kBlockM;
        const int rows = min(Tr::kBlockM, sq - m0);
        if (classify_tile(__ldg(p.q_pos + m0), __ldg(p.q_pos + m0 + rows - 1), cta_k_min,
                          cta_k_max, lo, hi) == kTileFull) {
          continue;
        }
        const auto sees_query = [&](int f, int r, int i) {  // key row (f, r) sees query i
          const int delta = k_pos_row[f][r] - __ldg(p.q_pos + m0 + i);
          return delta >= lo && delta <= hi;
        };
        add_nonfinite_values<kBf16, Tr::kKFrags, Tr::kDTiles, Tr::kBlockM>(
            acc_dv, sees_query, do_head + m0 * p.do_row_stride, p.do_row_stride, rows, d, lane);
      }
      red_add_key_rows<Tr>(p.dv + kv_base, kv_row_stride, acc_dv, 1.f, warp_key0, sk, d, lane);
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
      const uint4 xv = *reinterpret_cast<const uint4*>(x + c);
      const uint4 yv = *reinterpret_cast<const uint4*>(y + c);
      const u32 xs[4] = {xv.x, xv.y, xv.z, xv.w};
      const u32 ys[4] = {yv.x, yv.y, yv.z, yv.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        sum = fmaf(from_half_bits<kBf16>(static_cast<u16>(xs[i] & 0xffffu)),
                   from_half_bits<kBf16>(static_cast<u16>(ys[i] & 0xffffu)), sum);
        sum = fmaf(from_half_bits<kBf16>(static_cast<u16>(xs[i] >> 16)),
                   from_half_bits<kBf16>(static_cast<u16>(ys[i] >> 16)), sum);
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    if (lane == 0) delta[(static_cast<i64>(b) * nheads + h) * seqlen + s] = sum;
  }
}

}  // namespace cuparing
