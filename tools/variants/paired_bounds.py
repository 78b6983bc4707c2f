# ruff: noqa: E501 (the kernel's source lines, quoted as they are)
"""Candidate for tools/ablate.py: both lower bounds of ``tiles_in_range`` (common/mask.cuh) in
one warp loop (PERF.md, forward next step 1).

A CTA of a masked launch whose positions have gaps (the forward's checked guesses fail there;
the backward always) finds its visible key tiles (the backward: its query tiles) before its
first K/V load with two warp-wide searches, each a chain of dependent loads (3 at 8k positions,
one per round of 32 probes), one after the other: with them, the causal forward's prologue is
3.4 us against the full mask's 1.7. Here every lane probes for both values each round and both
loads are issued before either ballot, so the two chains overlap: 3 dependent loads instead of
6. Predicted ~0.5 us per CTA: ~1% of the causal forward at 8k, ~1.5% of a packed ring step.
Same answers as two lower_bound_warp calls (tests/test_variants.py checks that the text
applies; tests/test_mask_search.py models both searches); compiles spill-free; not run.

    python tools/ablate.py tools/variants/paired_bounds.py -- tools/bench_attention.py --quick \\
        --families sm90
    python tools/ablate.py tools/variants/paired_bounds.py -- tools/profile_ring_steps.py \\
        --documents --ranks 2 --layouts zigzag
"""

MASK = "cuparing/kernels/common/mask.cuh"

VARIANTS = {
    "paired": [
        (
            MASK,
            "// The tiles (kTile entries each) of a sorted position array holding some value in\n",
            """// lower_bound_warp for two values at once: each round every lane probes for both, both loads
// issued before either ballot, so the two chains of dependent loads overlap.
__device__ __forceinline__ void lower_bounds_warp(const int* __restrict__ pos, int n, i64 value0,
                                                  i64 value1, int lane, int& found0,
                                                  int& found1) {
  int lo0 = 0, hi0 = n, lo1 = 0, hi1 = n;  // the answers lie in [lo0, hi0], [lo1, hi1]
  while (lo0 < hi0 || lo1 < hi1) {
    const int step0 = (hi0 - lo0 + 31) >> 5, step1 = (hi1 - lo1 + 31) >> 5;
    const int probe0 = lo0 + (lane + 1) * step0 - 1, probe1 = lo1 + (lane + 1) * step1 - 1;
    const bool in0 = lo0 < hi0 && probe0 < hi0, in1 = lo1 < hi1 && probe1 < hi1;
    const int at0 = in0 ? __ldg(pos + probe0) : 0;
    const int at1 = in1 ? __ldg(pos + probe1) : 0;
    const int count0 = __popc(__ballot_sync(0xffffffffu, in0 && static_cast<i64>(at0) < value0));
    const int count1 = __popc(__ballot_sync(0xffffffffu, in1 && static_cast<i64>(at1) < value1));
    if (lo0 < hi0) {
      hi0 = min(hi0, lo0 + (count0 + 1) * step0 - 1);
      lo0 += count0 * step0;
    }
    if (lo1 < hi1) {
      hi1 = min(hi1, lo1 + (count1 + 1) * step1 - 1);
      lo1 += count1 * step1;
    }
  }
  found0 = lo0;
  found1 = lo1;
}

// The tiles (kTile entries each) of a sorted position array holding some value in
""",
        ),
        (
            MASK,
            """  if (begin < 0) begin = lower_bound_warp(pos, n, begin_value, lane);
  if (end < 0) end = lower_bound_warp(pos, n, end_value, lane);
""",
            """  if (begin < 0 && end < 0) {
    lower_bounds_warp(pos, n, begin_value, end_value, lane, begin, end);
  } else if (begin < 0) {
    begin = lower_bound_warp(pos, n, begin_value, lane);
  } else if (end < 0) {
    end = lower_bound_warp(pos, n, end_value, lane);
  }
""",
        ),
    ],
}
