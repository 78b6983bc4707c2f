"""Candidates for tools/ablate.py: the L2 budget of the Hopper kernels' CTA sections
(kernels/launch_order.py L2_SHARE: 0.64 of the device's L2 in the tree, 32 MB of an H100's or
H200's 50; PERF.md backward v0.7).

At 8k tokens, d=128, a backward (batch, head) pair's Q, dO and float32 dq take 8 MB: 32 MB deals
4 heads per section (256 CTAs: a wave of 132 holds about half of each head's 64 key tiles),
16 MB deals 2 (a wave holds every key tile of both heads: each Q / dO tile is read by
all 64 CTAs of its head within one wave), 48 MB deals 6. The forward's K / V pairs (4 MB per
query head over its GQA group) follow the same budget. The sections gained 6-8% against a
predicted 10-20%: whether a smaller section keeps more of the shared operands in L2.

    python tools/ablate.py tools/variants/section_size.py -- tools/bench_backward.py --quick \\
        --families sm90
"""

ORDER = "cuparing/kernels/launch_order.py"
OLD = "L2_SHARE = 0.64\n"

VARIANTS = {
    f"{mb}MB": [(ORDER, OLD, f"L2_SHARE = {mb / 50}\n")]
    for mb in (16, 48)
}
