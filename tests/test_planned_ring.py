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

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cuparing.backends.planned_ring import (
    PlannedBackward,
    PlannedForward,
    PlannedGather,
    PlannedGatherBackward,
)
from cuparing.schedule import (
    run_planned_backward,
    run_planned_forward,
    run_planned_gathered_backward,
    run_planned_gathered_forward,
)

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
    waited for. Where they must go home, the last step adds its pair into them and casts the
    sum in one launch (casts only, without a pair of its own) into a pair of the gradients'
    dtype, which travels home; dq is converted after that trip starts and before it is waited
    for (the GPU converts while they travel); dk, dv are copied out of what arrived, or cast
    from the accumulators where nothing travelled."""
    log = _Recorder()
    last = len(kinds) - 1
    steps = [
        (log.launch(f"block {t}"), 7000 + t, (16 * t, None, 16 * t + 4) if flags else (None,) * 3)
        if busy else None
        for t, busy in enumerate(kinds)
    ]  # fmt: skip
    scratch_arrays = (_array(), _array(), [_array(), _array()], _array() if flags else None)
    pair, home_pair = [_array(), _array()], [_array(), _array()]
    homeward = (log.launch("add_cast"), lambda: log.events.append(("travel",)) or home_pair,
                log.launch("copy"))  # fmt: skip
    planned = PlannedBackward(
        last, home, log.launch("delta"), steps, q_pos=999, dq_out=log.launch("dq"),
        dkv_out=log.launch("dkv"), scratch=lambda: scratch_arrays,
        fresh=lambda: log.events.append(("fresh",)) or pair,
        clear=lambda made: log.events.append(("clear", tuple(x.data.ptr for x in made))),
        add=log.launch("add"), homeward=homeward if home else None,
    )  # fmt: skip
    k, v = _array(), _array()
    dout, q, out, lse, dq, dk, dv = 1, 2, 3, 4, 5, 6, 7
    kept = run_planned_backward(_RecordingRing(log), planned, (dout, q, out, lse), [k, v],
                                (dq, dk, dv))  # fmt: skip
    later = any(kinds[1:])
    # (a captured call keeps the pairs)
    assert kept == (scratch_arrays, [pair] * later + [home_pair] * bool(home))

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
        part = t > 0 and busy
        if t > 0:
            acc = next(waits)[2]
            want.append(("wait", "dkv", acc))
            if part and not (home and t == last):
                want += [("add", (spare[0], acc[0])), ("add", (spare[1], acc[1]))]
        if home and t == last:
            whole = tuple(x.data.ptr for x in home_pair)
            want.append(("travel",))
            want += [("add_cast", (spare[i], acc[i], whole[i])) if part
                     else ("dkv", (acc[i], whole[i])) for i in range(2)]  # fmt: skip
            acc = whole
        if t < last:
            want.append(("exchange", acc, 1, "dkv"))
            held = next(waits)[2]
            want.append(("wait", "kv", held))
    if home:
        want.append(("exchange", acc, home, "dkv_home"))
    want.append(("dq", (dq_acc.data.ptr, dq)))
    if home:
        acc = next(waits)[2]
        want += [("wait", "dkv_home", acc), ("copy", (acc[0], dk)), ("copy", (acc[1], dv))]
    else:
        want += [("dkv", (acc[0], dk)), ("dkv", (acc[1], dv))]
    want.append(("check",))
    assert log.events == want


def test_a_backward_whose_gradients_travel_home_needs_their_launches():
    with pytest.raises(ValueError, match="travel home needs their add and cast"):
        PlannedBackward(0, 1, None, [None], 0, None, object(), None)


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

    def gathered(self, parts, keys):
        return _array(), _array()

    def rows_of_steps(self, dk, dv, keys):
        return [(_array(), _array()) for _ in keys.rows]

    def add_into(self, acc, x):
        pass

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

    def kv_homeward(self, acc, part, dtype):
        return _array()

    def cast(self, x, dtype, out=None):
        return out

    def copy(self, x):
        return x


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
            homeward=(noop, lambda: [_array(), _array()], noop),
        )  # fmt: skip
        run_planned_backward(planned, backward, (0, 0, 0, 0), [_array(), _array()], (0, 0, 0))
        assert planned.events() == full.events()


def _gathered_forward_plan(last: int, log: _Recorder | None, busy=(True, True),
                           identity: bool = False):  # fmt: skip
    """A PlannedGather of ``last`` + 1 steps whose launches record into ``log`` (or do nothing);
    ``busy``: whether the own and the gathered block are not EMPTY; ``identity``: no gather
    (one received shard in order)."""
    launch = _launcher(log)
    count = sum(busy)
    steps = []
    for t, name in enumerate(("own", "gathered")):
        writes = busy[t] and sum(busy[t + 1 :]) == 0  # (the last busy block writes the output)
        steps.append((launch(name), 5000 + t, writes) if busy[t] else None)
    blocks = PlannedForward(1, steps, q_pos=999, accumulates=count > 1)
    if identity:
        return PlannedGather(last, None, blocks, sources=777, gathered_shape=None)
    return PlannedGather(last, launch("gather"), blocks, sources=777,
                         gathered_shape=(1, 64, 2, 8))  # fmt: skip


def _launcher(log: _Recorder | None):
    """Named launches that record into ``log``, or do nothing where it is None."""
    if log is not None:
        return log.launch
    return lambda name: SimpleNamespace(launch=lambda *pointers: None)


_BUSY = st.sampled_from([(True, True), (True, False), (False, True)])


@settings(max_examples=60, deadline=None)
@given(last=st.integers(1, 8), busy=_BUSY, identity=st.booleans())
def test_a_gathered_forward_runs_its_own_block_while_the_others_arrive(last, busy, identity):
    """Exchanges of shifts 1 .. last_step on their own channels, all issued first; this rank's
    block on its own K/V before the first wait (the transfers run behind it); then, with every
    shard held, the gather (each received pair in step order, the sources map last) and the
    gathered block; the second of two blocks merges the float32 accumulator the first wrote
    and writes the output, a lone block writes it straight. Without a gather (one received
    shard, in order) the gathered block reads the received shard."""
    identity = identity and last == 1
    log = _Recorder()
    planned = _gathered_forward_plan(last, log, busy, identity)
    k, v = _array(), _array()
    q, out, lse, acc, k_all, v_all = 11, 22, 33, 44, 55, 66
    run_planned_gathered_forward(_RecordingRing(log), planned, q, [k, v], out, lse,
                                 (k_all, v_all), acc)  # fmt: skip
    sent = (k.data.ptr, v.data.ptr)
    events = log.events
    assert events[:last] == [("exchange", sent, s, f"kv_gather_{s}") for s in range(1, last + 1)]
    rest = events[last:]
    two = all(busy)
    if busy[0]:
        dest, reads = (acc, 0) if two else (out, acc)
        assert rest[:2] == [("trace", "fwd own"), ("own", (dest, lse, q, *sent, 999, 5000,
                                                            reads))]  # fmt: skip
        rest = rest[2:]
    waits, rest = rest[:last], rest[last:]
    assert [w[:2] for w in waits] == [("wait", f"kv_gather_{s}") for s in range(1, last + 1)]
    if busy[1]:
        held = [w[2] for w in waits]
        if identity:
            reads = held[0]
        else:
            reads = (k_all, v_all)
            assert rest[0] == ("gather", (k_all, v_all, *(h[0] for h in held),
                                          *(h[1] for h in held), 777))  # fmt: skip
            rest = rest[1:]
        assert rest[:2] == [("trace", "fwd gathered"),
                            ("gathered", (out, lse, q, *reads, 999, 5001, acc))]  # fmt: skip
        rest = rest[2:]
    assert rest == [("check",)]
    if not identity:
        with pytest.raises(ValueError, match=f"expected {last} shards, got {last + 1}"):
            planned.launch_gather([(1, 2)] * (last + 1), k_all, v_all)
    with pytest.raises(ValueError, match="at least two steps and two blocks"):
        PlannedGather(0, None, planned.blocks, 0, None)
    with pytest.raises(ValueError, match="without a gather has one received shard"):
        PlannedGather(2, None, planned.blocks, 0, None)


def _gathered_backward_plan(last: int, log: _Recorder | None, busy=(True, True),
                            identity: bool = False):  # fmt: skip
    """A PlannedGatherBackward of ``last`` + 1 steps whose launches record into ``log`` (or do
    nothing) and whose scratch arrays are fresh stand-ins; ``busy``, ``identity`` as for the
    forward."""
    launch = _launcher(log)
    steps = [(launch(name), 5000 + t, (None,) * 3) if busy[t] else None
             for t, name in enumerate(("own", "gathered"))]  # fmt: skip
    blocks = PlannedBackward(
        1, 0, launch("delta"), steps, q_pos=999, dq_out=launch("dq"), dkv_out=launch("dkv"),
        scratch=lambda: (_array(), _array(), [_array(), _array()], None),
        fresh=lambda: [_array(), _array()], clear=lambda pair: None, add=launch("add"),
    )  # fmt: skip
    backs = 0 if identity else last
    return PlannedGatherBackward(
        last, None if identity else launch("gather"), blocks,
        tuple(launch(f"back {t}") for t in range(1, backs + 1)), sources=777,
        step_sources=tuple(600 + t for t in range(1, last + 1)),
        scratch=lambda: (blocks.scratch(), () if identity else (_array(), _array()),
                         (_array(), _array()), [(_array(), _array()) for _ in range(backs)]),
    )  # fmt: skip


@settings(max_examples=60, deadline=None)
@given(last=st.integers(1, 8), busy=_BUSY, identity=st.booleans())
def test_a_gathered_backward_sends_rows_home_and_adds_them_in_step_order(last, busy, identity):
    """Exchanges of every other shard's K/V first (shifts 1 .. last_step); delta and this
    rank's block into its own dK / dV before the first wait; the gather and the gathered block
    into the gathered dK / dV; each step's rows copied out of those and sent to their owner
    (shift C - t, channel ``dkv_gather_t``, all issued before any wait); dq converted; what
    arrives added into this rank's own dK / dV in step order, and those cast into dk / dv.
    Without a gather (one received shard, in order) the gathered block reads the received
    shard and its dK / dV go home as they are."""
    identity = identity and last == 1
    log = _Recorder()
    planned = _gathered_backward_plan(last, log, busy, identity)
    recorded = []
    scratch_of = planned.scratch
    planned.scratch = lambda: recorded.append(scratch_of()) or recorded[-1]
    ring = _RecordingRing(log)
    ring.size = last + 3
    k, v = _array(), _array()
    dout, q, out, lse, dq, dk, dv = 1, 2, 3, 4, 5, 6, 7
    returned = run_planned_gathered_backward(ring, planned, (dout, q, out, lse), [k, v],
                                             (dq, dk, dv))  # fmt: skip
    ((delta, dq_acc, dkv_own, _), gathered, dkv_all, pieces), = recorded
    assert returned is recorded[0]
    ptr = lambda x: x.data.ptr  # noqa: E731
    sent = (k.data.ptr, v.data.ptr)
    own = tuple(map(ptr, dkv_own))
    dk_all, dv_all = map(ptr, dkv_all)
    events = log.events
    assert events[:last] == [("exchange", sent, s, f"kv_gather_{s}") for s in range(1, last + 1)]
    rest = events[last:]
    assert rest[0] == ("delta", (dout, out, ptr(delta)))
    rest = rest[1:]
    if busy[0]:
        assert rest[:2] == [("trace", "bwd own"), ("own", (dout, lse, ptr(delta), ptr(dq_acc),
                                                            *own, q, *sent, 999, 5000, 0, 0, 0,
                                                            0, 0))]  # fmt: skip
        rest = rest[2:]
    waits, rest = rest[:last], rest[last:]
    assert [w[:2] for w in waits] == [("wait", f"kv_gather_{s}") for s in range(1, last + 1)]
    held = [w[2] for w in waits]
    if busy[1]:
        if identity:
            k_all, v_all = held[0]
        else:
            k_all, v_all = map(ptr, gathered)
            assert rest[0] == ("gather", (k_all, v_all, *(h[0] for h in held),
                                          *(h[1] for h in held), 777))  # fmt: skip
            rest = rest[1:]
        assert rest[:2] == [("trace", "bwd gathered"), ("gathered", (
            dout, lse, ptr(delta), ptr(dq_acc), dk_all, dv_all, q, k_all, v_all, 999, 5001, 0,
            0, 0, 0, 0))]  # fmt: skip
        rest = rest[2:]
    sent_back = [dkv_all] if identity else pieces
    want = [
        *((f"back {t}", (*map(ptr, pieces[t - 1]), dk_all, dv_all, 600 + t))
          for t in range(1, len(pieces) + 1)),
        *(("exchange", tuple(map(ptr, sent_back[t - 1])), ring.size - t, f"dkv_gather_{t}")
          for t in range(1, last + 1)),
        ("dq", (ptr(dq_acc), dq)),
    ]  # fmt: skip
    assert rest[: len(want)] == want
    rest = rest[len(want) :]
    for t in range(1, last + 1):
        wait, add_k, add_v, *rest = rest
        assert wait[:2] == ("wait", f"dkv_gather_{t}")
        assert add_k == ("add", (wait[2][0], own[0])) and add_v == ("add", (wait[2][1], own[1]))
    assert rest == [("dkv", (own[0], dk)), ("dkv", (own[1], dv)), ("check",)]


def test_a_gathered_backward_plan_needs_two_blocks_and_a_way_back_for_every_shard():
    with pytest.raises(ValueError, match="a way back for each received shard"):
        PlannedGatherBackward(2, object(), None, (None,) * 2, 0, (0,) * 3, None)
    with pytest.raises(ValueError, match="got last_step=2, no gather"):
        PlannedGatherBackward(2, None, None, (), 0, (0,) * 2, None)
    with pytest.raises(ValueError, match="at least two steps"):
        PlannedGatherBackward(0, None, None, (), 0, (), None)


@settings(max_examples=60, deadline=None)
@given(
    world=st.integers(2, 9),
    layout=st.sampled_from(["contiguous", "zigzag", "striped"]),
    causal=st.booleans(),
    window=st.one_of(st.none(), st.tuples(st.integers(0, 40), st.integers(0, 40))),
    lengths=st.one_of(st.none(), st.lists(st.integers(1, 30), min_size=1, max_size=6)),
)
def test_planned_gathered_calls_exchange_as_the_schedule_does(world, layout, causal, window,
                                                              lengths):  # fmt: skip
    """With the gather switch on, each rank's pointer-level gathered forward and backward make
    the full path's exchanges (tags, shifts, order) and compute spans, rank by rank, on plain
    sequences and packed documents (``lengths``), under windows too, whichever blocks are
    EMPTY: ranks of one call may take either path."""

    from cuparing import validation
    from cuparing.masks import BlockKind
    from cuparing.schedule import (
        gathered_keys,
        gathers,
        plan_documents,
        plan_ring,
        ring_backward,
        ring_forward,
    )

    mask = validation.check_mask(causal, window)
    if lengths is not None and layout == "striped":
        layout = "zigzag"  # (documents take contiguous, zigzag or packed)
    for rank in range(world):
        if lengths is None:
            plan = plan_ring(layout, rank, world, 16, mask, gather=True)
        else:
            cu = (0, *(int(x) for x in np.cumsum(lengths)))
            plan = plan_documents(layout, rank, world, cu, mask, gather=True)
        if not gathers(plan):  # (one step: the ring's own calls, tested above)
            continue
        keys = gathered_keys(plan)
        busy = (keys.own_kind != BlockKind.EMPTY, keys.kind != BlockKind.EMPTY)
        if any(busy):  # (a forward with no block keeps no plan)
            full, planned = _LoggingRing(world), _LoggingRing(world)
            ring_forward(_ScheduleBackend(), full, _array(), _array(), _array(), plan, 1.0)
            forward = _gathered_forward_plan(plan.last_step, None, busy, keys.identity)
            run_planned_gathered_forward(planned, forward, 0, [_array(), _array()], 0, 0,
                                         (0, 0), 0)  # fmt: skip
            assert planned.events() == full.events()

        full, planned = _LoggingRing(world), _LoggingRing(world)
        ring_backward(_ScheduleBackend(), full, *(_array() for _ in range(6)), plan, 1.0,
                      grads_into=(_array(), _array(), _array()))  # fmt: skip
        backward = _gathered_backward_plan(plan.last_step, None, busy, keys.identity)
        run_planned_gathered_backward(planned, backward, (0, 0, 0, 0), [_array(), _array()],
                                      (0, 0, 0))  # fmt: skip
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
