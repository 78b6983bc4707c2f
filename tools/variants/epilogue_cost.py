# ruff: noqa: E501 (the kernel's source lines, quoted as they are)
"""Ablations for tools/ablate.py: what the forward's epilogue costs (PERF.md, "Where the
size-dependent gap may come from"; ring steps of short CTAs merge a float32 partial per row).
Results are wrong in both; only their time counts.

- ``no-old-partial``: a merging ring step does not read the running result (it writes as the
  first step does).
- ``no-epilogue``: no output, LSE or running result written at all.

    python tools/ablate.py tools/variants/epilogue_cost.py -- tools/profile_ring_steps.py \
        --documents --ranks 2 --layouts zigzag
    python tools/ablate.py tools/variants/epilogue_cost.py -- tools/bench_attention.py --quick \
        --families sm90
"""

EPILOGUE = "cuparing/kernels/common/epilogue.cuh"

VARIANTS = {
    "no-old-partial": [
        (
            EPILOGUE,
            "      keep_old = a != neg_inf();  // never read an accumulator row with weight 0 (NaN-safe)\n",
            "      keep_old = false;\n",
        ),
    ],
    "no-epilogue": [
        (
            EPILOGUE,
            "  const int g = lane >> 2;\n  const int t = lane & 3;\n  const int sq = p.seqlen_q;\n  reduce_row_sums<Tr>(row_sum);\n",
            "  if (p.seqlen_q >= 0) return;\n  const int g = lane >> 2;\n  const int t = lane & 3;\n  const int sq = p.seqlen_q;\n  reduce_row_sums<Tr>(row_sum);\n",
        ),
    ],
}
