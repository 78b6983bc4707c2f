// Backward attention on Hopper (sm_90a): one (key tile of 128, query head, batch) per CTA of
// three warpgroups, wgmma for all five products.
//
// Producer (warpgroup 0, cp.async): K and V of the CTA's 128 keys once; then per query tile of
// 64 (the tiles some key of the CTA sees) Q, dO, and the tile's lse (log2 units, +inf where the
// query sees no key or lies past Sq: P = 0 exactly there), delta and query positions into one of
// two stages, completing on the stage's "full" mbarrier; a stage is refilled once every consumer
// warp released it.
// Consumers (warpgroups 1 and 2): consumer c owns keys [64c, 64c + 64) of the tile, so its dK and
// dV stay in registers for the CTA's life. Per query tile, in the transposed orientation (rows =
// the consumer's keys, columns = queries), as the sm80 family:
//   S^T  = K_c Q^T            wgmma SS, both K-major
//   dP^T = V_c dO^T           wgmma SS, both K-major
//   P^T  = 2^(S^T scale log2e - lse log2e),  dS^T = P^T (dP^T - delta)   (registers)
//   dV  += P^T dO             wgmma RS: P^T packed from the S^T accumulators, dO MN-major
//   dQ   = dS K               dS^T stored to shared memory [key][query]; wgmma SS with both
//                             operands MN-major; consumer c computes dQ's columns
//                             [c d/2, (c + 1) d/2) over all 128 keys (both consumers' dS^T,
//                             double-buffered)
//   dK  += dS^T Q             wgmma RS, Q MN-major, issued last: it runs while dQ leaves
// dQ (times scale) leaves through shared memory: each warp stages its 16 x d/2 fragment in
// float32 and one lane adds it into the float32 dq accumulator with one bulk reduction of the
// copy engine (cp.reduce.async.bulk). The accumulator is laid out in those fragments (dq tiles,
// common/dq_tiles.cuh), so the fragment is one contiguous 4 KB piece: per-element atomics, then
// one bulk reduction per 256-byte row, were what limited the kernel (PERF.md "Hopper backward").
// At the end dK (times scale) and dV are added into the float32 dk / dv accumulators, which GQA's
// query heads of one group share.
// Masks: each consumer classifies the tile against its 64 keys; PARTIAL and EMPTY tiles are
// masked element by element (no wgmma sits under a data-dependent branch: ptxas would serialise
// every wgmma of the kernel), keys past Sk always; there a hidden pair's P is -0 and its dS 0.
// NaN / inf next to a mask edge: a CTA whose K, or a tile not FULL for it whose Q or dO, holds
// one stops before that tile and marks itself for the sm80 kernel's redo pass (params.cuh
// BwdParams::redo), launched after this kernel, which finishes it with its exact path. The
// producer scans K and each such tile as it lands, a tile ahead of the consumers, and leaves
// its answer in the stage; the consumers only read it (their own scan and agreement cost a
// packed-document ring step ~6%: PERF.md).
// Deterministic mode (kOrdered, its own instantiation; common/turns.cuh): a query tile's dQ
// partials are added in key-tile order and a GQA group's dK / dV in head order. The CTA then
// walks every query tile whose endpoints classify non-EMPTY against its keys (the same set seen
// from either side, so a tile's adders before key tile n are a known range); each consumer warp
// waits for its turn before it stages its dQ rows, and a tile later, once its reductions are
// complete, tells the producer (an mbarrier per tile, CTA scope). One producer thread counts the
// CTA's turn on the tile once all eight warps did: the count's release at GPU scope (a memory
// barrier that waits ~1.6 us under the reductions' traffic) then stalls no consumer.
// Not yet here: TMA loads, overlap of one tile's products with the next tile's.
#pragma once
#include "../common/cta_profile.cuh"
#include "../common/direct_grads.cuh"
#include "../common/dq_tiles.cuh"
#include "../common/launch_order.cuh"
#include "../common/mask.cuh"
#include "../common/nonfinite.cuh"
#include "../common/params.cuh"
#include "../common/ptx.cuh"
#include "../common/turns.cuh"
#include "copy.cuh"
#include "sync.cuh"
#include "tma.cuh"
#include "traits.cuh"
#include "wgmma.cuh"

namespace cuparing {

template <int kHeadDim_>
struct Sm90BwdTraits : Sm90Boxes<kHeadDim_> {
  using Boxes = Sm90Boxes<kHeadDim_>;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = 64;   // queries per tile (the N of S^T)
  static constexpr int kBlockN = 128;  // keys per CTA, 64 per consumer (the M of S^T)
  static constexpr int kConsumerKeys = 64;  // one warpgroup's M
  static constexpr int kStages = 2;
  static constexpr int kNThreads = 384;
  static constexpr int kConsumerThreads = 256;
  // setmaxnreg moves registers inside the CTA's allocation (168 per thread at launch, the bound
  // for 384 threads): what the producer gives up must cover what the consumers take, or their
  // setmaxnreg.inc waits forever
  static constexpr int kLaunchRegs = 168;
  static constexpr int kProducerRegs = 24;
  static constexpr int kConsumerRegs = 240;
  static_assert(Boxes::kProducerThreads * (kLaunchRegs - kProducerRegs) >=
                    kConsumerThreads * (kConsumerRegs - kLaunchRegs),
                "the consumers would wait for registers the producer does not release");
  static constexpr int kQTiles = kBlockM / 8;   // n8 tiles of S^T (queries) per thread
  static constexpr int kQSteps = kBlockM / 16;  // k16 steps over queries (dV, dK)
  static constexpr int kDTiles = kHeadDim / 8;  // n8 tiles of dK, dV, dQ per thread
  static constexpr int kKSteps = kHeadDim / 16; // k16 steps over d (S^T, dP^T)

  static constexpr int kKVBytes = Boxes::kBoxes * kBlockN * Boxes::kBoxRowBytes;  // K or V
  static constexpr int kQBytes = Boxes::kBoxes * kBlockM * Boxes::kBoxRowBytes;   // Q or dO
  static constexpr int kDsBytes = kConsumerKeys * kBlockM * 2;  // one consumer's dS^T, [key][query]
  // dQ: consumer c computes columns [c kDqCols, (c + 1) kDqCols) (d = 128: box c; d = 64: half c
  // of the one box) over all 128 keys, so a CTA tile adds one float32 partial (half the
  // reduction traffic of one per consumer, and the consumers never add into the same rows). It
  // reads both consumers' dS^T, double-buffered so a consumer writing the next tile's never
  // meets the other still reading this one's.
  static constexpr int kDqCols = kHeadDim / 2;
  static constexpr int kDsRegionBytes = 2 * 2 * kDsBytes;
  // lse (log2), delta, q positions; then the tile's first key tile (deterministic mode) and,
  // under masks, the producer's NaN / inf answer for the tile
  static constexpr int kRowInfoBytes = 3 * kBlockM * 4 + 16;
  // dQ leaves through shared memory: each consumer warp stages its 16 query rows of kDqCols
  // columns in float32, in the dq tiles' piece order (common/dq_tiles.cuh: each 8-byte store of
  // the warp lands in one 256-byte run, no bank conflicts; a half box is the contiguous half of
  // a piece), and one lane adds them.
  static constexpr int kDqWarpBytes = 16 * kDqCols * 4;
  static constexpr int kDqStageBytes = (kConsumerThreads / 32) * kDqWarpBytes;
  // K, V; per stage Q and dO; dS^T (every tile a whole number of 1024-byte swizzle atoms, so all
  // stay aligned); the dQ staging rows; per stage the row info; the mbarriers (full, empty per
  // stage, K/V, the stop flag, the deterministic mode's "added" slots, checked per stage) and
  // the CTA's key positions with K's NaN / inf answer
  static constexpr int kStageBytes = 2 * kQBytes;
  // deterministic mode: the producer counts the CTA's turn on query tile j when it starts loading
  // tile j + kCountLag (the consumer warps arrive on tile j's "added" mbarrier a tile after their
  // adds, during tile j + 1, before they release its stage: the producer's wait for that stage,
  // before tile j + 3, covers the arrivals). The mbarriers (slot j % kAddedSlots) are waited on
  // only for the last tiles the consumers added into, after the loop: a slot's previous phase is
  // then complete and its next never starts
  static constexpr int kCountLag = 3;
  static constexpr int kAddedSlots = 4;
  static constexpr int kConsumerWarps = kConsumerThreads / 32;
  static constexpr int kBarrierBytes = 112;
  static constexpr int kSmemBytes = 2 * kKVBytes + kStages * kStageBytes + kDsRegionBytes +
                                    kDqStageBytes + kStages * kRowInfoBytes + kBarrierBytes + 1024;
  static_assert(kQBytes % 1024 == 0 && kKVBytes % 1024 == 0 && kDsBytes % 1024 == 0,
                "tiles must keep the 1024-byte alignment of the swizzle atoms");
  static_assert(kHeadDim == 64 || kHeadDim == 128, "head dims 64 and 128");
  static_assert(kSmemBytes <= 227 * 1024, "more shared memory than an sm_90 CTA can have");
  static_assert(8 * (3 * kStages + 2 + kAddedSlots) + 12 <= kBarrierBytes,
                "room for the mbarriers and the CTA's key positions");
  static_assert(kAddedSlots > kCountLag, "the tiles counted after the loop share no slot");
  static_assert(kBlockM * 2 == Boxes::kBoxRowBytes, "a dS^T row is one swizzled 128-byte row");
  static_assert(Boxes::kProducerThreads == 2 * kBlockM,
                "the producer's two halves copy a tile's lse (and positions) and its delta");
  static_assert(kBlockN == 2 * kConsumerKeys, "two consumer warpgroups share the key tile");
  static_assert(kBlockM == kDqTileRows && kDqPieceRows == 16 && Boxes::kBoxRowBytes == 128 &&
                    kDqTileCols % kDqCols == 0,
                "a consumer warp's dQ fragment (16 x kDqCols) is one piece of the dq tiles, or "
                "its contiguous half");
};

#ifndef CUPARING_SM90_BWD_SMEM
#error "CUPARING_SM90_BWD_SMEM must be defined by the loader (cuparing/kernels/loader.py)"
#endif
#define CUPARING_CHECK_SM90_BWD_SMEM(D, SMEM)                            \
  static_assert(Sm90BwdTraits<D>::kSmemBytes == (SMEM),                    \
                "loader sm90_bwd_smem_bytes disagrees (D=" #D ")");
CUPARING_SM90_BWD_SMEM(CUPARING_CHECK_SM90_BWD_SMEM)
#undef CUPARING_CHECK_SM90_BWD_SMEM

// Deterministic mode's dQ turns (common/turns.cuh). The counter of query tile m of this CTA's
// (batch, head): every consumer warp of every CTA that walks the tile counts itself once.
template <class Tr>
__device__ __forceinline__ int* dq_turn(const BwdParams& p, int m) {
  const int q_tiles = (p.seqlen_q + Tr::kBlockM - 1) / Tr::kBlockM;
  return p.dq_turns + static_cast<i64>(cta_pair()) * q_tiles + m;
}

// The count a consumer warp waits for on a query tile whose adders start at key tile `first`
// (first_key_tile_seen; 0 in a FULL block, where every CTA walks every tile): the 8 warps of
// each key tile before this CTA's.
template <class Tr>
__device__ __forceinline__ int dq_turn_target(int first) {
  return (Tr::kConsumerThreads / 32) * (cta_tile() - first);
}

// first_key_tile_seen for a later query tile (first position q_min) of the CTA, from `first`,
// the answer for an earlier one: the answers ascend with the tiles. One thread; never past the
// CTA's own key tile, which walks the tile.
template <int kKeyTile>
__device__ __forceinline__ int next_key_tile_seen(const BwdParams& p, int first, int q_min) {
  const int begin = q_min + p.lo;  // (positions and |lo| < 2^30: no overflow)
  while (!p.block_full && first < cta_tile() &&
         __ldg(p.k_pos + min(kKeyTile * (first + 1), p.seqlen_k) - 1) < begin) {
    ++first;
  }
  return first;
}

// The warp's dQ adds into a query tile are complete (lane 0 issued them; called a tile later, so
// rarely with a wait): one arrival on the tile's "added" mbarrier, whose release (CTA scope)
// the producer's count extends to the GPU.
__device__ __forceinline__ void arrive_dq_added(u32 added, int lane) {
  if (lane == 0) {
    bulk_wait<0>();
    fence_proxy_async_global();  // the copy engine's adds, before the count that says they are done
    mbarrier_arrive(added);
  }
}

template <class Tr, bool kBf16, bool kOrdered>
__device__ __forceinline__ void bwd_block_sm90(const BwdParams& p) {
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int wg = warp >> 2;  // 0: producer; 1, 2: consumers
#ifdef CUPARING_CTA_PROFILE
  if (tid == 0) cta_profile_start();
#endif

  // (batch, head) pairs dealt in sections whose Q, dO and float32 dq tiles share L2
  // (common/launch_order.cuh); the ordered kernel's host gives it one section of every pair
  // (the plain order: its waits point only at CTAs started before, and a section's long
  // key-tile chains would wait in turn)
  const CtaWork work = cta_work(p.nheads);
  const int n0 = work.tile * Tr::kBlockN;  // the CTA's first key
  const int h = work.h;
  const int b = work.b;
  // the key/value head (computed where used: kept, it would be spilled across the loop)
  const auto kv_head = [&]() { return h / (p.nheads / p.nheads_kv); };
  const int sq = p.seqlen_q;
  const int sk = p.seqlen_k;
  const int keys_valid = min(Tr::kBlockN, sk - n0);
  const int lo = p.lo, hi = p.hi;

  // ---- the query tiles some key of the CTA sees (a contiguous range, mask.cuh)
  int m_first = 0, m_count = (sq + Tr::kBlockM - 1) / Tr::kBlockM;
  if (!p.block_full) {
    const int k_min = __ldg(p.k_pos + n0);
    const int k_max = __ldg(p.k_pos + n0 + keys_valid - 1);
    seeing_query_tiles<Tr::kBlockM, false, kOrdered>(p.q_pos, sq, k_min, k_max, lo, hi, lane,
                                                      m_first, m_count);
  }

  // ---- shared memory: K, V, the stages, dS^T, the dQ staging rows, the row info, the mbarriers
  const u32 s_k = (smem_addr(smem_raw) + 1023u) & ~1023u;  // swizzle atoms are 1024 bytes
  const u32 s_v = s_k + Tr::kKVBytes;
  const u32 s_stages = s_v + Tr::kKVBytes;
  const u32 s_ds0 = s_stages + Tr::kStages * Tr::kStageBytes;
  const u32 s_dq0 = s_ds0 + Tr::kDsRegionBytes;
  const u32 s_info = s_dq0 + Tr::kDqStageBytes;
  const u32 s_bar = s_info + Tr::kStages * Tr::kRowInfoBytes;
  auto s_q = [&](int s) { return s_stages + s * Tr::kStageBytes; };
  auto s_do = [&](int s) { return s_q(s) + Tr::kQBytes; };
  // per stage kBlockM floats of lse, then of delta, then the queries' positions
  auto s_lse = [&](int s) { return s_info + s * Tr::kRowInfoBytes; };
  auto s_delta = [&](int s) { return s_lse(s) + 4 * Tr::kBlockM; };
  auto s_qpos = [&](int s) { return s_lse(s) + 8 * Tr::kBlockM; };
  auto s_first_key_tile = [&](int s) { return s_lse(s) + 12 * Tr::kBlockM; };
  // nonzero: K, or the stage's Q / dO, holds a NaN / inf (written where the tile is not FULL for
  // the CTA, before `checked` completes)
  auto s_nonfinite = [&](int s) { return s_first_key_tile(s) + 4; };
  auto full = [&](int s) { return s_bar + 8u * s; };
  auto empty = [&](int s) { return s_bar + 8u * (Tr::kStages + s); };
  auto checked = [&](int s) { return s_bar + 8u * (2 * Tr::kStages + 2 + Tr::kAddedSlots + s); };
  const u32 kv_full = s_bar + 8u * (2 * Tr::kStages);
  // nonzero: the consumers left query tiles (stop flag - 1) on to the redo pass
  const u32 stop_flag = kv_full + 8u;
  // deterministic mode: every consumer warp's dQ adds into query tile j are complete
  auto dq_added = [&](int j) { return stop_flag + 8u + 8u * (j % Tr::kAddedSlots); };
  // the first and last position of the CTA's keys, and whether K holds a NaN / inf (the
  // producer's check reads them here: its 24 registers have no room to keep them)
  const u32 s_cta_keys = s_bar + 8u * (3 * Tr::kStages + 2 + Tr::kAddedSlots);
  if (tid == 0) {
    for (int s = 0; s < Tr::kStages; ++s) {
      // every producer thread: one cp.async arrival (noinc) and one after its row-info stores
      mbarrier_init(full(s), 2 * Tr::kProducerThreads);
      mbarrier_init(empty(s), Tr::kConsumerThreads / 32);  // one release per consumer warp
      mbarrier_init(checked(s), 1);  // the producer's first thread, after the others' scans
    }
    mbarrier_init(kv_full, Tr::kProducerThreads);
    st_shared_u32(stop_flag, 0);
    if (!p.block_full) {
      st_shared_u32(s_cta_keys, __ldg(p.k_pos + n0));
      st_shared_u32(s_cta_keys + 4, __ldg(p.k_pos + n0 + keys_valid - 1));
    }
    for (int j = 0; j < Tr::kAddedSlots; ++j) mbarrier_init(dq_added(j), Tr::kConsumerWarps);
    mbarrier_init_fence();
  }
  __syncthreads();
  // No query of the sequence sees these keys: nothing to add (with direct gradients the CTA
  // goes on, through no tile, to write its rows' zeros)
  if (m_count == 0 && p.dk_out == nullptr) return;

  if (wg == 0) {
    // ================= producer =================
    setmaxnreg_dec<Tr::kProducerRegs>();
    constexpr float kLog2e = 1.4426950408889634f;
    const int d_chunks = p.headdim >> 3;
    const u16* q_head = p.q + b * p.q_batch_stride + h * p.q_head_stride;
    const u16* do_head = p.dout + b * p.do_batch_stride + h * p.do_head_stride;
    const float* lse_head = p.lse + (static_cast<i64>(b) * p.nheads + h) * sq;
    const float* delta_head = p.delta + (static_cast<i64>(b) * p.nheads + h) * sq;
    load_tile_sm90<Tr, Tr::kBlockN>(
        s_k, p.k + b * p.k_batch_stride + kv_head() * p.k_head_stride + n0 * p.k_row_stride,
        p.k_row_stride, keys_valid, d_chunks, tid);
    load_tile_sm90<Tr, Tr::kBlockN>(
        s_v, p.v + b * p.v_batch_stride + kv_head() * p.v_head_stride + n0 * p.v_row_stride,
        p.v_row_stride, keys_valid, d_chunks, tid);
    cp_async_mbarrier_arrive(kv_full);
    // deterministic mode: the first key tile that walks the query tile (first_key_tile_seen),
    // searched for once and then advanced
    int first_key = 0;
    if (kOrdered && !p.block_full) {
      first_key = first_key_tile_seen<Tr::kBlockN>(
          p.k_pos, sk, __ldg(p.q_pos + m_first * Tr::kBlockM), lo, lane);
    }
    // deterministic mode: the CTA's turns on its query tiles (all eight consumer warps' at once:
    // the counters' targets count warps)
    int* const turns = kOrdered ? dq_turn<Tr>(p, m_first) : nullptr;
    // NaN / inf next to a mask edge (the consumers stop there; see the top of the file): K once,
    // then Q and dO of each tile not FULL for the CTA as it lands, by the 128 producer threads,
    // which have nothing else to do until the consumers free the next stage. Every tile gets an
    // answer (0 for FULL ones), so `checked` completes once per stage use, as `full` does.
    constexpr int kCheckBarrier = 4;  // (1: the consumers' dS^T barrier)
    const auto check_tile = [&](int j) {
      const int s = j % Tr::kStages;
      if (j == 0) {  // K's answer, kept by the answering thread in shared memory (no register)
        mbarrier_wait(kv_full, 0);
        const bool k_found = named_barrier_or(
            kCheckBarrier, Tr::kProducerThreads,
            magnitudes_nonfinite<kBf16>(
                region_magnitudes<kBf16, Tr::kProducerThreads>(s_k, Tr::kKVBytes, tid)));
        if (tid == 0) st_shared_u32(s_cta_keys + 8, k_found);
      }
      mbarrier_wait(full(s), (j / Tr::kStages) & 1);
      // (the stage's rows past Sq repeat the last position: its last row is the tile's last)
      const bool partial =
          classify_tile(static_cast<int>(ld_shared_u32(s_qpos(s))),
                        static_cast<int>(ld_shared_u32(s_qpos(s) + 4 * (Tr::kBlockM - 1))),
                        static_cast<int>(ld_shared_u32(s_cta_keys)),
                        static_cast<int>(ld_shared_u32(s_cta_keys + 4)), p.lo, p.hi) != kTileFull;
      const u32 magnitudes =
          partial ? region_magnitudes<kBf16, Tr::kProducerThreads>(s_q(s), Tr::kStageBytes, tid)
                  : 0u;
      const bool found = named_barrier_or(kCheckBarrier, Tr::kProducerThreads,
                                          magnitudes_nonfinite<kBf16>(magnitudes));
      if (tid == 0) {
        st_shared_u32(s_nonfinite(s), partial && (found || ld_shared_u32(s_cta_keys + 8) != 0));
        mbarrier_arrive(checked(s));
      }
    };
    int it = 0;  // after the loop: the tiles loaded
    for (; it < m_count; ++it) {
      const int s = it % Tr::kStages;
      const int m0 = (m_first + it) * Tr::kBlockM;
      const int rows = min(Tr::kBlockM, sq - m0);
      mbarrier_wait(empty(s), ((it / Tr::kStages) & 1) ^ 1);
      // The stop flag is set before the release that ended the wait, but a stop at the tile
      // after that release may land while the producer threads read it: under masks (where the
      // consumers can stop) they agree, so all of them take part in the check's barrier below
      if (p.block_full ? ld_shared_u32(stop_flag) != 0
                       : named_barrier_or(kCheckBarrier, Tr::kProducerThreads,
                                          ld_shared_u32(stop_flag) != 0)) {
        break;
      }
      // Tile it - kCountLag: each consumer warp arrived on its "added" mbarrier (its adds
      // complete) before it released the stage of tile it - 2, which the wait above acquired;
      // so no wait here (one spilled the producer's 24 registers)
      if (kOrdered && tid == 0 && it >= Tr::kCountLag) {
        end_turn(turns + it - Tr::kCountLag, Tr::kConsumerWarps);
      }
      load_tile_sm90<Tr, Tr::kBlockM>(s_q(s), q_head + m0 * p.q_row_stride, p.q_row_stride, rows,
                                      d_chunks, tid);
      load_tile_sm90<Tr, Tr::kBlockM>(s_do(s), do_head + m0 * p.do_row_stride, p.do_row_stride,
                                      rows, d_chunks, tid);
      cp_async_mbarrier_arrive(full(s));
      if (tid < Tr::kBlockM) {  // lse in log2 units; +inf: P = 0 for the whole column
        const int row = m0 + tid;
        const float l = row < sq ? __ldg(lse_head + row) : neg_inf();
        st_shared_u32(s_lse(s) + 4 * tid, __float_as_uint(l == neg_inf() ? pos_inf() : l * kLog2e));
        st_shared_u32(s_qpos(s) + 4 * tid, __ldg(p.q_pos + min(row, sq - 1)));
      } else {
        const int i = tid - Tr::kBlockM;
        const int row = m0 + i;
        st_shared_u32(s_delta(s) + 4 * i, __float_as_uint(row < sq ? __ldg(delta_head + row) : 0.f));
      }
      if (kOrdered && tid == 0) {  // the tiles' first positions ascend, and so does this
        first_key = next_key_tile_seen<Tr::kBlockN>(p, first_key, __ldg(p.q_pos + m0));
        st_shared_u32(s_first_key_tile(s), first_key);
      }
      mbarrier_arrive(full(s));
      // each tile checked as soon as it is loaded, a tile ahead of the consumers; the first
      // after the second's loads are issued (its stage is free: no wait on the consumers)
      if (!p.block_full && !(it == 0 && m_count > 1)) {
        if (it == 1) check_tile(0);
        check_tile(it);
      }
    }
    // Every copy must land before the CTA ends: the consumers wait for all of them, except
    // after a stop, when the next tile's may still be in flight. The commit takes in every copy
    // of this thread so far (those the mbarriers track too); the wait then covers them all, and
    // needs no agreement on which stage was loaded last.
    cp_async_commit();
    cp_async_wait<0>();
    if (kOrdered && tid == 0) {
      // The turns not yet counted: tiles the consumers added into, once their adds are complete;
      // after a stop, the tiles left to the redo pass, after the adders before this CTA as in
      // any turn (counts add up: one taken early would stand in for an earlier CTA's). The stop
      // flag is read first: a left tile's slot may still be in the phase of a left tile four
      // before it, which the parity test would take as complete.
      int first = 0;  // first_key_tile_seen of the left tiles (a plain scan, rare)
      for (int j = max(it - Tr::kCountLag, 0); j < m_count; ++j) {
        bool left = false;
        for (;;) {
          const int stop = static_cast<int>(ld_shared_u32(stop_flag));
          if (stop != 0 && j >= stop - 1) {
            left = true;
            break;
          }
          if (mbarrier_try_wait(dq_added(j), (j / Tr::kAddedSlots) & 1)) break;
        }
        if (left) {
          first = next_key_tile_seen<Tr::kBlockN>(p, first,
                                                  __ldg(p.q_pos + (m_first + j) * Tr::kBlockM));
          wait_turn(turns + j, dq_turn_target<Tr>(first));
        }
        end_turn(turns + j, Tr::kConsumerWarps);
      }
    }
    return;
  }

  // ================= consumers =================
  setmaxnreg_inc<Tr::kConsumerRegs>();
  const int c = wg - 1;            // keys [64c, 64c + 64) of the CTA
  const int wq = warp & 3;         // warp in the warpgroup: key rows [16 wq, 16 wq + 16)
  const int g = lane >> 2;
  const int t = lane & 3;
  const int c_key0 = n0 + Tr::kConsumerKeys * c;  // the consumer's first key (global index)
  const bool c_has_keys = c_key0 < sk;
  int c_kmin = 0, c_kmax = 0;
  if (c_has_keys) {
    c_kmin = __ldg(p.k_pos + c_key0);
    c_kmax = __ldg(p.k_pos + min(c_key0 + Tr::kConsumerKeys, sk) - 1);
  }
  int key_pos[2];
  bool key_ok[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int key = c_key0 + 16 * wq + g + 8 * r;
    key_ok[r] = key < sk;
    key_pos[r] = key_ok[r] ? __ldg(p.k_pos + key) : 0;
  }

  float acc_dv[Tr::kDTiles][4];
  float acc_dk[Tr::kDTiles][4];
#pragma unroll
  for (int j = 0; j < Tr::kDTiles; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      acc_dv[j][e] = 0.f;
      acc_dk[j][e] = 0.f;
    }
  }

  constexpr u32 kSbo = 8 * Tr::kBoxRowBytes;  // 8-row groups of a swizzle atom
  // K_c, V_c as K-major A operands (rows = the consumer's keys; k16 step kk: box kk / 4, 32 bytes
  // into its rows); K_c as the MN-major B operand of dQ (N = d across boxes kBlockN rows apart)
  // (descriptors are built where used: their 64-bit values would hold registers the
  // accumulators need)
  const u32 k_rows = s_k + Tr::kConsumerKeys * c * Tr::kBoxRowBytes;
  const u32 v_rows = k_rows + Tr::kKVBytes;
  // where this consumer's dS^T goes, [key][query]: one 128-byte swizzled row per key
  const auto ds_tile = [&](int it) {
    return s_ds0 + (it & 1) * 2 * Tr::kDsBytes;  // both consumers' rows
  };
  const float scale_log2 = p.scale_log2;
  const float scale = p.scale;
  // A hidden pair's P: -0, which no exponential gives (a visible pair's P is +0 at the least),
  // so its dS can be told apart and made exactly 0 while a visible pair whose P underflowed
  // keeps its 0 * (dP - delta) (NaN where that is non-finite, as dense attention)
  const float kHiddenP = __uint_as_float(0x80000000u);
  const int d = p.headdim;

  mbarrier_wait(kv_full, 0);
  fence_proxy_async();  // cp.async data, read by wgmma (the async proxy)

  // NaN / inf where a tile is partly masked: the products multiply a hidden pair's exact zero
  // (P, dS) by its operands, and 0 * NaN is NaN. P and dS of hidden pairs are made exactly 0
  // below, so V (only in dP) may hold anything; K (dQ), Q (dK) and dO (dV) must be finite there.
  // When one is not, the CTA stops before that tile and leaves it and the rest to the sm80
  // kernel (params.cuh BwdParams::redo), whose exact path handles them. The producer's answer
  // for each tile not FULL for the CTA is in the stage (the same word for every consumer
  // thread, so they stop together without a barrier).
  const int ctid = tid - Tr::kProducerThreads;  // 0..255 over the consumers
  int cta_kmin = 0, cta_kmax = 0;
  if (!p.block_full) {
    cta_kmin = __ldg(p.k_pos + n0);
    cta_kmax = __ldg(p.k_pos + n0 + keys_valid - 1);
  }

  int it = 0;  // after the loop: the tiles done (fewer than m_count after a stop)
  for (; it < m_count; ++it) {
    const int s = it % Tr::kStages;
    const int m0 = (m_first + it) * Tr::kBlockM;
    const int rows = min(Tr::kBlockM, sq - m0);
    mbarrier_wait(full(s), (it / Tr::kStages) & 1);
    fence_proxy_async();
#ifdef CUPARING_CTA_PROFILE
    if (it == 0 && tid == Tr::kProducerThreads) cta_profile_first();  // the first consumer thread
#endif
    const u32 lse_s = s_lse(s), delta_s = s_delta(s), qpos_s = s_qpos(s);
    int kind = kTileEmpty;
    if (c_has_keys) {
      const int q_min = static_cast<int>(ld_shared_u32(qpos_s));
      const int q_max = static_cast<int>(ld_shared_u32(qpos_s + 4 * (rows - 1)));
      kind = p.block_full ? kTileFull : classify_tile(q_min, q_max, c_kmin, c_kmax, lo, hi);
      if (c_key0 + Tr::kConsumerKeys > sk && kind == kTileFull) kind = kTilePartial;  // the Sk tail
    }
    if (!p.block_full) {  // CTA-uniform: both consumers see the same positions
      const int q_min = static_cast<int>(ld_shared_u32(qpos_s));
      const int q_max = static_cast<int>(ld_shared_u32(qpos_s + 4 * (rows - 1)));
      if (classify_tile(q_min, q_max, cta_kmin, cta_kmax, lo, hi) != kTileFull) {
        mbarrier_wait(checked(s), (it / Tr::kStages) & 1);
        if (ld_shared_u32(s_nonfinite(s)) != 0) {
          if (ctid == 0) {  // lane 0 of its warp: written before that warp's release below
            p.redo[(static_cast<i64>(n0 / Tr::kBlockN) * p.batch + b) * p.nheads + h] = m0 + 1;
            st_shared_u32(stop_flag, it + 1);
          }
          // the producer waits for this stage (it is one stage ahead): released, it reads the
          // stop flag and loads no more
          if (lane == 0) mbarrier_arrive(empty(s));
          break;
        }
      }
    }

    // S^T and dP^T (Q, dO K-major: k16 step kk in box kk / 4, 32 bytes into its rows)
    float acc_s[Tr::kQTiles][4];
    float acc_dp[Tr::kQTiles][4];
    {
      const u64 q_desc = smem_desc_sw128(s_q(s), 16, kSbo);
      const u64 do_desc = smem_desc_sw128(s_do(s), 16, kSbo);
      const u64 k_desc = smem_desc_sw128(k_rows, 16, kSbo);
      const u64 v_desc = smem_desc_sw128(v_rows, 16, kSbo);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < Tr::kKSteps; ++kk) {
        const u64 a_step = ((kk >> 2) * Tr::kBlockN * Tr::kBoxRowBytes + (kk & 3) * 32) >> 4;
        const u64 b_step = ((kk >> 2) * Tr::kBlockM * Tr::kBoxRowBytes + (kk & 3) * 32) >> 4;
        Wgmma<Tr::kBlockM, kBf16>::ss(acc_s, k_desc + a_step, q_desc + b_step, kk > 0);
      }
      wgmma_commit();
#pragma unroll
      for (int kk = 0; kk < Tr::kKSteps; ++kk) {
        const u64 a_step = ((kk >> 2) * Tr::kBlockN * Tr::kBoxRowBytes + (kk & 3) * 32) >> 4;
        const u64 b_step = ((kk >> 2) * Tr::kBlockM * Tr::kBoxRowBytes + (kk & 3) * 32) >> 4;
        Wgmma<Tr::kBlockM, kBf16>::ss(acc_dp, v_desc + a_step, do_desc + b_step, kk > 0);
      }
      wgmma_commit();
    }
    wgmma_wait<1>();
    fence_accumulator(acc_s);
    // P^T: lse per query column; hidden pairs, keys past Sk and EMPTY tiles give P = -0
#pragma unroll
    for (int j = 0; j < Tr::kQTiles; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float lse = __uint_as_float(ld_shared_u32(lse_s + 4 * (8 * j + 2 * t + e)));
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          acc_s[j][2 * r + e] = exp2_approx(fmaf(acc_s[j][2 * r + e], scale_log2, -lse));
        }
      }
    }
    if (kind != kTileFull) {  // warp-uniform; no wgmma inside
#pragma unroll
      for (int j = 0; j < Tr::kQTiles; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int qp = static_cast<int>(ld_shared_u32(qpos_s + 4 * (8 * j + 2 * t + e)));
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const int delta = key_pos[r] - qp;
            const bool seen = kind == kTilePartial && key_ok[r] && delta >= lo && delta <= hi;
            if (!seen) acc_s[j][2 * r + e] = kHiddenP;
          }
        }
      }
    }
    wgmma_wait<0>();
    fence_accumulator(acc_dp);
    // dS^T = P^T (dP^T - delta), delta per query column
#pragma unroll
    for (int j = 0; j < Tr::kQTiles; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float delta = __uint_as_float(ld_shared_u32(delta_s + 4 * (8 * j + 2 * t + e)));
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          acc_dp[j][2 * r + e] = acc_s[j][2 * r + e] * (acc_dp[j][2 * r + e] - delta);
        }
      }
    }
    if (kind != kTileFull) {  // warp-uniform: hidden pairs' dS exactly 0, whatever dP or delta
#pragma unroll
      for (int j = 0; j < Tr::kQTiles; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          if (__float_as_uint(acc_s[j][e]) == __float_as_uint(kHiddenP)) acc_dp[j][e] = 0.f;
        }
      }
    }
    // P^T and dS^T as A operands (k16 step kk over queries: n8 tiles 2kk, 2kk + 1)
    u32 pa[Tr::kQSteps][4], dsa[Tr::kQSteps][4];
#pragma unroll
    for (int kk = 0; kk < Tr::kQSteps; ++kk) {
      pa[kk][0] = pack2<kBf16>(acc_s[2 * kk][0], acc_s[2 * kk][1]);
      pa[kk][1] = pack2<kBf16>(acc_s[2 * kk][2], acc_s[2 * kk][3]);
      pa[kk][2] = pack2<kBf16>(acc_s[2 * kk + 1][0], acc_s[2 * kk + 1][1]);
      pa[kk][3] = pack2<kBf16>(acc_s[2 * kk + 1][2], acc_s[2 * kk + 1][3]);
      dsa[kk][0] = pack2<kBf16>(acc_dp[2 * kk][0], acc_dp[2 * kk][1]);
      dsa[kk][1] = pack2<kBf16>(acc_dp[2 * kk][2], acc_dp[2 * kk][3]);
      dsa[kk][2] = pack2<kBf16>(acc_dp[2 * kk + 1][0], acc_dp[2 * kk + 1][1]);
      dsa[kk][3] = pack2<kBf16>(acc_dp[2 * kk + 1][2], acc_dp[2 * kk + 1][3]);
    }
    // dS^T to shared memory from its packed pairs (dsa[kk][2 * jj + r]: row 16 wq + g + 8r,
    // columns 8j + 2t, +1 with j = 2kk + jj): chunk j of the row, swizzled by the row's low 3
    // bits (the 128-byte swizzle the descriptor describes). The buffer was last read by both
    // consumers' dQ two tiles ago, before the last tile's barrier 1. Stored before dK is issued:
    // the A-fragment registers of a wgmma in flight must not be touched, read or written.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = 16 * wq + g + 8 * r;
      const u32 row_addr =
          ds_tile(it) + (Tr::kConsumerKeys * c + row) * Tr::kBoxRowBytes + 4 * t;
#pragma unroll
      for (int j = 0; j < Tr::kQTiles; ++j) {
        st_shared_u32(row_addr + ((j ^ (row & 7)) << 4), dsa[j >> 1][2 * (j & 1) + r]);
      }
    }
    // dV += P^T dO now; dQ (needs every dS^T row of the tile) after the barrier; dK += dS^T Q
    // last, so dQ is staged and reduced while dK runs (dO, Q MN-major: d across boxes kBlockM
    // rows apart; k16 step kk 16 query rows further)
    const u64 do_mn = smem_desc_sw128(s_do(s), Tr::kBlockM * Tr::kBoxRowBytes, kSbo);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < Tr::kQSteps; ++kk) {
      const u64 step = (kk * 16 * Tr::kBoxRowBytes) >> 4;
      Wgmma<Tr::kHeadDim, kBf16>::rs_trans_b(acc_dv, pa[kk], do_mn + step, 1);
    }
    wgmma_commit();
    if constexpr (kOrdered) {  // the last tile's adds: long complete by now
      if (it > 0) arrive_dq_added(dq_added(it - 1), lane);
    }
    fence_proxy_async();  // the dS^T stores, before wgmma reads them
    named_barrier_sync(1, Tr::kConsumerThreads);  // both consumers' dS^T rows are written
    // dQ's columns [col0, col0 + kDqCols) over the CTA's 128 keys: K's box col0 / 64, and at
    // d = 64 half c of it, 64 bytes into its swizzled rows
    const int col0 = c * Tr::kDqCols;
    float acc_dq[Tr::kDqCols / 8][4];
    {
      const u64 ds_desc = smem_desc_sw128(ds_tile(it), Tr::kDsBytes, kSbo);
      const u64 k_mn_desc = smem_desc_sw128(s_k, Tr::kBlockN * Tr::kBoxRowBytes, kSbo);
      const u64 col_step =
          ((col0 / 64) * Tr::kBlockN * Tr::kBoxRowBytes + (col0 % 64) * 2) >> 4;
#pragma unroll
      for (int kk = 0; kk < Tr::kBlockN / 16; ++kk) {
        const u64 step = (kk * 16 * Tr::kBoxRowBytes) >> 4;
        Wgmma<Tr::kDqCols, kBf16>::ss_trans_ab(acc_dq, ds_desc + step,
                                               k_mn_desc + col_step + step, kk > 0);
      }
      wgmma_commit();
    }
    {
      const u64 q_mn = smem_desc_sw128(s_q(s), Tr::kBlockM * Tr::kBoxRowBytes, kSbo);
#pragma unroll
      for (int kk = 0; kk < Tr::kQSteps; ++kk) {
        const u64 step = (kk * 16 * Tr::kBoxRowBytes) >> 4;
        Wgmma<Tr::kHeadDim, kBf16>::rs_trans_b(acc_dk, dsa[kk], q_mn + step, 1);
      }
      wgmma_commit();
    }
    wgmma_wait<1>();  // dV and dQ done; dK may still run (dS^T's registers stay untouched)
    fence_accumulator(acc_dv);
    fence_accumulator(acc_dq);
    // dQ rows: queries 16 wq + g (+8) of the tile, columns col0 + 8j + 2t (+1) (every tile
    // adds: an EMPTY tile for one consumer may not be for the other, whose keys go into the same
    // partial). Stage the warp's part (times scale); lane 0 then adds it with one bulk
    // reduction. The staging is rewritten once per tile, after the last reduction read it.
    if constexpr (kOrdered) {
      if (lane == 0) {
        const int first = static_cast<int>(ld_shared_u32(s_first_key_tile(s)));
        wait_turn(dq_turn<Tr>(p, m_first + it), dq_turn_target<Tr>(first));
      }
      __syncwarp();
      fence_proxy_async_global();  // the turn, before this warp's adds by the copy engine
    }
    {
      const u32 dq_stage = s_dq0 + (4 * c + wq) * Tr::kDqWarpBytes;
      if (!kOrdered && lane == 0) bulk_wait_read<0>();  // ordered: complete since arrive_dq_added
      __syncwarp();
#pragma unroll
      for (int j = 0; j < Tr::kDqCols / 8; ++j) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          st_shared_v2_f32(dq_stage + 8 * ((2 * j + r) * 32 + lane), acc_dq[j][2 * r] * scale,
                           acc_dq[j][2 * r + 1] * scale);
        }
      }
      fence_proxy_async();  // the staged piece, before the copy engine (async proxy) reads it
      __syncwarp();
      if (lane == 0) {  // (the tail tile's rows past Sq add zeros nobody reads)
        // the piece of box col0 / 64, from its column col0 % 64 on (n8 tile j = that / 8)
        const i64 part = DqTiles(p).chunk(b, h, m0 / Tr::kBlockM, col0 / 64) +
                         wq * kDqPieceFloats + (col0 % 64) * kDqPieceRows;
        bulk_reduce_add_f32(p.dq + part, dq_stage, Tr::kDqWarpBytes);
        bulk_commit();
      }
    }
    wgmma_wait<0>();  // dK done
    fence_accumulator(acc_dk);
    if (lane == 0) mbarrier_arrive(empty(s));  // Q, dO, row info of the stage are read
  }
  // every dQ reduction complete (its reads of shared memory and its adds) before the CTA ends
  if (lane == 0) bulk_wait<0>();
#ifdef CUPARING_CTA_PROFILE
  if (lane == 0) cta_profile_last();
#endif
  // (a stopped CTA's turns on the tiles it left to the redo pass: the producer counts them)
  if constexpr (kOrdered) {
    if (it > 0) arrive_dq_added(dq_added(it - 1), lane);
  }
  // Deterministic mode with GQA: the query heads of a group add into the same dK / dV rows, in
  // head order (every consumer warp of a head counts itself)
  const int group = p.nheads / p.nheads_kv;
  int* kv_turn = nullptr;
  if (kOrdered && group > 1) {
    kv_turn = p.dkv_turns + (static_cast<i64>(b) * p.nheads_kv + kv_head()) * cta_tiles() +
              cta_tile();
    if (lane == 0) wait_turn(kv_turn, (Tr::kConsumerThreads / 32) * (h % group));
    __syncwarp();
  }

  // dV and dK (times scale) of the consumer's keys: added into the float32 accumulators; with
  // direct gradients (params.cuh dk_out) written in the gradients' dtype, or, where the CTA
  // stopped for the redo pass, stored into the float32 scratch that pass adds the rest to
  const i64 kv_row_stride = static_cast<i64>(p.nheads_kv) * d;  // dk, dv [B, Sk, Hkv, D]
  const i64 kv_base = static_cast<i64>(b) * sk * kv_row_stride + kv_head() * d;
  const bool direct = p.dk_out != nullptr;
  const bool direct_half = direct && it == m_count;  // (it < m_count: stopped)
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int key = c_key0 + 16 * wq + g + 8 * r;
    if (!key_ok[r]) continue;
    const i64 row = kv_base + key * kv_row_stride;
#pragma unroll
    for (int j = 0; j < Tr::kDTiles; ++j) {
      const int col = 8 * j + 2 * t;
      if (col >= d) continue;
      const float dv0 = acc_dv[j][2 * r], dv1 = acc_dv[j][2 * r + 1];
      const float dk0 = acc_dk[j][2 * r] * scale, dk1 = acc_dk[j][2 * r + 1] * scale;
      if (direct_half) {
        st_global_u32(p.dv_out + row + col, pack2<kBf16>(dv0, dv1));
        st_global_u32(p.dk_out + row + col, pack2<kBf16>(dk0, dk1));
      } else if (direct) {
        st_global_f32x2(p.dv + row + col, dv0, dv1);
        st_global_f32x2(p.dk + row + col, dk0, dk1);
      } else {
        red_add_f32x2(p.dv + row + col, dv0, dv1);
        red_add_f32x2(p.dk + row + col, dk0, dk1);
      }
    }
  }
  if (kv_turn != nullptr) {
    __threadfence();  // this lane's adds, before lane 0 counts the warp's
    __syncwarp();
    if (lane == 0) end_turn(kv_turn, 1);
  }
#ifdef CUPARING_CTA_PROFILE
  if (lane == 0) cta_profile_end();
#endif
}

}  // namespace cuparing
