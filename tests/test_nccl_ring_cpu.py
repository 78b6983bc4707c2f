"""NcclRing's host-side logic on the CPU, against the fake CuPy/NCCL of ``fake_gpu.py``.

Sends read their bytes when the fake GPU runs them and receives complete in order per (sender,
receiver), which is enough to check peers, byte transport of any dtype, double buffering, the
event ordering the ring promises, the watchdog and the failure channel.
"""

from __future__ import annotations

import re
import sys
import threading
import time
import weakref
from types import SimpleNamespace

import ml_dtypes
import numpy as np
import pytest
from fake_gpu import FakeStack, run_threads
from fake_gpu import dev as _dev

import cuparing as cr
from cuparing.comm import gpu_ring as gpu_ring_mod
from cuparing.comm import nccl as nccl_mod
from cuparing.comm.rendezvous import RankInfo
from cuparing.launch import free_port


@pytest.fixture
def stack(monkeypatch):
    stack = FakeStack()
    stack.install(monkeypatch)
    yield stack
    stack.close()


@pytest.fixture
def rings(stack):
    made = []

    def make(size=2, timeout=30.0, trace=False):
        comms = stack.communicators(size)
        out = [nccl_mod.NcclRing(r, size, comms[r], 0, timeout, trace) for r in range(size)]
        made.extend(out)
        return out

    make.caller = stack.cupy.cuda.get_current_stream()
    yield make
    for ring in made:
        ring._stop.set()


def _comm(ring):
    """The fake NCCL communicator under ``ring``."""
    return ring._collective.comm


def _settle(*rings):
    """Wait until the fake GPU has run everything the rings and the caller's stream queued."""
    for ring in rings:
        ring.synchronize()
    rings[0]._cupy.cuda.get_current_stream().synchronize()


def test_exchange_moves_any_dtype_to_the_next_rank(rings):
    ring0, ring1, ring2 = rings(3)
    sent = {}
    pendings = []
    for ring in (ring0, ring1, ring2):
        r = ring.rank
        base = np.arange(24, dtype=np.float32).reshape(2, 3, 4) + 100 * r
        arrays = [
            _dev(base.astype(ml_dtypes.bfloat16)),
            _dev(base[:, :, ::2]),  # not contiguous: the ring copies it first
            _dev(np.full((5,), r, dtype=np.int64)),
        ]
        sent[r] = [np.array(a) for a in arrays]
        pendings.append(ring.exchange(arrays, 1, "kv"))
    for ring, pending in zip((ring0, ring1, ring2), pendings, strict=True):
        got = pending.wait()
        _settle(ring)
        want = sent[(ring.rank - 1) % 3]
        for g, w in zip(got, want, strict=True):
            assert g.dtype == w.dtype and g.shape == w.shape
            np.testing.assert_array_equal(np.asarray(g).view(np.uint8), w.view(np.uint8))
    assert _comm(ring1).calls[0] == ("send", 2, 24 * 2) and _comm(ring1).calls[1][:2] == ("recv", 0)
    ring0.synchronize()


def test_receive_buffers_alternate_and_are_reused(rings):
    ring0, ring1 = rings(2)
    seen = []
    for step in range(4):
        pend = [ring.exchange([_dev(np.full(4, step * 10 + ring.rank, np.float32))], 1, "kv")
                for ring in (ring0, ring1)]  # fmt: skip
        got0 = pend[0].wait()[0]
        _settle(ring0)
        assert got0[0] == step * 10 + 1
        seen.append(got0.ctypes.data)
        pend[1].wait()
    assert seen[0] == seen[2] and seen[1] == seen[3] and seen[0] != seen[1]
    # another tag has its own pair
    pend = [ring.exchange([_dev(np.zeros(4, np.float32))], 1, "dkv") for ring in (ring0, ring1)]
    assert pend[0].wait()[0].ctypes.data not in seen


def test_event_ordering_between_caller_and_comm_streams(rings):
    ring0, ring1 = rings(2)
    caller = rings.caller
    p0 = ring0.exchange([_dev(np.ones(3, np.float32))])
    ready = ring0.stream.waited[-1]
    assert ready.stream is caller  # the comm stream waits on the caller's work before sending
    ring1.exchange([_dev(np.ones(3, np.float32))])
    p0.wait()
    _settle(ring0)
    received = caller.waited[-1]
    assert received.stream is ring0.stream and received.done  # caller waits on 'received'


@pytest.mark.parametrize("drop_wait", [False, True])
def test_sends_wait_for_the_work_that_writes_them(rings, stack, drop_wait):
    """The comm stream waits for the caller's queued work before sending. Negative control:
    without that wait, a send reads the array before the kernel that writes it has run."""
    ring0, ring1 = rings(2)
    caller = rings.caller
    if drop_wait:
        ring0.stream.wait_event = lambda event: None
    stack.gpu.paused = True  # every host call is issued before the GPU runs anything
    stack.gpu.starve.add(caller)  # and the caller's kernels run last
    x = _dev(np.zeros(4, np.float32))
    caller.launch(lambda: x.fill(7))  # the kernel producing what rank 0 sends
    pending = [ring.exchange([a]) for ring, a in ((ring0, x), (ring1, _dev(np.zeros_like(x))))]
    got = pending[1].wait()[0]
    pending[0].wait()
    stack.gpu.paused = False
    _settle(ring0, ring1)
    assert bool((np.asarray(got) == 7).all()) is not drop_wait


def test_allgather_bytes_of_any_lengths_and_barrier(rings):
    ring_set = rings(3)
    data = [b"", b"rank one", bytes(range(200))]
    results = run_threads([lambda ring=ring: (ring.allgather_bytes(data[ring.rank]), ring.barrier())
                           for ring in ring_set])  # fmt: skip
    assert results == [(data, None)] * 3
    (solo,) = rings(1)
    assert solo.allgather_bytes(b"x") == [b"x"]
    solo.barrier()


def test_a_collective_a_peer_never_joins_times_out(rings):
    ring0, _ = rings(2, timeout=0.3)
    with pytest.raises(cr.RingTimeoutError, match=r"rank 0: collective 'barrier' #0 made no"):
        ring0.barrier()


def test_shift_zero_or_world_of_one_moves_nothing(rings):
    (solo,) = rings(1)
    x = _dev(np.ones(2, np.float32))
    assert solo.exchange([x]).wait()[0] is x
    ring0, _ = rings(2)
    assert ring0.exchange([x], shift=2).wait()[0] is x


def test_rejects_non_cupy_arrays(rings):
    ring0, _ = rings(2)
    with pytest.raises(TypeError, match=r"arrays\[0\] must be a CuPy array"):
        ring0.exchange([np.ones(3)])


def test_dead_peer_times_out_aborts_and_raises(rings, capfd):
    ring0, ring1 = rings(2, timeout=0.2)
    pending = ring0.exchange([_dev(np.ones(3, np.float32))], 1, "kv")
    pending.wait()  # does not block the host, even though nothing arrived
    deadline = time.monotonic() + 10
    # _fail records the error first, then says it and aborts: wait for the whole of it
    while ring0._error is None or not _comm(ring0).aborted:
        assert time.monotonic() < deadline, "the watchdog never fired and aborted"
        time.sleep(0.02)
    pattern = r"rank 0: exchange 'kv' #0 \(shift 1: rank 0 sends to rank 1, receives from rank 1\)"
    for call in (pending.wait, ring0.synchronize, lambda: ring0.exchange([])):
        with pytest.raises(cr.RingTimeoutError, match=pattern):
            call()
    assert "RingTimeoutError" in capfd.readouterr().err  # said at once, not only when raised
    ring1.close()
    comm = _comm(ring0)
    ring0.close()
    assert not comm.destroyed  # after a failure the communicator was aborted, not destroyed


def test_synchronize_times_out_instead_of_hanging(rings):
    ring0, _ = rings(2, timeout=0.3)
    ring0.exchange([_dev(np.ones(3, np.float32))], 1, "dkv")
    start = time.monotonic()
    with pytest.raises(cr.RingTimeoutError, match="'dkv' #0"):
        ring0.synchronize()
    assert time.monotonic() - start < 5


def test_slow_queue_is_not_a_hang(rings):
    ring0, ring1 = rings(2, timeout=1.0)
    p = [ring0.exchange([_dev(np.ones(2, np.float32))]) for _ in range(4)]
    # each step takes 0.3 s < timeout; the whole queue 1.2 s > timeout (0.7 s of slack per step
    # for a loaded host's scheduling)
    for _ in range(4):
        time.sleep(0.3)
        ring1.exchange([_dev(np.ones(2, np.float32))])
    for pending in p:
        pending.wait()
    ring0.synchronize()
    assert ring0._error is None


def test_close_destroys_and_refuses_more_work(rings):
    ring0, ring1 = rings(2)
    comm = _comm(ring0)
    ring0.close()
    ring0.close()
    assert comm.destroyed and not comm.aborted
    with pytest.raises(cr.RingError, match="closed ring"):
        ring0.exchange([_dev(np.ones(1, np.float32))])


def test_trace_records_comm_and_compute_windows(rings, tmp_path):
    ring0, ring1 = rings(2, trace=True)
    for _ in range(2):
        p = [ring.exchange([_dev(np.ones(8, np.float32))]) for ring in (ring0, ring1)]
        with ring0.trace_compute("block"):
            time.sleep(0.002)
        for pending in p:
            pending.wait()
    tracks = sorted({i.track for i in ring0.trace_intervals()})
    assert tracks == ["comm", "compute"]
    names = [i.name for i in ring0.trace_intervals()]
    assert "kv#0" in names and "compute during kv#1" in names and "block" in names
    assert 0.0 <= ring0.hidden_transfer_fraction() <= 1.0
    path = ring0.write_trace(str(tmp_path / "r{rank}.json"))
    assert path.endswith("r0.json")
    ring0.stop_trace()
    assert ring0.trace_intervals()  # still readable after stopping


def test_communicator_accepts_old_tuple_ids():
    made = {}

    class OldComm:
        def __init__(self, world, uid, rank):
            if not isinstance(uid, tuple):
                raise TypeError("Argument 'commId' has incorrect type")
            made["uid"] = uid

    nccl = SimpleNamespace(NcclCommunicator=OldComm, NcclError=RuntimeError)
    info = RankInfo(1, 2, 1)
    nccl_mod._communicator(nccl, info, bytes([0, 127, 128, 255] * 32), timeout=5)
    assert made["uid"][:4] == (0, 127, -128, -1)


def test_from_env_without_cupy_is_a_clear_error(monkeypatch):
    try:
        import cupy  # noqa: F401

        pytest.skip("CuPy is installed")
    except ImportError:
        pass
    with pytest.raises(RuntimeError, match=re.escape("needs CuPy")):
        cr.Ring.from_env()


# --- the failure channel, wired through from_env ---


@pytest.fixture
def env_rings(monkeypatch, stack):
    """``make(world)``: ``NcclRing.from_env`` on ``world`` threads (TCP rendezvous on loopback,
    fake CuPy/NCCL/communicators), returned by rank."""
    local, comms = threading.local(), {}  # the ranks of one ring share its unique id

    def communicator(nccl, info, uid, timeout):
        return comms.setdefault(uid, stack.communicators(info.world_size))[info.rank]

    monkeypatch.setattr(nccl_mod, "RankInfo", SimpleNamespace(from_env=lambda: local.info))
    monkeypatch.setattr(nccl_mod, "_communicator", communicator)
    monkeypatch.delenv("CUPARING_HEALTH", raising=False)
    made = []

    def make(world, timeout=20.0, **kwargs):
        port, rings, errors = free_port(), {}, []

        def rank_main(rank):
            # local rank 0 everywhere: the fake arrays all live on "GPU 0"
            local.info = RankInfo(rank, world, 0, "127.0.0.1", port, "tok", "torchrun")
            try:
                rings[rank] = nccl_mod.NcclRing.from_env(timeout=timeout, **kwargs)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors, errors
        made.extend(rings.values())
        return rings

    yield make
    for ring in made:
        ring.close()


def _wait_error(ring, deadline):
    """The ring's error once it is recorded and the communicator aborted (``None`` if that has
    not happened by ``deadline``)."""
    while not (ring._error is not None and _comm(ring).aborted) and time.monotonic() < deadline:
        time.sleep(0.005)
    return ring._error if _comm(ring).aborted else None


def test_one_rank_failing_aborts_every_rank_at_once(env_rings, capfd):
    rings = env_rings(4)
    assert all(ring._health is not None for ring in rings.values())
    start = time.monotonic()
    rings[2]._fail(cr.RingTimeoutError("rank 2: exchange 'kv' #5 made no progress within 20 s"))
    for rank in (0, 1, 3):
        error = _wait_error(rings[rank], start + 1.0)
        assert error is not None, f"rank {rank} was not told within 1 s"
        assert type(error) is cr.RingError and _comm(rings[rank]).aborted
        assert str(error).startswith(f"rank {rank}: ring aborted because rank 2 failed: rank 2:")
        with pytest.raises(cr.RingError, match="because rank 2 failed"):
            rings[rank].exchange([_dev(np.ones(2, np.float32))])
    assert "because rank 2 failed" in capfd.readouterr().err


def test_watchdog_timeout_is_relayed(env_rings):
    rings = env_rings(3, timeout=0.3)
    rings[1].exchange([_dev(np.ones(2, np.float32))])  # ranks 0 and 2 never take part
    deadline = time.monotonic() + 10
    while rings[1]._error is None:
        assert time.monotonic() < deadline, "the watchdog never fired"
        time.sleep(0.005)
    fired = time.monotonic()
    for rank in (0, 2):
        error = _wait_error(rings[rank], fired + 1.0)
        assert "because rank 1 failed" in str(error) and "made no progress" in str(error)


def test_rank0_failure_reaches_the_others(env_rings):
    rings = env_rings(3)
    start = time.monotonic()
    rings[0]._fail(cr.RingError("rank 0: NCCL failed"))
    for rank in (1, 2):
        assert "because rank 0 failed: rank 0: NCCL failed" in str(
            _wait_error(rings[rank], start + 1.0)
        )


def test_clean_close_raises_nowhere(env_rings):
    rings = env_rings(3)
    server = rings[0]._health_server
    for rank in (0, 1, 2):  # rank 0 first: the others must not take its leaving for a death
        rings[rank].close()
        time.sleep(0.1)
    assert server.join(2)
    assert all(ring._error is None for ring in rings.values())


def test_failure_channel_can_be_turned_off(env_rings, monkeypatch):
    rings = env_rings(2, health=False)
    assert all(r._health is None and r._health_server is None for r in rings.values())
    monkeypatch.setenv("CUPARING_HEALTH", "0")
    rings = env_rings(2)
    assert all(r._health is None for r in rings.values())


def test_world_of_one_runs_no_channel(env_rings):
    (ring,) = env_rings(1).values()
    assert ring._health is None and ring._health_server is None


def test_leaving_with_on_an_exception_is_a_failure(env_rings):
    rings = env_rings(3)
    with pytest.raises(ValueError), rings[1]:
        raise ValueError("boom")
    for rank in (0, 2):
        error = _wait_error(rings[rank], time.monotonic() + 1.0)
        assert "because rank 1 failed: rank 1: left the ring on ValueError: boom" in str(error)


def test_interpreter_exit_leaves_cleanly_unless_crashing(env_rings, monkeypatch):
    rings = env_rings(3)
    monkeypatch.delattr(sys, "last_value", raising=False)
    gpu_ring_mod.leave_at_exit(weakref.ref(rings[0]))  # rank 0 (the server) ends first, normally
    time.sleep(0.3)
    assert all(ring._error is None for ring in rings.values())
    rings = env_rings(3)
    monkeypatch.setattr(sys, "last_value", KeyError("k"), raising=False)
    gpu_ring_mod.leave_at_exit(weakref.ref(rings[2]))
    for rank in (0, 1):
        error = _wait_error(rings[rank], time.monotonic() + 1.0)
        assert "because rank 2 failed: rank 2: the process exits on KeyError" in str(error)


def test_captured_exchanges_arm_nothing_and_a_replay_is_watched(rings):
    ring0, _ = rings(2, timeout=0.3)
    assert ring0.capturable
    with ring0.capturing():
        # the peer never answers: armed, this exchange would time out
        ring0.exchange([_dev(np.ones(3, np.float32))], 1, "kv").wait()
    time.sleep(0.6)
    ring0.synchronize()  # nothing armed: returns at once, nothing failed
    ring0.check()
    # a replay arms one flight on the caller's stream (by its raw handle), which waits on that
    # exchange forever
    caller = ring0._cupy.cuda.get_current_stream()
    ring0.watch("ring call (CUDA graph)", caller.ptr)
    assert ring0._flights[-1].event.stream is caller
    with pytest.raises(cr.RingTimeoutError, match=r"'ring call \(CUDA graph\)' #0"):
        ring0.synchronize()


def test_a_tracing_ring_is_not_captured(rings):
    ring0, _ = rings(2, trace=True)
    assert not ring0.capturable
    with pytest.raises(RuntimeError, match="cannot be captured"):
        with ring0.capturing():
            pass


def test_close_releases_captured_graphs_before_destroying_the_communicator(rings):
    ring0, _ = rings(2)
    comm = _comm(ring0)
    released = []

    class Captured:  # what ring_graphs.CapturedRingCall offers the ring
        def release(self):
            released.append(comm.destroyed)

    kept = Captured()
    ring0.adopt_capture(kept)
    ring0.adopt_capture(Captured())  # held weakly: gone before close, never released
    ring0.close()
    assert released == [False] and comm.destroyed


def test_release_buffers_releases_the_graphs_that_point_at_them(rings):
    ring0, ring1 = rings(2)
    released = []

    class Captured:
        def release(self):
            released.append(len(ring0._buffers))  # the buffers are still there

    kept = Captured()
    pending = [ring.exchange([_dev(np.ones(3, np.float32))], 1, "kv") for ring in (ring0, ring1)]
    for p in pending:
        p.wait()
    ring0.adopt_capture(kept)
    ring0.release_buffers()
    assert released == [1] and not ring0._buffers


def test_a_ring_of_one_is_not_captured_and_watches_nothing(stack):
    solo = nccl_mod.NcclRing(0, 1, None, 0)  # what from_env builds for a world of one
    assert not solo.capturable
    for _ in range(3):
        solo.watch("ring call (CUDA graph)", 0)  # no watchdog would ever retire a flight
    assert not solo._flights
    solo.close()
