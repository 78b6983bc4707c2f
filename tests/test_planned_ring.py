"""The pointer-level ring calls (cuparing.schedule.run_planned_forward / run_planned_backward
with cuparing.backends.planned_ring's plans) on the CPU, with recording stand-ins for the
launches and the ring: the same exchanges in the same order as the schedule's forward and
backward, each block launched with the addresses of the K/V shard (and dK/dV accumulators) held
at its step, EMPTY blocks skipped, the results taken from what the ring holds at the end. The
launches themselves run on GPUs (test_gpu_attention.py, tests/multigpu: repeats of ring
calls)."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cuparing.backends.planned_ring import PlannedBackward, PlannedForward
from cuparing.schedule import run_planned_backward, run_planned_forward

_addresses = itertools.count(1 << 20, 4096)


def _array():
    """A stand-in device array: only its address matters here (a shape and dtype for what
    reads them)."""
    return SimpleNamespace(data=SimpleNamespace(ptr=next(_addresses)), shape=(1,), dtype="float32")


class _Recorder:
    """Launches and ring calls in the order they happen."""

    def __init__(self):
        self.events = []

    def launch(self, name):
        return SimpleNamespace(launch=lambda *ptrs: self.events.append((name, ptrs)))


class _RecordingRing:
    """exchange() hands back fresh arrays (the receive buffers) on wait()."""

    def __init__(self, log: _Recorder):
        self._log = log

    def exchange(self, arrays, shift=1, tag="kv"):
        sent = tuple(a.data.ptr for a in arrays)
        self._log.events.append(("exchange", sent, shift, tag))
        received = [_array(), _array()]
        log = self._log

        class Pending:
            def wait(self):
                log.events.append(("wait", tag, tuple(a.data.ptr for a in received)))
                return received

        return Pending()

    def trace_compute(self, label):
        import contextlib

        self._log.events.append(("trace", label))
        return contextlib.nullcontext()

    def check(self):
        self._log.events.append(("check",))


@settings(max_examples=60, deadline=None)
@given(kinds=st.lists(st.booleans(), min_size=1, max_size=8))
def test_steps_exchanges_and_launches_follow_the_schedule(kinds):
    """kinds[t]: whether step t's block is non-EMPTY. Each step exchanges first (but the last),
    launches its block with the K/V held at that step, then waits; the blocks write the
    accumulator, but the last (or only) one, which writes the output."""
    log = _Recorder()
    last = len(kinds) - 1
    busy = [t for t, b in enumerate(kinds) if b]
    steps = [
        (log.launch(f"block {t}"), 7000 + t, t == busy[-1]) if b else None
        for t, b in enumerate(kinds)
    ]
    planned = PlannedForward(last, steps, q_pos=999, accumulates=len(busy) > 1)
    k, v = _array(), _array()
    q, out, lse, acc = 11, 22, 33, 44
    run_planned_forward(_RecordingRing(log), planned, q, [k, v], out, lse, acc)

    want, held = [], (k.data.ptr, v.data.ptr)
    received = iter(e[2] for e in log.events if e[0] == "wait")
    for t, b in enumerate(kinds):
        if t < last:
            want.append(("exchange", held, 1, "kv"))
        if b:
            writes = t == busy[-1]
            dest, reads = (out, acc) if writes else (acc, 0)
            want.append(("trace", f"fwd step {t}"))
            want.append((f"block {t}", (dest, lse, q, *held, 999, 7000 + t, reads)))
        if t < last:
            held = next(received)
            want.append(("wait", "kv", held))
    want.append(("check",))
    assert log.events == want


def test_a_plan_needs_one_entry_per_step():
    with pytest.raises(ValueError, match="expected 3 steps, got 2"):
        PlannedForward(2, [None, None], q_pos=0, accumulates=False)


@settings(max_examples=60, deadline=None)
@given(
    kinds=st.lists(st.booleans(), min_size=1, max_size=8),
    home=st.integers(0, 7),
    flags=st.booleans(),
)
def test_backward_steps_follow_the_schedule(kinds, home, flags):
    """Delta first; each step exchanges K/V (but the last) and launches its block: at step 0
    into this rank's dK/dV accumulators, at later steps into one spare pair (made once a call,
    cleared before each reuse) while the accumulators of the shard it holds are on their way;
    those are then waited for and the step's pair added into them in place (an EMPTY step
    passes them on as they arrived); they travel on (but the last step's) and the K/V are
    waited for; the accumulators go home if they must, and dq is converted after that trip
    starts and before it is waited for (the GPU converts while they travel); dk, dv come from
    what this rank holds at the end."""
    log = _Recorder()
    last = len(kinds) - 1
    steps = [
        (log.launch(f"block {t}"), 7000 + t, (16 * t, None, 16 * t + 4) if flags else (None,) * 3)
        if busy else None
        for t, busy in enumerate(kinds)
    ]  # fmt: skip
    scratch_arrays = (_array(), _array(), [_array(), _array()], _array() if flags else None)
    pair = [_array(), _array()]
    planned = PlannedBackward(
        last, home, log.launch("delta"), steps, q_pos=999, dq_out=log.launch("dq"),
        dkv_out=log.launch("dkv"), scratch=lambda: scratch_arrays,
        fresh=lambda: log.events.append(("fresh",)) or pair,
        clear=lambda made: log.events.append(("clear", tuple(x.data.ptr for x in made))),
        add=log.launch("add"),
    )  # fmt: skip
    k, v = _array(), _array()
    dout, q, out, lse, dq, dk, dv = 1, 2, 3, 4, 5, 6, 7
    kept = run_planned_backward(_RecordingRing(log), planned, (dout, q, out, lse), [k, v],
                                (dq, dk, dv))  # fmt: skip
    later = any(kinds[1:])
    assert kept == (scratch_arrays, [pair] if later else [])  # (a captured call keeps the pair)

    delta, dq_acc, dkv, flag_array = scratch_arrays
    flag_base = flag_array.data.ptr if flags else 0
    waits = iter(e for e in log.events if e[0] == "wait")
    spare = tuple(x.data.ptr for x in pair)
    want = [("delta", (dout, out, delta.data.ptr))]
    held = (k.data.ptr, v.data.ptr)
    acc = (dkv[0].data.ptr, dkv[1].data.ptr)
    made = False
    for t, busy in enumerate(kinds):
        if t < last:
            want.append(("exchange", held, 1, "kv"))
        into = acc if t == 0 else spare
        if t > 0 and busy:
            want.append(("clear", spare) if made else ("fresh",))
            made = True
        if busy:
            redo, dq_turns, dkv_turns = (
                (flag_base + 16 * t, 0, flag_base + 16 * t + 4) if flags else (0, 0, 0)
            )
            want.append(("trace", f"bwd step {t}"))
            want.append((f"block {t}", (dout, lse, delta.data.ptr, dq_acc.data.ptr, *into, q,
                                        *held, 999, 7000 + t, redo, dq_turns, dkv_turns, 0, 0)))
        if t > 0:
            acc = next(waits)[2]
            want.append(("wait", "dkv", acc))
            if busy:
                want += [("add", (spare[0], acc[0])), ("add", (spare[1], acc[1]))]
        if t < last:
            want.append(("exchange", acc, 1, "dkv"))
            held = next(waits)[2]
            want.append(("wait", "kv", held))
    if home:
        want.append(("exchange", acc, home, "dkv_home"))
    want.append(("dq", (dq_acc.data.ptr, dq)))
    if home:
        acc = next(waits)[2]
        want.append(("wait", "dkv_home", acc))
    want += [("dkv", (acc[0], dk)), ("dkv", (acc[1], dv))]
    want.append(("check",))
    assert log.events == want


@pytest.mark.parametrize("flags", [False, True])
def test_a_backward_whose_block_writes_dk_dv_casts_only_dq(flags):
    """Without a dK / dV cast (one block makes them whole: the kernels write them), the block
    gets the gradients' addresses beside its float32 scratch, and only dq is converted."""
    log = _Recorder()
    offsets = (16, None, None) if flags else (None,) * 3
    scratch_arrays = (_array(), _array(), [_array(), _array()], _array() if flags else None)
    planned = PlannedBackward(
        0, 0, log.launch("delta"), [(log.launch("block 0"), 7000, offsets)], q_pos=999,
        dq_out=log.launch("dq"), dkv_out=None, scratch=lambda: scratch_arrays, direct=True,
    )  # fmt: skip
    assert planned.direct
    k, v = _array(), _array()
    dout, q, out, lse, dq, dk, dv = 1, 2, 3, 4, 5, 6, 7
    run_planned_backward(_RecordingRing(log), planned, (dout, q, out, lse), [k, v], (dq, dk, dv))
    delta, dq_acc, dkv, flag_array = scratch_arrays
    redo = flag_array.data.ptr + 16 if flags else 0
    assert log.events == [
        ("delta", (dout, out, delta.data.ptr)),
        ("trace", "bwd step 0"),
        ("block 0", (dout, lse, delta.data.ptr, dq_acc.data.ptr, dkv[0].data.ptr,
                     dkv[1].data.ptr, q, k.data.ptr, v.data.ptr, 999, 7000, redo, 0, 0, dk, dv)),
        ("dq", (dq_acc.data.ptr, dq)),
        ("check",),
    ]  # fmt: skip


def test_a_backward_plan_needs_one_entry_per_step():
    with pytest.raises(ValueError, match="expected 2 steps, got 1"):
        PlannedBackward(1, 0, None, [None], 0, None, None, None)


@pytest.mark.parametrize("last_step,home", [(1, 0), (0, 1)])
def test_direct_gradients_need_one_step_and_no_trip_home(last_step, home):
    steps = [None] * (last_step + 1)
    with pytest.raises(ValueError, match="one step, no trip home"):
        PlannedBackward(last_step, home, None, steps, 0, None, None, None, direct=True)
    with pytest.raises(ValueError, match="needs their cast"):
        PlannedBackward(0, 0, None, [None], 0, None, None, None)


class _ScheduleBackend:
    """The backend protocol's calls that the schedule makes, doing nothing: only the ring's log
    of exchanges and compute spans matters here."""

    def positions(self, host_positions):
        return host_positions

    def forward_state(self, q, blocks, out=None, lse=None):
        return None

    def forward_block(self, *args):
        pass

    def forward_finish(self, state):
        return None, None

    def backward_delta(self, dout, out):
        return _array()

    def dq_accum(self, q):
        return _array()

    def kv_accum(self, q, k, whole=False, into=None):
        return _array()

    def backward_block(self, *args, **kwargs):
        pass

    def dq_from_accum(self, acc, dtype, out=None):
        return out

    def kv_from_accum(self, acc, dtype, out=None):
        return out

    def add_into(self, acc, x):
        pass


class _LoggingRing(_RecordingRing):
    """Logs what a peer sees of a rank's ring call (exchanges by tag and shift, waits, compute
    spans), not the addresses, which differ between the two paths."""

    def __init__(self, size):
        super().__init__(_Recorder())
        self.size = size

    def events(self):
        return [e[:1] + e[2:] if e[0] == "exchange" else e[:2] for e in self._log.events]


@settings(max_examples=60, deadline=None)
@given(
    world=st.integers(1, 8),
    layout=st.sampled_from(["contiguous", "zigzag", "striped"]),
    causal=st.booleans(),
    window=st.one_of(st.none(), st.tuples(st.integers(0, 40), st.integers(0, 40))),
)
def test_planned_calls_exchange_as_the_schedule_does(world, layout, causal, window):
    """For every rank of a ring, the pointer-level forward and backward make the schedule's
    exchanges (tags, shifts, order) and compute the same steps: within one call some ranks may
    take the full path (a misaligned address) and others the planned one, so the two must never
    differ in what their peers see."""
    from cuparing import validation
    from cuparing.masks import BlockKind
    from cuparing.schedule import plan_ring, ring_backward, ring_forward

    mask = validation.check_mask(causal, window)
    noop = SimpleNamespace(launch=lambda *pointers: None)
    for rank in range(world):
        plan = plan_ring(layout, rank, world, 16, mask)
        kinds = plan.kinds[: plan.last_step + 1]

        full, planned = _LoggingRing(world), _LoggingRing(world)
        ring_forward(_ScheduleBackend(), full, _array(), _array(), _array(), plan, 1.0)
        steps = [None if kind == BlockKind.EMPTY else (noop, 0, False) for kind in kinds]
        forward = PlannedForward(plan.last_step, steps, 0, accumulates=plan.blocks > 1)
        run_planned_forward(planned, forward, 0, [_array(), _array()], 0, 0, 0)
        assert planned.events() == full.events()

        full, planned = _LoggingRing(world), _LoggingRing(world)
        ring_backward(_ScheduleBackend(), full, *(_array() for _ in range(6)), plan, 1.0,
                      grads_into=(_array(), _array(), _array()))  # fmt: skip
        steps = [None if kind == BlockKind.EMPTY else (noop, 0, (None,) * 3) for kind in kinds]
        backward = PlannedBackward(
            plan.last_step, (-plan.last_step) % world, noop, steps, 0, noop, noop,
            scratch=lambda: (_array(), _array(), [_array(), _array()], None),
            fresh=lambda: [_array(), _array()], clear=lambda pair: None, add=noop,
        )  # fmt: skip
        run_planned_backward(planned, backward, (0, 0, 0, 0), [_array(), _array()], (0, 0, 0))
        assert planned.events() == full.events()


@pytest.mark.parametrize("world", [2, 3, 5])
def test_the_schedule_converts_dq_while_dk_dv_travel_home(world):
    """The full path's backward (``schedule.ring_backward``) queues dQ's conversion after the
    dK / dV trip home has started and before it is waited for, as the planned one does."""
    from cuparing import validation
    from cuparing.schedule import home_shift_of, plan_ring, ring_backward

    plan = plan_ring("zigzag", 1, world, 16, validation.check_mask(True, None))
    ring = _LoggingRing(world)

    class LoggingBackend(_ScheduleBackend):
        def dq_from_accum(self, acc, dtype, out=None):
            ring._log.events.append(("dq",))
            return out

    ring_backward(LoggingBackend(), ring, *(_array() for _ in range(6)), plan, 1.0,
                  grads_into=(_array(), _array(), _array()))  # fmt: skip
    events = ring.events()
    home = ("exchange", home_shift_of(plan), "dkv_home")
    assert home_shift_of(plan) > 0
    assert events.index(home) < events.index(("dq",)) < events.index(("wait", "dkv_home"))
