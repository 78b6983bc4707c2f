"""Candidates for tools/ablate.py: the L2 budget of the Hopper kernels' CTA sections
(common/launch_order.cuh kL2SectionBytes, 32 MB in the tree; PERF.md backward v0.7).

At 8k tokens, d=128, a backward (batch, head) pair's Q, dO and float32 dq take 8 MB: 32 MB deals
4 heads per section (256 CTAs: a wave of 132 holds about half of each head's 64 key tiles),
16 MB deals 2 (a wave holds every key tile of both heads: each Q / dO tile is read by
all 64 CTAs of its head within one wave), 48 MB deals 6. The forward's K / V pairs (4 MB per
query head over its GQA group) follow the same budget. The sections gained 6-8% against a
predicted 10-20%: whether a smaller section keeps more of the shared operands in L2.

    python tools/ablate.py tools/variants/section_size.py -- tools/bench_backward.py --quick \\
        --families sm90
"""

ORDER = "cuparing/kernels/common/launch_order.cuh"
OLD = "constexpr long long kL2SectionBytes = 32ll << 20;\n"

VARIANTS = {
    f"{mb}MB": [(ORDER, OLD, f"constexpr long long kL2SectionBytes = {mb}ll << 20;\n")]
    for mb in (16, 48)
}
