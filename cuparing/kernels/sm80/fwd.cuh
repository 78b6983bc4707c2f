// Forward attention for one (query tile, head, batch): FlashAttention-2 structure on mma.sync.
//
// CTA = kNWarps warps over a (kBlockM, kHeadDim) query tile; warp w owns kMFrags m16 fragments
// of it. Per key tile (kBlockN keys):
//   S = Q K^T        (kBlockM, kBlockN) fp32 accumulators, ldmatrix.x4 from swizzled smem
//   mask             only for PARTIAL tiles (per-warp classification) and the Sk tail
//   online softmax   exp2 with scale*log2(e) folded in, running max/sum in registers
//   O += P V         P converted straight from the S accumulator layout into A fragments
//                    (never touches shared memory); V B-fragments by ldmatrix.x4.trans
// NaN / inf in V (common/nonfinite.cuh): on tiles the mask does not leave whole for the CTA,
// each thread checks the V chunks it copied and the loop's barrier ORs the answer; only if one
// is found, they become 0 in shared memory, and after the loop each row adds back the ones it sees.
// K/V tiles stream through kStages shared-memory stages with 16-byte cp.async.cg, so the copy of
// tile i+kStages-1 overlaps the math of tile i; one __syncthreads per tile.
// The epilogue normalises, then writes (out, lse) in the input dtype, or writes / merges the
// float32 running result of the ring (OutMode) with lse = max + log(exp(a-max) + exp(b-max)).
#pragma once
#include "../common/mask.cuh"
#include "../common/nonfinite.cuh"
#include "../common/params.cuh"
#include "../common/ptx.cuh"
#include "../common/softmax.cuh"
#include "../common/epilogue.cuh"
#include "traits.cuh"

namespace cuparing {

// Copy rows [0, rows_valid) x chunks [0, d_chunks) of a (kRows, kHeadDim) tile from global memory
// (row stride in elements, last axis contiguous) into swizzled shared memory; everything else
// in the tile is zero-filled, so padded keys, queries and head-dim columns contribute exactly 0.
//
// Thread tid always copies chunk tid % kLoadChunks of rows tid / kLoadChunks + i * kRowStep.
// kRowStep is a multiple of 8, so the thread's swizzle key never changes and every copy is
// (per-thread base) + (compile-time offset): no per-chunk 64-bit address math for ptxas to hoist
// into registers across the main loop.
template <class Tr, int kRows>
__device__ __forceinline__ void load_tile(u32 smem, const u16* __restrict__ gmem, i64 row_stride,
                                          int rows_valid, int d_chunks, int tid) {
  constexpr int kRowStep = Tr::kNThreads / Tr::kLoadChunks;
  static_assert(kRows % kRowStep == 0, "whole row groups per tile");
  const int chunk = tid % Tr::kLoadChunks;
  const int row0 = tid / Tr::kLoadChunks;
  if (Tr::kLoadChunks != Tr::kChunks && chunk >= Tr::kChunks) return;  // beyond the row
  const bool chunk_ok = chunk < d_chunks;
  const u32 dst = smem + Tr::offset(row0, chunk);
  const u16* src = gmem + row0 * row_stride + chunk * 8;
  const i64 src_step = kRowStep * row_stride;
#pragma unroll
  for (int i = 0; i < kRows / kRowStep; ++i) {
    const bool ok = chunk_ok && row0 + i * kRowStep < rows_valid;
    // a masked-off copy reads 0 bytes (ptxas turns it into a zero-filling predicated LDGSTS)
    cp_async_16(dst + i * kRowStep * Tr::kRowBytes, src + i * src_step, ok ? 16 : 0);
  }
}

// Whether the chunks this thread copied with load_tile (same assignment) into a (kRows,
// kHeadDim) tile hold a NaN or inf; with kZero, those values are also replaced by 0 in place.
// Valid once the thread's own copies have landed (cp.async.wait_group); zero-filled chunks are
// finite.
template <class Tr, int kRows, bool kBf16, bool kZero>
__device__ __forceinline__ bool own_chunks_nonfinite(u32 smem, int tid) {
  constexpr int kRowStep = Tr::kNThreads / Tr::kLoadChunks;
  const int chunk = tid % Tr::kLoadChunks;
  if (Tr::kLoadChunks != Tr::kChunks && chunk >= Tr::kChunks) return false;
  const u32 base = smem + Tr::offset(tid / Tr::kLoadChunks, chunk);
  u32 bad = 0;
#pragma unroll
  for (int i = 0; i < kRows / kRowStep; ++i) {
    const u32 addr = base + i * kRowStep * Tr::kRowBytes;
    bad |= kZero ? zero_nonfinite_chunk<kBf16>(addr) : chunk_nonfinite<kBf16>(addr);
  }
  return bad != 0;
}

// O += P V for one key tile: the S accumulator of n8 tiles (2kk, 2kk+1) is exactly the A
// fragment of k16 step kk (rows g / g+8, columns 2t.. and 2t+8..), so P never leaves registers.
template <class Tr, bool kBf16>
__device__ __forceinline__ void pv_tile(float (&acc_o)[Tr::kMFrags][Tr::kDTiles][4],
                                        const float (&acc_s)[Tr::kMFrags][Tr::kNTiles][4],
                                        u32 s_v, const u32 (&lane_off)[4]) {
#pragma unroll
  for (int kk = 0; kk < Tr::kNTiles / 2; ++kk) {
    u32 a[Tr::kMFrags][4];
#pragma unroll
    for (int mf = 0; mf < Tr::kMFrags; ++mf) {
      a[mf][0] = pack2<kBf16>(acc_s[mf][2 * kk][0], acc_s[mf][2 * kk][1]);
      a[mf][1] = pack2<kBf16>(acc_s[mf][2 * kk][2], acc_s[mf][2 * kk][3]);
      a[mf][2] = pack2<kBf16>(acc_s[mf][2 * kk + 1][0], acc_s[mf][2 * kk + 1][1]);
      a[mf][3] = pack2<kBf16>(acc_s[mf][2 * kk + 1][2], acc_s[mf][2 * kk + 1][3]);
    }
#pragma unroll
    for (int dd = 0; dd < Tr::kDTiles / 2; ++dd) {
      u32 bv[4];
      ldmatrix_x4_trans(bv, s_v + lane_off[dd & 3] + kk * 16 * Tr::kRowBytes + ((dd >> 2) << 7));
#pragma unroll
      for (int mf = 0; mf < Tr::kMFrags; ++mf) {
        mma_16816<kBf16>(acc_o[mf][2 * dd], a[mf], bv[0], bv[1]);
        mma_16816<kBf16>(acc_o[mf][2 * dd + 1], a[mf], bv[2], bv[3]);
      }
    }
  }
}

template <class Tr, bool kBf16>
__device__ __forceinline__ void fwd_block(const FwdParams& p) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int g = lane >> 2;  // row within an m16 fragment (and +8)
  const int t = lane & 3;   // column pair within an n8 tile

  // heaviest query tiles first: under causal masks later positions see more keys
  const int m_block = gridDim.z - 1 - blockIdx.z;
  const int h = blockIdx.x;
  const int b = blockIdx.y;
  const int hk = h / (p.nheads / p.nheads_kv);
  const int sq = p.seqlen_q;
  const int sk = p.seqlen_k;
  const int m0 = m_block * Tr::kBlockM;
  const int rows_valid = min(Tr::kBlockM, sq - m0);
  const int d_chunks = p.headdim >> 3;
  const int lo = p.lo, hi = p.hi;

  // ---- which key tiles can any query of this CTA see? (a contiguous range, see mask.cuh)
  const int n_tiles_total = (sk + Tr::kBlockN - 1) / Tr::kBlockN;
  int n_first = 0, n_count = n_tiles_total;
  int cta_q_min = 0, cta_q_max = 0;
  if (!p.block_full) {
    cta_q_min = __ldg(p.q_pos + m0);
    cta_q_max = __ldg(p.q_pos + m0 + rows_valid - 1);
    visible_key_tiles<Tr::kBlockN>(p.k_pos, sk, cta_q_min, cta_q_max, lo, hi, lane, n_first,
                                   n_count);
  }

  // ---- rows of this warp and of this thread
  const int warp_row0 = m0 + warp * Tr::kRowsPerWarp;  // global query index
  const bool warp_has_rows = warp_row0 < sq;
  int warp_q_min = 0, warp_q_max = 0;
  int q_pos_row[Tr::kMFrags][2];  // positions of this thread's rows (clamped past the end)
  if (warp_has_rows) {
    warp_q_min = __ldg(p.q_pos + warp_row0);
    warp_q_max = __ldg(p.q_pos + min(warp_row0 + Tr::kRowsPerWarp, sq) - 1);
  }
#pragma unroll
  for (int mf = 0; mf < Tr::kMFrags; ++mf) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      q_pos_row[mf][r] = __ldg(p.q_pos + min(warp_row0 + mf * 16 + g + 8 * r, sq - 1));
    }
  }

  float acc_o[Tr::kMFrags][Tr::kDTiles][4];  // (16*kMFrags, kHeadDim) per warp, fp32
  float row_max[Tr::kMFrags][2];
  float row_sum[Tr::kMFrags][2];
#pragma unroll
  for (int mf = 0; mf < Tr::kMFrags; ++mf) {
#pragma unroll
    for (int j = 0; j < Tr::kDTiles; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_o[mf][j][e] = 0.f;
    }
    row_max[mf][0] = row_max[mf][1] = neg_inf();
    row_sum[mf][0] = row_sum[mf][1] = 0.f;
  }

  if (n_count > 0) {
    const u32 s_q = smem_addr(smem_raw);
    const u32 s_kv = s_q + Tr::kQBytes;
    const u16* q_tile = p.q + b * p.q_batch_stride + h * p.q_head_stride + m0 * p.q_row_stride;
    const u16* k_head = p.k + b * p.k_batch_stride + hk * p.k_head_stride;
    const u16* v_head = p.v + b * p.v_batch_stride + hk * p.v_head_stride;

    auto load_kv = [&](int tile, int stage) {
      const int n0 = (n_first + tile) * Tr::kBlockN;
      const int keys = min(Tr::kBlockN, sk - n0);
      const u32 s_k = s_kv + stage * Tr::kStageBytes;
      load_tile<Tr, Tr::kBlockN>(s_k, k_head + n0 * p.k_row_stride, p.k_row_stride, keys,
                                 d_chunks, tid);
      load_tile<Tr, Tr::kBlockN>(s_k + Tr::kKVBytes, v_head + n0 * p.v_row_stride,
                                 p.v_row_stride, keys, d_chunks, tid);
    };

    // prologue: Q and the first kStages-1 key tiles, one commit group per tile (Q rides in 0)
    load_tile<Tr, Tr::kBlockM>(s_q, q_tile, p.q_row_stride, rows_valid, d_chunks, tid);
#pragma unroll
    for (int s = 0; s < Tr::kStages - 1; ++s) {
      if (s < n_count) load_kv(s, s);
      cp_async_commit();
    }

    // One per-lane ldmatrix mapping serves Q and V (K has its own, below): lane l addresses row (l & 15) of a 16-row
    // slab at chunk 2*step + (l >> 4), so the four 8x8 matrices are
    //   (rows 0-7, c0), (rows 8-15, c0), (rows 0-7, c1), (rows 8-15, c1).
    // For Q (A operand, rows = queries) that is a0..a3 as mma wants them; for K (rows = keys, non-
    // transposed) it is b0(keys 0-7), b0(keys 8-15), b1(keys 0-7), b1(keys 8-15); for V (.trans,
    // rows = keys, chunks = d) it is b0(d 0-7), b1(d 0-7), b0(d 8-15), b1(d 8-15).
    // Slabs start at multiples of 8 rows, so the lane's swizzle key x (0..7) is fixed, and
    //   (2*step + c) ^ x = 8*(step/4) + ((2*(step%4)) ^ (c ^ x)):
    // four per-lane offsets plus compile-time immediates cover every step, instead of one live
    // address register per (operand, step) -- which is what pushed d=128 into spills.
    u32 lane_off[4];
    {
      const int row = lane & 15;
      const int x = (lane >> 4) ^ Tr::swizzle_key(row);
#pragma unroll
      for (int i = 0; i < 4; ++i) lane_off[i] = row * Tr::kRowBytes + (((2 * i) ^ x) << 4);
    }
    // K gets its own mapping so ldmatrix returns each n8 tile's (b0, b1) in adjacent registers,
    // the pair mma.sync takes: lane l reads key row (l & 7) + 8 * (l >> 4), chunk 2*step +
    // ((l >> 3) & 1), i.e. matrices (keys 0-7, c0), (keys 0-7, c1), (keys 8-15, c0), (keys
    // 8-15, c1). With the Q mapping the pairs were (r0, r2) and (r1, r3), and ptxas spent two
    // register moves per K fragment to pair them (SASS, d=128, 128x32: 125 moves per tile, now 10).
    // Same row % 8, hence the same swizzle key, as the Q mapping.
    u32 k_lane_off[4];
    {
      const int row = (lane & 7) | ((lane >> 4) << 3);
      const int x = ((lane >> 3) & 1) ^ Tr::swizzle_key(row);
#pragma unroll
      for (int i = 0; i < 4; ++i) k_lane_off[i] = row * Tr::kRowBytes + (((2 * i) ^ x) << 4);
    }
    const u32 q_warp = s_q + warp * Tr::kRowsPerWarp * Tr::kRowBytes;
    // byte offset of chunk pair `step` (16 columns) relative to lane_off/k_lane_off[step % 4]
#define CUPARING_STEP_OFF(step) (((step) >> 2) << 7)

    constexpr int kQFrags = Tr::kQInRegs ? Tr::kMFrags : 1;
    constexpr int kQSteps = Tr::kQInRegs ? Tr::kKSteps : 1;
    u32 q_frag[kQFrags][kQSteps][4];
    bool values_zeroed = false;  // some V tile had its NaN / inf replaced by 0 (rare)

    for (int it = 0; it < n_count; ++it) {
      const int n0 = (n_first + it) * Tr::kBlockN;
      const int keys = min(Tr::kBlockN, sk - n0);
      // tile extremes, loaded before the barrier so their latency hides behind it
      const int k_min = __ldg(p.k_pos + n0);
      const int k_max = __ldg(p.k_pos + n0 + keys - 1);

      const int stage = it % Tr::kStages;
      const u32 s_k = s_kv + stage * Tr::kStageBytes;
      const u32 s_v = s_k + Tr::kKVBytes;
      cp_async_wait<Tr::kStages - 2>();  // tile `it` (and Q) has landed for this thread...
      // A tile some query of the CTA sees only in part: may its V hold a NaN or inf that a
      // hidden pair would meet? Each thread checks its own copies; the barrier ORs them.
      const bool cta_partial =
          !p.block_full &&
          classify_tile(cta_q_min, cta_q_max, k_min, k_max, lo, hi) != kTileFull;
      const bool own_bad =
          cta_partial && own_chunks_nonfinite<Tr, Tr::kBlockN, kBf16, false>(s_v, tid);
      // ...for all threads; and stage (it-1) is free again
      if (__syncthreads_or(own_bad)) {  // rare, CTA-uniform: see common/nonfinite.cuh
        own_chunks_nonfinite<Tr, Tr::kBlockN, kBf16, true>(s_v, tid);  // NaN / inf -> 0
        __syncthreads();  // before any warp reads the tile
        values_zeroed = true;
      }
      {
        const int next = it + Tr::kStages - 1;
        if (next < n_count) load_kv(next, next % Tr::kStages);
        cp_async_commit();  // always commit (maybe empty) so group counting stays uniform
      }
      if constexpr (Tr::kQInRegs) {
        if (it == 0) {
#pragma unroll
          for (int mf = 0; mf < Tr::kMFrags; ++mf) {
#pragma unroll
            for (int kk = 0; kk < Tr::kKSteps; ++kk) {
              ldmatrix_x4(q_frag[mf][kk],
                          q_warp + lane_off[kk & 3] + mf * 16 * Tr::kRowBytes + CUPARING_STEP_OFF(kk));
            }
          }
        }
      }

      int kind = p.block_full ? kTileFull
                              : classify_tile(warp_q_min, warp_q_max, k_min, k_max, lo, hi);
      if (keys < Tr::kBlockN && kind == kTileFull) kind = kTilePartial;  // Sk tail
      if (!warp_has_rows) kind = kTileEmpty;
      if (kind == kTileEmpty) continue;  // warp-uniform; the barrier is at the loop top

      // ---- S = Q K^T: (16*kMFrags, kBlockN) per warp
      float acc_s[Tr::kMFrags][Tr::kNTiles][4];
#pragma unroll
      for (int mf = 0; mf < Tr::kMFrags; ++mf) {
#pragma unroll
        for (int j = 0; j < Tr::kNTiles; ++j) {
#pragma unroll
          for (int e = 0; e < 4; ++e) acc_s[mf][j][e] = 0.f;
        }
      }
#pragma unroll
      for (int kk = 0; kk < Tr::kKSteps; ++kk) {
        u32 a[Tr::kMFrags][4];
#pragma unroll
        for (int mf = 0; mf < Tr::kMFrags; ++mf) {
          if constexpr (Tr::kQInRegs) {
#pragma unroll
            for (int e = 0; e < 4; ++e) a[mf][e] = q_frag[mf][kk][e];
          } else {
            ldmatrix_x4(a[mf], q_warp + lane_off[kk & 3] + mf * 16 * Tr::kRowBytes + CUPARING_STEP_OFF(kk));
          }
        }
#pragma unroll
        for (int nn = 0; nn < Tr::kNTiles / 2; ++nn) {
          u32 bk[4];
          ldmatrix_x4(bk, s_k + k_lane_off[kk & 3] + nn * 16 * Tr::kRowBytes + CUPARING_STEP_OFF(kk));
#pragma unroll
          for (int mf = 0; mf < Tr::kMFrags; ++mf) {
            mma_16816<kBf16>(acc_s[mf][2 * nn], a[mf], bk[0], bk[1]);
            mma_16816<kBf16>(acc_s[mf][2 * nn + 1], a[mf], bk[2], bk[3]);
          }
        }
      }

      if (kind == kTilePartial) apply_mask<Tr>(acc_s, q_pos_row, p.k_pos, n0, sk, lo, hi, lane);
      online_softmax<Tr>(acc_s, row_max, row_sum, acc_o, p.scale_log2);

      pv_tile<Tr, kBf16>(acc_o, acc_s, s_v, lane_off);
    }

    // Rare: some tile's V had its NaN / inf zeroed. Each row now adds the non-finite values of
    // the keys it sees in every tile the CTA sees in part (only those were ever zeroed). Adding
    // a non-finite value the row already holds changes nothing (inf + inf, NaN + x), so tiles
    // that kept their values may be walked again; done once here, after the loop, where the S
    // accumulators are dead, and without the corrections of later tiles (0 * inf).
    if (values_zeroed) {
      const auto sees_key = [&](int n0) {
        return [&, n0](int mf, int r, int key) {
          const int delta = __ldg(p.k_pos + n0 + key) - q_pos_row[mf][r];
          return delta >= lo && delta <= hi;
        };
      };
#pragma unroll 1
      for (int it = 0; it < n_count; ++it) {
        const int n0 = (n_first + it) * Tr::kBlockN;
        const int keys = min(Tr::kBlockN, sk - n0);
        if (!warp_has_rows || classify_tile(cta_q_min, cta_q_max, __ldg(p.k_pos + n0),
                                            __ldg(p.k_pos + n0 + keys - 1), lo,
                                            hi) == kTileFull) {
          continue;
        }
        add_nonfinite_values<kBf16, Tr::kMFrags, Tr::kDTiles, Tr::kBlockN>(
            acc_o, sees_key(n0), v_head + n0 * p.v_row_stride, p.v_row_stride, keys, p.headdim,
            lane);
      }
    }
  }

#undef CUPARING_STEP_OFF

  // ---- epilogue: normalise and write (common/epilogue.cuh)
  write_block_output<Tr, kBf16>(p, acc_o, row_max, row_sum, warp_row0, b, h, lane);
}

}  // namespace cuparing
