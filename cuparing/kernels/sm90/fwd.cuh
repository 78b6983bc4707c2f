// Forward attention on Hopper (sm_90a): wgmma for both products, one (query tile, head, batch)
// per CTA of two warpgroups.
//
// Per key tile (kBlockN keys), each warpgroup (64 query rows):
//   S = Q K^T      wgmma SS: Q and K read straight from 128B-swizzled shared memory
//   mask           only for PARTIAL tiles (classified per warpgroup) and the Sk tail
//   online softmax shared with the sm80 family (common/softmax.cuh), on the same register layout
//   O += P V       wgmma RS: P packed from the S accumulator into A fragments, never leaving
//                  registers; V MN-major in shared memory
// K/V tiles stream through kStages shared-memory stages with 16-byte cp.async issued by all 256
// threads; each thread waits for its copies, fences them into the async proxy, and one
// __syncthreads per tile publishes the tile and frees the stage read one step earlier.
// The epilogue (common/epilogue.cuh) is the sm80 family's: direct output, or the ring's float32
// write / merge.
#pragma once
#include "../common/epilogue.cuh"
#include "../common/mask.cuh"
#include "../common/params.cuh"
#include "../common/ptx.cuh"
#include "../common/softmax.cuh"
#include "traits.cuh"
#include "wgmma.cuh"

namespace cuparing {

// Copy rows [0, rows_valid) x chunks [0, d_chunks) of a (kRows, kHeadDim) tile from global memory
// into the swizzled box layout of traits.cuh; everything else in the tile is zero-filled, so
// padded keys, queries and head-dim columns contribute exactly 0.
template <class Tr, int kRows>
__device__ __forceinline__ void load_tile_sm90(u32 smem, const u16* __restrict__ gmem,
                                               i64 row_stride, int rows_valid, int d_chunks,
                                               int tid) {
  constexpr int kRowStep = Tr::kNThreads / Tr::kLoadChunks;
  static_assert(kRows % kRowStep == 0, "whole row groups per tile");
  const int chunk = tid % Tr::kLoadChunks;
  const int row0 = tid / Tr::kLoadChunks;
  if (Tr::kLoadChunks != Tr::kChunks && chunk >= Tr::kChunks) return;  // beyond the row
  const bool chunk_ok = chunk < d_chunks;
  const u32 dst = smem + Tr::template offset<kRows>(row0, chunk);
  const u16* src = gmem + row0 * row_stride + chunk * 8;
  const i64 src_step = kRowStep * row_stride;
#pragma unroll
  for (int i = 0; i < kRows / kRowStep; ++i) {
    const bool ok = chunk_ok && row0 + i * kRowStep < rows_valid;
    cp_async_16(dst + i * kRowStep * Tr::kBoxRowBytes, src + i * src_step, ok ? 16 : 0);
  }
}

template <class Tr, bool kBf16>
__device__ __forceinline__ void fwd_block_sm90(const FwdParams& p) {
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int wg = warp >> 2;  // warpgroup: query rows [64 wg, 64 wg + 64) of the tile
  const int g = lane >> 2;

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
  if (!p.block_full) {
    const int q_min = __ldg(p.q_pos + m0);
    const int q_max = __ldg(p.q_pos + m0 + rows_valid - 1);
    const int key_begin = lower_bound_warp(p.k_pos, sk, static_cast<i64>(q_min) + lo, lane);
    const int key_end = lower_bound_warp(p.k_pos, sk, static_cast<i64>(q_max) + hi + 1, lane);
    if (key_end <= key_begin) {
      n_count = 0;
    } else {
      n_first = key_begin / Tr::kBlockN;
      n_count = (key_end - 1) / Tr::kBlockN - n_first + 1;
    }
  }

  // ---- rows of this warpgroup, warp and thread
  const int wg_row0 = m0 + wg * 64;  // global query index
  const bool wg_has_rows = wg_row0 < sq;
  int wg_q_min = 0, wg_q_max = 0;
  if (wg_has_rows) {
    wg_q_min = __ldg(p.q_pos + wg_row0);
    wg_q_max = __ldg(p.q_pos + min(wg_row0 + 64, sq) - 1);
  }
  const int warp_row0 = m0 + warp * Tr::kRowsPerWarp;
  int q_pos_row[1][2];  // positions of this thread's rows (clamped past the end)
#pragma unroll
  for (int r = 0; r < 2; ++r) q_pos_row[0][r] = __ldg(p.q_pos + min(warp_row0 + g + 8 * r, sq - 1));

  float acc_o[1][Tr::kDTiles][4];
  float row_max[1][2] = {{neg_inf(), neg_inf()}};
  float row_sum[1][2] = {{0.f, 0.f}};
#pragma unroll
  for (int j = 0; j < Tr::kDTiles; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc_o[0][j][e] = 0.f;
  }

  if (n_count > 0) {
    const u32 s_q = (smem_addr(smem_raw) + 1023u) & ~1023u;  // swizzle atoms are 1024 bytes
    const u32 s_kv = s_q + Tr::kQBytes;
    const u16* q_tile = p.q + b * p.q_batch_stride + h * p.q_head_stride + m0 * p.q_row_stride;
    const u16* k_head = p.k + b * p.k_batch_stride + hk * p.k_head_stride;
    const u16* v_head = p.v + b * p.v_batch_stride + hk * p.v_head_stride;

    auto load_kv = [&](int tile, int stage) {
      const int n0 = (n_first + tile) * Tr::kBlockN;
      const int keys = min(Tr::kBlockN, sk - n0);
      const u32 s_k = s_kv + stage * Tr::kStageBytes;
      load_tile_sm90<Tr, Tr::kBlockN>(s_k, k_head + n0 * p.k_row_stride, p.k_row_stride, keys,
                                      d_chunks, tid);
      load_tile_sm90<Tr, Tr::kBlockN>(s_k + Tr::kKVBytes, v_head + n0 * p.v_row_stride,
                                      p.v_row_stride, keys, d_chunks, tid);
    };

    // prologue: Q and the first kStages-1 key tiles, one commit group per tile (Q rides in 0)
    load_tile_sm90<Tr, Tr::kBlockM>(s_q, q_tile, p.q_row_stride, rows_valid, d_chunks, tid);
#pragma unroll
    for (int s = 0; s < Tr::kStages - 1; ++s) {
      if (s < n_count) load_kv(s, s);
      cp_async_commit();
    }

    // Descriptors: k16 step kk of a K-major operand starts 32 bytes further into box kk / 4;
    // the warpgroup's 64 Q rows start 64 rows (8 swizzle atoms) into each Q box.
    constexpr u32 kSbo = 8 * Tr::kBoxRowBytes;  // 8-row groups of a swizzle atom
    const u64 q_desc = smem_desc_sw128(s_q + wg * 64 * Tr::kBoxRowBytes, 16, kSbo);

    for (int it = 0; it < n_count; ++it) {
      const int n0 = (n_first + it) * Tr::kBlockN;
      const int keys = min(Tr::kBlockN, sk - n0);
      // tile extremes, loaded before the barrier so their latency hides behind it
      const int k_min = __ldg(p.k_pos + n0);
      const int k_max = __ldg(p.k_pos + n0 + keys - 1);

      cp_async_wait<Tr::kStages - 2>();  // tile `it` (and Q) has landed for this thread...
      fence_proxy_async();               // ...is visible to wgmma's (async) reads...
      __syncthreads();                   // ...for all threads; and stage (it-1) is free again
      {
        const int next = it + Tr::kStages - 1;
        if (next < n_count) load_kv(next, next % Tr::kStages);
        cp_async_commit();  // always commit (maybe empty) so group counting stays uniform
      }

      int kind = p.block_full ? kTileFull
                              : classify_tile(wg_q_min, wg_q_max, k_min, k_max, lo, hi);
      if (keys < Tr::kBlockN && kind == kTileFull) kind = kTilePartial;  // Sk tail
      if (!wg_has_rows) kind = kTileEmpty;
      if (kind == kTileEmpty) continue;  // warpgroup-uniform; the barrier is at the loop top

      const u32 s_k = s_kv + (it % Tr::kStages) * Tr::kStageBytes;
      const u32 s_v = s_k + Tr::kKVBytes;

      // ---- S = Q K^T: (64, kBlockN) per warpgroup
      float acc_s[1][Tr::kNTiles][4];
      const u64 k_desc = smem_desc_sw128(s_k, 16, kSbo);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < Tr::kKSteps; ++kk) {
        // (box, 32-byte step) -> descriptor address units of 16 bytes
        const u64 q_step = ((kk >> 2) * Tr::kBlockM * Tr::kBoxRowBytes + (kk & 3) * 32) >> 4;
        const u64 k_step = ((kk >> 2) * Tr::kBlockN * Tr::kBoxRowBytes + (kk & 3) * 32) >> 4;
        Wgmma<Tr::kBlockN, kBf16>::ss(acc_s[0], q_desc + q_step, k_desc + k_step, kk > 0);
      }
      wgmma_commit();
      wgmma_wait<0>();
      fence_accumulator(acc_s[0]);

      if (kind == kTilePartial) apply_mask<Tr>(acc_s, q_pos_row, p.k_pos, n0, sk, lo, hi, lane);
      online_softmax<Tr>(acc_s, row_max, row_sum, acc_o, p.scale_log2);

      // ---- O += P V: n8 tiles (2kk, 2kk+1) of the S accumulator are the A fragment of step kk
      u32 pa[Tr::kPSteps][4];
#pragma unroll
      for (int kk = 0; kk < Tr::kPSteps; ++kk) {
        pa[kk][0] = pack2<kBf16>(acc_s[0][2 * kk][0], acc_s[0][2 * kk][1]);
        pa[kk][1] = pack2<kBf16>(acc_s[0][2 * kk][2], acc_s[0][2 * kk][3]);
        pa[kk][2] = pack2<kBf16>(acc_s[0][2 * kk + 1][0], acc_s[0][2 * kk + 1][1]);
        pa[kk][3] = pack2<kBf16>(acc_s[0][2 * kk + 1][2], acc_s[0][2 * kk + 1][3]);
      }
      // V: along N (head dim) the boxes are kKVBytes / kBoxes apart; along K (keys) 8-row
      // groups are kSbo apart; step kk starts 16 rows further
      const u64 v_desc = smem_desc_sw128(s_v, Tr::kBlockN * Tr::kBoxRowBytes, kSbo);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < Tr::kPSteps; ++kk) {
        const u64 v_step = (kk * 16 * Tr::kBoxRowBytes) >> 4;
        Wgmma<Tr::kHeadDim, kBf16>::rs_trans_b(acc_o[0], pa[kk], v_desc + v_step, 1);
      }
      wgmma_commit();
      wgmma_wait<0>();
      fence_accumulator(acc_o[0]);
    }
  }

  // ---- epilogue: normalise and write (common/epilogue.cuh)
  write_block_output<Tr, kBf16>(p, acc_o, row_max, row_sum, warp_row0, b, h, lane);
}

}  // namespace cuparing
