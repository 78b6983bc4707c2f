"""Ring calls replayed as CUDA graphs (cuparing.backends.ring_graphs), on the CPU: a replay hands
each captured kernel node exactly the arguments a fresh launch with the caller's addresses would
get (captured addresses replaced by value, everything else as captured), rewrites only nodes
whose arguments changed since the last replay, copies K/V first and launches the graph once.
The driver is a recording stand-in that reads the arguments the way the CUDA driver does."""

from __future__ import annotations

import ctypes
import struct
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cuparing.backends import launch_plans, ring_graphs


class RecordingGraphDriver:
    """Records the node updates (the pointer fields read through the ``void*`` array), the K/V
    copies and the launches of a replay."""

    def __init__(self, fields: int):
        self.fields, self.updates, self.copies, self.launches = fields, [], [], []

    def kernel_params(self, function, geometry, arguments):
        return SimpleNamespace(function=function, geometry=geometry, arguments=arguments)

    def set_kernel_node(self, executable, node, params):
        struct_address = ctypes.c_uint64.from_address(params.arguments).value
        packed = ctypes.string_at(struct_address, 8 * self.fields)
        self.updates.append((node, struct.unpack(f"<{self.fields}Q", packed), params.function))

    def copy(self, destination, source, nbytes, stream):
        self.copies.append((destination, source, nbytes, stream))

    def launch(self, executable, stream):
        self.launches.append((executable, stream))

    def destroy(self, executable, graph):
        pass


FIELDS = 4  # pointers per launch in these tests: a struct of four addresses


def _launch(function: int) -> launch_plans.PackedLaunch:
    kernel = SimpleNamespace(kernel=SimpleNamespace(ptr=function))
    never = SimpleNamespace(launch=None)  # a replay updates nodes, it launches no kernel
    return launch_plans.PackedLaunch((kernel,), (1,), (32,), 0, bytes(8 * FIELDS),
                                     tuple(range(0, 8 * FIELDS, 8)), driver=never)  # fmt: skip


def _captured(driver, entries, addresses):
    """A CapturedRingCall over ``entries`` = [(launch, captured pointers)], node i = "n{i}"."""
    launches = [[packed, pointers, 0, f"n{i}"] for i, (packed, pointers) in enumerate(entries)]
    kv = [SimpleNamespace(data=SimpleNamespace(ptr=0xA000), nbytes=64),
          SimpleNamespace(data=SimpleNamespace(ptr=0xB000), nbytes=32)]  # fmt: skip
    return ring_graphs.CapturedRingCall(driver, "graph", "exec", launches, addresses, kv, None)


def test_replay_repoints_only_what_the_caller_moved():
    q0, out0, lse0 = 0x1000, 0x2000, 0x3000
    own_kv, received, scratch = 0xA000, 0xC000, 0xD000
    step0, step1 = _launch(11), _launch(12)
    entries = [(step0, (scratch, q0, own_kv, lse0)), (step1, (out0, q0, received, lse0)),
               (step1, (scratch, scratch, received, 0))]  # fmt: skip
    driver = RecordingGraphDriver(FIELDS)
    graph = _captured(driver, entries, (q0, out0, lse0))

    graph.replay((q0, out0, lse0), (0x7000, 0x8000), stream=5)  # the captured call's addresses
    assert driver.updates == []
    assert driver.copies == [(0xA000, 0x7000, 64, 5), (0xB000, 0x8000, 32, 5)]
    assert driver.launches == [("exec", 5)]

    q1, out1 = 0x5000, 0x6000
    graph.replay((q1, out1, lse0), (0x7000, 0x8000), stream=5)
    assert driver.updates == [("n0", (scratch, q1, own_kv, lse0), 11),
                              ("n1", (out1, q1, received, lse0), 12)]  # fmt: skip
    driver.updates.clear()
    graph.replay((q1, out1, lse0), (0x7000, 0x8000), stream=5)  # nothing moved since
    assert driver.updates == []
    graph.replay((q1, out0, lse0), (0x7000, 0x8000), stream=5)  # only the output moved back
    assert driver.updates == [("n1", (out0, q1, received, lse0), 12)]
    assert len(driver.launches) == 4

    graph.release()
    assert not graph.live
    with pytest.raises(RuntimeError, match="released"):
        graph.replay((q1, out0, lse0), (0x7000, 0x8000), stream=5)


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
    graph = _captured(driver, entries, tuple(caller))
    state = {f"n{i}": pointers for i, (_, pointers) in enumerate(entries)}  # what each node holds
    for _ in range(draw(st.integers(1, 5))):
        # new caller addresses, distinct (they are live tensors), some unchanged
        moved = tuple(draw(st.sampled_from([a, a + 2**45 + 16 * draw(st.integers(0, 3))]))
                      for a in caller)  # fmt: skip
        if len(set(moved)) != len(moved):
            continue
        remap = dict(zip(caller, moved, strict=True))
        driver.updates.clear()
        graph.replay(moved, (0x10, 0x20), stream=1)
        updated = set()
        for node, pointers, _ in driver.updates:
            assert node not in updated  # one update per node and replay
            assert state[node] != pointers  # and only where its arguments change
            updated.add(node)
            state[node] = pointers
        for i, (_, pointers) in enumerate(entries):
            want = tuple(remap.get(p, p) for p in pointers)
            assert state[f"n{i}"] == want


def test_capture_refuses_addresses_it_could_not_tell_apart():
    for addresses in ((0x10, 0x10), (0x10, 0)):
        with pytest.raises(ValueError, match="distinct and non-zero"):
            ring_graphs.capture(None, lambda kv: None, [], addresses)
