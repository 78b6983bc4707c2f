# ruff: noqa: E501 (the kernel's source lines, quoted as they are)
"""Ablations for tools/ablate.py: what a PARTIAL tile costs the Hopper forward (PERF.md, "sm90: a
persistent grid": packed documents' ring steps run ~30% slower per tile than one long causal
launch, with 24-26% of their tiles PARTIAL). Results are wrong in both; only their time counts.

- ``no-v-check``: the producer's NaN / inf scan of V on tiles not FULL for the CTA skipped.
- ``no-mask``: PARTIAL tiles' scores not masked element by element (EMPTY ones neither).

    python tools/ablate.py tools/variants/fwd_partial_cost.py -- tools/profile_ring_steps.py \
        --documents --ranks 2 --layouts zigzag
"""

FWD = "cuparing/kernels/sm90/fwd.cuh"

VARIANTS = {
    "no-v-check": [
        (
            FWD,
            '  const auto partial_for_cta = [&](int i) {\n    if (p.block_full) return false;\n',
            '  const auto partial_for_cta = [&](int i) {\n    if (p.block_full || i >= 0) return false;\n',
        ),
    ],
    "no-mask": [
        (
            FWD,
            '        if (kind != kTileFull) {\n          // (warp-uniform',
            '        if (kind < 0) {  // (never)\n          // (warp-uniform',
        ),
    ],
}
