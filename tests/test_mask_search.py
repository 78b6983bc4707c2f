"""The warp-wide searches of kernels/common/mask.cuh, modelled lane by lane: lower_bound_warp
(32 probes per round), the paired form of tools/variants/paired_bounds.py (two values per round,
both chains at once) and the forward's checked guesses (guessed_lower_bound, the search where a
check fails) give numpy's searchsorted answers for any sorted positions; the Hopper forward's
load-free mask (apply_mask_run) masks as the loaded one (apply_mask) wherever it is taken."""

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


def mask_by_loads(q_rows, k_pos, n0, seqlen_k, lo, hi, block_n):
    """apply_mask's visibility of one tile, [rows, block_n]: key n0 + c loaded per column."""
    cols = n0 + np.arange(block_n)
    in_range = cols < seqlen_k
    kp = np.where(in_range, np.asarray(k_pos)[np.minimum(cols, seqlen_k - 1)], 0)
    delta = kp[None, :] - np.asarray(q_rows)[:, None]
    return in_range[None, :] & (delta >= lo) & (delta <= hi)


def mask_by_run(q_rows, k_min, keys, lo, hi, block_n):
    """apply_mask_run's: one shift per row (k_min - q), column c visible iff c < keys and
    lo <= c + shift <= hi."""
    cols = np.arange(block_n)
    shift = k_min - np.asarray(q_rows)
    delta = cols[None, :] + shift[:, None]
    return (cols < keys)[None, :] & (delta >= lo) & (delta <= hi)


@given(
    runs=st.lists(st.tuples(st.integers(1, 300), st.integers(1, 5000)), min_size=1, max_size=6),
    base=st.integers(-(2**29), 2**29), window=st.tuples(st.integers(0, 400), st.integers(0, 400)),
    causal=st.booleans(), block_n=st.sampled_from([64, 128]), seed=st.integers(0, 2**32 - 1),
)  # fmt: skip
def test_the_load_free_mask_is_the_loaded_one_where_it_applies(runs, base, window, causal,
                                                                block_n, seed):  # fmt: skip
    """The Hopper forward masks a tile without loading key positions where the tile's end
    positions lie its length apart (``k_max - k_min == keys - 1``); over strictly increasing
    key positions (runs of consecutive ones with gaps between: documents, padding, zigzag's two
    pieces), every tile that test admits is masked exactly as by the loads, for any queries,
    window and Sk tail; tiles of consecutive positions are always admitted."""
    rng = np.random.default_rng(seed)
    k_pos, at = [], base
    for length, gap in runs:
        k_pos.extend(range(at, at + length))
        at += length + gap
    seqlen_k = len(k_pos)
    lo, hi = -window[0], 0 if causal else window[1]
    for n0 in range(0, seqlen_k, block_n):
        keys = min(block_n, seqlen_k - n0)
        k_min, k_max = k_pos[n0], k_pos[n0 + keys - 1]
        consecutive = k_pos[n0 : n0 + keys] == list(range(k_min, k_min + keys))
        admitted = k_max - k_min == keys - 1
        assert admitted == consecutive
        if not admitted:
            continue
        # queries near the tile (and far from it), sorted as the kernels' rows are
        q_rows = np.sort(rng.integers(k_min - 2 * block_n - 500, k_max + 2 * block_n + 500, 16))
        np.testing.assert_array_equal(
            mask_by_run(q_rows, k_min, keys, lo, hi, block_n),
            mask_by_loads(q_rows, k_pos, n0, seqlen_k, lo, hi, block_n),
        )
