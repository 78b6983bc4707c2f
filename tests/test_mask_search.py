"""The warp-wide searches of kernels/common/mask.cuh, modelled lane by lane: lower_bound_warp
(32 probes per round), the paired form of tools/variants/paired_bounds.py (two values per round,
both chains at once) and the forward's checked guesses (guessed_lower_bound, the search where a
check fails) give numpy's searchsorted answers for any sorted positions."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st


def search_round(pos, lo, hi, value):
    """One round of the warp's search in [lo, hi]: 32 lanes probe evenly spaced indices, and
    the count of probes before the answer narrows the range."""
    step = (hi - lo + 31) >> 5
    count = sum(
        1 for lane in range(32)
        if (probe := lo + (lane + 1) * step - 1) < hi and pos[probe] < value
    )  # fmt: skip
    return lo + count * step, min(hi, lo + (count + 1) * step - 1)


def lower_bound_warp(pos, value):
    lo, hi = 0, len(pos)
    while lo < hi:
        lo, hi = search_round(pos, lo, hi, value)
    return lo


def lower_bounds_warp(pos, value0, value1):
    """The paired form: each round narrows both ranges (a finished one stays); returns both
    answers and the rounds taken."""
    bounds = [(0, len(pos)), (0, len(pos))]
    rounds = 0
    while any(lo < hi for lo, hi in bounds):
        rounds += 1
        bounds = [search_round(pos, lo, hi, value) if lo < hi else (lo, hi)
                  for (lo, hi), value in zip(bounds, (value0, value1), strict=True)]  # fmt: skip
    return bounds[0][0], bounds[1][0], rounds


@given(
    pos=st.lists(st.integers(-50, 5000), max_size=3000).map(sorted),
    values=st.tuples(st.integers(-60, 5100), st.integers(-60, 5100)),
)
def test_searches_find_numpys_lower_bounds(pos, values):
    want = [int(np.searchsorted(np.asarray(pos, dtype=np.int64), v, side="left")) for v in values]
    assert [lower_bound_warp(pos, v) for v in values] == want
    first, second, rounds = lower_bounds_warp(pos, *values)
    assert [first, second] == want
    # the rounds of the longer chain, not of both: 32 ** rounds covers the positions
    assert rounds <= max(1, int(np.ceil(np.log(max(len(pos), 1)) / np.log(32))) + 1)


@given(
    length=st.integers(0, 40000), spread=st.integers(1, 100000), seed=st.integers(0, 2**32 - 1),
    picks=st.tuples(st.floats(-0.1, 1.1), st.floats(-0.1, 1.1)),
)  # fmt: skip
def test_searches_on_long_positions_with_repeats(length, spread, seed, picks):
    """Long arrays (several rounds of 32 probes) with repeated values (padding, documents)."""
    rng = np.random.default_rng(seed)
    pos = np.sort(rng.integers(0, spread, size=length)).tolist()
    values = tuple(int(p * spread) for p in picks)
    want = [int(np.searchsorted(np.asarray(pos, dtype=np.int64), v, side="left")) for v in values]
    first, second, _ = lower_bounds_warp(pos, *values)
    assert [first, second] == want
    assert lower_bound_warp(pos, values[0]) == want[0]


def guessed_lower_bound(pos, value):
    """mask.cuh's guess for positions without gaps from pos[0]: the index value - pos[0],
    clamped to [0, n], if pos[g - 1] < value <= pos[g] holds there, else -1."""
    n = len(pos)
    base = pos[0] if n else 0
    g = min(max(value - base, 0), n)
    above_previous = g == 0 or pos[g - 1] < value
    at_or_past = g == n or pos[g] >= value
    return g if above_previous and at_or_past else -1


def guessed_then_searched(pos, value):
    """tiles_in_range<..., kGuess>'s lower bound: the guess, or the search where it fails."""
    found = guessed_lower_bound(pos, value)
    return found if found >= 0 else lower_bound_warp(pos, value)


@given(
    length=st.integers(0, 20000), base=st.integers(-(2**30) + 1, 2**30 - 20001),
    gaps=st.lists(st.tuples(st.integers(0, 19999), st.integers(-1, 7)), max_size=4),
    values=st.lists(st.integers(-(2**31), 2**31), min_size=1, max_size=6),
    near=st.lists(st.integers(-3, 20003), max_size=6),
)  # fmt: skip
def test_guessed_bounds_equal_numpys(length, base, gaps, values, near):
    """Positions without gaps from a random base (a device's, a contiguous block's), then the
    same with a few gaps or repeats put in (padding, documents, zigzag's second piece): the
    guess, or the search behind a failed check, is numpy's lower bound every time; with no gap
    the guess itself holds for every value."""
    gapless = list(range(base, base + length))
    probes = values + [base + offset for offset in near]
    for value in probes:
        want = int(np.searchsorted(np.asarray(gapless, dtype=np.int64), value, side="left"))
        assert guessed_lower_bound(gapless, value) == want
    # a step of -1 repeats the previous position (the sentinels of padding rows); others skip
    steps = np.ones(length, dtype=np.int64)
    for at, step in gaps:
        if 0 < at < length:
            steps[at] = 0 if step == -1 else step + 1
    gapped = (base + np.concatenate([[0], np.cumsum(steps[1:])])).tolist() if length else []
    for value in probes:
        want = int(np.searchsorted(np.asarray(gapped, dtype=np.int64), value, side="left"))
        assert guessed_then_searched(gapped, value) == want
