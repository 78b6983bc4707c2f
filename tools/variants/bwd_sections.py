# ruff: noqa: E501 (the kernel's source lines, quoted as they are)
"""Candidate for tools/ablate.py: the Hopper backward's CTAs dealt in L2-sized sections of
(batch, head) pairs (PERF.md, backward next step 0). The grid (heads, batch, key tiles) starts
heads fastest, so a wave holds ~4 key tiles of all 32 heads: each head's Q, dO and float32 dq
tiles are shared by ~4 CTAs at a time and ~256 MB of them are in flight against 50 MB of L2
(the dq tiles' reductions then miss L2 too). In sections of pairs whose operands fit in 32 MB
(4 heads at 8k, d=128), a wave holds ~33 key tiles of each of its 4 heads, as
FlashAttention-3's schedulers do. The ordered (deterministic) kernel keeps the grid's order.
Spreading one head's CTAs over different dq tiles cost 7% (PERF.md), which this reverses.
Compiles spill-free; not yet run on a GPU. If adopted, the section code belongs in
common/launch_order.cuh, for the forward too (there it spilled the TMA variants: its b, h and
query tile, derived by division, stay live where blockIdx was re-read; keep them in shared
memory).

    python tools/ablate.py tools/variants/bwd_sections.py -- tools/bench_backward.py --quick \
        --families sm90
    python tools/ablate.py tools/variants/bwd_sections.py --apply sections  # then the tests
"""

BWD = "cuparing/kernels/sm90/bwd.cuh"

VARIANTS = {
    "sections": [
        (
            BWD,
            "// Deterministic mode's dQ turns (common/turns.cuh). The counter of query tile m of this CTA's",
            "// The order in which a grid's CTAs meet their work: (batch, head) pairs dealt in sections that\n// share L2.\n//\n// The hardware starts CTAs in linear block order (x fastest, then y, then z), and a wave (one CTA\n// per SM) of a grid (heads, batch, tiles) with heads fastest holds a few tiles of every head: each\n// head's shared operands (the forward's K and V, the backward's Q, dO and float32 dq tiles) are\n// read by a few CTAs at a time, and every head's are in flight at once, far more than L2 holds.\n// Dealt in sections of `section` (batch, head) pairs instead, a section's pairs fastest, then its\n// tiles, a wave holds many tiles of few pairs whose operands fit in L2 (FlashAttention-3 orders\n// its CTAs the same way). A section of every pair is the grid's own order.\n\n// L2 the sections' shared operands may fill (H100 and H200 have 50 MB)\nconstexpr long long kL2SectionBytes = 32ll << 20;\n\nstruct CtaWork {\n  int tile, b, h;  // the grid's z, y and x as the section order deals them\n};\n\n// This CTA's (tile, batch, head) in the section order of a grid (heads, batch, tiles).\n__device__ __forceinline__ CtaWork sectioned_work(int section) {\n  const int heads = gridDim.x, pairs = gridDim.x * gridDim.y;\n  const int linear = blockIdx.x + heads * (blockIdx.y + gridDim.y * blockIdx.z);\n  const int per_section = section * gridDim.z;\n  const int first_pair = linear / per_section * section;  // the section's first pair\n  const int in_section = min(section, pairs - first_pair);\n  const int r = linear - first_pair * gridDim.z;\n  const int pair = first_pair + r % in_section;\n  return CtaWork{r / in_section, pair / heads, pair % heads};\n}\n\n// How many (batch, head) pairs a section holds when each pair's shared operands take\n// `pair_bytes`: as many as fit in kL2SectionBytes (one at least), in whole groups of `group`\n// pairs (a GQA group's query heads read the same K / V) where a group fits.\n__device__ __forceinline__ int section_pairs(long long pair_bytes, int pairs, int group) {\n  long long fit = kL2SectionBytes / max(pair_bytes, 1ll);\n  int section = static_cast<int>(min(static_cast<long long>(pairs), max(fit, 1ll)));\n  if (section >= group) section -= section % group;\n  return section;\n}\n\n\n// Deterministic mode's dQ turns (common/turns.cuh). The counter of query tile m of this CTA's",
        ),
        (
            BWD,
            "  const int n0 = blockIdx.z * Tr::kBlockN;  // the CTA's first key\n  const int h = blockIdx.x;\n  const int b = blockIdx.y;\n",
            "  // The unordered kernel deals (batch, head) pairs in sections whose Q, dO and float32 dq tiles\n  // share L2 (sectioned_work above); the ordered one keeps the grid's order, whose waits point\n  // only at CTAs started before (and a section's long key-tile chains would wait in turn).\n  const CtaWork work =\n      kOrdered ? CtaWork{static_cast<int>(blockIdx.z), static_cast<int>(blockIdx.y),\n                         static_cast<int>(blockIdx.x)}\n               : sectioned_work(section_pairs(static_cast<i64>(p.seqlen_q) * Tr::kHeadDim * 8,\n                                              gridDim.x * gridDim.y, p.nheads / p.nheads_kv));\n  const int n0 = work.tile * Tr::kBlockN;  // the CTA's first key\n  const int h = work.h;\n  const int b = work.b;\n",
        ),
        (
            BWD,
            '            p.redo[(blockIdx.z * gridDim.y + b) * gridDim.x + h] = m0 + 1;',
            '            p.redo[(n0 / Tr::kBlockN * gridDim.y + b) * gridDim.x + h] = m0 + 1;',
        ),
    ],
}
