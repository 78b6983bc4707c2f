# ruff: noqa: E501 (the kernel's source lines, quoted as they are)
"""Ablations for tools/ablate.py: what tiles not FULL for a CTA cost the Hopper backward (packed
documents' ring backward is ~3/4 of their training step; a zigzag rank's tiles are far more often
PARTIAL than one GPU's). Results are wrong in both; only their time counts.

- ``no-check``: the producer's NaN / inf scan of each such tile's Q and dO skipped (before
  commit "sm90 backward: the producer checks", the consumers scanned and agreed themselves: that
  ablation measured -6% of a packed ring rank, the move itself -8%).
- ``no-mask``: PARTIAL tiles' P^T not masked element by element (EMPTY ones neither).

    python tools/ablate.py tools/variants/bwd_partial_cost.py -- tools/profile_ring_steps.py \
        --documents --ranks 4 --layouts zigzag --backward
"""

BWD = "cuparing/kernels/sm90/bwd.cuh"

VARIANTS = {
    "no-check": [
        (
            BWD,
            "          partial ? region_magnitudes<kBf16, Tr::kProducerThreads>(s_q(s), Tr::kStageBytes, tid)\n",
            "          partial && p.nheads < 0 ? region_magnitudes<kBf16, Tr::kProducerThreads>(s_q(s), Tr::kStageBytes, tid)\n",
        ),
    ],
    "no-mask": [
        (
            BWD,
            "    if (kind != kTileFull) {  // warp-uniform; no wgmma inside\n",
            "    if (kind < 0) {  // (never)\n",
        ),
    ],
}
