"""The ring backward's rotation (cuparing.schedule.backward_rotation) on the fake GPU rings of
tests/fake_gpu.py, NCCL and the copy-engine ring in both of its sync modes, with a stream
starved: each step computes into a spare dK / dV pair while the travelling one arrives, adds it
in and sends the sum on (the last step's sum made into a new pair, which travels home), so every
rank's contribution to a shard must reach the shard's owner exactly once, whichever steps are
EMPTY, over several calls back to back. A control without the caller's wait for what arrived
shows the check can see a missing order."""

from __future__ import annotations

import ctypes
import threading

import fake_gpu
import numpy as np
import pytest
from fake_gpu import FakeStack, run_threads

from cuparing.comm import gpu_ring
from cuparing.comm import ipc as ipc_mod
from cuparing.comm import nccl as nccl_mod
from cuparing.schedule import backward_rotation

WIDTH = 6  # elements of each stand-in accumulator

# (ring size, last step, per rank: whether each step's block is busy)
PATTERNS = [
    (2, 1, [[True, True], [True, True]]),
    (2, 1, [[True, False], [False, True]]),
    (3, 2, [[True, True, True]] * 3),
    (3, 2, [[True, False, True], [False, True, False], [True, True, False]]),
    (3, 2, [[False, False, True], [True, False, False], [False, True, True]]),
    (4, 3, [[True, False, False, True], [True, True, False, False],
            [False, False, False, False], [True, False, True, True]]),
    (4, 1, [[True, True], [False, True], [True, False], [True, True]]),  # home shift 3
    (3, 0, [[True], [False], [True]]),  # one step, nothing travels
]  # fmt: skip


@pytest.fixture(params=["nccl", "ipc-device", "ipc-host"])
def fake(request, monkeypatch):
    """``fake(size)``: the rings of one ring on one fake GPU, of the parameter's transport."""
    stack = FakeStack(seed=hash(request.node.name) & 0xFFFF)
    stack.install(monkeypatch)
    driver = stack.driver
    made = []

    def make(size):
        comms = stack.communicators(size)
        if request.param == "nccl":
            rings = [nccl_mod.NcclRing(r, size, comms[r], 0, 20.0, False) for r in range(size)]
        else:
            meshes = fake_gpu.peer_mesh(size)
            stack.driver = driver if request.param == "ipc-device" else None
            rings = [ipc_mod.IpcRing(r, size, comms[r], 0, 20.0, False, meshes[r])
                     for r in range(size)]  # fmt: skip
        made.extend(rings)
        return rings

    make.stack = stack
    yield make
    for ring in made:  # (as test_ipc_ring_cpu's rings end: no collective close between threads)
        ring._stop.set()
        links = getattr(ring, "_links", None)
        if links is not None:
            links.close(0)
    stack.close()


def _zeroed_on_stream(cupy):
    """A new array holding NaN (uninitialised memory), zeroed by work queued on the current
    stream."""
    array = fake_gpu.dev(np.full(WIDTH, np.nan, np.float32))
    address, size = array.ctypes.data, array.nbytes
    cupy.cuda.get_current_stream().launch(lambda: ctypes.memset(address, 0, size))
    return array


def _run(fake, pattern, starve, calls=3):
    """Every rank's rotation, ``calls`` times; each busy block adds ``2^rank * (call + 1)`` to
    dK and 1 to dV of the shard it holds (and checks it holds the right K/V). Asserts each
    owner ends with every contributor's sum once."""
    size, last, busy = pattern
    rings = fake(size)
    gpu, cupy = fake.stack.gpu, fake.stack.cupy
    gpu.paused = True  # (nothing runs until every rank has queued its first call)
    start = threading.Barrier(size, action=lambda: setattr(gpu, "paused", False))
    home = (-last) % size
    results = {r: [] for r in range(size)}
    errors = []

    def rank_main(ring):
        rank, caller = ring.rank, cupy.cuda.get_current_stream()
        if starve == ("caller", rank):
            gpu.starve.add(caller)
        elif starve == ("comm", rank):
            gpu.starve.add(ring.stream)
        for call in range(calls):
            kv = [fake_gpu.dev(np.full(WIDTH, rank + 100 * call, np.float32)),
                  fake_gpu.dev(np.full(WIDTH, -rank - 100 * call, np.float32))]  # fmt: skip

            def compute(step, kv, pair, call=call, rank=rank):
                def kernel():
                    shard = int(kv[0][0]) - 100 * call
                    if shard != (rank - step) % size or int(kv[1][0]) != -shard - 100 * call:
                        errors.append((rank, call, step, float(kv[0][0])))
                    pair[0] += float(1 << rank) * (call + 1)
                    pair[1] += 1.0

                caller.launch(kernel)

            def add(part, arrived):
                def kernel():
                    arrived[0] += part[0]
                    arrived[1] += part[1]

                caller.launch(kernel)

            def spare():
                return [_zeroed_on_stream(cupy), _zeroed_on_stream(cupy)]

            def homeward(part, held):  # (a new pair, as a cast to the gradients' dtype makes)
                whole = [_zeroed_on_stream(cupy), _zeroed_on_stream(cupy)]

                def kernel():
                    for i in range(2):
                        whole[i] += held[i] if part is None else held[i] + part[i]

                caller.launch(kernel)
                return whole

            own = [_zeroed_on_stream(cupy), _zeroed_on_stream(cupy)]
            out = backward_rotation(ring, kv, own, busy[rank], home, compute, spare, add,
                                    homeward)  # fmt: skip
            caller.launch(lambda out=out, call=call, rank=rank: results[rank].append(
                (call, np.array(out[0]), np.array(out[1]))))  # fmt: skip
        start.wait(20)
        ring.synchronize()
        caller.synchronize()

    outcome = run_threads([lambda ring=ring: rank_main(ring) for ring in rings], timeout=60)
    assert all(o is None for o in outcome), outcome
    assert errors == []
    for owner in range(size):
        contributors = [r for r in range(size)
                        if (r - owner) % size <= last and busy[r][(r - owner) % size]]  # fmt: skip
        for call, dk, dv in results[owner]:
            assert np.all(dk == sum(1 << r for r in contributors) * (call + 1)), (owner, call, dk)
            assert np.all(dv == len(contributors)), (owner, call, dv)
    assert all(len(results[r]) == calls for r in range(size))


@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: f"C{p[0]}-last{p[1]}")
@pytest.mark.parametrize("starve", [None, ("caller", 0), ("caller", 1), ("comm", 0), ("comm", 1)])
def test_every_contribution_reaches_its_owner_once(fake, pattern, starve):
    _run(fake, pattern, starve)


def test_without_the_callers_wait_the_sums_come_out_wrong(fake, monkeypatch):
    monkeypatch.setattr(gpu_ring.GpuPending, "wait", lambda self: list(self._received))
    with pytest.raises(AssertionError):
        _run(fake, PATTERNS[5], ("comm", 0))
