// Forward attention on Hopper (sm_90a): one (query tile, head, batch) per CTA of three or four
// warpgroups (a producer and two or three consumers, traits.cuh), FlashAttention-3's structure
// on our own PTX.
//
// Producer (warpgroup 0): copies Q once and K, V tile by tile into kStages shared-memory stages,
// each completing on the stage's "full" mbarrier; a stage is refilled only after every consumer
// released it on its "empty" mbarrier. K and V have separate barriers: K of a stage is free
// after Q K^T, V only after P V, one tile later. Two ways to copy (template kTma):
//   TMA: one thread issues a bulk tensor load per 64-column box (tensor maps from the host),
//        the barrier counts the bytes (24 registers for the producer; 240 for each of two
//        consumers, 160 for each of three);
//   cp.async: all 128 threads copy 16-byte chunks and arrive through cp.async.mbarrier.arrive
//        (40 / 232 or 152 registers), for operands the copy engine cannot address.
// Consumers (warpgroups 1 .. kConsumers, 64 query rows each; traits.cuh), per key tile j:
//   wait for my turn (named barrier), issue  S_j = Q K_j^T   (wgmma SS, both from shared memory)
//                                     and    O += P_{j-1} V_{j-1}  (wgmma RS, P from registers)
//   hand the turn to the next consumer, wait for S_j (release K_j), then for P_{j-1} V_{j-1}
//   (release V_{j-1}: P_{j-1}'s registers are free), then mask, softmax and convert S_j to P_j
//   while the tensor cores run the other consumers' products (the turns go round); at head dim
//   64 the mask and softmax of S_j come before the wait for P_{j-1} V_{j-1}, only the
//   conversion after.
//   The running output is rescaled by tile j's correction only when P_j V_j is issued.
// Masks: tiles classified per consumer (64 rows); PARTIAL tiles and the Sk tail are masked, EMPTY
// ones skipped (they still pass through the turn-taking and release their stage).
// NaN / inf in V (common/nonfinite.cuh): the producer checks every V tile the mask does not leave
// whole for the CTA once it has landed (TMA: warps 1-3, idle otherwise; cp.async: the copying
// threads, one tile behind their copies), replaces NaN / inf by 0 in shared memory only when it
// finds one, and publishes a per-stage flag; consumers wait on the stage's "checked" barrier
// instead of its "full" one, and a consumer that met a flag adds back, after its last tile, the
// values its rows see. The epilogue
// (common/epilogue.cuh) is the sm80 family's: direct output, or the ring's float32 write / merge.
#pragma once
#include "../common/cta_profile.cuh"
#include "../common/epilogue.cuh"
#include "../common/launch_order.cuh"
#include "../common/mask.cuh"
#include "../common/nonfinite.cuh"
#include "../common/params.cuh"
#include "../common/ptx.cuh"
#include "../common/softmax.cuh"
#include "copy.cuh"
#include "sync.cuh"
#include "tma.cuh"
#include "traits.cuh"
#include "wgmma.cuh"

namespace cuparing {

// The producer's check of one V tile (stage `s_v`, landed when `full_v` completes phase
// `parity`), by kThreads threads (ctid 0..kThreads-1, named barrier `bar_id`): if the mask does
// not leave the tile whole for the CTA (`partial`), every NaN / inf in it becomes 0 in shared
// memory and the flag word says whether there was one (0 otherwise); then `checked` completes,
// which the consumers wait on instead of `full_v`.
template <class Tr, bool kBf16, int kThreads>
__device__ __forceinline__ void check_v_tile(u32 s_v, u32 full_v, u32 parity, u32 checked,
                                             u32 flag, bool partial, int ctid, int bar_id) {
  mbarrier_wait(full_v, parity);
  // (partial: the same for every checking thread)
  const u32 magnitudes = partial ? region_magnitudes<kBf16, kThreads>(s_v, Tr::kKVBytes, ctid) : 0u;
  // On every tile, FULL ones too: no checking warp may fall a whole pipeline turn behind the
  // first thread's arrivals (its full_v parity would then alias the next turn's).
  const bool found = named_barrier_or(bar_id, kThreads, magnitudes_nonfinite<kBf16>(magnitudes));
  if (found) {  // rare: zero them, each thread its own chunks
    u32 zeroed = 0;
#pragma unroll 1
    for (int c = ctid; c < Tr::kKVBytes / 16; c += kThreads) {
      zeroed |= zero_nonfinite_chunk<kBf16>(s_v + 16 * c);
    }
    if (zeroed) fence_proxy_async();  // this thread's zeros, before wgmma (async proxy) reads
    named_barrier_sync(bar_id, kThreads);  // everyone's zeros are written
  }
  if (ctid == 0) {
    st_shared_u32(flag, found);
    mbarrier_arrive(checked);
  }
}

template <class Tr, bool kBf16, bool kTma>
__device__ __forceinline__ void fwd_block_sm90(const FwdParams& p, const Sm90Maps& maps) {
  // one expect_tx arrival (TMA) or one cp.async arrival per producer thread
  constexpr u32 kFullArrivals = kTma ? 1 : Tr::kProducerThreads;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int wg = warp >> 2;  // 0: producer; 1 .. kConsumers: consumers

  // (batch, head) pairs dealt in sections whose K and V share L2 (common/launch_order.cuh; a GQA
  // group's query heads read the same); within one, the heaviest query tiles first: under
  // causal masks later positions see more keys. The batch and heads, derived by division, would
  // stay live in registers and spill: after the prologue they are read back from shared memory
  // (work_at below).
  const int group = p.nheads / p.nheads_kv;
  const CtaWork work = cta_work(p.nheads);
  const int m_block = cta_tiles() - 1 - work.tile;
  const int h = work.h;
  const int b = work.b;
  const int hk = h / group;
  const int sq = p.seqlen_q;
  const int sk = p.seqlen_k;
  const int m0 = m_block * Tr::kBlockM;
  const int rows_valid = min(Tr::kBlockM, sq - m0);
  const int lo = p.lo, hi = p.hi;
#ifdef CUPARING_CTA_PROFILE
  if (tid == 0) cta_profile_start();
#endif

  // ---- which key tiles can any query of this CTA see? (a contiguous range, see mask.cuh)
  const int n_tiles_total = (sk + Tr::kBlockN - 1) / Tr::kBlockN;
  int n_first = 0, n_count = n_tiles_total;
  if (!p.block_full) {
    const int q_min = __ldg(p.q_pos + m0);
    const int q_max = __ldg(p.q_pos + m0 + rows_valid - 1);
    visible_key_tiles<Tr::kBlockN>(p.k_pos, sk, q_min, q_max, lo, hi, lane, n_first, n_count);
  }
  // ---- shared memory: Q, kStages x (K, V), then the mbarriers
  const u32 s_q = (smem_addr(smem_raw) + 1023u) & ~1023u;  // swizzle atoms are 1024 bytes
  const u32 s_kv = s_q + Tr::kQBytes;
  const u32 s_bar = s_kv + Tr::kStages * Tr::kStageBytes;
  auto full_k = [&](int s) { return s_bar + 8u * s; };
  auto full_v = [&](int s) { return s_bar + 8u * (Tr::kStages + s); };
  auto empty_k = [&](int s) { return s_bar + 8u * (2 * Tr::kStages + s); };
  auto empty_v = [&](int s) { return s_bar + 8u * (3 * Tr::kStages + s); };
  auto checked_v = [&](int s) { return s_bar + 8u * (4 * Tr::kStages + s); };
  const u32 q_full = s_bar + 8u * (5 * Tr::kStages);
  auto v_flag = [&](int s) { return s_bar + 8u * (5 * Tr::kStages + 1) + 4u * s; };
  // the CTA's first query row, batch, head and K/V head (written before the barrier below)
  constexpr int kWorkQueryRow = 0, kWorkBatch = 1, kWorkHead = 2, kWorkKvHead = 3;
  const u32 s_work = s_bar + Tr::kBarrierBytes - 16;
  static_assert(8 * (5 * Tr::kStages + 1) + 4 * Tr::kStages <= Tr::kBarrierBytes - 24,
                "the mbarriers and flags end before the profile's and the work slots");
#ifdef CUPARING_CTA_PROFILE
  // the consumers' last product (cta_profile_last_shared: a global address spilled them)
  const u32 s_profile_last = s_work - 8;
#endif
  const auto work_at = [&](int field) { return static_cast<int>(ld_shared_u32(s_work + 4 * field)); };
  // Does some query of the CTA see key tile i only in part? (Then its V is checked for NaN/inf.)
  // Positions are re-read and the fields taken from the parameters rather than kept: neither the
  // consumers' main loop nor the producer (24 registers with TMA) has a register to spare.
  const auto partial_for_cta = [&](int i) {
    if (p.block_full) return false;
    const int n0 = (n_first + i) * Tr::kBlockN;
    const int first_q = work_at(kWorkQueryRow);
    return classify_tile(__ldg(p.q_pos + first_q),
                         __ldg(p.q_pos + min(first_q + Tr::kBlockM, p.seqlen_q) - 1),
                         __ldg(p.k_pos + n0), __ldg(p.k_pos + min(n0 + Tr::kBlockN, p.seqlen_k) - 1),
                         p.lo, p.hi) != kTileFull;
  };
  // named barrier of the V checkers (1 .. kConsumers: the consumers' turns)
  constexpr int kCheckBarrier = Tr::kConsumers + 1;
  if (tid == 0) {
    for (int s = 0; s < Tr::kStages; ++s) {
      mbarrier_init(full_k(s), kFullArrivals);
      mbarrier_init(full_v(s), kFullArrivals);
      mbarrier_init(empty_k(s), Tr::kConsumerThreads);  // every consumer thread releases
      mbarrier_init(empty_v(s), Tr::kConsumerThreads);
      mbarrier_init(checked_v(s), 1);  // the first checking thread, after the others
    }
    mbarrier_init(q_full, kFullArrivals);
    st_shared_u32(s_work + 4 * kWorkQueryRow, m0);
    st_shared_u32(s_work + 4 * kWorkBatch, b);
    st_shared_u32(s_work + 4 * kWorkHead, h);
    st_shared_u32(s_work + 4 * kWorkKvHead, hk);
#ifdef CUPARING_CTA_PROFILE
    st_shared_u32(s_profile_last, 0);
    st_shared_u32(s_profile_last + 4, 0);
#endif
    mbarrier_init_fence();
  }
  __syncthreads();

  if (wg == 0) {
    // ================= producer =================
    setmaxnreg_dec<Tr::kProducerRegs>();
    if (n_count == 0) return;
    if constexpr (kTma) {
      if (warp > 0) {  // warps 1-3 check the V tiles as they land
        constexpr int kCheckers = Tr::kProducerThreads - 32;
        for (int i = 0; i < n_count; ++i) {
          const int s = i % Tr::kStages;
          check_v_tile<Tr, kBf16, kCheckers>(s_kv + s * Tr::kStageBytes + Tr::kKVBytes, full_v(s),
                                             (i / Tr::kStages) & 1, checked_v(s), v_flag(s),
                                             partial_for_cta(i), tid - 32, kCheckBarrier);
        }
        return;
      }
      if (tid != 0) return;
      mbarrier_arrive_expect_tx(q_full, Tr::kQBytes);
#pragma unroll
      for (int box = 0; box < Tr::kBoxes; ++box) {
        tma_load_4d(s_q + box * Tr::kBlockM * Tr::kBoxRowBytes, &maps.q, q_full, box * 64, m0, h,
                    b);
      }
      for (int i = 0; i < n_count; ++i) {
        const int s = i % Tr::kStages;
        const u32 phase = (i / Tr::kStages) & 1;
        const int n0 = (n_first + i) * Tr::kBlockN;
        const u32 s_k = s_kv + s * Tr::kStageBytes;
        mbarrier_wait(empty_k(s), phase ^ 1);
        mbarrier_arrive_expect_tx(full_k(s), Tr::kKVBytes);
#pragma unroll
        for (int box = 0; box < Tr::kBoxes; ++box) {
          tma_load_4d(s_k + box * Tr::kBlockN * Tr::kBoxRowBytes, &maps.k, full_k(s), box * 64, n0,
                      work_at(kWorkKvHead), work_at(kWorkBatch));
        }
        mbarrier_wait(empty_v(s), phase ^ 1);
        mbarrier_arrive_expect_tx(full_v(s), Tr::kKVBytes);
#pragma unroll
        for (int box = 0; box < Tr::kBoxes; ++box) {
          tma_load_4d(s_k + Tr::kKVBytes + box * Tr::kBlockN * Tr::kBoxRowBytes, &maps.v,
                      full_v(s), box * 64, n0, work_at(kWorkKvHead), work_at(kWorkBatch));
        }
      }
    } else {
      const int d_chunks = p.headdim >> 3;
      const u16* q_tile = p.q + b * p.q_batch_stride + h * p.q_head_stride + m0 * p.q_row_stride;
      const u16* k_head = p.k + b * p.k_batch_stride + hk * p.k_head_stride;
      const u16* v_head = p.v + b * p.v_batch_stride + hk * p.v_head_stride;
      const auto check_previous = [&](int i) {
        const int s = i % Tr::kStages;
        check_v_tile<Tr, kBf16, Tr::kProducerThreads>(
            s_kv + s * Tr::kStageBytes + Tr::kKVBytes, full_v(s), (i / Tr::kStages) & 1,
            checked_v(s), v_flag(s), partial_for_cta(i), tid, kCheckBarrier);
      };
      load_tile_sm90<Tr, Tr::kBlockM>(s_q, q_tile, p.q_row_stride, rows_valid, d_chunks, tid);
      cp_async_mbarrier_arrive(q_full);
      for (int i = 0; i < n_count; ++i) {
        const int s = i % Tr::kStages;
        const u32 phase = (i / Tr::kStages) & 1;
        const int n0 = (n_first + i) * Tr::kBlockN;
        const int keys = min(Tr::kBlockN, sk - n0);
        const u32 s_k = s_kv + s * Tr::kStageBytes;
        mbarrier_wait(empty_k(s), phase ^ 1);
        load_tile_sm90<Tr, Tr::kBlockN>(s_k, k_head + n0 * p.k_row_stride, p.k_row_stride, keys,
                                        d_chunks, tid);
        cp_async_mbarrier_arrive(full_k(s));
        mbarrier_wait(empty_v(s), phase ^ 1);
        load_tile_sm90<Tr, Tr::kBlockN>(s_k + Tr::kKVBytes, v_head + n0 * p.v_row_stride,
                                        p.v_row_stride, keys, d_chunks, tid);
        cp_async_mbarrier_arrive(full_v(s));
        if (i > 0) check_previous(i - 1);  // one tile behind: its copies had time to land
      }
      check_previous(n_count - 1);
      // (the copies complete on the mbarriers the consumers wait for, so none is still in
      // flight when the CTA ends; no commit group exists for this wait to cover)
      cp_async_wait<0>();
    }
  } else {
    // ================= consumers =================
    setmaxnreg_inc<Tr::kConsumerRegs>();
    const int c = wg - 1;          // consumer: query rows [64c, 64c + 64) of the tile
    const int cwarp = warp - 4;    // warp among the consumers: rows [16 cwarp, 16 cwarp + 16)
    const int g = lane >> 2;
    // named barriers 1 .. kConsumers: consumer c's turn on the tensor cores, each synced by the
    // consumer and arrived at by the one before it (128 threads each)
    constexpr int kTurnBarrier = 1;
    constexpr int kTurnThreads = 256;

    const int wg_row0 = m0 + c * 64;  // global query index
    const bool wg_has_rows = wg_row0 < sq;
    int wg_q_min = 0, wg_q_max = 0;
    if (wg_has_rows) {
      wg_q_min = __ldg(p.q_pos + wg_row0);
      wg_q_max = __ldg(p.q_pos + min(wg_row0 + 64, sq) - 1);
    }
    const int warp_row0 = m0 + cwarp * Tr::kRowsPerWarp;
    int q_pos_row[1][2];  // positions of this thread's rows (clamped past the end)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      q_pos_row[0][r] = __ldg(p.q_pos + min(warp_row0 + g + 8 * r, sq - 1));
    }

    float acc_o[1][Tr::kDTiles][4];
    float row_max[1][2] = {{neg_inf(), neg_inf()}};
    float row_sum[1][2] = {{0.f, 0.f}};
#pragma unroll
    for (int j = 0; j < Tr::kDTiles; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_o[0][j][e] = 0.f;
    }

    if (n_count > 0) {
      constexpr u32 kSbo = 8 * Tr::kBoxRowBytes;  // 8-row groups of a swizzle atom
      const u64 q_desc = smem_desc_sw128(s_q + c * 64 * Tr::kBoxRowBytes, 16, kSbo);

      // S = Q K^T of the tile in stage s (k16 step kk of a K-major operand: box kk / 4, 32 bytes
      // per step inside its rows)
      auto issue_qk = [&](float (&acc_s)[Tr::kNTiles][4], int s) {
        const u64 k_desc = smem_desc_sw128(s_kv + s * Tr::kStageBytes, 16, kSbo);
#pragma unroll
        for (int kk = 0; kk < Tr::kKSteps; ++kk) {
          const u64 q_step = ((kk >> 2) * Tr::kBlockM * Tr::kBoxRowBytes + (kk & 3) * 32) >> 4;
          const u64 k_step = ((kk >> 2) * Tr::kBlockN * Tr::kBoxRowBytes + (kk & 3) * 32) >> 4;
          Wgmma<Tr::kBlockN, kBf16>::ss(acc_s, q_desc + q_step, k_desc + k_step, kk > 0);
        }
        wgmma_commit();
      };
      // O += P V with the V tile of stage s (MN-major: 64-column boxes kBlockN rows apart, 8-row
      // groups kSbo apart; step kk starts 16 rows further)
      auto issue_pv = [&](const u32 (&pa)[Tr::kPSteps][4], int s) {
        const u32 s_v = s_kv + s * Tr::kStageBytes + Tr::kKVBytes;
        const u64 v_desc = smem_desc_sw128(s_v, Tr::kBlockN * Tr::kBoxRowBytes, kSbo);
#pragma unroll
        for (int kk = 0; kk < Tr::kPSteps; ++kk) {
          const u64 v_step = (kk * 16 * Tr::kBoxRowBytes) >> 4;
          Wgmma<Tr::kHeadDim, kBf16>::rs_trans_b(acc_o[0], pa[kk], v_desc + v_step, 1);
        }
        wgmma_commit();
      };
      // Mask (every tile this consumer does not see whole: PARTIAL, the Sk tail, and EMPTY ones,
      // whose scores all become -inf and add nothing) and softmax; then convert to P.
      u32 pa[Tr::kPSteps][4];
      float corr[1][2];
      auto softmax_scores = [&](float (&acc_s)[1][Tr::kNTiles][4], int it) {
        const int n0 = (n_first + it) * Tr::kBlockN;
        const int keys = min(Tr::kBlockN, sk - n0);
        int kind = kTileFull;
        int k_min = 0, k_max = 0;
        if (!p.block_full || keys < Tr::kBlockN || !wg_has_rows) {
          k_min = __ldg(p.k_pos + n0);
          k_max = __ldg(p.k_pos + n0 + keys - 1);
          kind = p.block_full ? kTilePartial
                              : classify_tile(wg_q_min, wg_q_max, k_min, k_max, lo, hi);
          if (keys < Tr::kBlockN || !wg_has_rows) kind = kTilePartial;
        }
        if (kind != kTileFull) {
          // (warp-uniform: keys of consecutive positions, e.g. inside one document, take the
          // bounds per row instead of a position load per column)
          if (k_max - k_min == keys - 1) {
            apply_mask_run<Tr>(acc_s, q_pos_row, k_min, keys, lo, hi, lane);
          } else {
            apply_mask<Tr>(acc_s, q_pos_row, p.k_pos, n0, sk, lo, hi, lane);
          }
        }
        softmax_tile<Tr>(acc_s, row_max, row_sum, p.scale_log2, corr);
      };
      auto pack_p = [&](float (&acc_s)[1][Tr::kNTiles][4]) {
#pragma unroll
        for (int kk = 0; kk < Tr::kPSteps; ++kk) {
          pa[kk][0] = pack2<kBf16>(acc_s[0][2 * kk][0], acc_s[0][2 * kk][1]);
          pa[kk][1] = pack2<kBf16>(acc_s[0][2 * kk][2], acc_s[0][2 * kk][3]);
          pa[kk][2] = pack2<kBf16>(acc_s[0][2 * kk + 1][0], acc_s[0][2 * kk + 1][1]);
          pa[kk][3] = pack2<kBf16>(acc_s[0][2 * kk + 1][2], acc_s[0][2 * kk + 1][3]);
        }
      };
      // Head dim 64: the softmax of S_j runs while P_{j-1} V_{j-1} may still be on the tensor
      // cores (its correction `corr` was applied to O when that product was issued, so only P's
      // registers wait for the product). Half the product per exponential of head dim 128 leaves
      // the softmax exposed behind the other consumer's turn; at 128 the longer register life
      // of P cost more than it hid (PERF.md).
      constexpr bool kSoftmaxUnderPv = Tr::kHeadDim == 64;
      // Turns go round the consumers (named barriers kTurnBarrier + c), consumer 0 first. Each
      // takes n_count + 1 turns; the last consumer starts the round with a hand-over to consumer
      // 0 and skips its own last one, which consumer 0 never waits for.
      constexpr int kLast = Tr::kConsumers - 1;
      auto my_turn = [&]() { named_barrier_sync(kTurnBarrier + c, kTurnThreads); };
      auto hand_over = [&]() {
        named_barrier_arrive(kTurnBarrier + (c == kLast ? 0 : c + 1), kTurnThreads);
      };

      u32 values_zeroed = 0;  // some P V of the CTA ran with V's NaN / inf zeroed (rare)
      mbarrier_wait(q_full, 0);
      if (c == kLast) hand_over();

      // turn 0: S_0 only
      {
        float acc_s[1][Tr::kNTiles][4];
        mbarrier_wait(full_k(0), 0);
        if constexpr (!kTma) fence_proxy_async();  // cp.async data, read by the async proxy
        my_turn();
#ifdef CUPARING_CTA_PROFILE
        if (c == 0 && cwarp == 0 && lane == 0) cta_profile_first();
#endif
        wgmma_fence();
        issue_qk(acc_s[0], 0);
        hand_over();
        wgmma_wait<0>();
        fence_accumulator(acc_s[0]);
        mbarrier_arrive(empty_k(0));
        softmax_scores(acc_s, 0);
        pack_p(acc_s);
      }
      // turns 1 .. n_count - 1: S_j, and P_{j-1} V_{j-1} behind it
      for (int it = 1; it < n_count; ++it) {
        const int s = it % Tr::kStages;
        const int prev = (it - 1) % Tr::kStages;
        float acc_s[1][Tr::kNTiles][4];
        mbarrier_wait(full_k(s), (it / Tr::kStages) & 1);
        mbarrier_wait(checked_v(prev), ((it - 1) / Tr::kStages) & 1);  // landed and checked
        values_zeroed |= ld_shared_u32(v_flag(prev));
        if constexpr (!kTma) fence_proxy_async();
        my_turn();
        rescale_output<Tr>(acc_o, corr);  // tile j-1's correction, before its P V
        wgmma_fence();
        issue_qk(acc_s[0], s);
        issue_pv(pa, prev);
        hand_over();
        wgmma_wait<1>();  // S_j has landed; P_{j-1} V_{j-1} may still run
        fence_accumulator(acc_s[0]);
        mbarrier_arrive(empty_k(s));
        if constexpr (kSoftmaxUnderPv) softmax_scores(acc_s, it);
        wgmma_wait<0>();  // P_{j-1} V_{j-1} done: pa and V_{j-1} are free
        fence_accumulator(acc_o[0]);
        fence_operand(pa);  // (the softmax above must not have taken pa's registers)
        mbarrier_arrive(empty_v(prev));
        if constexpr (!kSoftmaxUnderPv) softmax_scores(acc_s, it);
        pack_p(acc_s);
      }
      // last turn: P V of the last tile
      {
        const int last = (n_count - 1) % Tr::kStages;
        mbarrier_wait(checked_v(last), ((n_count - 1) / Tr::kStages) & 1);
        values_zeroed |= ld_shared_u32(v_flag(last));
        if constexpr (!kTma) fence_proxy_async();
        my_turn();
        rescale_output<Tr>(acc_o, corr);
        wgmma_fence();
        issue_pv(pa, last);
        if (c != kLast) hand_over();
        wgmma_wait<0>();
        fence_accumulator(acc_o[0]);
        mbarrier_arrive(empty_v(last));
      }

      // Rare: add, per row, the NaN / inf values of the keys it sees in the tiles whose values
      // were zeroed (walking every tile the CTA sees in part: adding a non-finite value the row
      // already holds changes nothing; common/nonfinite.cuh), after the last correction.
      if (values_zeroed) {
        const u16* v_head = p.v + work_at(kWorkBatch) * p.v_batch_stride +
                            work_at(kWorkKvHead) * p.v_head_stride;
#pragma unroll 1
        for (int it = 0; it < n_count; ++it) {
          if (!partial_for_cta(it)) continue;
          const int n0 = (n_first + it) * Tr::kBlockN;
          const auto sees = [&](int, int r, int key) {
            const int delta = __ldg(p.k_pos + n0 + key) - q_pos_row[0][r];
            return delta >= lo && delta <= hi;
          };
          add_nonfinite_values<kBf16, 1, Tr::kDTiles, Tr::kBlockN>(
              acc_o, sees, v_head + n0 * p.v_row_stride, p.v_row_stride,
              min(Tr::kBlockN, sk - n0), p.headdim, lane);
        }
      }
    }

#ifdef CUPARING_CTA_PROFILE
    if (lane == 0) cta_profile_last_shared(s_profile_last);
#endif
    // ---- epilogue: normalise and write (common/epilogue.cuh)
    write_block_output<Tr, kBf16>(p, acc_o, row_max, row_sum,
                                  work_at(kWorkQueryRow) + cwarp * Tr::kRowsPerWarp,
                                  work_at(kWorkBatch), work_at(kWorkHead), lane);
#ifdef CUPARING_CTA_PROFILE
    if (lane == 0) cta_profile_end_shared(s_profile_last);
#endif
  }
}

}  // namespace cuparing
