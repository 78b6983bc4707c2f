"""Ring calls replayed as CUDA graphs (cuparing.backends.ring_graphs), on the CPU: a replay hands
each captured kernel node exactly the arguments a fresh launch with the caller's addresses would
get (captured addresses replaced by value, everything else as captured), rewrites only nodes
whose arguments changed since the last replay (the K/V copy node's two sources by position:
K and V may be the caller's other arrays) and launches the graph once.
The driver is a recording stand-in that reads the arguments the way the CUDA driver does."""

from __future__ import annotations

import contextlib
import ctypes
import struct
import warnings
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cuparing.backends import launch_plans, ring_graphs
from cuparing.comm.base import RingError


class RecordingGraphDriver:
    """Records the node updates (the instantiation, the node, the pointer fields read through
    the ``void*`` array, the function) and the launches of a replay."""

    def __init__(self, fields: int):
        self.fields, self.updates, self.launches = fields, [], []
        self.orders, self.destroyed, self.refuse_wait, self.refuse_record = [], [], False, False
        self.instantiated = 0

    def instantiate(self, graph):
        self.instantiated += 1
        return f"exec{self.instantiated}"

    def kernel_params(self, function, geometry, arguments):
        return SimpleNamespace(function=function, geometry=geometry, arguments=arguments)

    def set_kernel_node(self, executable, node, params):
        struct_address = ctypes.c_uint64.from_address(params.arguments).value
        packed = ctypes.string_at(struct_address, 8 * self.fields)
        self.updates.append((executable, node, struct.unpack(f"<{self.fields}Q", packed),
                             params.function))  # fmt: skip

    def new_event(self):
        return "done"

    def record(self, event, stream):
        if self.refuse_record:
            raise RuntimeError("cuEventRecord failed: CUDA_ERROR_INVALID_HANDLE")
        self.orders.append(("record", stream))

    def wait_event(self, stream, event):
        if self.refuse_wait:
            raise RuntimeError("cuStreamWaitEvent failed: CUDA_ERROR_INVALID_HANDLE")
        self.orders.append(("wait", stream))

    def destroy_event(self, event):
        self.destroyed.append(event)

    def on_device(self, device):
        return contextlib.nullcontext()

    def launch(self, executable, stream):
        self.launches.append((executable, stream))

    def destroy(self, executable, graph):
        self.destroyed.append((executable, graph))


FIELDS = 4  # pointers per launch in these tests: a struct of four addresses


def _launch(function: int) -> launch_plans.PackedLaunch:
    kernel = SimpleNamespace(kernel=SimpleNamespace(ptr=function))
    never = SimpleNamespace(launch=None)  # a replay updates nodes, it launches no kernel
    return launch_plans.PackedLaunch((kernel,), (1,), (32,), 0, bytes(8 * FIELDS),
                                     tuple(range(0, 8 * FIELDS, 8)), driver=never)  # fmt: skip


CAPTURED_KV = (0x7000, 0x8000)  # the caller's K and V when the tests' graphs were captured
COPIES = (0xA000, 0xB000)  # the graph's own K/V copies


def _captured(driver, entries, addresses, copy=None):
    """A CapturedRingCall over ``entries`` = [(launch, captured pointers)], node i = "n{i}",
    captured with the caller's ``addresses``; with ``copy`` (a launch), node "kv" copies K/V,
    captured at ``CAPTURED_KV``, into ``COPIES``."""
    launches = [[packed, pointers, 0, f"n{i}"] for i, (packed, pointers) in enumerate(entries)]
    kv = [SimpleNamespace(data=SimpleNamespace(ptr=p)) for p in COPIES]
    kv_copy = None
    if copy is not None:
        kv_copy = [copy, (CAPTURED_KV[0], COPIES[0], CAPTURED_KV[1], COPIES[1]), 0, "kv"]
    return ring_graphs.CapturedRingCall(driver, "graph", "exec", launches, addresses, kv,
                                        keep=["scratch"], home_stream=5, device=0,
                                        kv_copy=kv_copy)  # fmt: skip


def test_replay_repoints_only_what_the_caller_moved():
    q0, out0, lse0 = 0x1000, 0x2000, 0x3000
    own_kv, received, scratch = 0xA000, 0xC000, 0xD000
    step0, step1 = _launch(11), _launch(12)
    entries = [(step0, (scratch, q0, own_kv, lse0)), (step1, (out0, q0, received, lse0)),
               (step1, (scratch, scratch, received, 0))]  # fmt: skip
    driver = RecordingGraphDriver(FIELDS)
    graph = _captured(driver, entries, (q0, out0, lse0))

    graph.replay((q0, out0, lse0), CAPTURED_KV, stream=5)  # the captured call's addresses
    assert driver.updates == []
    assert driver.launches == [("exec", 5)]

    q1, out1 = 0x5000, 0x6000
    graph.replay((q1, out1, lse0), CAPTURED_KV, stream=5)
    assert driver.updates == [("exec", "n0", (scratch, q1, own_kv, lse0), 11),
                              ("exec", "n1", (out1, q1, received, lse0), 12)]  # fmt: skip
    driver.updates.clear()
    graph.replay((q1, out1, lse0), CAPTURED_KV, stream=5)  # nothing moved since
    assert driver.updates == []
    graph.replay((q1, out0, lse0), CAPTURED_KV, stream=5)  # only the output moved back
    assert driver.updates == [("exec", "n1", (out0, q1, received, lse0), 12)]
    assert len(driver.launches) == 4

    # every replay on the stream the graph's memory came from: no waits, a record after each
    assert driver.orders == [("record", 5)] * 4

    graph.release()
    graph.release()
    assert not graph.live
    assert driver.destroyed == [("exec", None), (None, "graph"), "done"]
    with pytest.raises(RuntimeError, match="released"):
        graph.replay((q1, out0, lse0), CAPTURED_KV, stream=5)


def test_the_kv_copy_node_follows_the_callers_kv():
    """The graph's first node copies the caller's K/V into its own copies: a replay rewrites its
    two source fields (by position) only when K or V moved since the last replay; K and V may
    be other caller arrays (``q is k``), and nothing else reads them."""
    q0 = 0x1000
    step0 = _launch(11)
    driver = RecordingGraphDriver(FIELDS)
    graph = _captured(driver, [(step0, (0xD000, q0, *COPIES))], (q0,), copy=_launch(13))
    graph.replay((q0,), CAPTURED_KV, stream=5)
    assert driver.updates == []
    graph.replay((q0,), (0x7100, CAPTURED_KV[1]), stream=5)  # K moved
    assert driver.updates == [("exec", "kv", (0x7100, COPIES[0], CAPTURED_KV[1], COPIES[1]),
                               13)]  # fmt: skip
    driver.updates.clear()
    graph.replay((q0,), (0x7100, CAPTURED_KV[1]), stream=5)
    assert driver.updates == []
    graph.replay((0x1100,), (0x1100, 0x1100), stream=5)  # q, k and v one array
    assert driver.updates == [("exec", "n0", (0xD000, 0x1100, *COPIES), 11),
                              ("exec", "kv", (0x1100, COPIES[0], 0x1100, COPIES[1]),
                               13)]  # fmt: skip
    driver.updates.clear()
    graph.replay((CAPTURED_KV[0],), CAPTURED_KV, stream=5)  # q where K was captured
    assert driver.updates == [("exec", "n0", (0xD000, CAPTURED_KV[0], *COPIES), 11),
                              ("exec", "kv", (CAPTURED_KV[0], COPIES[0], CAPTURED_KV[1],
                                              COPIES[1]), 13)]  # fmt: skip
    assert len(driver.launches) == 5


def test_replays_on_another_stream_wait_for_the_last_and_release_waits_for_them():
    """The K/V copies and the scratch are one set: a replay on a new stream first waits for the
    last replay's stream, and releasing hands the memory back in its home stream's order only
    after the last replay."""
    driver = RecordingGraphDriver(FIELDS)
    graph = _captured(driver, [(_launch(1), (0x1000, 0, 0, 0))], (0x1000,))
    for stream in (5, 7, 7, 9):
        graph.replay((0x1000,), CAPTURED_KV, stream=stream)
    assert driver.orders == [("record", 5), ("wait", 7), ("record", 7), ("record", 7),
                             ("wait", 9), ("record", 9)]  # fmt: skip
    graph.release()
    assert driver.orders[-1] == ("wait", 5)  # the home stream waits for the replay on 9
    assert graph._keep is None  # then the graph's memory is handed back

    # a refused wait: the memory stays allocated (a replay may still use it), the rest is freed
    driver = RecordingGraphDriver(FIELDS)
    graph = _captured(driver, [(_launch(1), (0x1000, 0, 0, 0))], (0x1000,))
    graph.replay((0x1000,), CAPTURED_KV, stream=6)
    driver.refuse_wait = True
    with pytest.warns(RuntimeWarning, match="memory stays allocated"):
        graph.release()
    assert graph._keep is not None and not graph.live
    assert driver.destroyed == [("exec", None), (None, "graph"), "done"]


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_every_replay_leaves_each_node_as_a_fresh_launch_would(data):
    draw = data.draw
    caller = draw(st.lists(st.integers(1, 2**40).map(lambda x: x * 16), min_size=1, max_size=6,
                           unique=True))  # fmt: skip
    # the graph's own addresses (scratch, ring buffers, positions) never equal the caller's
    own = draw(st.lists(st.integers(2**41, 2**42).map(lambda x: x * 16) | st.just(0),
                        min_size=1, max_size=6))  # fmt: skip
    pool = st.sampled_from(caller + own)
    count = draw(st.integers(1, 6))
    launches = [_launch(100 + i) for i in range(draw(st.integers(1, 3)))]
    entries = [(draw(st.sampled_from(launches)), tuple(draw(pool) for _ in range(FIELDS)))
               for _ in range(count)]  # fmt: skip
    driver = RecordingGraphDriver(FIELDS)
    graph = _captured(driver, entries, tuple(caller), copy=_launch(99))
    state = {f"n{i}": pointers for i, (_, pointers) in enumerate(entries)}  # what each node holds
    state["kv"] = (CAPTURED_KV[0], COPIES[0], CAPTURED_KV[1], COPIES[1])
    for _ in range(draw(st.integers(1, 5))):
        # new caller addresses, distinct (they are live tensors), some unchanged; K and V
        # anywhere, the caller's other arrays included
        moved = tuple(draw(st.sampled_from([a, a + 2**45 + 16 * draw(st.integers(0, 3))]))
                      for a in caller)  # fmt: skip
        if len(set(moved)) != len(moved):
            continue
        kv = tuple(draw(st.sampled_from([*CAPTURED_KV, *caller, *moved])) for _ in range(2))
        remap = dict(zip(caller, moved, strict=True))
        driver.updates.clear()
        graph.replay(moved, kv, stream=1)
        updated = set()
        for executable, node, pointers, _ in driver.updates:
            assert executable == "exec"
            assert node not in updated  # one update per node and replay
            assert state[node] != pointers  # and only where its arguments change
            updated.add(node)
            state[node] = pointers
        for i, (_, pointers) in enumerate(entries):
            want = tuple(remap.get(p, p) for p in pointers)
            assert state[f"n{i}"] == want
        assert state["kv"] == (kv[0], COPIES[0], kv[1], COPIES[1])


def test_capture_refuses_addresses_it_could_not_tell_apart():
    def at(p):
        return SimpleNamespace(data=SimpleNamespace(ptr=p))

    kv = [at(0x100), at(0x200)]
    for addresses in ((0x10, 0x10), (0x10, 0)):
        with pytest.raises(ValueError, match="distinct and non-zero"):
            ring_graphs.capture(None, lambda kv: None, kv, addresses)
    with pytest.raises(ValueError, match="K and V"):
        ring_graphs.capture(None, lambda kv: None, kv[:1], (0x10,))


# --- call_plans.GraphSlot: when a plan captures, replays, falls back --------------------------


class SlotRing:
    """A ring as GraphSlot sees it."""

    def __init__(self):
        self.capturable, self.failed, self.watched = True, None, 0

    def check(self):
        if self.failed is not None:
            raise self.failed

    def watch(self, tag, stream):
        self.watched += 1
        self.watched_on = stream


class SlotGraph:
    """A captured call as GraphSlot sees it."""

    def __init__(self, refuse=False):
        self.live, self.refuse, self.replays = True, refuse, []
        self.matches = True  # (a copy-engine ring's graph: its channels at the captured parity)

    def replay(self, addresses, kv, stream):
        if self.refuse:
            raise RuntimeError("cuGraphLaunch failed: CUDA_ERROR_INVALID_VALUE")
        self.replays.append((addresses, kv, stream))

    def release(self):
        self.live = False


class Tensor:  # torch-like K/V for replay, CuPy-like for run
    def __init__(self, ptr, contiguous=True):
        self.ptr, self.contiguous = ptr, contiguous
        self.flags = SimpleNamespace(c_contiguous=contiguous)
        self.data = SimpleNamespace(ptr=ptr)

    def is_contiguous(self):
        return self.contiguous

    def data_ptr(self):
        return self.ptr


@pytest.fixture
def slot_env(monkeypatch):
    from cuparing import call_plans

    env = SimpleNamespace(captures=[], graphs=[], eager=0, capture_error=None)

    def capture(ring, run, kv, addresses):
        env.captures.append(addresses)
        if env.capture_error is not None:
            raise env.capture_error
        env.graphs.append(SlotGraph(refuse=env.refuse_replay))
        return env.graphs[-1]

    def run(kv):
        env.eager += 1

    env.refuse_replay = False
    env.run = run
    monkeypatch.setattr(ring_graphs, "enabled", lambda ring: ring.capturable)
    monkeypatch.setattr(ring_graphs, "capture", capture)
    # CuPy's current stream (inside the caller's call context) and torch's are the same CUDA
    # stream in a real call; distinct handles here show which one each path takes
    env.on_device = []

    @contextlib.contextmanager
    def on_device(device):
        env.on_device.append(device)
        yield

    monkeypatch.setattr(call_plans, "_current_stream", lambda: 4)
    monkeypatch.setattr(call_plans, "torch_current_stream", lambda device: 3 + 10 * device)
    monkeypatch.setattr(ring_graphs, "on_device", on_device)
    env.slot = call_plans.GraphSlot()
    return env


KV = (Tensor(0x100), Tensor(0x200))


def test_a_slot_captures_once_then_only_replays(slot_env):
    env, ring = slot_env, SlotRing()
    # nothing captured yet: the caller runs eagerly
    assert not env.slot.replay(ring, (1, 2), KV, 3)
    env.slot.run(ring, env.run, list(KV), (1, 2), 3)
    assert env.captures == [(1, 2)] and env.eager == 0 and ring.watched == 1
    assert env.graphs[0].replays == [((1, 2), (0x100, 0x200), 3)]  # the capturing call itself
    assert env.slot.replay(ring, (4, 5), KV, 3) and ring.watched == 2
    assert env.graphs[0].replays[-1] == ((4, 5), (0x100, 0x200), 3)
    assert not env.slot.replay(ring, (4, 5), (Tensor(0x100, contiguous=False), KV[1]), 3)
    ring.capturable = False  # tracing: the call shows its exchanges
    assert not env.slot.replay(ring, (4, 5), KV, 3)
    assert len(env.captures) == 1


def test_a_failed_ring_raises_before_a_replay_queues_anything(slot_env):
    env, ring = slot_env, SlotRing()
    env.slot.run(ring, env.run, list(KV), (1, 2), 3)
    ring.failed = RuntimeError("rank 0: ring aborted because rank 1 failed")
    with pytest.raises(RuntimeError, match="rank 1 failed"):
        env.slot.replay(ring, (1, 2), KV, 3)
    assert len(env.graphs[0].replays) == 1 and ring.watched == 1


def test_a_released_graph_is_captured_again(slot_env):
    env, ring = slot_env, SlotRing()
    env.slot.run(ring, env.run, list(KV), (1, 2), 3)
    env.graphs[0].release()  # the ring dropped its receive buffers
    assert not env.slot.replay(ring, (1, 2), KV, 3)
    env.slot.run(ring, env.run, list(KV), (1, 2), 3)
    assert len(env.captures) == 2 and env.slot.replay(ring, (1, 2), KV, 3)
    assert env.graphs[1].replays and env.eager == 0


def test_refusals_fall_back_to_eager_for_good_and_ring_errors_propagate(slot_env):
    env, ring = slot_env, SlotRing()
    env.capture_error = RuntimeError("cuStreamBeginCapture failed")
    with pytest.warns(RuntimeWarning, match="could not be captured"):
        env.slot.run(ring, env.run, list(KV), (1, 2), 3)
    env.slot.run(ring, env.run, list(KV), (1, 2), 3)
    assert env.eager == 2 and len(env.captures) == 1 and ring.watched == 0

    from cuparing import call_plans
    from cuparing.comm.base import RingError

    env.slot = call_plans.GraphSlot()
    env.capture_error = RingError("rank 0: exchange 'kv' on a closed ring")
    with pytest.raises(RingError):
        env.slot.run(ring, env.run, list(KV), (1, 2), 3)

    env.slot, env.capture_error, env.refuse_replay = call_plans.GraphSlot(), None, True
    with pytest.warns(RuntimeWarning, match="could not be replayed"):
        env.slot.run(ring, env.run, list(KV), (1, 2), 3)
    assert env.eager == 3 and not env.graphs[-1].live  # released, the call ran eagerly
    assert not env.slot.replay(ring, (1, 2), KV, 3)
    env.slot.run(ring, env.run, list(KV), (1, 2), 3)
    assert env.eager == 4 and len(env.captures) == 3  # no second capture


def test_repeated_or_non_contiguous_operands_are_not_captured(slot_env):
    env, ring = slot_env, SlotRing()
    env.slot.run(ring, env.run, list(KV), (1, 1), 3)
    env.slot.run(ring, env.run, list(KV), (1, 0), 3)
    env.slot.run(ring, env.run, [Tensor(0x100, contiguous=False), KV[1]], (1, 2), 3)
    env.slot.run(ring, env.run, [KV[0], Tensor(0x208)], (1, 2), 3)  # (the copy's 16-byte words)
    assert env.eager == 4 and env.captures == []
    env.slot.run(ring, env.run, [KV[0], KV[0]], (0x100, 2), 3)  # K is V is an address: fine
    assert env.eager == 4 and env.captures == [(0x100, 2)]
    assert not env.slot.replay(ring, (1, 2), (KV[0], Tensor(0x208)), 3)
    assert env.slot.replay(ring, (1, 2), KV, 3)


def test_a_replay_that_ran_never_raises_and_then_keeps_to_its_stream():
    """Once the graph is launched the call has run: a failure to record its end must not send
    the caller to run it again; later replays keep to that stream, and a release keeps the
    memory it cannot order."""
    driver = RecordingGraphDriver(FIELDS)
    graph = _captured(driver, [(_launch(1), (0x1000, 0, 0, 0))], (0x1000,))
    graph.replay((0x1000,), CAPTURED_KV, stream=6)  # (waits for nothing: none recorded yet)
    driver.refuse_record = True
    with pytest.warns(RuntimeWarning, match="recording"):
        graph.replay((0x1000,), CAPTURED_KV, stream=6)
    assert len(driver.launches) == 2
    with pytest.warns(RuntimeWarning, match="recording"):
        graph.replay((0x1000,), CAPTURED_KV, stream=6)  # the same stream: fine
    with pytest.raises(RuntimeError, match="cannot wait for the last"):
        graph.replay((0x1000,), CAPTURED_KV, stream=7)
    assert len(driver.launches) == 3  # refused before anything was queued
    with pytest.warns(RuntimeWarning, match="memory stays allocated"):
        graph.release()
    assert graph._keep is not None


def test_a_call_replays_or_else_runs_on_backend_views(slot_env, monkeypatch):
    from cuparing import call_plans

    views, entered = [], []
    monkeypatch.setattr(call_plans, "to_backend", lambda x, origin: views.append(x) or x)

    @contextlib.contextmanager
    def call_context():  # the caller's allocator and stream: only what runs eagerly needs it
        entered.append(True)
        yield

    origin = SimpleNamespace(device_index=1, stream=call_context)
    env, ring = slot_env, SlotRing()
    env.slot.call(ring, env.run, origin, KV, (1, 2))  # captures (from the views), replays
    assert views == list(KV) and env.captures == [(1, 2)] and ring.watched == 1
    # inside the call context: on CuPy's current stream (there, torch's)
    assert entered == [True] and ring.watched_on == 4 and env.on_device == []
    env.slot.call(ring, env.run, origin, KV, (3, 4))  # replays: no views, no call context
    # on torch's current stream of the caller's device, that device entered
    assert len(views) == 2 and env.graphs[0].replays[-1] == ((3, 4), (0x100, 0x200), 13)
    assert entered == [True] and env.eager == 0 and ring.watched == 2 and ring.watched_on == 13
    assert env.on_device == [1]


def test_a_slot_keeps_a_graph_per_transport_state_up_to_its_bound(slot_env):
    """A copy-engine ring's graph replays only at its channels' captured slot parity: a repeat
    no kept graph matches captures another (up to GraphSlot.VARIANTS), then replays whichever
    matches; past the bound it runs eagerly."""
    env, ring = slot_env, SlotRing()
    env.slot.run(ring, env.run, list(KV), (1, 2), 3)
    first = env.graphs[0]
    first.matches = False  # the call made an odd number of exchanges: the other parity now
    assert not env.slot.replay(ring, (1, 2), KV, 3)
    env.slot.run(ring, env.run, list(KV), (1, 2), 3)  # captures the second parity's graph
    second = env.graphs[1]
    assert len(env.captures) == 2 and len(second.replays) == 1 and env.eager == 0
    first.matches, second.matches = True, False
    assert env.slot.replay(ring, (5, 6), KV, 3) and first.replays[-1][0] == (5, 6)
    first.matches = False
    for _ in range(env.slot.VARIANTS - 2):  # states no graph matches fill the slot
        env.slot.run(ring, env.run, list(KV), (1, 2), 3)
        env.graphs[-1].matches = False
    env.slot.run(ring, env.run, list(KV), (1, 2), 3)
    assert len(env.captures) == env.slot.VARIANTS and env.eager == 1
    second.release()  # the ring released its graphs: all of them go, and are captured anew
    assert not env.slot.replay(ring, (1, 2), KV, 3)
    env.slot.run(ring, env.run, list(KV), (1, 2), 3)
    assert len(env.captures) == env.slot.VARIANTS + 1 and env.eager == 1


def test_a_deferred_capture_runs_eagerly_and_captures_on_a_later_repeat(slot_env):
    """A transport that must set something up first (the copy-engine ring's channels, after
    ``release_buffers``) defers the capture: that repeat runs eagerly, with no warning, and the
    next one captures."""
    import warnings

    from cuparing.comm.base import CaptureDeferred

    env, ring = slot_env, SlotRing()
    env.capture_error = CaptureDeferred("rank 0: exchange 'kv' #3 sets up a channel")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        env.slot.run(ring, env.run, list(KV), (1, 2), 3)
    assert env.eager == 1 and env.graphs == []
    env.capture_error = None
    env.slot.run(ring, env.run, list(KV), (1, 2), 3)
    assert env.eager == 1 and len(env.graphs) == 1 and env.graphs[0].replays


def test_a_refused_replay_releases_every_graph_of_the_plan(slot_env):
    """Where the driver refuses a replay the plan runs eagerly from then on, with one warning:
    its other graphs (the other slot parity's) are released too, not tried in turn."""
    env, ring = slot_env, SlotRing()
    env.slot.run(ring, env.run, list(KV), (1, 2), 3)
    env.graphs[0].matches = False
    env.slot.run(ring, env.run, list(KV), (1, 2), 3)
    first, second = env.graphs
    first.matches, first.refuse = True, True  # (second no longer matches: first is tried)
    second.matches = False
    with pytest.warns(RuntimeWarning, match="could not be replayed") as caught:
        assert not env.slot.replay(ring, (1, 2), KV, 3)
        for _ in range(3):
            assert not env.slot.replay(ring, (1, 2), KV, 3)
            env.slot.run(ring, env.run, list(KV), (1, 2), 3)
    assert len(caught) == 1 and not first.live and not second.live
    assert env.eager == 3 and len(env.captures) == 2


class RecordedExchanges:
    """What a copy-engine ring's capture yields, as CapturedRingCall uses it: ``state`` stands
    for where the ring's channels are (``key()``); ``patched`` lists the executables given
    values, in order; ``calls`` the orderings before a launch and the advances after it, with
    their streams and how many launches ``driver`` (a RecordingGraphDriver) had seen then."""

    def __init__(self, refuse=False, driver=None):
        self.refuse, self.patched, self.advanced, self.released = refuse, [], 0, False
        self.state = (0,)
        self.refuse_order = self.refuse_advance = self.fail_advance = False
        self.driver, self.calls = driver, []
        self.launched = "transport event"

    def _call(self, what, stream):
        self.calls.append((what, stream, len(self.driver.launches) if self.driver else None))

    def matches(self):
        return not self.released

    def key(self):
        return self.state

    def patch(self, executable):
        if self.refuse:
            raise RuntimeError("cuGraphExecBatchMemOpNodeSetParams failed: NOT_SUPPORTED")
        self.patched.append(executable)

    def before_launch(self, stream, after_last=False):
        if self.refuse_order:
            raise RuntimeError("cudaStreamWaitEvent failed: cudaErrorInvalidResourceHandle")
        self._call("before launch" + " after last" * after_last, stream)

    def advance(self, stream):
        self.advanced += 1
        self._call("advance", stream)
        if self.refuse_advance:
            raise RuntimeError("cudaEventRecord failed: cudaErrorInvalidResourceHandle")
        if self.fail_advance:
            raise RingError("rank 0: recording the end of a replayed CUDA graph failed")

    def release(self):
        self.released = True


def _with_exchanges(driver, exchanges, entries=(), copy=None):
    """A CapturedRingCall over ``entries`` (as :func:`_captured`) whose transport is
    ``exchanges``."""
    launches = [[packed, pointers, 0, f"n{i}"] for i, (packed, pointers) in enumerate(entries)]
    kv = [SimpleNamespace(data=SimpleNamespace(ptr=p)) for p in COPIES]
    kv_copy = None
    if copy is not None:
        kv_copy = [copy, (CAPTURED_KV[0], COPIES[0], CAPTURED_KV[1], COPIES[1]), 0, "kv"]
    return ring_graphs.CapturedRingCall(driver, "graph", "exec", launches, (0x1000,), kv,
                                        keep=None, home_stream=5, device=0,
                                        exchanges=exchanges, kv_copy=kv_copy)  # fmt: skip


def test_a_replay_patches_the_transport_before_anything_is_queued():
    """A state of the transport no instantiation has yet is given its values before the
    stream switch and the launch, and the counts move on only after the launch: a refused
    patch leaves nothing of the call queued (the caller may run it eagerly), nothing advanced
    and no half-patched instantiation kept. A release drops the transport's record too."""
    driver = RecordingGraphDriver(FIELDS)
    exchanges = RecordedExchanges()
    graph = _with_exchanges(driver, exchanges)
    graph.replay((0x1000,), (0x10,), stream=5)  # the capture's state: its own nodes
    assert (exchanges.patched, exchanges.advanced, driver.launches) == ([], 1, [("exec", 5)])
    assert graph.matches
    exchanges.refuse, exchanges.state = True, (2,)
    orders = list(driver.orders)
    with pytest.raises(RuntimeError, match="SetParams failed"):
        graph.replay((0x1000,), (0x10,), stream=7)  # (another stream: it would wait first)
    assert driver.orders == orders and len(driver.launches) == 1
    assert exchanges.advanced == 1
    assert driver.destroyed == [("exec1", None)]  # the refused instantiation
    exchanges.refuse = False
    graph.replay((0x1000,), (0x10,), stream=5)
    assert exchanges.patched == ["exec2"] and driver.launches[-1] == ("exec2", 5)
    graph.release()
    assert exchanges.released and not graph.matches
    # (not the event: the transport's, which its channels may still wait for)
    assert driver.destroyed[1:] == [("exec", None), ("exec2", None), (None, "graph")]


def test_the_transport_orders_each_launch_and_moves_on_after_it():
    """Each replay hands the transport its stream before the launch (``before_launch``: the
    launch must follow the exchanges issued before it) and after (``advance``). A refused
    ordering leaves nothing launched and nothing advanced (the caller may run the call
    eagerly); a refused advance comes after the launch: it only warns."""
    driver = RecordingGraphDriver(FIELDS)
    exchanges = RecordedExchanges(driver=driver)
    graph = _with_exchanges(driver, exchanges)
    graph.replay((0x1000,), (0x10,), stream=5)
    graph.replay((0x1000,), (0x10,), stream=7)
    assert exchanges.calls == [("before launch", 5, 0), ("advance", 5, 1),
                               ("before launch after last", 7, 1), ("advance", 7, 2)]  # fmt: skip
    # one event per replay, the transport's: waited for on the new stream, never recorded here
    assert driver.orders == [("wait", 7)]
    exchanges.refuse_order = True
    with pytest.raises(RuntimeError, match="cudaStreamWaitEvent failed"):
        graph.replay((0x1000,), (0x10,), stream=7)
    assert len(driver.launches) == 2 and exchanges.advanced == 2
    exchanges.refuse_order, exchanges.refuse_advance = False, True
    with pytest.warns(RuntimeWarning, match="issue the next exchanges from its stream"):
        graph.replay((0x1000,), (0x10,), stream=7)
    assert len(driver.launches) == 3 and exchanges.calls[-1] == ("advance", 7, 3)
    with pytest.raises(RuntimeError, match="cannot wait for the last one"):
        graph.replay((0x1000,), (0x10,), stream=5)  # (its end was not recorded)
    with pytest.warns(RuntimeWarning, match="its memory stays allocated"):
        graph.release()  # (on stream 7, its end not recorded)
    assert "transport event" not in driver.destroyed  # (the transport's to free)


def test_a_transport_that_fails_the_ring_after_a_launch_does_not_warn():
    """Where recording the launch's end fails the ring (the copy-engine ring: its next
    exchanges could otherwise wait for good), the replay returns quietly (the ring's next call
    raises) and keeps to its stream."""
    driver = RecordingGraphDriver(FIELDS)
    exchanges = RecordedExchanges(driver=driver)
    exchanges.fail_advance = True
    graph = _with_exchanges(driver, exchanges)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        graph.replay((0x1000,), (0x10,), stream=5)
    assert len(driver.launches) == 1
    with pytest.raises(RuntimeError, match="cannot wait for the last one"):
        graph.replay((0x1000,), (0x10,), stream=7)


def test_each_transport_state_replays_its_own_instantiation_patched_once():
    """The copy-engine ring's flag values repeat every four exchanges: each state met gets its
    own instantiation, given its values once, and every later replay at that state launches it
    unpatched. Past ``EXECUTABLES`` states the least recently replayed instantiation takes the
    new state's values (and its old state, met again, is patched again)."""
    driver = RecordingGraphDriver(FIELDS)
    exchanges = RecordedExchanges()
    graph = _with_exchanges(driver, exchanges)
    loop = [(0,), (2,), (0,), (2,)] * 5  # one channel, two exchanges per call: 0, 2, 0, 2 ...
    for state in loop:
        exchanges.state = state
        graph.replay((0x1000,), (0x10,), stream=5)
    assert exchanges.patched == ["exec1"]  # once, when the second state's copy was made
    assert [e for e, _ in driver.launches] == ["exec", "exec1"] * 10
    assert ring_graphs.CapturedRingCall.EXECUTABLES == 4
    for state in [(0, 2), (2, 2)]:  # (two channels: up to four states)
        exchanges.state = state
        graph.replay((0x1000,), (0x10,), stream=5)
    assert exchanges.patched == ["exec1", "exec2", "exec3"]
    exchanges.state = (1, 3)  # a fifth state: the least recently replayed, (0,) on "exec"
    graph.replay((0x1000,), (0x10,), stream=5)
    assert exchanges.patched[-1] == "exec" and driver.launches[-1][0] == "exec"
    exchanges.state = (0,)  # its old state: the least recent now, "exec1", takes it
    graph.replay((0x1000,), (0x10,), stream=5)
    assert exchanges.patched[-1] == "exec1" and driver.launches[-1][0] == "exec1"
    assert len(exchanges.patched) == 5
    for state in [(2, 2), (1, 3), (0,), (0, 2)]:  # all kept: no patch
        exchanges.state = state
        graph.replay((0x1000,), (0x10,), stream=5)
    assert len(exchanges.patched) == 5 and exchanges.advanced == len(driver.launches)


def test_each_instantiation_keeps_its_own_record_of_the_kernel_nodes():
    """Kernel node updates reach one instantiation only: a new instantiation holds the
    captured pointers and takes the caller's moved addresses and K/V itself, and returning to
    an instantiation that has them already rewrites nothing."""
    q0, q1, k1 = 0x1000, 0x5000, 0x7100
    step0 = _launch(11)
    driver = RecordingGraphDriver(FIELDS)
    exchanges = RecordedExchanges()
    graph = _with_exchanges(driver, exchanges, [(step0, (0xD000, q0, *COPIES))], _launch(13))
    moved_kv = (k1, CAPTURED_KV[1])
    graph.replay((q1,), moved_kv, stream=5)
    moved = [("n0", (0xD000, q1, *COPIES), 11),
             ("kv", (k1, COPIES[0], CAPTURED_KV[1], COPIES[1]), 13)]  # fmt: skip
    assert driver.updates == [("exec", *update) for update in moved]
    driver.updates.clear()
    exchanges.state = (2,)  # a new instantiation: its nodes as captured
    graph.replay((q1,), moved_kv, stream=5)
    assert driver.updates == [("exec1", *update) for update in moved]
    assert [e for e, _ in driver.launches] == ["exec", "exec1"]
    driver.updates.clear()
    for state in [(0,), (2,), (0,)]:  # both have them now
        exchanges.state = state
        graph.replay((q1,), moved_kv, stream=5)
    assert driver.updates == []
    graph.replay((q0,), CAPTURED_KV, stream=5)  # back to the captured ones, on "exec" only
    assert driver.updates == [("exec", "n0", (0xD000, q0, *COPIES), 11),
                              ("exec", "kv", (*CAPTURED_KV[:1], COPIES[0], CAPTURED_KV[1],
                                              COPIES[1]), 13)]  # fmt: skip
    driver.updates.clear()
    exchanges.state = (2,)
    graph.replay((q1,), moved_kv, stream=5)  # "exec1" still holds q1 and k1
    assert driver.updates == []


def test_a_refused_capture_releases_the_graphs_already_kept(slot_env):
    """A refused capture leaves the plan eager for good, as a refused replay does: graphs of
    other slot parities captured before are released, not replayed on."""
    env, ring = slot_env, SlotRing()
    env.slot.run(ring, env.run, list(KV), (1, 2), 3)
    env.graphs[0].matches = False
    env.capture_error = RuntimeError("cuStreamBeginCapture failed")
    with pytest.warns(RuntimeWarning, match="could not be captured"):
        env.slot.run(ring, env.run, list(KV), (1, 2), 3)
    assert not env.graphs[0].live and env.eager == 1
    env.graphs[0].matches = True
    assert not env.slot.replay(ring, (1, 2), KV, 3)
    env.slot.run(ring, env.run, list(KV), (1, 2), 3)
    assert env.eager == 2 and len(env.captures) == 2


class Held:
    """A captured call as the budget sees it."""

    def __init__(self, budget):
        self.budget, self.released = budget, False

    def release(self):
        self.released = True
        self.budget.forget(self)


def test_the_graph_budget_releases_the_least_recently_replayed(monkeypatch):
    """Past ``CUPARING_RING_GRAPHS_MAX`` live captured calls, a new capture releases the one
    replayed least recently (its plan captures again at its next repeat); released ones leave
    the count."""
    monkeypatch.setenv("CUPARING_RING_GRAPHS_MAX", "3")
    budget = ring_graphs.GraphBudget()
    calls = [Held(budget) for _ in range(5)]
    for call in calls[:3]:
        budget.admit(call)
    budget.used(calls[0])  # replayed: now the most recent
    budget.admit(calls[3])
    assert [c.released for c in calls[:4]] == [False, True, False, False]
    calls[2].release()  # released by its ring: no longer counted
    budget.admit(calls[4])
    assert [c.released for c in calls] == [False, True, True, False, False]
    monkeypatch.setenv("CUPARING_RING_GRAPHS_MAX", "1")  # (read at each capture)
    newest = Held(budget)
    budget.admit(newest)
    assert not newest.released and all(c.released for c in calls)
    monkeypatch.setenv("CUPARING_RING_GRAPHS_MAX", "many")  # unreadable: the default
    assert ring_graphs.GraphBudget.limit() == ring_graphs.GraphBudget.DEFAULT
