"""The simulated ring: failures surface with their rank, nothing hangs, windows save transfers."""

from __future__ import annotations

import inspect
import re
import sys
import threading
import time

import numpy as np
import pytest
from numerics import check_forward

import cuparing as cr
from cuparing.comm.local import LocalRing
from cuparing.masks import MaskSpec
from cuparing.schedule import plan_ring


def test_simulate_returns_results_in_rank_order():
    assert cr.simulate(5, lambda ring: (ring.rank, ring.size)) == [(r, 5) for r in range(5)]


def test_a_failing_rank_raises_its_error_and_releases_the_others():
    def fn(ring):
        if ring.rank == 2:
            raise KeyError("boom on two")
        ring.exchange([np.zeros(3)]).wait()  # rank 3 waits on rank 2 forever otherwise
        return ring.rank

    start = time.monotonic()
    with pytest.raises(KeyError, match="boom on two") as info:
        cr.simulate(4, fn, timeout=30)
    assert time.monotonic() - start < 10
    if sys.version_info >= (3, 11):  # exception notes exist from Python 3.11 on
        assert "raised on simulated rank 2 of 4" in info.value.__notes__


def test_a_silent_peer_times_out_with_a_clear_error():
    def fn(ring):
        if ring.rank == 0:
            time.sleep(2)  # never sends
            return None
        return ring.exchange([np.zeros(2)]).wait()

    with pytest.raises(cr.RingTimeoutError, match=r"rank 1: no data from rank 0 .* within 0.5 s"):
        cr.simulate(2, fn, timeout=0.5)


def line_of(fn, text: str) -> int:
    """The line number of the first line of ``fn``'s source that contains ``text``."""
    lines, first = inspect.getsourcelines(fn)
    return first + next(i for i, line in enumerate(lines) if text in line)


# simulate must raise by its timeout plus this: the ring waits end at the deadline and the ranks
# in them exit at once; the rest is slack for a loaded CI machine
SLACK_S = 4.0


def test_a_rank_sleeping_past_the_timeout_is_reported_by_the_timeout():
    def fn(ring):
        if ring.rank == 1:
            time.sleep(120)  # sleeps far past the timeout, never sends
        return ring.exchange([np.zeros(2)]).wait()

    start = time.monotonic()
    with pytest.raises(cr.RingTimeoutError) as info:
        cr.simulate(3, fn, timeout=1.0)
    elapsed = time.monotonic() - start
    assert 1.0 <= elapsed < 1.0 + SLACK_S, elapsed  # before: it waited for the sleep (120 s)
    message = str(info.value)
    assert "simulate: rank 1 of 3 still running after the 1 s timeout" in message
    here = f"{__file__}:{line_of(fn, 'time.sleep(120)')} in fn"
    assert f"rank 1: at {here}" in message
    # rank 2 waited for rank 1 and timed out: its error is the cause, and quoted
    assert isinstance(info.value.__cause__, cr.RingTimeoutError)
    assert "first error, on rank 2: RingTimeoutError: rank 2: no data from rank 1" in message
    if sys.version_info >= (3, 11):  # exception notes exist from Python 3.11 on
        assert any(
            note.startswith("stack of simulated rank 1") and "time.sleep(120)" in note
            for note in info.value.__notes__
        )


def test_a_rank_blocked_for_good_is_reported_by_the_timeout():
    never = threading.Event()

    def fn(ring):
        if ring.rank == 0:
            never.wait()  # blocked outside the ring: nothing but the test can release it
        return ring.rank

    start = time.monotonic()
    try:
        with pytest.raises(cr.RingTimeoutError) as info:
            cr.simulate(2, fn, timeout=1.0)
        elapsed = time.monotonic() - start
    finally:
        never.set()  # let the left-behind thread end
    assert 1.0 <= elapsed < 1.0 + SLACK_S, elapsed  # before: it never returned
    message = str(info.value)
    assert "simulate: rank 0 of 2 still running after the 1 s timeout" in message
    # the innermost frames: threading's wait, called from the test's line
    assert re.search(r"rank 0: at .*threading\.py:\d+ in wait, called from ", message), message
    assert f"{__file__}:{line_of(fn, 'never.wait()')} in fn" in message
    assert info.value.__cause__ is None  # rank 1 finished: no other error to report
    if sys.version_info >= (3, 11):  # exception notes exist from Python 3.11 on
        assert any("never.wait()" in note for note in info.value.__notes__)


def test_exchange_delivers_from_the_previous_rank_with_any_shift():
    def fn(ring):
        got1 = ring.exchange([np.array([ring.rank])], shift=1).wait()[0][0]
        got3 = ring.exchange([np.array([ring.rank])], shift=3, tag="far").wait()[0][0]
        return int(got1), int(got3)

    assert cr.simulate(5, fn) == [((r - 1) % 5, (r - 3) % 5) for r in range(5)]


class CountingRing(LocalRing):
    def __init__(self, inner):
        self.__dict__.update(inner.__dict__)
        self.tags = []

    def exchange(self, arrays, shift=1, tag="kv"):
        self.tags.append((tag, shift))
        return super().exchange(arrays, shift, tag)


def test_a_short_window_stops_the_ring_early():
    world, local = 4, 16
    plan = plan_ring("contiguous", 0, world, local, MaskSpec(True, 3, None))
    assert plan.last_step == 1  # a 3-token window never reaches two shards back
    rng = np.random.default_rng(0)
    q, k, v, dout = rng.standard_normal((4, 1, world * local, 2, 8))

    def fn(ring):
        ring = CountingRing(ring)
        ql, kl, vl, dl = (cr.shard(x, ring.rank, world) for x in (q, k, v, dout))
        out, lse = cr.ring_attention(ql, kl, vl, ring, causal=True, window=(3, None),
                                     return_lse=True)  # fmt: skip
        cr.ring_attention_backward(dl, ql, kl, vl, out, lse, ring, causal=True, window=(3, None))
        return out, ring.tags

    results = cr.simulate(world, fn)
    # forward: 1 K/V hop; backward: 1 K/V hop, 1 dK/dV hop, then dK/dV jump home (shift 3)
    assert results[0][1] == [("kv", 1), ("kv", 1), ("dkv", 1), ("dkv_home", 3)]
    out = cr.unshard([r[0] for r in results])
    check_forward(out, None, q, k, v, causal=True, window=(3, None))


def test_causal_contiguous_skips_blocks_above_the_diagonal():
    plan = plan_ring("contiguous", 1, 4, 8, MaskSpec(causal=True))
    assert [k.name for k in plan.kinds] == ["PARTIAL", "FULL", "EMPTY", "EMPTY"]
    assert plan.last_step == 3  # the last rank still needs every step
