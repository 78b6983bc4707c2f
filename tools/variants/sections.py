# ruff: noqa: E501 (the kernel's source lines, quoted as they are)
"""Candidates for tools/ablate.py: the Hopper kernels' CTAs dealt in L2-sized sections of (batch,
head) pairs (PERF.md, backward next step 0).

The grid (heads, batch, tiles) starts heads fastest, so a wave (one CTA per SM) holds ~4 tiles of
all 32 heads: each head's shared operands (the backward's Q, dO and float32 dq tiles, ~8 MB per
head at 8k, d=128; the forward's K and V, ~4 MB) are read by ~4 CTAs at a time, and ~128-256 MB
of them are in flight against 50 MB of L2 (the backward's dq reductions then miss L2 too). Dealt
in sections of pairs whose operands fit in 32 MB (4 heads for the backward at 8k, 8 for the
forward), a wave holds ~16-33 tiles of each of its few heads, as FlashAttention-3's schedulers
order theirs. Spreading one head's backward CTAs over different dq tiles cost 7% (PERF.md), which
this goes the other way from.

- ``bwd``: the unordered backward (the ordered one keeps the grid's order: its waits point only
  at CTAs started before, and a section's long key-tile chains would wait in turn).
- ``fwd``: the forward at head dims 128 and 256 (at 64 it spilled); its coordinates, derived by
  division, are read back from shared memory after the prologue (kept in registers, where
  blockIdx was re-read for free, they spilled).
- ``both``.

The section code goes into common/params.cuh here (both kernels include it); adopted, it belongs
in a header of its own. Compiles spill-free (every sm90 instantiation); not yet run on a GPU.

    python tools/ablate.py tools/variants/sections.py -- tools/bench_backward.py --quick \
        --families sm90
    python tools/ablate.py tools/variants/sections.py -- tools/bench_attention.py --quick \
        --families sm90
    python tools/ablate.py tools/variants/sections.py --apply both  # then the GPU tests
"""

PARAMS = "cuparing/kernels/common/params.cuh"
FWD = "cuparing/kernels/sm90/fwd.cuh"
BWD = "cuparing/kernels/sm90/bwd.cuh"

HELPER = [
        (
            PARAMS,
            'static_assert(sizeof(BwdParams) == 256, "BwdParams layout changed: update loader.BWD_PARAMS_DTYPE");\n\n}  // namespace cuparing\n',
            'static_assert(sizeof(BwdParams) == 256, "BwdParams layout changed: update loader.BWD_PARAMS_DTYPE");\n\n// The order in which a grid\'s CTAs meet their work: (batch, head) pairs dealt in sections that\n// share L2.\n//\n// The hardware starts CTAs in linear block order (x fastest, then y, then z), and a wave (one CTA\n// per SM) of a grid (heads, batch, tiles) with heads fastest holds a few tiles of every head: each\n// head\'s shared operands (the forward\'s K and V, the backward\'s Q, dO and float32 dq tiles) are\n// read by a few CTAs at a time, and every head\'s are in flight at once, far more than L2 holds.\n// Dealt in sections of `section` (batch, head) pairs instead, a section\'s pairs fastest, then its\n// tiles, a wave holds many tiles of few pairs whose operands fit in L2 (FlashAttention-3 orders\n// its CTAs the same way). A section of every pair is the grid\'s own order.\n\n// L2 the sections\' shared operands may fill (H100 and H200 have 50 MB)\nconstexpr long long kL2SectionBytes = 32ll << 20;\n\nstruct CtaWork {\n  int tile, b, h;  // the grid\'s z, y and x as the section order deals them\n};\n\n// This CTA\'s (tile, batch, head) in the section order of a grid (heads, batch, tiles).\n__device__ __forceinline__ CtaWork sectioned_work(int section) {\n  const int heads = gridDim.x, pairs = gridDim.x * gridDim.y;\n  const int linear = blockIdx.x + heads * (blockIdx.y + gridDim.y * blockIdx.z);\n  const int per_section = section * gridDim.z;\n  const int first_pair = linear / per_section * section;  // the section\'s first pair\n  const int in_section = min(section, pairs - first_pair);\n  const int r = linear - first_pair * gridDim.z;\n  const int pair = first_pair + r % in_section;\n  return CtaWork{r / in_section, pair / heads, pair % heads};\n}\n\n// How many (batch, head) pairs a section holds when each pair\'s shared operands take\n// `pair_bytes`: as many as fit in kL2SectionBytes (one at least), in whole groups of `group`\n// pairs (a GQA group\'s query heads read the same K / V) where a group fits.\n__device__ __forceinline__ int section_pairs(long long pair_bytes, int pairs, int group) {\n  long long fit = kL2SectionBytes / max(pair_bytes, 1ll);\n  int section = static_cast<int>(min(static_cast<long long>(pairs), max(fit, 1ll)));\n  if (section >= group) section -= section % group;\n  return section;\n}\n\n}  // namespace cuparing\n',
        ),
]

BWD_CHANGES = [
        (
            BWD,
            "#endif\n\n  const int n0 = blockIdx.z * Tr::kBlockN;  // the CTA's first key\n  const int h = blockIdx.x;\n  const int b = blockIdx.y;\n  // the key/value head (computed where used: kept, it would be spilled across the loop)\n  const auto kv_head = [&]() { return h / (p.nheads / p.nheads_kv); };\n",
            "#endif\n\n  // The unordered kernel deals (batch, head) pairs in sections whose Q, dO and float32 dq tiles\n  // share L2 (sectioned_work); the ordered one keeps the grid's order, whose waits point only at\n  // CTAs started before (and a section's long key-tile chains would wait in turn).\n  const CtaWork work =\n      kOrdered ? CtaWork{static_cast<int>(blockIdx.z), static_cast<int>(blockIdx.y),\n                         static_cast<int>(blockIdx.x)}\n               : sectioned_work(section_pairs(static_cast<i64>(p.seqlen_q) * Tr::kHeadDim * 8,\n                                              gridDim.x * gridDim.y, p.nheads / p.nheads_kv));\n  const int n0 = work.tile * Tr::kBlockN;  // the CTA's first key\n  const int h = work.h;\n  const int b = work.b;\n  // the key/value head (computed where used: kept, it would be spilled across the loop)\n  const auto kv_head = [&]() { return h / (p.nheads / p.nheads_kv); };\n",
        ),
        (
            BWD,
            "        if (named_barrier_or(kAgree, Tr::kConsumerThreads, bad)) {\n          if (ctid == 0) {  // lane 0 of its warp: written before that warp's release below\n            p.redo[(blockIdx.z * gridDim.y + b) * gridDim.x + h] = m0 + 1;\n            st_shared_u32(stop_flag, it + 1);\n          }\n",
            "        if (named_barrier_or(kAgree, Tr::kConsumerThreads, bad)) {\n          if (ctid == 0) {  // lane 0 of its warp: written before that warp's release below\n            p.redo[(n0 / Tr::kBlockN * gridDim.y + b) * gridDim.x + h] = m0 + 1;\n            st_shared_u32(stop_flag, it + 1);\n          }\n",
        ),
]

FWD_CHANGES = [
        (
            FWD,
            '  const int wg = warp >> 2;  // 0: producer; 1, 2: consumers\n\n  // heaviest query tiles first: under causal masks later positions see more keys\n  const int m_block = gridDim.z - 1 - blockIdx.z;\n  const int h = blockIdx.x;\n  const int b = blockIdx.y;\n  const int hk = h / (p.nheads / p.nheads_kv);\n  const int sq = p.seqlen_q;\n  const int sk = p.seqlen_k;\n',
            "  const int wg = warp >> 2;  // 0: producer; 1, 2: consumers\n\n  // (batch, head) pairs dealt in sections whose K and V share L2 (sectioned_work; a GQA group's\n  // query heads read the same); within one, the heaviest query tiles first: under causal masks\n  // later positions see more keys. Derived by division, the CTA's coordinates would stay live in\n  // registers where blockIdx is re-read for free, and spill: after the prologue they are read\n  // back from shared memory (work_at below).\n  const int group = p.nheads / p.nheads_kv;\n  const CtaWork work =\n      Tr::kHeadDim >= 128\n          ? sectioned_work(section_pairs(static_cast<i64>(p.seqlen_k) * Tr::kHeadDim * 4 / group,\n                                         gridDim.x * gridDim.y, group))\n          : CtaWork{static_cast<int>(blockIdx.z), static_cast<int>(blockIdx.y),\n                    static_cast<int>(blockIdx.x)};  // (d = 64: the sections spilled)\n  const int m_block = gridDim.z - 1 - work.tile;\n  const int h = work.h;\n  const int b = work.b;\n  const int hk = h / group;\n  const int sq = p.seqlen_q;\n  const int sk = p.seqlen_k;\n",
        ),
        (
            FWD,
            "    visible_key_tiles<Tr::kBlockN>(p.k_pos, sk, q_min, q_max, lo, hi, lane, n_first, n_count);\n  }\n  // Does some query of the CTA see key tile i only in part? (Then its V is checked for NaN/inf.)\n  // Positions are re-read and the fields taken from the parameters rather than kept: neither the\n  // consumers' main loop nor the producer (24 registers with TMA) has a register to spare.\n  const auto partial_for_cta = [&](int i) {\n    if (p.block_full) return false;\n    const int n0 = (n_first + i) * Tr::kBlockN;\n    const int first_q = (gridDim.z - 1 - blockIdx.z) * Tr::kBlockM;\n    return classify_tile(__ldg(p.q_pos + first_q),\n                         __ldg(p.q_pos + min(first_q + Tr::kBlockM, p.seqlen_q) - 1),\n                         __ldg(p.k_pos + n0), __ldg(p.k_pos + min(n0 + Tr::kBlockN, p.seqlen_k) - 1),\n                         p.lo, p.hi) != kTileFull;\n  };\n\n  // ---- shared memory: Q, kStages x (K, V), then the mbarriers\n  const u32 s_q = (smem_addr(smem_raw) + 1023u) & ~1023u;  // swizzle atoms are 1024 bytes\n",
            '    visible_key_tiles<Tr::kBlockN>(p.k_pos, sk, q_min, q_max, lo, hi, lane, n_first, n_count);\n  }\n  // ---- shared memory: Q, kStages x (K, V), then the mbarriers\n  const u32 s_q = (smem_addr(smem_raw) + 1023u) & ~1023u;  // swizzle atoms are 1024 bytes\n',
        ),
        (
            FWD,
            '  const u32 q_full = s_bar + 8u * (5 * Tr::kStages);\n  auto v_flag = [&](int s) { return s_bar + 8u * (5 * Tr::kStages + 1) + 4u * s; };\n  constexpr int kCheckBarrier = 3;  // named barrier of the V checkers (1, 2: consumer turns)\n  if (tid == 0) {\n',
            '  const u32 q_full = s_bar + 8u * (5 * Tr::kStages);\n  auto v_flag = [&](int s) { return s_bar + 8u * (5 * Tr::kStages + 1) + 4u * s; };\n  // the CTA\'s first query row, batch, head and K/V head (written before the barrier below)\n  constexpr int kWorkQueryRow = 0, kWorkBatch = 1, kWorkHead = 2, kWorkKvHead = 3;\n  const u32 s_work = s_bar + Tr::kBarrierBytes - 16;\n  static_assert(8 * (5 * Tr::kStages + 1) + 4 * Tr::kStages <= Tr::kBarrierBytes - 16,\n                "the mbarriers and flags end before the work slot");\n  const auto work_at = [&](int field) { return static_cast<int>(ld_shared_u32(s_work + 4 * field)); };\n  // Does some query of the CTA see key tile i only in part? (Then its V is checked for NaN/inf.)\n  // Positions are re-read and the fields taken from the parameters rather than kept: neither the\n  // consumers\' main loop nor the producer (24 registers with TMA) has a register to spare.\n  const auto partial_for_cta = [&](int i) {\n    if (p.block_full) return false;\n    const int n0 = (n_first + i) * Tr::kBlockN;\n    const int first_q = work_at(kWorkQueryRow);\n    return classify_tile(__ldg(p.q_pos + first_q),\n                         __ldg(p.q_pos + min(first_q + Tr::kBlockM, p.seqlen_q) - 1),\n                         __ldg(p.k_pos + n0), __ldg(p.k_pos + min(n0 + Tr::kBlockN, p.seqlen_k) - 1),\n                         p.lo, p.hi) != kTileFull;\n  };\n  constexpr int kCheckBarrier = 3;  // named barrier of the V checkers (1, 2: consumer turns)\n  if (tid == 0) {\n',
        ),
        (
            FWD,
            '    }\n    mbarrier_init(q_full, kFullArrivals);\n    mbarrier_init_fence();\n  }\n',
            '    }\n    mbarrier_init(q_full, kFullArrivals);\n    st_shared_u32(s_work + 4 * kWorkQueryRow, m0);\n    st_shared_u32(s_work + 4 * kWorkBatch, b);\n    st_shared_u32(s_work + 4 * kWorkHead, h);\n    st_shared_u32(s_work + 4 * kWorkKvHead, hk);\n    mbarrier_init_fence();\n  }\n',
        ),
        (
            FWD,
            '        for (int box = 0; box < Tr::kBoxes; ++box) {\n          tma_load_4d(s_k + box * Tr::kBlockN * Tr::kBoxRowBytes, &maps.k, full_k(s), box * 64, n0,\n                      hk, b);\n        }\n        mbarrier_wait(empty_v(s), phase ^ 1);\n',
            '        for (int box = 0; box < Tr::kBoxes; ++box) {\n          tma_load_4d(s_k + box * Tr::kBlockN * Tr::kBoxRowBytes, &maps.k, full_k(s), box * 64, n0,\n                      work_at(kWorkKvHead), work_at(kWorkBatch));\n        }\n        mbarrier_wait(empty_v(s), phase ^ 1);\n',
        ),
        (
            FWD,
            '        for (int box = 0; box < Tr::kBoxes; ++box) {\n          tma_load_4d(s_k + Tr::kKVBytes + box * Tr::kBlockN * Tr::kBoxRowBytes, &maps.v,\n                      full_v(s), box * 64, n0, hk, b);\n        }\n      }\n',
            '        for (int box = 0; box < Tr::kBoxes; ++box) {\n          tma_load_4d(s_k + Tr::kKVBytes + box * Tr::kBlockN * Tr::kBoxRowBytes, &maps.v,\n                      full_v(s), box * 64, n0, work_at(kWorkKvHead), work_at(kWorkBatch));\n        }\n      }\n',
        ),
        (
            FWD,
            '      // already holds changes nothing; common/nonfinite.cuh), after the last correction.\n      if (values_zeroed) {\n        const u16* v_head = p.v + b * p.v_batch_stride + hk * p.v_head_stride;\n#pragma unroll 1\n        for (int it = 0; it < n_count; ++it) {\n',
            '      // already holds changes nothing; common/nonfinite.cuh), after the last correction.\n      if (values_zeroed) {\n        const u16* v_head = p.v + work_at(kWorkBatch) * p.v_batch_stride +\n                            work_at(kWorkKvHead) * p.v_head_stride;\n#pragma unroll 1\n        for (int it = 0; it < n_count; ++it) {\n',
        ),
        (
            FWD,
            '\n    // ---- epilogue: normalise and write (common/epilogue.cuh)\n    write_block_output<Tr, kBf16>(p, acc_o, row_max, row_sum, warp_row0, b, h, lane);\n#ifdef CUPARING_CTA_PROFILE\n    if (lane == 0) cta_profile_end();\n',
            '\n    // ---- epilogue: normalise and write (common/epilogue.cuh)\n    write_block_output<Tr, kBf16>(p, acc_o, row_max, row_sum,\n                                  work_at(kWorkQueryRow) + cwarp * Tr::kRowsPerWarp,\n                                  work_at(kWorkBatch), work_at(kWorkHead), lane);\n#ifdef CUPARING_CTA_PROFILE\n    if (lane == 0) cta_profile_end();\n',
        ),
]

VARIANTS = {
    "bwd": HELPER + BWD_CHANGES,
    "fwd": HELPER + FWD_CHANGES,
    "both": HELPER + BWD_CHANGES + FWD_CHANGES,
}
