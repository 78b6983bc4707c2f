"""Ranks must agree: Ring.agree on simulated ranks and on GPU rings over the fake GPU stack."""

from __future__ import annotations

import re
import threading

import pytest
from fake_gpu import FakeStack, run_threads

import cuparing as cr
from cuparing.comm.ipc import IpcRing
from cuparing.comm.local import LocalRing, SoloRing
from cuparing.comm.nccl import NcclRing

CALL = {"layout": "zigzag", "dtype": "bfloat16", "q": "(1, 64, 4, 8)", "causal": "True"}


def _outcome(call):
    """``call()``'s result, or the message of the ValueError it raised."""
    try:
        return call()
    except ValueError as exc:
        return f"ValueError: {exc}"


@pytest.fixture
def gathers(monkeypatch):
    """Counts LocalRing.allgather_bytes calls, by rank."""
    counts: dict[int, int] = {}
    real = LocalRing.allgather_bytes

    def counting(self, data):
        counts[self.rank] = counts.get(self.rank, 0) + 1
        return real(self, data)

    monkeypatch.setattr(LocalRing, "allgather_bytes", counting)
    return counts


# --- simulated ranks ---


def test_a_mismatch_raises_on_every_rank_naming_the_field_and_both_values():
    def fn(ring):
        fields = dict(CALL, layout="contiguous") if ring.rank == 2 else CALL
        return _outcome(lambda: ring.agree(fields))

    got = cr.simulate(4, fn, timeout=20)
    for rank in (0, 1, 3):  # each names rank 2, the lowest rank it differs from
        assert got[rank] == (
            f"ValueError: rank {rank}: the ranks disagree on layout: this rank has "
            "layout='zigzag', rank 2 has layout='contiguous'; every rank must make the same call"
        )
    assert got[2].startswith("ValueError: rank 2: the ranks disagree on layout: this rank has "
                             "layout='contiguous', rank 0 has layout='zigzag'")  # fmt: skip


def test_the_first_differing_field_by_name_is_named_and_a_missing_one_shows_absent():
    def fn(ring):
        fields = {"window": "(3, None)", "dtype": "float16"} if ring.rank else {"dtype": "float32"}
        return _outcome(lambda: ring.agree(fields))

    got = cr.simulate(2, fn, timeout=20)
    assert "disagree on dtype: this rank has dtype='float32', rank 1 has dtype='float16'" in got[0]
    assert "disagree on dtype: this rank has dtype='float16', rank 0 has dtype='float32'" in got[1]

    def fn_window(ring):
        fields = {"window": "(3, None)"} if ring.rank else {}
        return _outcome(lambda: ring.agree(fields))

    got = cr.simulate(2, fn_window, timeout=20)
    assert "this rank has window='<absent>', rank 1 has window='(3, None)'" in got[0]


def test_a_repeat_of_the_previous_call_does_no_exchange(gathers):
    def fn(ring):
        ring.agree(CALL)
        first = gathers[ring.rank]
        ring.agree(dict(CALL))  # an equal mapping, another object
        repeat = gathers[ring.rank]
        ring.agree(dict(CALL, q="(1, 128, 4, 8)"))  # a changed call is checked again
        changed = gathers[ring.rank]
        ring.agree(CALL)  # and so is going back: only the previous call is remembered
        return first, repeat, changed, gathers[ring.rank]

    assert cr.simulate(3, fn, timeout=20) == [(1, 1, 2, 3)] * 3


def test_a_mismatch_is_checked_again(gathers):
    def fn(ring):
        fields = dict(CALL, dtype="float16") if ring.rank == 1 else CALL
        first = _outcome(lambda: ring.agree(fields))
        second = _outcome(lambda: ring.agree(fields))
        return first == second and first.startswith("ValueError"), gathers[ring.rank]

    assert cr.simulate(2, fn, timeout=20) == [(True, 2)] * 2


def test_ranks_swapping_two_agreed_calls_are_caught():
    """Both calls agreed before; now each rank changes to a different one of them."""
    a, b, c = (dict(CALL, causal=str(x)) for x in ("True", "False", "None"))

    def fn(ring):
        ring.agree(a)
        ring.agree(b)
        ring.agree(c)
        return _outcome(lambda: ring.agree(a if ring.rank == 0 else b))

    got = cr.simulate(2, fn, timeout=20)
    assert all(g.startswith("ValueError") and "disagree on causal" in g for g in got), got


def test_one_rank_changing_alone_is_never_silent():
    """Rank 0 changes its call, rank 1 repeats its previous one: rank 0 checks, rank 1 does not,
    and the check ends in the timeout instead of letting the ranks compute different things."""
    a, b = dict(CALL, causal="True"), dict(CALL, causal="False")

    def fn(ring):
        ring.agree(b)
        ring.agree(a if ring.rank == 0 else b)
        return "no error"

    with pytest.raises(cr.RingError):
        cr.simulate(2, fn, timeout=2)


def test_a_rank_that_does_not_take_part_times_out_instead_of_hanging():
    def fn(ring):
        if ring.rank == 1:
            return "skipped"
        return ring.agree(CALL)

    with pytest.raises(cr.RingTimeoutError, match=r"rank 0: no data from rank 1 at allgather #0"):
        cr.simulate(2, fn, timeout=0.3)


@pytest.mark.parametrize(
    "fields, message",
    [
        (["layout", "zigzag"], "fields must be a mapping of str to str, got list"),
        ({"layout": 3}, "fields['layout'] must be a str, got int 3"),
        ({1: "x"}, "fields names must be str, got 1 (int)"),
    ],
)
def test_bad_fields_are_a_type_error_before_any_exchange(gathers, fields, message):
    def fn(ring):
        with pytest.raises(TypeError, match=re.escape(message)):
            ring.agree(fields)
        return gathers.get(ring.rank, 0)

    assert cr.simulate(2, fn, timeout=20) == [0, 0]


def test_a_ring_of_one_needs_no_exchange(gathers):
    assert cr.simulate(1, lambda ring: ring.agree(CALL)) == [None]
    assert gathers == {}
    spy = SoloRing()
    spy.size = 2  # test rings pretend to be one rank of several: still nothing to compare
    spy.agree(CALL)


# --- GPU rings over the fake GPU stack ---


@pytest.fixture
def gpu_rings(monkeypatch):
    stack = FakeStack()
    stack.install(monkeypatch)
    made = []

    def make(ring_class, size):
        comms = stack.communicators(size)
        rings = [ring_class(r, size, comms[r], 0, 20.0) for r in range(size)]
        made.extend(rings)
        return rings

    make.comm = lambda ring: ring._collective.comm
    yield make
    for ring in made:
        ring.close()
    stack.close()


@pytest.mark.parametrize("ring_class", [NcclRing, IpcRing])
def test_gpu_rings_agree_once_and_raise_everywhere_on_a_mismatch(gpu_rings, ring_class):
    rings = gpu_rings(ring_class, 3)
    collectives = lambda: [gpu_rings.comm(ring)._gathers for ring in rings]  # noqa: E731

    def agree_twice(ring):
        ring.agree(CALL)
        ring.agree(CALL)

    assert run_threads([lambda ring=ring: agree_twice(ring) for ring in rings]) == [None] * 3
    done = collectives()
    assert done[0] > 0 and done == [done[0]] * 3  # one check's collectives, not two checks'

    def fn(ring):
        fields = dict(CALL, causal="False") if ring.rank == 1 else CALL
        fields = dict(fields, q="(1, 32, 4, 8)")
        return _outcome(lambda: ring.agree(fields))

    got = run_threads([lambda ring=ring: fn(ring) for ring in rings])
    assert got[0] == got[2].replace("rank 2:", "rank 0:") == (
        "ValueError: rank 0: the ranks disagree on causal: this rank has causal='True', rank 1 "
        "has causal='False'; every rank must make the same call"
    )
    assert "rank 1: the ranks disagree on causal: this rank has causal='False', rank 0" in got[1]
    assert all(ring._error is None for ring in rings)  # a disagreement is no ring failure


def test_a_read_only_call_agreed_last_is_not_read_again(gathers, monkeypatch):
    """A kept plan passes the same frozen fields on every repeat: after they agreed, agree
    returns without making their key; any other mapping, a call in between or a refusal makes
    the next call read (and, where it changed, check) again. A read-only view of a dict the
    caller may change is no such promise."""
    from types import MappingProxyType

    from cuparing.comm import agreement

    keys = {}
    real = agreement.call_key

    def counting(fields):
        keys[threading.get_ident()] = keys.get(threading.get_ident(), 0) + 1
        return real(fields)

    monkeypatch.setattr(agreement, "call_key", counting)
    kept = agreement.CallFields(CALL)
    other = agreement.CallFields(dict(CALL, causal="False"))
    view = MappingProxyType(dict(CALL))

    def fn(ring):
        me = threading.get_ident()
        made = []
        for fields in (kept, kept, dict(CALL), kept, other, kept):
            ring.agree(fields)
            made.append(keys.get(me, 0))
        ring.refuse("ring_attention", ValueError("q must be 4-D"))
        ring.agree(kept)  # after a refusal: checked again
        made.append(keys.get(me, 0))
        ring.agree(view)
        ring.agree(view)  # a read-only view is read every time
        made.append(keys.get(me, 0))
        return made, gathers[ring.rank]

    got = cr.simulate(2, fn, timeout=20)
    # keys made: kept (1), kept again (none), an equal dict (1: no collective), kept again
    # (1: another mapping came between), other (1), kept (1), after the refusal (2: its own),
    # the view twice (2)
    assert got == [([1, 1, 2, 3, 4, 5, 7, 9], 5)] * 2
