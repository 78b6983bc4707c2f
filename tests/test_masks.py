"""The visibility rule, stated again from README's definition and checked by brute force.

Key ``j`` is visible to query ``i`` iff ``i - left <= j <= i + right`` (``None``: unbounded) and,
when causal, ``j <= i``. Both the code under test (``MaskSpec``) and the oracle
(``cuparing.reference.visible_pairs``) must say exactly that, and block classification must be
conservative: ``EMPTY`` only if no pair is visible, ``FULL`` only if every pair is.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from cuparing.masks import BlockKind, MaskSpec
from cuparing.reference import visible_pairs

SIDES = st.one_of(st.none(), st.integers(-40, 40))
POSITIONS = st.lists(st.integers(0, 60), min_size=1, max_size=12, unique=True).map(sorted)


def brute_force(q_positions, k_positions, causal, left, right) -> np.ndarray:
    seen = np.zeros((len(q_positions), len(k_positions)), dtype=bool)
    for a, i in enumerate(q_positions):
        for b, j in enumerate(k_positions):
            ok = (left is None or i - left <= j) and (right is None or j <= i + right)
            seen[a, b] = ok and (not causal or j <= i)
    return seen


@given(POSITIONS, POSITIONS, st.booleans(), SIDES, SIDES)
def test_visibility_is_the_readme_rule(q_positions, k_positions, causal, left, right):
    want = brute_force(q_positions, k_positions, causal, left, right)
    spec = MaskSpec(causal, left, right)
    got = spec.visible(np.array(q_positions), np.array(k_positions))
    np.testing.assert_array_equal(got, want)
    oracle = visible_pairs(q_positions, k_positions, causal, (left, right))
    np.testing.assert_array_equal(oracle, want)


@given(POSITIONS, POSITIONS, st.booleans(), SIDES, SIDES)
def test_classification_is_conservative(q_positions, k_positions, causal, left, right):
    seen = brute_force(q_positions, k_positions, causal, left, right)
    kind = MaskSpec(causal, left, right).classify(
        q_positions[0], q_positions[-1], k_positions[0], k_positions[-1]
    )
    if kind == BlockKind.EMPTY:
        assert not seen.any()
    elif kind == BlockKind.FULL:
        assert seen.all()
    spec = MaskSpec(causal, left, right)
    if -spec.left_bound > spec.right_bound:
        return  # a window that hides everything: any conservative answer will do
    # for a contiguous block of positions the classification is also exact
    q_span = list(range(q_positions[0], q_positions[-1] + 1))
    k_span = list(range(k_positions[0], k_positions[-1] + 1))
    span_seen = brute_force(q_span, k_span, causal, left, right)
    exact = (BlockKind.EMPTY if not span_seen.any()
             else BlockKind.FULL if span_seen.all() else BlockKind.PARTIAL)  # fmt: skip
    assert kind == exact
