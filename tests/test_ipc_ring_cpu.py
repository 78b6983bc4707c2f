"""IpcRing's handshake and ordering on the CPU, against a fake GPU that runs queued stream work.

The fake keeps CUDA's stream semantics where they matter: each stream is a queue run in order by
one "GPU" thread; ``record`` captures a generation; a stream wait on an event waits for the
event's *latest record at the time of the wait call* (none: no wait), the very semantics that
make the host handshake necessary; IPC handles alias the same event or memory across ranks (here
threads). A scheduler policy can starve chosen streams, which turns a missing GPU wait into a
deterministic wrong answer; the negative controls below show that each wait the ring issues is
needed. Links are real loopback TCP (:mod:`cuparing.comm.peerlink`).
"""

from __future__ import annotations

import ctypes
import random
import struct
import threading
import time
from collections import deque
from types import SimpleNamespace

import ml_dtypes
import numpy as np
import pytest

import cuparing as cr
from cuparing.comm import ipc as ipc_mod
from cuparing.comm import nccl as nccl_mod
from cuparing.comm.peerlink import Address, LinkError, PeerLinks

# --- the fake GPU ---


class FakeGpu:
    def __init__(self, seed: int = 0):
        self.cond = threading.Condition()
        self.streams: list[FakeStream] = []
        self.objects: dict[int, object] = {}  # raw handles: streams, events, opened events
        self.next_ptr = 1 << 40
        self.rng = random.Random(seed)
        self.starve: set = set()  # streams that run only when nothing else can
        self.paused = False
        self.opened_mem, self.closed_mem, self.destroyed = [], [], []
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def register(self, obj) -> int:
        with self.cond:
            self.next_ptr += 16
            self.objects[self.next_ptr] = obj
            return self.next_ptr

    def enqueue(self, stream, op) -> None:
        with self.cond:
            stream.ops.append(op)

    def _runnable(self, op) -> bool:
        if op[0] == "wait":
            return op[1].done_gen >= op[2]
        if op[0] == "collective":
            return op[1].ready()
        return True

    def step(self) -> bool:
        with self.cond:
            if self.paused:
                return False
            ready = [s for s in self.streams if s.ops and self._runnable(s.ops[0])]
            pick = [s for s in ready if s not in self.starve] or ready
            if not pick:
                return False
            stream = self.rng.choice(pick)
            op = stream.ops.popleft()
            kind = op[0]
            if kind == "record":
                op[1].done_gen = max(op[1].done_gen, op[2])
            elif kind == "copy":
                ctypes.memmove(op[1], op[2], op[3])
            elif kind == "fn":
                op[1]()
            elif kind == "collective":
                op[1].execute(op[2])
            return True

    def _run(self) -> None:
        while not self._stop:
            if not self.step():
                time.sleep(0.0002)

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)


class FakeStream:
    def __init__(self, gpu: FakeGpu, non_blocking: bool = False):
        self.gpu, self.ops = gpu, deque()
        self.ptr = gpu.register(self)
        with gpu.cond:
            gpu.streams.append(self)

    def wait_event(self, event) -> None:
        with self.gpu.cond:
            if event.recorded:  # the latest record now, or nothing at all
                self.ops.append(("wait", event, event.recorded))

    def launch(self, fn) -> None:
        self.gpu.enqueue(self, ("fn", fn))

    def synchronize(self) -> None:
        while self.ops:
            time.sleep(0.0005)


class FakeEvent:
    def __init__(self, gpu: FakeGpu, block=False, disable_timing=False, interprocess=False):
        self.gpu, self.interprocess = gpu, interprocess
        self.recorded = self.done_gen = 0
        self.t = None
        self.ptr = gpu.register(self)

    def record(self, stream=None) -> None:
        with self.gpu.cond:
            self.recorded += 1
            stream.ops.append(("record", self, self.recorded))
        self.t = time.perf_counter()

    @property
    def done(self) -> bool:
        return self.done_gen >= self.recorded


class FakeMemory:
    def __init__(self, gpu: FakeGpu, size: int):
        self.buf = np.zeros(size, np.uint8)
        self.ptr, self.size = self.buf.ctypes.data, size
        gpu.memory[self.ptr] = self


class FakeArray(np.ndarray):
    """The fake ``cupy.ndarray``: also builds views of fake memory, as ``memptr=`` does."""

    def __new__(cls, shape, dtype=float, memptr=None):
        if memptr is None:
            return np.zeros(shape, dtype).view(cls)
        return np.ndarray(shape, dtype, buffer=memptr.mem.buf, offset=memptr.offset).view(cls)

    @property
    def data(self):
        return SimpleNamespace(ptr=self.ctypes.data)

    @property
    def device(self):
        return SimpleNamespace(id=0)


def _dev(x):
    return np.array(x).view(FakeArray)


class FakeDevice:
    def __init__(self, index=0):
        self.id = index

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def use(self):
        pass


def _handle(tag: bytes, ptr: int) -> bytes:
    return (tag + struct.pack("<Q", ptr)).ljust(64, b"\0")


def _fake_cupy(gpu: FakeGpu):
    local = threading.local()
    gpu.memory = {}

    def current():
        if not hasattr(local, "stream"):
            local.stream = FakeStream(gpu)
        return local.stream

    def open_event(handle: bytes) -> int:
        assert len(handle) == 64
        event = gpu.objects[struct.unpack("<Q", handle[1:9])[0]]
        assert event.interprocess
        return gpu.register(event)  # a new handle to the same event

    def open_mem(handle: bytes, flags=1) -> int:
        assert len(handle) == 64 and handle[:1] == b"M"
        ptr = struct.unpack("<Q", handle[1:9])[0]
        gpu.opened_mem.append(ptr)
        return ptr

    def destroy(ptr):
        gpu.destroyed.append(ptr)
        gpu.objects.pop(ptr)

    runtime = SimpleNamespace(
        getDeviceCount=lambda: 8, memcpyDeviceToDevice=3,
        memcpyAsync=lambda dst, src, n, kind, s: gpu.enqueue(gpu.objects[s], ("copy", dst, src, n)),
        streamWaitEvent=lambda s, e, flags=0: gpu.objects[s].wait_event(gpu.objects[e]),
        ipcGetMemHandle=lambda ptr: _handle(b"M", ptr),
        ipcOpenMemHandle=open_mem, ipcCloseMemHandle=gpu.closed_mem.append,
        ipcGetEventHandle=lambda ptr: _handle(b"E", ptr), ipcOpenEventHandle=open_event,
        eventDestroy=destroy,
    )  # fmt: skip
    cuda = SimpleNamespace(
        Device=FakeDevice, Stream=lambda non_blocking=False: FakeStream(gpu, non_blocking),
        Event=lambda **kw: FakeEvent(gpu, **kw), get_current_stream=current,
        get_elapsed_time=lambda a, b: (b.t - a.t) * 1e3, runtime=runtime,
        Memory=lambda size: FakeMemory(gpu, size),
        MemoryPointer=lambda mem, offset: SimpleNamespace(mem=mem, offset=offset),
    )  # fmt: skip
    return SimpleNamespace(
        ndarray=FakeArray, cuda=cuda, int32=np.int32, uint8=np.uint8,
        empty=lambda shape, dtype: FakeArray(shape, dtype),
        zeros=lambda shape, dtype: FakeArray(shape, dtype),
        asarray=_dev, asnumpy=lambda a: np.array(a),
        ascontiguousarray=lambda a: np.ascontiguousarray(a).view(FakeArray),
    )  # fmt: skip


class Gather:
    """A fake NCCL all-gather: runs once every rank has posted its part."""

    def __init__(self, size):
        self.size, self.parts, self.recvs = size, {}, {}

    def ready(self):
        return len(self.parts) == self.size

    def execute(self, rank):
        data = b"".join(self.parts[r] for r in range(self.size))
        ptr, _ = self.recvs[rank]
        ctypes.memmove(ptr, data, len(data))


class FakeComm:
    def __init__(self, gpu, rank, gather):
        self.gpu, self.rank, self.gather = gpu, rank, gather
        self.aborted = self.destroyed = False

    def allGather(self, send, recv, count, dtype, stream):
        with self.gpu.cond:
            self.gather.parts[self.rank] = ctypes.string_at(send, count)
            self.gather.recvs[self.rank] = (recv, count)
        self.gpu.enqueue(self.gpu.objects[stream], ("collective", self.gather, self.rank))

    def abort(self):
        self.aborted = True

    def destroy(self):
        self.destroyed = True


def _threads(fns, timeout=30.0):
    """Run ``fns[r]()`` on one thread each; returns results (exceptions as values)."""
    out = [None] * len(fns)

    def run(r):
        try:
            out[r] = fns[r]()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out[r] = exc

    threads = [threading.Thread(target=run, args=(r,), daemon=True) for r in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a rank hung"
    return out


def _mesh(size, timeout=10.0):
    pairs = [PeerLinks.listen(r, size) for r in range(size)]
    addresses = [address for _, address in pairs]
    results = _threads([lambda p=p: p[0].connect(addresses, timeout) for p in pairs])
    assert all(r is None for r in results), results
    return [links for links, _ in pairs]


@pytest.fixture
def fake(monkeypatch):
    gpu = FakeGpu()
    cupy = _fake_cupy(gpu)
    nccl = SimpleNamespace(available=True, NCCL_UINT8=1, NCCL_INT32=2, NCCL_SUM=0)
    monkeypatch.setattr(nccl_mod, "_import_cupy", lambda: cupy)
    monkeypatch.setattr(nccl_mod, "_import_nccl", lambda: nccl)
    monkeypatch.delenv("CUPARING_TRACE", raising=False)
    made = []

    def make(size=2, timeout=20.0, trace=False, links=True):
        gather = Gather(size)
        meshes = _mesh(size) if links else [None] * size
        rings = [ipc_mod.IpcRing(r, size, FakeComm(gpu, r, gather), 0, timeout, trace, meshes[r])
                 for r in range(size)]  # fmt: skip
        made.extend(rings)
        return rings

    make.gpu, make.cupy = gpu, cupy
    yield make
    for ring in made:
        ring._stop.set()
        if ring._links is not None:
            ring._links.close(0)
    gpu.close()


# --- data movement and ordering ---


def _origin_arrays(rank):
    base = np.arange(24, dtype=np.float32).reshape(2, 3, 4) + 1000 * rank
    return [
        _dev(base.astype(ml_dtypes.bfloat16)),
        _dev(base[:, :, ::2]),  # not contiguous: the ring copies it first
        _dev(np.full((5,), rank, dtype=np.int64)),
    ]


def _rotate(fake, rings, steps, starve=None, pause=True):
    """Every rank forwards what it received (the forward schedule) ``steps`` times; a "kernel"
    on the caller's stream snapshots the K/V it holds at each step. With ``pause`` every host
    issues all its steps before the GPU runs anything. Returns {rank: [snapshot per step]}."""
    gpu, size = fake.gpu, len(rings)
    gpu.paused = pause
    gate = threading.Barrier(size, action=lambda: setattr(gpu, "paused", False))
    logs = {r: [None] * steps for r in range(size)}

    def rank_main(ring):
        caller = fake.cupy.cuda.get_current_stream()
        if starve == ("caller", ring.rank):
            gpu.starve.add(caller)
        kv = _origin_arrays(ring.rank)
        for step in range(steps):
            pending = ring.exchange(kv, 1, "kv")
            caller.launch(lambda kv=kv, step=step: logs[ring.rank].__setitem__(
                step, [np.array(a) for a in kv]))  # fmt: skip
            kv = pending.wait()
        gate.wait(20)
        ring.synchronize()
        caller.synchronize()

    if starve is not None and starve[0] == "copy":
        gpu.starve.add(rings[starve[1]].stream)
    results = _threads([lambda ring=ring: rank_main(ring) for ring in rings])
    assert all(r is None for r in results), results
    return logs


def _wrong_steps(logs, size):
    wrong = []
    for rank, snapshots in logs.items():
        for step, got in enumerate(snapshots):
            want = _origin_arrays((rank - step) % size)
            ok = all(
                np.array_equal(np.asarray(g).view(np.uint8), np.ascontiguousarray(w).view(np.uint8))
                for g, w in zip(got, want, strict=True)
            )
            if not ok:
                wrong.append((rank, step))
    return wrong


@pytest.mark.parametrize("size", [2, 3, 4])
@pytest.mark.parametrize("starve", [None, ("caller", 1), ("copy", 0)])
def test_rotation_delivers_every_rank_s_data_in_order(fake, size, starve):
    rings = fake(size)
    logs = _rotate(fake, rings, steps=3 * size + 1, starve=starve)
    assert _wrong_steps(logs, size) == []
    channel = next(iter(rings[0]._channels.values()))
    assert channel.count == 3 * size + 1
    assert channel.received[0][0].ctypes.data != channel.received[1][0].ctypes.data


def test_without_the_done_wait_a_slow_reader_is_overwritten(fake, monkeypatch):
    """Negative control: the copy stream's wait on the receiver's *done* event is needed."""

    def host_wait_only(self, channel, slot, flight):
        self._await(channel.dest, ipc_mod._DONE, channel, flight.seq - 2, flight, "x")

    monkeypatch.setattr(ipc_mod.IpcRing, "_after_peer_freed", host_wait_only)
    rings = fake(3)
    logs = _rotate(fake, rings, steps=8, starve=("caller", 1))
    assert any(rank == 1 for rank, _ in _wrong_steps(logs, 3))


def test_without_the_ready_wait_a_reader_sees_stale_data(fake, monkeypatch):
    """Negative control: the side stream's wait on the sender's *ready* event is needed."""

    def host_wait_only(self, channel, slot, flight):
        self._await(channel.source, ipc_mod._READY, channel, flight.seq, flight, "x")

    monkeypatch.setattr(ipc_mod.IpcRing, "_after_peer_pushed", host_wait_only)
    rings = fake(2)
    logs = _rotate(fake, rings, steps=4, starve=("copy", 0))
    assert any(rank == 1 for rank, _ in _wrong_steps(logs, 2))


def test_backward_pattern_two_tags_and_a_home_shift(fake):
    """kv and dkv in flight together, then dkv sent home with a shift != 1 (as the schedule)."""
    size, steps = 4, 3
    rings = fake(size)

    def rank_main(ring):
        r = ring.rank
        kv = [_dev(np.full(6, r, np.float32))]
        dkv = [_dev(np.full((2, 3), 100 + r, np.float64))]
        for _ in range(steps):
            pending_kv = ring.exchange(kv, 1, "kv")
            pending_dkv = ring.exchange(dkv, 1, "dkv")
            kv, dkv = pending_kv.wait(), pending_dkv.wait()
        home = (-steps) % size
        dkv = ring.exchange(dkv, home, "dkv_home").wait()
        ring.synchronize()
        fake.cupy.cuda.get_current_stream().synchronize()
        return float(kv[0][0]), float(dkv[0][0, 0])

    got = _threads([lambda ring=ring: rank_main(ring) for ring in rings])
    for r, (kv0, dkv0) in enumerate(got):
        assert kv0 == (r - steps) % size  # kv came from `steps` ranks back
        assert dkv0 == 100 + r  # dkv went round and came home


def test_shift_zero_or_world_of_one_moves_nothing(fake):
    (solo,) = fake(1, links=False)
    x = _dev(np.ones(2, np.float32))
    assert solo.exchange([x]).wait()[0] is x
    ring0, _ = fake(2)
    assert ring0.exchange([x], shift=2).wait()[0] is x


def test_trace_records_the_pushes(fake):
    rings = fake(2, trace=True)

    def rank_main(ring):
        kv = [_dev(np.ones(8, np.float32))]
        for _ in range(2):
            pending = ring.exchange(kv)
            with ring.trace_compute("block"):
                time.sleep(0.002)
            kv = pending.wait()
        return [i.name for i in ring.trace_intervals()]

    names = _threads([lambda ring=ring: rank_main(ring) for ring in rings])[0]
    assert "kv#0" in names and "kv#1" in names and "compute during kv#1" in names
    assert 0.0 <= rings[0].hidden_transfer_fraction() <= 1.0


# --- failures ---


def test_a_peer_that_never_comes_times_out_naming_rank_tag_exchange_and_peer(fake):
    ring0, ring1 = fake(2, timeout=0.4)
    reports = []
    ring0._health = SimpleNamespace(report=reports.append, close=lambda: None)
    x = [_dev(np.ones(3, np.float32))]

    def ranks_then_one_stops(ring, count):
        for _ in range(count):
            ring.exchange(x, 1, "kv").wait()

    # two exchanges together, then rank 1 stops: rank 0's third waits on rank 1 in vain
    results = _threads([lambda: ranks_then_one_stops(ring0, 3),
                        lambda: ranks_then_one_stops(ring1, 2)])  # fmt: skip
    assert isinstance(results[0], cr.RingTimeoutError), results
    message = str(results[0])
    assert message.startswith("rank 0: exchange 'kv' #2 (shift 1: rank 0 sends to rank 1")
    assert "waited for rank 1 to finish reading" in message
    assert reports and "'kv' #2" in reports[0]  # told the failure channel
    with pytest.raises(cr.RingTimeoutError, match="'kv' #2"):
        ring0.exchange(x)


def test_a_peer_leaving_is_an_error_at_once(fake):
    ring0, ring1 = fake(2, timeout=30.0)
    ring1._links.close(0)  # as a dead process's sockets close
    start = time.monotonic()
    with pytest.raises(cr.RingError, match=r"rank 0: exchange 'kv' #0 .* rank 1 left the ring"):
        ring0.exchange([_dev(np.ones(3, np.float32))])
    assert time.monotonic() - start < 5


def test_a_failure_elsewhere_wakes_an_exchange_waiting_on_a_peer(fake):
    ring0, _ = fake(2, timeout=30.0)
    threading.Timer(0.2, ring0._peer_failed, args=(3, "boom")).start()
    start = time.monotonic()
    with pytest.raises(cr.RingError, match="because rank 3 failed: boom"):
        ring0.exchange([_dev(np.ones(3, np.float32))])
    assert time.monotonic() - start < 5
    assert ring0._comm.aborted


def test_different_shapes_are_diagnosed(fake):
    ring0, ring1 = fake(2)
    results = _threads([lambda: ring0.exchange([_dev(np.ones(4, np.float32))]),
                        lambda: ring1.exchange([_dev(np.ones(5, np.float32))])])  # fmt: skip
    for r in (0, 1):
        assert isinstance(results[r], cr.RingError)
        assert "different exchange sequence" in str(results[r]), results[r]


def test_close_waits_for_the_peers_then_frees_the_handles(fake):
    rings = fake(2)
    gpu = fake.gpu
    _rotate(fake, rings, steps=3, pause=False)
    comms = [ring._comm for ring in rings]
    closed = threading.Event()
    closer = threading.Thread(target=lambda: (rings[0].close(), closed.set()))
    closer.start()
    time.sleep(0.3)
    assert not closed.is_set() and gpu.closed_mem == []  # rank 1 may still use rank 0's buffers
    rings[1].close()
    closer.join(5)
    assert closed.is_set()
    assert sorted(gpu.closed_mem) == sorted(gpu.opened_mem) and len(gpu.opened_mem) == 2
    assert len(gpu.destroyed) == 8  # each rank: 2 done + 2 ready events it had opened
    assert all(comm.destroyed for comm in comms)


def test_links_are_set_up_through_the_all_gather(fake):
    rings = fake(3, links=False)
    results = _threads([lambda ring=ring: ring._connect_links(10.0) for ring in rings])
    assert all(r is None for r in results), results
    logs = _rotate(fake, rings, steps=4)
    assert _wrong_steps(logs, 3) == []


def test_ranks_on_different_hosts_are_refused(fake, monkeypatch):
    rings = fake(2, links=False)
    names = iter([b"a" * 16, b"b" * 16])
    lock = threading.Lock()

    def identity():
        with lock:
            return next(names)

    monkeypatch.setattr(ipc_mod, "_host_identity", identity)
    results = _threads([lambda ring=ring: ring._connect_links(5.0) for ring in rings])
    assert all(isinstance(r, RuntimeError) and "one host" in str(r) for r in results), results


# --- selection ---


def test_transport_is_chosen_by_argument_or_environment(monkeypatch):
    calls = []

    def fake_from_env(name):
        return classmethod(lambda cls, **kw: calls.append((name, kw)) or name)

    monkeypatch.setattr(ipc_mod.IpcRing, "from_env", fake_from_env("ipc"))
    monkeypatch.setattr(nccl_mod.NcclRing, "from_env", fake_from_env("nccl"))
    monkeypatch.delenv("CUPARING_TRANSPORT", raising=False)
    assert cr.Ring.from_env(timeout=5) == "nccl"
    assert cr.Ring.from_env(timeout=5, transport="ipc") == "ipc"
    monkeypatch.setenv("CUPARING_TRANSPORT", "IPC")
    assert cr.Ring.from_env(timeout=5, trace=True) == "ipc"
    assert calls[-1] == ("ipc", {"timeout": 5, "trace": True})
    assert cr.Ring.from_env(transport="nccl") == "nccl"  # the argument wins
    with pytest.raises(ValueError, match="transport must be 'nccl' or 'ipc', got 'shm'"):
        cr.Ring.from_env(transport="shm")


# --- the links alone ---


def test_links_deliver_in_order_and_time_out():
    links = _mesh(3)
    try:
        for seq in range(5):
            links[0].send(2, 7, 1, seq, bytes([seq]) * 3)
        assert [links[2].wait(0, 7, 1, s, 5.0) for s in range(5)] == [
            bytes([s]) * 3 for s in range(5)
        ]
        links[2].send(1, 3, 9, 0)
        assert links[1].wait(2, 3, 9, 0, 5.0) == b""
        with pytest.raises(LinkError, match="nothing from rank 0 within 0.1 s") as info:
            links[1].wait(0, 3, 9, 0, 0.1)
        assert info.value.timed_out
        links[1].interrupt("ring failed")
        with pytest.raises(LinkError, match="ring failed"):
            links[1].wait(2, 3, 9, 1, 5.0)
    finally:
        for link in links:
            link.close(0)


def test_links_refuse_a_stranger():
    links, address = PeerLinks.listen(0, 2)
    other, _ = PeerLinks.listen(1, 2)
    stranger = Address(address.host, address.port, b"x" * 16)  # not rank 0's key
    results = _threads([lambda: links.connect([address, address], 1.0),
                        lambda: other._dial(0, stranger, time.monotonic() + 0.5)])  # fmt: skip
    assert isinstance(results[0], RuntimeError), results
    assert "ranks [1] did not connect" in str(results[0])
    links.close(0)
    other.close(0)
