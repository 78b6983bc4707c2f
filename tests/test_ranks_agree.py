"""Every rank's ring call is checked against the others' before the first transfer (issue 13).

A rank with another layout, mask or local length than its peers used to compute a wrong answer
silently, or wait for the ring's timeout; now every rank raises, naming the field.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from numerics import check_forward

import cuparing as cr

X = np.random.default_rng(0).standard_normal((1, 16, 2, 8))


def outcome(call):
    """What ``call()`` gave on this rank: ``"ok"`` or its ValueError's message."""
    try:
        call()
    except ValueError as exc:
        return str(exc)
    return "ok"


def forward_with(rank_options):
    """A rank function calling ring_attention with ``rank_options[ring.rank]`` (layout, causal,
    tokens per rank)."""

    def fn(ring):
        layout, causal, local = rank_options[ring.rank]
        xl = cr.shard(X, ring.rank, ring.size, layout=layout)[:, :local]
        return outcome(lambda: cr.ring_attention(xl, xl, xl, ring, causal=causal, layout=layout))

    return fn


@pytest.mark.parametrize(
    ("ranks", "field"),
    [
        ([("zigzag", True, 8), ("contiguous", True, 8)], "layout"),
        ([("zigzag", True, 8), ("zigzag", False, 8)], "causal"),
        ([("striped", False, 8), ("striped", False, 4)], "global_seqlen"),
    ],
)
def test_ranks_that_disagree_raise_on_every_rank_naming_the_field(ranks, field):
    messages = cr.simulate(len(ranks), forward_with(ranks), timeout=30)
    for rank, message in enumerate(messages):
        assert f"rank {rank}: the ranks disagree on {field}:" in message, message
        assert f"rank {1 - rank} has {field}=" in message, message


def test_backward_ranks_that_disagree_on_the_window_are_named():
    def fn(ring):
        xl = cr.shard(X, ring.rank, ring.size)
        out, lse = cr.ring_attention(xl, xl, xl, ring, return_lse=True)
        window = (2, 2) if ring.rank == 0 else (2, 3)
        return outcome(
            lambda: cr.ring_attention_backward(xl, xl, xl, xl, out, lse, ring, window=window)
        )

    messages = cr.simulate(2, fn, timeout=30)
    assert all("the ranks disagree on window:" in m for m in messages), messages
    assert "window='(2, 2)', rank 1 has window='(2, 3)'" in messages[0]


def test_every_ring_call_asks_the_ranks_to_agree():
    calls = []

    def fn(ring):
        agree = ring.agree

        def counting(fields):
            calls.append(ring.rank)
            agree(fields)

        ring.agree = counting
        xl = cr.shard(X, ring.rank, ring.size, layout="zigzag")
        outs = [cr.ring_attention(xl, xl, xl, ring, causal=True, layout="zigzag") for _ in range(3)]
        return outs[-1]

    full = cr.unshard(cr.simulate(2, fn, timeout=30), layout="zigzag")
    check_forward(full, None, X, X, X, causal=True)
    assert sorted(calls) == [0, 0, 0, 1, 1, 1]  # every call asks; the ring caches the answer


def test_a_rank_whose_call_is_invalid_fails_every_rank_at_once():
    """Rank 1's call fails its own checks (a float64 k beside float32 q): the other rank learns
    it inside its agreement check and raises too, long before the ring's timeout."""
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((1, 8, 2, 4)).astype(np.float32) for _ in range(3))

    def fn(ring):
        k_here = k.astype(np.float64) if ring.rank == 1 else k
        try:
            cr.ring_attention(q, k_here, v, ring)
        except (TypeError, ValueError) as exc:
            return f"{type(exc).__name__}: {exc}"
        return "no error"

    start = time.monotonic()
    got = cr.simulate(2, fn, timeout=30)
    assert time.monotonic() - start < 10
    assert "rank 1 could not make this call" in got[0], got
    assert "dtype" in got[1] and "could not make" not in got[1], got


def test_a_rank_without_the_deterministic_kernels_fails_every_rank_at_once(monkeypatch):
    """Rank 1 cannot run ``deterministic=True`` (a NotImplementedError from its kernel check,
    stood in for here, as a GPU without the ordered kernels raises it): rank 0 learns it inside
    its agreement check and raises too, long before the ring's timeout."""
    rng = np.random.default_rng(4)
    q, k, v, dout = (rng.standard_normal((1, 8, 2, 4)).astype(np.float32) for _ in range(4))
    q_of_rank_one = q.copy()  # (how the stand-in knows rank 1's call)
    real = cr.api._check_deterministic_runs

    def rank_one_lacks_them(origin, q, deterministic):
        if deterministic and q is q_of_rank_one:
            raise NotImplementedError("deterministic=True needs the Hopper backward kernels")
        real(origin, q, deterministic)

    def fn(ring):
        q_here = q_of_rank_one if ring.rank == 1 else q
        out, lse = cr.ring_attention(q_here, k, v, ring, return_lse=True)
        try:
            cr.ring_attention_backward(dout, q_here, k, v, out, lse, ring, deterministic=True)
        except (NotImplementedError, ValueError) as exc:
            return f"{type(exc).__name__}: {exc}"
        return "no error"

    monkeypatch.setattr(cr.api, "_check_deterministic_runs", rank_one_lacks_them)
    start = time.monotonic()
    got = cr.simulate(2, fn, timeout=30)
    assert time.monotonic() - start < 10
    assert "rank 1 could not make this call" in got[0], got
    assert got[1].startswith("NotImplementedError"), got
