"""IpcRing's ordering on the CPU, in both of its modes (device flags and host handshake), against
the fake GPU of ``fake_gpu.py``.

That fake runs queued stream work on a "GPU" thread with CUDA's event semantics (a wait refers to
the event's latest record at the time of the call) and stream memory operations on 32-bit words
(a fake ``cuda.bindings.driver``), and IPC handles alias the same event or memory across ranks
(here threads). Starving chosen streams turns a missing GPU wait into a deterministic wrong
answer; the negative controls below show that each wait the ring issues is needed. The ``fake``
fixture runs a test once per mode; a test that concerns one mode pins it. Links are real loopback
TCP (:mod:`cuparing.comm.peerlink`).
"""

from __future__ import annotations

import ctypes
import gc
import os
import socket
import threading
import time
import weakref
from types import SimpleNamespace

import fake_gpu
import ml_dtypes
import numpy as np
import pytest
from fake_gpu import FakeStack, fake_driver, word
from fake_gpu import dev as _dev
from fake_gpu import run_threads as _threads
from wiretap import Wiretap, replay

import cuparing as cr
from cuparing.backends.ring_graphs import CapturedRingCall
from cuparing.comm import ipc as ipc_mod
from cuparing.comm import ipc_capture, peerlink
from cuparing.comm import nccl as nccl_mod
from cuparing.comm.base import CaptureDeferred, RingError
from cuparing.comm.peerlink import Address, LinkError, PeerLinks

SYNCS = ["device", "host"]


@pytest.fixture(params=SYNCS)
def fake(request, monkeypatch):
    """``fake(size, ...)`` builds the IpcRings of one ring on one fake GPU, in the mode the
    parameter names (the host handshake: cuda-bindings "not installed"); ``syncs`` gives each
    rank its own mode instead."""
    stack = FakeStack()
    stack.install(monkeypatch)
    driver = stack.driver
    made = []

    def make(size=2, timeout=20.0, trace=False, links=True, syncs=None):
        comms = stack.communicators(size)
        meshes = fake_gpu.peer_mesh(size) if links else [None] * size
        rings = []
        for r, sync in enumerate(syncs or [request.param] * size):
            stack.driver = driver if sync == "device" else None
            rings.append(ipc_mod.IpcRing(r, size, comms[r], 0, timeout, trace, meshes[r]))
            assert rings[-1].sync == sync
        made.extend(rings)
        return rings

    make.gpu, make.cupy, make.driver, make.sync = stack.gpu, stack.cupy, driver, request.param
    yield make
    for ring in made:
        ring._stop.set()
        if ring._links is not None:
            ring._links.close(0)
    stack.close()


# --- data movement and ordering ---


def _origin_arrays(rank):
    base = np.arange(24, dtype=np.float32).reshape(2, 3, 4) + 1000 * rank
    return [
        _dev(base.astype(ml_dtypes.bfloat16)),
        _dev(base[:, :, ::2]),  # not contiguous: the ring copies it first
        _dev(np.full((5,), rank, dtype=np.int64)),
    ]


def _rotate(fake, rings, steps, starve=None, pause=True, results=None):
    """Every rank forwards what it received (the forward schedule) ``steps`` times; a "kernel"
    on the caller's stream snapshots the K/V it holds at each step. With ``pause`` every host
    issues all its steps before the GPU runs anything. Returns {rank: [snapshot per step]};
    each rank's exception goes into the list ``results`` where one is given (else none may
    occur)."""
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
    outcome = _threads([lambda ring=ring: rank_main(ring) for ring in rings])
    if results is None:
        assert all(r is None for r in outcome), outcome
    else:
        results.extend(outcome)
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


def _drop_gpu_wait(monkeypatch, sync: str, step: str) -> None:
    """Take the GPU wait out of *await freed* or *await pushed* (``step``). The host handshake
    keeps its host wait, so that its messages still pair up."""
    if sync == "device":
        monkeypatch.setattr(ipc_mod._DeviceFlags, step, lambda self, channel, k, flight: None)
        return
    peer, kind, back = ("dest", ipc_mod._DONE, 2) if step == "await_freed" else (
        "source", ipc_mod._READY, 0)  # fmt: skip

    def host_wait_only(self, channel, k, flight):
        if step == "await_freed" and k < 2:  # (no message before exchange 2, as in the ring)
            return
        self._ring._await(getattr(channel, peer), kind, channel, k - back, flight, "x")

    monkeypatch.setattr(ipc_mod._HostHandshake, step, host_wait_only)


def test_without_the_done_wait_a_slow_reader_is_overwritten(fake, monkeypatch):
    """Negative control: the copy stream's wait for the receiver's *done* (flag or event) is
    needed."""
    _drop_gpu_wait(monkeypatch, fake.sync, "await_freed")
    rings = fake(3)
    logs = _rotate(fake, rings, steps=8, starve=("caller", 1))
    assert any(rank == 1 for rank, _ in _wrong_steps(logs, 3))


def test_without_the_ready_wait_a_reader_sees_stale_data(fake, monkeypatch):
    """Negative control: the side stream's wait for the sender's *ready* (flag or event) is
    needed. With the host handshake rank 1 reads its slot before rank 0's push lands. With
    device flags rank 1, never held back, also frees slot 0 for exchange 2 (``done[0] =
    flag_phase(0)``) before rank 0's starved copy stream has evaluated its wait for exchange
    0's ``flag_phase(-2)``, which then never comes: the ring hangs (the phases' argument in the
    module doc rests on this wait)."""
    _drop_gpu_wait(monkeypatch, fake.sync, "await_pushed")
    if fake.sync == "host":
        rings = fake(2)
        logs = _rotate(fake, rings, steps=4, starve=("copy", 0))
        assert any(rank == 1 for rank, _ in _wrong_steps(logs, 2))
        return
    rings = fake(2, timeout=1.0)
    results = []
    _rotate(fake, rings, steps=4, starve=("copy", 0), results=results)
    assert isinstance(results[0], cr.RingTimeoutError), results
    assert "'kv' #0" in str(results[0])


@pytest.mark.parametrize("fake", ["device"], indirect=True)
def test_without_clearing_the_flags_a_reader_sees_garbage(fake, monkeypatch):
    """Negative control: new memory holds garbage (as after cudaMalloc), which satisfies the
    waits at once unless the flag words are set up before the peers learn of them. (Two
    exchanges: rank 1 reads the first before rank 0's push lands. A third would hang instead:
    rank 1, never held back, would free slot 0 for exchange 2 before rank 0's held-back copy
    stream evaluated its wait for exchange 0.)"""
    monkeypatch.setattr(ipc_mod._DeviceFlags, "_initialise", lambda self, channel: None)
    rings = fake(2)
    logs = _rotate(fake, rings, steps=2, starve=("copy", 0))
    assert (1, 1) in _wrong_steps(logs, 2)


def test_flag_phases_are_one_hot_and_differ_two_exchanges_apart():
    """The values a slot's word takes in turn never satisfy each other's AND wait, repeat every
    four exchanges, and the setup's words (0 for ready, phase(-2) for done) and the failure
    release (all ones) sit where the module doc puts them."""
    phase = ipc_capture.flag_phase
    assert [phase(k) for k in range(-2, 8)] == [2, 2, 1, 1, 2, 2, 1, 1, 2, 2]
    for k in range(-2, 200):
        assert phase(k) in (1, 2) and phase(k) == phase(k + 4)
        assert not fake_gpu.wait_satisfied(phase(k - 2), phase(k), fake_gpu.WAIT_AND)
        assert fake_gpu.wait_satisfied(phase(k), phase(k), fake_gpu.WAIT_AND)
        assert not fake_gpu.wait_satisfied(0, phase(k), fake_gpu.WAIT_AND)
        assert fake_gpu.wait_satisfied(0xFFFFFFFF, phase(k), fake_gpu.WAIT_AND)
    assert phase(1 << 40) == phase(0) and phase((1 << 40) + 2) == phase(2)


@pytest.mark.parametrize("fake", ["device"], indirect=True)
@pytest.mark.parametrize("steps", [1, 2, 3, 5, 8, 11])
def test_flag_words_hold_the_last_push_and_the_last_read(fake, steps):
    """After exchanges k = 0..steps-1 of one channel: ready[s] holds phase(k) of the last push
    into slot s (0 where none), done[s] phase(k - 2) of the reader's last exchange k on slot s
    (phase(-2) where none: the setup's)."""
    rings = fake(2)
    logs = _rotate(fake, rings, steps=steps, pause=False)
    assert _wrong_steps(logs, 2) == []
    phase = ipc_capture.flag_phase
    last = [max((k for k in range(steps) if k % 2 == s), default=None) for s in range(2)]
    want = [0 if k is None else phase(k) for k in last]
    want += [phase(-2) if k is None else phase(k - 2) for k in last]
    for ring in rings:
        channel = next(iter(ring._channels.values()))
        flags = channel.memory.ptr + channel.flags_at
        assert [word(flags + 4 * i) for i in range(4)] == want


@pytest.mark.parametrize("fake", ["device"], indirect=True)
def test_values_that_do_not_alternate_let_a_stale_word_satisfy_a_wait(fake, monkeypatch):
    """Negative control: with one value for every exchange, rank 1's ready[0] still holds
    exchange 0's push when it awaits exchange 2's, so with rank 0's copies held back it reads
    slot 0 before exchange 2's data lands (three ranks: exchanges 0 and 2 carry different
    data)."""
    monkeypatch.setattr(ipc_mod, "flag_phase", lambda k: 1)  # (the name ipc.py's flags call)
    rings = fake(3)
    logs = _rotate(fake, rings, steps=4, starve=("copy", 0))
    assert (1, 3) in _wrong_steps(logs, 3)  # (step 3 reads what exchange 2 delivered)


def _unwaited(fake, rings, steps, elsewhere=False):
    """Each rank issues ``steps`` exchanges of one channel without ever calling ``wait()`` (the
    hosts first, then the GPU; rank 1's side stream runs only when nothing else can), then
    synchronises; each rank's outcome and the last exchange's arrays. ``elsewhere``: each
    exchange but the last is waited for, on a stream of its own that the caller's stream, from
    which the exchanges are issued, never joins."""
    gpu = fake.gpu
    gpu.paused = True
    gate = threading.Barrier(len(rings), action=lambda: setattr(gpu, "paused", False))
    gpu.starve.add(rings[1]._join)

    def rank_main(ring):
        other = fake.cupy.cuda.Stream(non_blocking=True)
        kv = [_dev(np.full(4, 10 * ring.rank + step, np.float32)) for step in range(steps)]
        pending = []
        for step in range(steps):
            pending.append(ring.exchange([kv[step]], 1, "kv"))
            if elsewhere and step < steps - 1:
                with other:
                    pending[-1].wait()
        gate.wait(20)
        ring.synchronize()
        got = pending[-1].wait()[0]
        fake.cupy.cuda.get_current_stream().synchronize()
        return float(got[0])

    return _threads([lambda ring=ring: rank_main(ring) for ring in rings])


def _no_previous_wait(monkeypatch):
    """Negative control: the copy stream no longer waits for exchange k - 2's *received* event
    before *freed* of exchange k."""
    monkeypatch.setattr(ipc_mod._DeviceFlags, "_after_previous", lambda self, channel, slot: None)


@pytest.mark.parametrize("fake", ["device"], indirect=True)
@pytest.mark.parametrize("elsewhere", [False, True])
def test_an_exchange_is_ordered_before_its_slot_is_freed_however_it_was_waited_for(
    fake, monkeypatch, elsewhere
):
    """Exchanges whose ``wait()`` is never called, or called on another stream than the one the
    next exchanges are issued from (``elsewhere``): rank 1's side stream has not yet evaluated
    its wait for exchange 0 when its copy stream would free slot 0 for exchange 2. The copy
    stream waits for exchange 0's *received* event first, whatever the caller did, so rank 0
    cannot push exchange 2 (whose phase the pending wait would not accept) before it; without
    that wait (negative control) the wait for exchange 0 never ends."""
    results = _unwaited(fake, fake(2), steps=3, elsewhere=elsewhere)
    assert results == [12.0, 2.0], results
    _no_previous_wait(monkeypatch)
    results = _unwaited(fake, fake(2, timeout=1.0), steps=3, elsewhere=elsewhere)
    assert isinstance(results[1], cr.RingTimeoutError), results
    assert "'kv' #0" in str(results[1])


@pytest.mark.parametrize("fake", ["device"], indirect=True)
def test_every_exchange_waits_for_its_slot_s_previous_one_and_keeps_no_arrays(fake):
    """Device flags: the copy stream waits for the *received* event of exchange k - 2 of the
    channel (none for k < 2), waited for or not; the channel keeps that event per slot, not the
    exchange's flight: the arrays it sent are dropped once the transfer is done (the watchdog
    lets go of its flight)."""
    rings = fake(2)
    events = {0: [], 1: []}
    sent = []

    def rank_main(ring):
        for step in range(5):
            x = _dev(np.full(4, step, np.float32))
            sent.append(weakref.ref(x))
            pending = ring.exchange([x])
            events[ring.rank].append(pending._flight.event)
            if step % 2:
                pending.wait()
        del x, pending
        fake.cupy.cuda.get_current_stream().synchronize()
        ring.synchronize()

    assert _threads([lambda ring=ring: rank_main(ring) for ring in rings]) == [None, None]
    gc.collect()
    assert [i for i, ref in enumerate(sent) if ref() is not None] == []  # (none alive)
    ring, received = rings[0], events[0]
    waited = [e for e in ring.stream.waited if any(e is r for r in received)]
    assert waited == received[:3]  # exchanges 2, 3 and 4 waited for 0, 1 and 2
    channel = next(iter(ring._channels.values()))
    assert [p.event for p in channel.previous] == [received[4], received[3]]
    assert all(p.capture is None and p.stream == ring._join.ptr for p in channel.previous)


def _count_messages(ring) -> dict:
    """Count the link messages ``ring`` sends and waits for from now on."""
    counts = {"send": 0, "wait": 0}
    links = ring._links
    for name in counts:
        real = getattr(links, name)

        def counted(*args, name=name, real=real):
            counts[name] += 1
            return real(*args)

        setattr(links, name, counted)
    return counts


def test_host_messages_per_exchange_none_with_device_flags(fake):
    """Per rank and channel the setup is two messages each way; after it, device flags need
    none, the host handshake one READY per exchange and one DONE per exchange from the third."""
    rings = fake(2)
    counts = [_count_messages(ring) for ring in rings]
    _rotate(fake, rings, steps=5)
    per_exchange = {"device": 0, "host": 5 + 3}[fake.sync]
    assert counts == [{"send": 2 + per_exchange, "wait": 2 + per_exchange}] * 2


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


def test_a_peer_that_stops_times_out_naming_rank_tag_exchange_and_peer(fake):
    """Two exchanges together, then rank 1 stops. Host handshake: rank 0's third exchange waits
    for rank 1's host in vain. Device flags: no exchange waits on the host; rank 0's GPU waits
    for rank 1's flags in vain, and the watchdog turns that into RingTimeoutError."""
    ring0, ring1 = fake(2, timeout=0.4)
    reports = []
    ring0._health = SimpleNamespace(report=reports.append, close=lambda: None)
    x = [_dev(np.ones(3, np.float32))]

    def ranks_then_one_stops(ring, count):
        for _ in range(count):
            ring.exchange(x, 1, "kv").wait()
        return time.monotonic()

    results = _threads([lambda: ranks_then_one_stops(ring0, 3),
                        lambda: ranks_then_one_stops(ring1, 2)])  # fmt: skip
    if fake.sync == "host":
        error, why = results[0], "waited for rank 1 to finish reading"
    else:
        assert isinstance(results[0], float), results  # every exchange and wait() returned
        with pytest.raises(cr.RingTimeoutError) as info:
            ring0.synchronize()
        assert time.monotonic() - results[0] < 0.4 + 2.0
        error, why = info.value, "made no progress within 0.4 s"
    assert isinstance(error, cr.RingTimeoutError), results
    message = str(error)
    assert message.startswith("rank 0: exchange 'kv' #2 (shift 1: rank 0 sends to rank 1")
    assert why in message
    # _fail records the error (which the raise above saw) before it tells the failure channel,
    # from the watchdog's thread: wait for the whole of it
    deadline = time.monotonic() + 10
    while not reports and time.monotonic() < deadline:
        time.sleep(0.01)
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
    assert ring0._collective.comm.aborted


def test_different_shapes_are_diagnosed(fake):
    ring0, ring1 = fake(2)
    results = _threads([lambda: ring0.exchange([_dev(np.ones(4, np.float32))]),
                        lambda: ring1.exchange([_dev(np.ones(5, np.float32))])])  # fmt: skip
    for r in (0, 1):
        assert isinstance(results[r], cr.RingError)
        assert "different exchange sequence" in str(results[r]), results[r]


@pytest.mark.parametrize("fake", ["device"], indirect=True)
def test_neighbours_in_different_modes_are_refused(fake):
    ring0, ring1 = fake(2, syncs=["device", "host"])
    x = _dev(np.ones(4, np.float32))
    results = _threads([lambda: ring0.exchange([x]), lambda: ring1.exchange([x])])
    assert all(isinstance(r, cr.RingError) for r in results), results
    assert "rank 1 orders pushes by host sync, this rank by device" in str(results[0])
    assert ("rank 0 orders pushes by device sync, this rank by host (cuda-bindings is not "
            "installed") in str(results[1])  # fmt: skip


@pytest.mark.parametrize("fake", ["device"], indirect=True)
def test_a_failing_stream_memory_operation_fails_the_exchange(fake):
    rings = fake(2)
    fake.driver.fail.add("wait")
    x = _dev(np.ones(4, np.float32))
    results = _threads([lambda ring=ring: ring.exchange([x]) for ring in rings])
    for rank, result in enumerate(results):
        assert isinstance(result, cr.RingError), results
        assert str(result).startswith(f"rank {rank}: exchange 'kv' #0")
        # the exchange's first wait: await freed, for flag_phase(0 - 2)
        assert "cuStreamWaitValue32 for 2 failed" in str(result)


@pytest.mark.parametrize("size", [2, 3])
def test_close_waits_for_the_peers_then_frees_the_handles(fake, size):
    rings = fake(size)
    gpu = fake.gpu
    _rotate(fake, rings, steps=3, pause=False)
    comms = [ring._collective.comm for ring in rings]
    closed = threading.Event()
    closer = threading.Thread(target=lambda: (rings[0].close(), closed.set()))
    closer.start()
    time.sleep(0.3)
    assert not closed.is_set() and gpu.closed_mem == []  # rank 1 may still use rank 0's buffers
    _threads([ring.close for ring in rings[1:]])
    closer.join(5)
    assert closed.is_set()
    # each rank maps dest's memory; with device flags also source's, once where it is dest
    mapped = {"host": size, "device": size if size == 2 else 2 * size}[fake.sync]
    assert sorted(gpu.closed_mem) == sorted(gpu.opened_mem) and len(gpu.opened_mem) == mapped
    # with the host handshake each rank opened 2 done + 2 ready events
    assert len(gpu.destroyed) == {"host": 4 * size, "device": 0}[fake.sync]
    assert all(comm.destroyed for comm in comms)


def test_links_are_set_up_through_the_all_gather(fake):
    rings = fake(3, links=False)
    results = _threads([lambda ring=ring: ring._connect_links(10.0) for ring in rings])
    assert all(r is None for r in results), results
    logs = _rotate(fake, rings, steps=4)
    assert _wrong_steps(logs, 3) == []


@pytest.mark.parametrize("fake", ["device"], indirect=True)
def test_ranks_agree_on_the_host_handshake_if_one_rank_must(fake):
    rings = fake(3, links=False, syncs=["device", "host", "device"])
    results = _threads([lambda ring=ring: ring._connect_links(10.0) for ring in rings])
    assert all(r is None for r in results), results
    assert [ring.sync for ring in rings] == ["host"] * 3
    assert rings[0].sync_reason == rings[2].sync_reason == "ranks [1] cannot use device flags"
    assert "cuda-bindings is not installed" in rings[1].sync_reason
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


@pytest.mark.parametrize(
    ("bindings", "version", "v1_attribute", "env", "sync", "reason"),
    [
        (True, 13000, 0, None, "device", None),  # the v2 operations; V1's attribute reads 0
        (True, 11040, 1, None, "device", None),  # an old driver with the V1 operations enabled
        (True, 11040, 0, None, "host", "CU_DEVICE_ATTRIBUTE_CAN_USE_STREAM_MEM_OPS_V1 is 0"),
        (False, 13000, 0, None, "host", "cuda-bindings is not installed"),
        (True, 13000, 0, "0", "host", "CUPARING_IPC_FLAGS=0"),
    ],
)  # fmt: skip
def test_the_mode_follows_bindings_driver_and_environment(
    monkeypatch, bindings, version, v1_attribute, env, sync, reason
):
    stack = FakeStack()
    stack.install(monkeypatch)
    stack.driver = fake_driver(stack.gpu, version, v1_attribute) if bindings else None
    if env is not None:
        monkeypatch.setenv("CUPARING_IPC_FLAGS", env)
    try:
        ring = ipc_mod.IpcRing(0, 1, device=0)
        assert ring.sync == sync
        assert (ring.sync_reason is None) if reason is None else (reason in ring.sync_reason)
        assert repr(ring) == f"IpcRing(rank=0, size=1, device=0, sync={sync!r})"
    finally:
        stack.close()


def _fake_ring_constructors(monkeypatch) -> list:
    """Ring.from_env's two constructors replaced by stand-ins returning their transport's name;
    the calls (name, keyword arguments) recorded in the returned list."""
    calls = []

    def fake_from_env(name):
        return classmethod(lambda cls, **kw: calls.append((name, kw)) or name)

    monkeypatch.setattr(ipc_mod.IpcRing, "from_env", fake_from_env("ipc"))
    monkeypatch.setattr(nccl_mod.NcclRing, "from_env", fake_from_env("nccl"))
    return calls


def _launched(monkeypatch, env: dict) -> None:
    """This process's launcher variables replaced by ``env`` (every family's cleared first)."""
    import os

    from cuparing.comm import rendezvous

    prefixes = ("OMPI_", "PMI_", "MPI_LOCAL", "SLURM_", "PMIX_")
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
             "CUPARING_TRANSPORT")  # fmt: skip
    for name in list(os.environ):
        if name in names or name.startswith(prefixes):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert rendezvous.RankInfo.from_env().world_size == int(
        env.get("WORLD_SIZE") or env.get("OMPI_COMM_WORLD_SIZE") or env.get("PMI_SIZE")
        or env.get("SLURM_NTASKS") or 1
    )  # fmt: skip


def test_transport_is_chosen_by_argument_or_environment(monkeypatch):
    calls = _fake_ring_constructors(monkeypatch)
    _launched(monkeypatch, {})
    assert cr.Ring.from_env(timeout=5) == "nccl"  # (auto: a world of one)
    assert cr.Ring.from_env(timeout=5, transport="ipc") == "ipc"
    monkeypatch.setenv("CUPARING_TRANSPORT", "IPC")
    assert cr.Ring.from_env(timeout=5, trace=True) == "ipc"
    assert calls[-1] == ("ipc", {"timeout": 5, "trace": True})
    assert cr.Ring.from_env(transport="nccl") == "nccl"  # the argument wins
    with pytest.raises(ValueError, match="transport must be 'nccl', 'ipc' or 'auto', got 'shm'"):
        cr.Ring.from_env(transport="shm")


_TORCHRUN = {"RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


@pytest.mark.parametrize("env, one_host", [
    ({**_TORCHRUN, "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4"}, True),
    ({**_TORCHRUN, "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4"}, False),
    ({**_TORCHRUN, "WORLD_SIZE": "4"}, False),  # (the launcher does not say)
    ({**_TORCHRUN, "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "four"}, False),
    ({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
      "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}, True),
    ({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
      "OMPI_COMM_WORLD_LOCAL_SIZE": "4", "MASTER_ADDR": "node0"}, False),
    ({"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "2", "MPI_LOCALNRANKS": "4"}, True),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0", "SLURM_NNODES": "1",
      "MASTER_ADDR": "node0", "MASTER_PORT": "29500"}, True),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_LOCALID": "0", "SLURM_NNODES": "1",
      "SLURM_STEP_NUM_NODES": "2", "MASTER_ADDR": "node0", "MASTER_PORT": "29500"}, False),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0", "MASTER_ADDR": "node0",
      "MASTER_PORT": "29500"}, False),
    ({}, True),  # a world of one
])  # fmt: skip
def test_the_launcher_says_whether_every_rank_is_on_this_host(monkeypatch, env, one_host):
    from cuparing.comm.rendezvous import RankInfo, on_one_host

    _launched(monkeypatch, env)
    assert on_one_host(RankInfo.from_env()) is one_host


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("one_host", [True, False])
@pytest.mark.parametrize("bindings", [True, False])
def test_auto_takes_the_copy_engines_on_gpus_of_one_host(monkeypatch, world, one_host,
                                                         bindings):  # fmt: skip
    """Unset (or ``auto``), the transport is the copy-engine ring exactly where the ring has 2+
    ranks the launcher puts on this host and the driver says the copy engines can serve them
    (``copy_engines_unavailable``, asked for that many GPUs); else NCCL."""
    from cuparing.comm import base

    calls = _fake_ring_constructors(monkeypatch)
    local = world if one_host else max(1, world // 2)
    _launched(monkeypatch, {**_TORCHRUN, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": str(world),
                            "LOCAL_WORLD_SIZE": str(local)})  # fmt: skip
    asked = []
    monkeypatch.setattr(ipc_mod, "copy_engines_unavailable",
                        lambda n: asked.append(n) or (None if bindings else "no peer access"))
    expected = "ipc" if world >= 2 and one_host and bindings else "nccl"
    assert cr.Ring.from_env(timeout=5) == expected
    assert cr.Ring.from_env(timeout=5, transport="auto") == expected
    monkeypatch.setenv("CUPARING_TRANSPORT", "nccl")
    assert cr.Ring.from_env(timeout=5) == "nccl"
    assert [name for name, _ in calls] == [expected, expected, "nccl"]
    assert set(asked) <= {world}
    assert base.IPC_DEFAULT_MIN_RANKS == 2


def test_a_copy_engine_ring_chosen_by_default_says_how_to_choose_nccl(monkeypatch):
    """Where ``auto`` chose the copy engines and they could not be set up, the error says that
    it was the default and how to choose NCCL; asked for by name, the error is the ring's own."""
    _fake_ring_constructors(monkeypatch)
    _launched(monkeypatch, {**_TORCHRUN, "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4"})
    monkeypatch.setattr(ipc_mod, "copy_engines_unavailable", lambda n: None)
    raised = [RuntimeError("rank 1: could not open peer memory")]

    def refused(cls, **kw):
        raise raised[0]

    monkeypatch.setattr(ipc_mod.IpcRing, "from_env", classmethod(refused))
    with pytest.raises(RuntimeError, match=r"could not open peer memory \(the copy-engine "
                       r"transport was chosen by default .* CUPARING_TRANSPORT=nccl"):  # fmt: skip
        cr.Ring.from_env(timeout=5)
    with pytest.raises(RuntimeError) as info:
        cr.Ring.from_env(timeout=5, transport="ipc")
    assert str(info.value) == "rank 1: could not open peer memory"
    # a ring's own failure (a peer died, the rendezvous timed out) keeps its type and words
    raised[0] = cr.RingTimeoutError("rank 1: nothing from rank 0 within 5 s")
    with pytest.raises(cr.RingTimeoutError) as info:
        cr.Ring.from_env(timeout=5)
    assert str(info.value) == "rank 1: nothing from rank 0 within 5 s"


class _PeerDriver:
    """What ``copy_engines_unavailable`` asks of cuda-bindings' driver: ``count`` GPUs, peer
    access between every pair but ``blocked`` ones, stream memory operations (v2) present."""

    CUdevice_attribute = SimpleNamespace(CU_DEVICE_ATTRIBUTE_CAN_USE_STREAM_MEM_OPS_V1=0)

    def __init__(self, count, blocked=()):
        self.count, self.blocked = count, set(blocked)

    def cuInit(self, flags):
        return (0,)

    def cuDriverGetVersion(self):
        return 0, 12040

    def cuDeviceGetCount(self):
        return 0, self.count

    def cuDeviceGet(self, ordinal):
        return 0, ordinal

    def cuDeviceCanAccessPeer(self, device, peer):
        return 0, int((device, peer) not in self.blocked)


@pytest.mark.parametrize("count, blocked, world, why", [
    (4, (), 4, None),
    (8, (), 4, None),
    (8, [(5, 6)], 4, None),  # (a pair outside the ring's GPUs)
    (2, (), 4, "sees 2 GPUs, fewer than the 4 ranks"),
    (4, [(2, 1)], 4, "GPU 2 cannot access GPU 1"),
])  # fmt: skip
def test_the_copy_engines_need_every_gpu_visible_and_peer_access(monkeypatch, count, blocked,
                                                                 world, why):  # fmt: skip
    monkeypatch.delenv(ipc_mod.FLAGS_ENV, raising=False)
    monkeypatch.setattr(ipc_mod, "import_driver", lambda: _PeerDriver(count, blocked))
    got = ipc_mod.copy_engines_unavailable(world)
    assert got is None if why is None else why in got
    monkeypatch.setenv(ipc_mod.FLAGS_ENV, "0")
    assert "CUPARING_IPC_FLAGS=0" in ipc_mod.copy_engines_unavailable(world)
    monkeypatch.delenv(ipc_mod.FLAGS_ENV)
    monkeypatch.setattr(ipc_mod, "import_driver", lambda: None)
    assert "cuda-bindings" in ipc_mod.copy_engines_unavailable(world)
    # a driver that cannot even be asked (no libcuda to load) means NCCL, not a crash
    broken = _PeerDriver(count)
    broken.cuInit = lambda flags: (_ for _ in ()).throw(RuntimeError("libcuda.so not found"))
    monkeypatch.setattr(ipc_mod, "import_driver", lambda: broken)
    assert "libcuda.so not found" in ipc_mod.copy_engines_unavailable(world)


# --- the links alone ---


def test_links_deliver_in_order_and_time_out():
    links = fake_gpu.peer_mesh(3)
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


def test_a_silent_local_connection_does_not_block_the_links(monkeypatch):
    """A process that connects to the listener and says nothing costs one handshake timeout,
    not the whole setup: rank 1 still joins well within the setup deadline."""
    monkeypatch.setattr(peerlink, "HANDSHAKE_SECONDS", 0.5)
    listener, address0 = PeerLinks.listen(0, 2)
    dialer, address1 = PeerLinks.listen(1, 2)
    silent = socket.create_connection((address0.host, address0.port))
    try:
        time.sleep(0.1)  # the silent connection is first in the accept queue
        start = time.monotonic()
        results = _threads([lambda: listener.connect([address0, address1], 10.0),
                            lambda: dialer.connect([address0, address1], 10.0)])  # fmt: skip
        assert not any(isinstance(r, BaseException) for r in results), results
        assert time.monotonic() - start < 5.0
    finally:
        silent.close()
        listener.close(0)
        dialer.close(0)


def test_links_refuse_a_replayed_hello():
    listener, address0 = PeerLinks.listen(0, 2)
    dialer, address1 = PeerLinks.listen(1, 2)
    tap = Wiretap((address0.host, address0.port))
    tapped = Address(tap.address[0], tap.address[1], address0.key)
    results = {}
    threads = [
        threading.Thread(target=lambda: results.update({0: listener.connect([address0, address1],
                                                                           10.0)})),
        threading.Thread(target=lambda: results.update({1: dialer.connect([tapped, address1],
                                                                         10.0)})),
    ]  # fmt: skip
    for thread in threads:
        thread.start()
    try:
        assert tap.intercepted.wait(10)
        # rank 1's answer to an earlier challenge, replayed while rank 0 still expects rank 1
        reply = replay((address0.host, address0.port), tap.recorded)
    finally:
        tap.release.set()
    assert tap.recorded and reply == b""  # closed without accepting: no proof came back
    for thread in threads:
        thread.join(20)
    assert results == {0: None, 1: None}  # rank 1 itself, retrying through the relay, joined
    listener.send(1, 7, 0, 0, b"hi")
    assert dialer.wait(0, 7, 0, 0, 5.0) == b"hi"
    for links in (listener, dialer):
        links.close(0)
    tap.close()


def test_links_do_not_trust_a_listener_that_cannot_prove_the_key():
    links, _ = PeerLinks.listen(1, 2)
    with socket.create_server(("127.0.0.1", 0)) as fake:

        def pose():  # takes rank 0's place, but does not hold rank 0's key
            conn, _ = fake.accept()
            with conn:
                conn.sendall(peerlink.MAGIC + os.urandom(32))
                conn.recv(4096)
                conn.sendall(b"\x01" + os.urandom(32))
                conn.recv(1)

        thread = threading.Thread(target=pose)
        thread.start()
        posing = Address("127.0.0.1", fake.getsockname()[1], os.urandom(16))
        with pytest.raises(RuntimeError, match="could not prove it holds rank 0's key"):
            links._dial(0, posing, time.monotonic() + 5)
        thread.join(5)
    links.close(0)


def test_after_a_failure_streams_waiting_on_a_dead_peer_drain(fake):
    """Device flags: rank 1 stops after two exchanges; rank 0's third leaves its copy and side
    streams waiting on flags only rank 1 would write, and its caller's stream waits behind them
    (wait()). The failure (the watchdog's timeout) releases them, so a blocking sync of the
    caller's stream returns instead of hanging. The host handshake cannot (module doc)."""
    if fake.sync != "device":
        pytest.skip("the host handshake's waits on a peer's events cannot be released")
    ring0, ring1 = fake(2, timeout=0.4)
    ring0._health = SimpleNamespace(report=lambda message: None, close=lambda: None)
    x = [_dev(np.ones(3, np.float32))]
    callers = {}

    def ranks_then_one_stops(ring, count):
        callers[ring.rank] = fake.cupy.cuda.get_current_stream()
        for _ in range(count):
            ring.exchange(x, 1, "kv").wait()

    results = _threads([lambda: ranks_then_one_stops(ring0, 3),
                        lambda: ranks_then_one_stops(ring1, 2)])  # fmt: skip
    assert results == [None, None], results
    with pytest.raises(cr.RingTimeoutError):
        ring0.synchronize()
    drained = threading.Event()
    threading.Thread(target=lambda: (callers[0].synchronize(), drained.set()), daemon=True).start()
    assert drained.wait(5), "the caller's stream still waits on the dead peer"
    # a neighbour's write queued before the failure lands after the release and undoes it: the
    # watchdog writes the release again (a stream waiting then would otherwise wait for good)
    channel = next(iter(ring0._channels.values()))
    ready0 = channel.memory.ptr + channel.flags_at
    assert word(ready0) == 0xFFFFFFFF
    ctypes.c_uint32.from_address(ready0).value = ipc_capture.flag_phase(0)  # a late push
    deadline = time.monotonic() + 5
    while word(ready0) != 0xFFFFFFFF and time.monotonic() < deadline:
        time.sleep(0.01)
    assert word(ready0) == 0xFFFFFFFF, "the release was not renewed after a late write undid it"


# --- capture into CUDA graphs (device flags) ---


def test_only_device_flags_can_be_captured(fake):
    rings = fake(2)
    assert rings[0].capturable == (fake.sync == "device")
    if fake.sync == "host":
        with pytest.raises(RuntimeError, match="cannot be captured"):
            with rings[0].capturing():
                pass


@pytest.mark.parametrize("fake", ["device"], indirect=True)
def test_a_capture_records_each_flag_operation_and_leaves_the_counts(fake):
    """Inside ``capturing()`` an exchange's four flag operations are recorded with their nodes
    and the exchanges whose phases they carry (k - 2, k - 2, k, k for exchange k: freed, await
    freed, pushed, await pushed), and the channel's count is back where it was when the capture
    ends (nothing of a capture runs; replays move it on). A channel is never set up inside a
    capture."""
    rings = fake(2)
    x = _dev(np.ones(4, np.float32))
    for result in _threads([lambda ring=ring: ring.exchange([x]).wait() for ring in rings]):
        assert not isinstance(result, BaseException), result
    ring = rings[0]
    channel = next(iter(ring._channels.values()))
    assert channel.count == 1
    fake.gpu.paused = True  # (this fake runs what a capture queues: keep it from running)
    with ring.capturing() as record:
        ring.exchange([x])
        queued = [len(s.ops) for s in (ring.stream, ring._join)]
        with pytest.raises(CaptureDeferred, match="sets up a channel: an eager call"):
            ring.exchange([_dev(np.ones(3, np.float32))], tag="new")
        # the deferred exchange queued nothing on the ring's streams
        assert [len(s.ops) for s in (ring.stream, ring._join)] == queued
    assert channel.count == 1 and len(ring._channels) == 1
    assert [op[4] for op in record._ops] == [-1, -1, 1, 1]
    write, wait = fake_gpu.WRITE, fake_gpu.WAIT
    assert [op[2].paramArray[0].operation for op in record._ops] == [write, wait, write, wait]
    # each node is the operation just queued on its stream (the copy stream's three, then the
    # side stream's wait), with the value the node holds
    queued = [op[1][2] for op in record._ops]
    assert [q[0] for q in queued] == ["write_value", "wait_value", "write_value", "wait_value"]
    assert [q[2] for q in queued] == [2, 2, 1, 1]  # flag_phase(-1), flag_phase(1)
    assert [q[3] for q in queued] == [0, fake_gpu.WAIT_AND, 0, fake_gpu.WAIT_AND]
    assert record._made == {id(channel): 1} and not ring._capturing
    assert ring._sync.capture is None


def _channel(count):
    return SimpleNamespace(count=count, previous=[None, None])


class _Cuda:
    """``cupy.cuda`` as ``CapturedExchanges`` uses it: events, and stream waits and event
    records on raw handles, logged as ("wait", stream, event) and ("record", event, stream);
    the runtime refuses the calls ``refuse`` names."""

    def __init__(self):
        self.log, self.refuse, self.events = [], set(), 0

        def call(what, *args):
            if what in self.refuse:
                raise RuntimeError(f"{what} refused: cudaErrorInvalidResourceHandle")
            self.log.append((what, *args))

        self.runtime = SimpleNamespace(
            streamWaitEvent=lambda stream, event, flags: call("wait", stream, event),
            eventRecord=lambda event, stream: call("record", event, stream))  # fmt: skip

    def Event(self, disable_timing=False):  # noqa: N802 (cupy's name)
        self.events += 1
        return SimpleNamespace(ptr=0xE000 + self.events)


def _no_failure(why):
    raise AssertionError(f"the ring failed: {why}")


def test_captured_exchanges_take_the_values_of_the_channels_counts_modulo_4():
    """A replay d exchanges after the capture writes and awaits flag_phase(step + d) for each
    captured step: the captured values where d % 4 == 0 on a channel, the other phase where
    d % 4 == 2, as ``key()`` tells; it matches only at even d on every channel it uses; each
    replay moves the counts on by the exchanges the graph makes."""
    phase = ipc_capture.flag_phase
    driver = fake_driver(None)
    nodes = []
    driver.cuStreamGetCaptureInfo = lambda stream: (driver.CUresult.CUDA_SUCCESS, 1, 0, None,
                                                    [f"node{len(nodes)}"], 1)  # fmt: skip
    kv, dkv, idle = _channel(5), _channel(2), _channel(9)
    record = ipc_capture.CapturedExchanges(driver, [kv, dkv, idle], _Cuda(), _no_failure)
    steps = ((kv, True, 3), (kv, False, 5), (dkv, True, 0))
    for channel, write, step in steps:
        nodes.append(step)
        record.add(7, channel, write, 0x100, step, 0)
    captured = [phase(step) for _, _, step in steps]
    assert captured == [2, 1, 1]
    assert [op[2].paramArray[0].writeValue.value for op in record._ops] == captured
    kv.count, dkv.count = 6, 4  # the captured call made one kv and two dkv exchanges
    record.finish()
    assert (kv.count, dkv.count, idle.count) == (5, 2, 9) and record.matches()
    assert record.key() == (0, 0)  # the capture's own values
    record.patch("exec")
    assert driver.node_values == [("exec", "node1", 2), ("exec", "node2", 1),
                                  ("exec", "node3", 1)]  # fmt: skip
    record.advance(3)
    assert (kv.count, dkv.count) == (6, 4) and not record.matches()  # kv: the other parity
    assert record.key() == (1, 2)
    kv.count += 1  # an eager call of one kv exchange: the parity is the captured one again
    idle.count += 3  # (a channel the graph does not use has no say)
    assert record.matches() and record.key() == (2, 2)

    def patched():
        driver.node_values.clear()
        record.patch("exec")
        return [value for _, _, value in driver.node_values]

    assert patched() == [1, 2, 2]  # both channels two exchanges on: the other phase
    seen = []
    for _ in range(12):  # the keys come round: the same key, the same values
        record.advance(3)
        kv.count += 1
        seen.append((record.key(), patched()))
    assert seen[:2] == [((0, 0), captured), ((2, 2), [1, 2, 2])]
    assert all(entry == seen[i % 2] for i, entry in enumerate(seen))
    kv.count = 5 + (1 << 34)  # far on: only the counts modulo 4 matter
    dkv.count = 2 + 2 + (1 << 33)
    assert record.key() == (0, 2) and patched() == captured[:2] + [2]


def test_a_failed_capture_leaves_every_count_and_predecessor_where_it_was():
    driver = fake_driver(None)
    driver.cuStreamGetCaptureInfo = lambda stream: (driver.CUresult.CUDA_SUCCESS, 1, 0, None,
                                                    ["node"], 1)  # fmt: skip
    kv, dkv = _channel(3), _channel(8)
    before = [ipc_capture.Received(f"event{i}", 77) for i in range(4)]
    kv.previous, dkv.previous = before[:2], before[2:]
    record = ipc_capture.CapturedExchanges(driver, [kv, dkv], _Cuda(), _no_failure)
    record.add(7, kv, True, 0x100, 2, 0)
    kv.previous[1] = ipc_capture.Received("captured", 9, record)  # (as the captured exchange does)
    kv.count, dkv.count = 4, 9  # dkv's exchange failed before its first flag operation
    dkv.previous[0] = None
    record.finish()
    assert (kv.count, dkv.count) == (3, 8)
    assert kv.previous + dkv.previous == before


def test_a_launch_waits_for_the_slots_previous_exchanges_and_stands_for_them_after():
    """Before a launch the stream waits for the last exchange on each slot the graph uses
    (once per event, none where it was recorded on the launch stream itself: a steady loop
    of replays on one stream waits for nothing); after it an event recorded on the launch
    stream is those slots' predecessor. Where that record is refused, the slots have none
    (their next exchange is ordered by the caller's stream only)."""
    driver = fake_driver(None)
    driver.cuStreamGetCaptureInfo = lambda stream: (driver.CUresult.CUDA_SUCCESS, 1, 0, None,
                                                    ["node"], 1)  # fmt: skip
    cuda = _Cuda()
    eager = [ipc_capture.Received(SimpleNamespace(ptr=0xA0 + i), 77) for i in range(4)]
    kv, dkv, idle = _channel(5), _channel(1), _channel(4)
    kv.previous, dkv.previous, idle.previous = eager[:2], [eager[2], None], [eager[3]] * 2
    failures = []
    record = ipc_capture.CapturedExchanges(driver, [kv, dkv, idle], cuda,
                                           lambda why: failures.append(why) or RingError(why))
    # the call: kv exchange 5 (slot 1), dkv exchanges 1 and 2 (slots 1 and 0)
    for channel, step in ((kv, 5), (dkv, 1), (dkv, 2)):
        record.add(7, channel, True, 0x100, step, 0)
    kv.count, dkv.count = 6, 3
    record.finish()
    assert kv.previous == eager[:2] and dkv.previous == [eager[2], None]
    launched = ipc_capture.Received(SimpleNamespace(ptr=0xE001), 3)
    record.before_launch(3)
    assert cuda.log == [("wait", 3, 0xA1), ("wait", 3, 0xA2)]  # (dkv's slot 1: none yet)
    record.advance(3)
    assert cuda.log[2:] == [("record", 0xE001, 3)]
    assert (kv.count, dkv.count, idle.count) == (6, 3, 4)
    assert kv.previous == [eager[0], launched] and dkv.previous == [launched, launched]
    assert idle.previous == [eager[3]] * 2  # (not the graph's)
    kv.count, kv.previous[0] = 7, eager[0]._replace(stream=78)  # an eager kv exchange (slot 0)
    del cuda.log[:]
    record.before_launch(3)  # its slots' last exchanges are the last launch, on stream 3
    assert cuda.log == []
    record.advance(3)
    record.before_launch(4)  # another stream: one wait for them all
    assert cuda.log == [("record", 0xE001, 3), ("wait", 4, 0xE001)]
    record.before_launch(4, after_last=True)  # (the caller waited for the launch already)
    assert len(cuda.log) == 2  # (every slot's last exchange is that launch)
    cuda.refuse.add("record")
    with pytest.raises(RingError, match="record refused"):  # (later exchanges could hang)
        record.advance(4)
    assert len(failures) == 1 and "record refused" in failures[0]
    assert (kv.count, dkv.count) == (9, 7)  # the graph ran: the counts moved on
    assert kv.previous[1] is None and dkv.previous == [None, None]
    record.release()
    record.before_launch(5)
    assert cuda.log[-1] == ("wait", 4, 0xE001)  # (released: nothing to order)
    assert record.launched.ptr == 0xE001  # (the event outlives the release)


@pytest.mark.parametrize("fake", ["device"], indirect=True)
def test_a_failure_during_a_capture_still_releases_every_flag_word(fake):
    """The watchdog or the failure channel may fail the ring while the main thread captures
    exchanges: the release's far-ahead writes go to the driver on their own stream, all of
    them, and none is taken for a captured operation."""
    rings = fake(2)
    x = _dev(np.ones(4, np.float32))
    for result in _threads([lambda ring=ring: ring.exchange([x]).wait() for ring in rings]):
        assert not isinstance(result, BaseException), result
    ring = rings[0]
    fake.gpu.paused = True
    with ring.capturing() as record:
        ring.exchange([x])
        captured = len(record._ops)
        ring._fail(cr.RingError("rank 1 died (a test's stand-in)"))
        assert len(record._ops) == captured == 4
    writes = [op for op in ring._sync._release_stream.ops if op[0] == "write_value"]
    assert len(writes) == 4  # ready[0..1] and done[0..1]
    assert all(op[2] == 0xFFFFFFFF for op in writes)  # shares a bit with every phase


@pytest.mark.parametrize("fake", ["device"], indirect=True)
def test_a_failed_capture_that_left_a_stream_capturing_fails_the_ring(fake, monkeypatch):
    rings = fake(2)
    ring = rings[0]
    ring.capture_failed()  # every stream left the capture: nothing to say
    ring.check()
    monkeypatch.setattr(type(ring._join), "is_capturing", lambda self: self is ring._join)
    with pytest.raises(cr.RingError, match="left 1 of the ring's streams capturing"):
        ring.capture_failed()
    with pytest.raises(cr.RingError):
        ring.check()


@pytest.mark.parametrize("fake", ["device"], indirect=True)
def test_a_capture_after_an_unwaited_exchange_leaves_its_order_to_the_launches(fake):
    """An exchange never waited for before a capture: the captured exchange that frees its slot
    does not wait for it (a captured stream cannot wait for work outside its graph) and the
    capture goes on (no refusal, no driver error); each launch of the graph waits for it
    instead (``before_launch``). A captured exchange whose slot's previous exchange was
    captured too waits for it inside the graph. When the capture ends, whether or not it
    failed, the channel's count and its slots' predecessors are where they were."""
    rings = fake(2)
    x = _dev(np.ones(4, np.float32))
    # exchange 0, never waited for
    for result in _threads([lambda ring=ring: ring.exchange([x]) for ring in rings]):
        assert not isinstance(result, BaseException), result
    ring = rings[0]
    channel = next(iter(ring._channels.values()))
    before = list(channel.previous)
    eager = before[0].event
    assert before[1] is None
    fake.gpu.paused = True  # (this fake runs what a capture queues: keep it from running)
    waits = len(ring.stream.waited)
    with ring.capturing() as record:
        first = ring.exchange([x])  # exchange 1: slot 1, nothing before it
        first.wait()
        ring.exchange([x]).wait()  # 2: slot 0, after the eager exchange 0
        ring.exchange([x]).wait()  # 3: slot 1, after exchange 1 of this capture
        captured_waits = ring.stream.waited[waits:]
        assert channel.previous[1].capture is record
    assert not any(e is eager for e in captured_waits)
    assert any(e is first._flight.event for e in captured_waits)
    assert channel.count == 1 and channel.previous == before
    assert record._slots == [(id(channel), 1), (id(channel), 0)]
    caller = fake.cupy.cuda.get_current_stream()
    record.before_launch(caller.ptr)  # (what a replay does first)
    assert caller.waited[-1] is eager
    with pytest.raises(ZeroDivisionError), ring.capturing():
        ring.exchange([x])
        1 / 0  # noqa: B018 (a failure inside the captured call)
    assert channel.count == 1 and channel.previous == before


def _set_up_and_replay_on_rank_1(fake, ring, caller, call):
    """``call()`` (exchanges 0 and 1: the channel's setup), then on rank 1 ``call()`` captured
    and replayed once on ``caller`` (2 and 3), elsewhere ``call()`` again: rank 1's captured
    call (None elsewhere) and what ``call()`` got."""
    call()
    caller.synchronize()
    ring.synchronize()
    if ring.rank != 1:
        return None, call()
    graph_driver = fake_gpu.FakeGraphDriver(fake.driver)
    with fake.gpu.capturing({caller, ring.stream, ring._join}) as graph:
        with ring.capturing() as record:
            got = call()
    replayed = CapturedRingCall(graph_driver, graph, graph_driver.instantiate(graph),
                                [], (1,), [], None, caller.ptr, 0, record)  # fmt: skip
    replayed.replay((1,), (), caller.ptr)
    return replayed, got


def _replay_after_eager(fake, rings, unwaited):
    """Rank 1 captures a call of two exchanges of one channel and replays it (exchanges 2 and
    3); then both ranks issue exchanges 4 and 5 eagerly, which rank 1 never waits for where
    ``unwaited`` (an exception between exchange and wait, the call then retried); then rank 1
    replays the graph (6 and 7) while its side stream runs only when nothing else can (the
    hosts first, then the GPU). Rank 0 calls eagerly throughout. Each rank's outcome."""
    gpu = fake.gpu
    gate = threading.Barrier(2, action=lambda: setattr(gpu, "paused", False))

    def rank_main(ring):
        caller = fake.cupy.cuda.get_current_stream()
        buf = _dev(np.full(4, ring.rank, np.float32))

        def call():
            return [ring.exchange([buf], 1, "kv").wait()[0] for _ in range(2)]

        replayed, got = _set_up_and_replay_on_rank_1(fake, ring, caller, call)
        caller.synchronize()
        ring.synchronize()
        gpu.paused = True
        pending = [ring.exchange([buf], 1, "kv") for _ in range(2)]
        if ring.rank == 0 or not unwaited:
            for p in pending:
                p.wait()
        del pending
        if ring.rank == 1:
            gpu.starve.add(ring._join)
            replayed.replay((1,), (), caller.ptr)
            ring.watch("ring call (CUDA graph)", caller.ptr)
        else:
            call()
        gate.wait(20)
        ring.synchronize()
        caller.synchronize()
        return [float(g[0]) for g in got]

    return _threads([lambda ring=ring: rank_main(ring) for ring in rings])


@pytest.mark.parametrize("fake", ["device"], indirect=True)
@pytest.mark.parametrize("unwaited", [False, True])
def test_a_replay_after_an_unwaited_exchange_is_ordered_after_it(fake, monkeypatch, unwaited):
    """Eager exchanges 4 and 5, never waited for (or waited for), then a replay whose first
    exchanges (6 and 7) free their slots: the launch stream waits for exchanges 4 and 5 first,
    so rank 0 cannot push exchange 6 before rank 1's starved side stream has evaluated its
    wait for exchange 4. Without that wait (negative control) that wait never ends."""
    results = _replay_after_eager(fake, fake(2), unwaited)
    assert results == [[1.0, 1.0], [0.0, 0.0]], results
    if not unwaited:
        return
    monkeypatch.setattr(ipc_capture.CapturedExchanges, "before_launch",
                        lambda self, stream, after_last=False: None)
    results = _replay_after_eager(fake, fake(2, timeout=1.0), unwaited)
    assert isinstance(results[1], cr.RingTimeoutError), results
    assert "'kv' #4" in str(results[1])


def _eager_after_replay_elsewhere(fake, rings):
    """Rank 1 captures a call of two exchanges and replays it on the caller's stream (exchanges
    2 and 3), then, with its side stream starved and the GPU paused for the hosts, replays it
    again (4 and 5) and issues two exchanges from another stream (6 and 7), never waited for;
    rank 0 calls eagerly throughout. Each rank's outcome."""
    gpu = fake.gpu
    gate = threading.Barrier(2, action=lambda: setattr(gpu, "paused", False))

    def rank_main(ring):
        caller = fake.cupy.cuda.get_current_stream()
        other = fake.cupy.cuda.Stream(non_blocking=True)
        buf = _dev(np.full(4, ring.rank, np.float32))

        def call():
            return [ring.exchange([buf], 1, "kv").wait()[0] for _ in range(2)]

        replayed, _ = _set_up_and_replay_on_rank_1(fake, ring, caller, call)
        caller.synchronize()
        ring.synchronize()
        gpu.paused = True
        if ring.rank == 1:
            gpu.starve.add(ring._join)
            replayed.replay((1,), (), caller.ptr)
            ring.watch("ring call (CUDA graph)", caller.ptr)
            with other:
                pending = [ring.exchange([buf], 1, "kv") for _ in range(2)]
            del pending
        else:
            call()
            call()
        gate.wait(20)
        ring.synchronize()
        caller.synchronize()
        return "done"

    return _threads([lambda ring=ring: rank_main(ring) for ring in rings])


@pytest.mark.parametrize("fake", ["device"], indirect=True)
def test_an_eager_exchange_from_another_stream_is_ordered_after_a_replay(fake, monkeypatch):
    """After a replay the event recorded on its stream is the slots' last exchange: the *freed*
    of exchange 6, issued from another stream, waits for it, so rank 0 cannot push exchange 6
    before rank 1's starved side stream has evaluated the graph's wait for exchange 4. Where
    the replay leaves the slots' predecessors as they were before it (negative control), that
    wait never ends and rank 1 times out."""
    assert _eager_after_replay_elsewhere(fake, fake(2, timeout=2.0)) == ["done", "done"]
    advance = ipc_capture.CapturedExchanges.advance

    def counts_only(self, stream):
        before = {key: list(c.previous) for key, c in self._channels.items()}
        advance(self, stream)
        for key, c in self._channels.items():
            c.previous[:] = before[key]

    monkeypatch.setattr(ipc_capture.CapturedExchanges, "advance", counts_only)
    results = _eager_after_replay_elsewhere(fake, fake(2, timeout=2.0))
    assert isinstance(results[1], cr.RingTimeoutError), results


def _unwaited_inside_a_capture(fake, rings):
    """Calls of four exchanges of one channel whose first two are waited for only after the
    last two were issued (so that exchanges 2 and 3 of the call free the slots of exchanges 0
    and 1, which nothing waited for yet). Rank 1 captures the second call and replays it twice,
    its side stream run only when nothing else can; rank 0 calls eagerly. Each rank's outcome:
    what the last two exchanges of each call received."""
    gpu = fake.gpu
    gate = threading.Barrier(2, action=lambda: setattr(gpu, "paused", False))

    def rank_main(ring):
        caller = fake.cupy.cuda.get_current_stream()
        graph_driver = fake_gpu.FakeGraphDriver(fake.driver)
        bufs = [_dev(np.zeros(4, np.float32)) for _ in range(4)]
        seen = []

        def call():
            pending = [ring.exchange([buf], 1, "kv") for buf in bufs]
            return [p.wait()[0] for p in pending[2:]]

        replayed = None
        for number in range(3):
            for e, buf in enumerate(bufs):  # (the GPU is done with the last call)
                buf[:] = 100 * number + 10 * e + ring.rank
            if ring.rank == 1 and number == 1:
                with gpu.capturing({caller, ring.stream, ring._join}) as graph:
                    with ring.capturing() as record:
                        got = call()
                replayed = CapturedRingCall(graph_driver, graph,
                                            graph_driver.instantiate(graph), [], (1,), [], None,
                                            caller.ptr, 0, record)  # fmt: skip
            gpu.paused = number > 0
            if replayed is not None:
                gpu.starve.add(ring._join)
                replayed.replay((1,), (), caller.ptr)
                ring.watch("ring call (CUDA graph)", caller.ptr)
            else:
                got = call()
            if number > 0:
                gate.wait(20)
            try:
                ring.synchronize()
            except cr.RingError:
                gate.abort()  # (the other rank: no next call)
                raise
            caller.synchronize()
            seen.append([float(g[0]) for g in got])
        return seen

    return _threads([lambda ring=ring: rank_main(ring) for ring in rings])


@pytest.mark.parametrize("fake", ["device"], indirect=True)
def test_an_exchange_unwaited_inside_a_capture_is_ordered_inside_the_graph(fake, monkeypatch):
    """Inside a capture, an exchange not yet waited for when its slot is freed again is waited
    for by the copy stream within the graph (an edge between captured nodes), so each replay
    delivers every exchange even with rank 1's side stream lagging behind everything else;
    without that wait in the graph (negative control: eager exchanges keep theirs) the replay
    never ends and the watchdog fails it."""
    results = _unwaited_inside_a_capture(fake, fake(2))
    want = [[[100 * n + 20 + 1 - r, 100 * n + 30 + 1 - r] for n in range(3)] for r in range(2)]
    assert results == want, results
    eager_only = ipc_mod._DeviceFlags._after_previous

    def not_captured(self, channel, slot):
        if self.capture is None:
            eager_only(self, channel, slot)

    monkeypatch.setattr(ipc_mod._DeviceFlags, "_after_previous", not_captured)
    results = _unwaited_inside_a_capture(fake, fake(2, timeout=1.0))
    assert isinstance(results[1], cr.RingTimeoutError), results
    assert "ring call (CUDA graph)" in str(results[1])


# ring calls as (tag, exchanges) lists; a pattern's calls take them in turn
REPLAY_PATTERNS = {
    "one exchange": [[("kv", 1)]],
    "two exchanges": [[("kv", 2)]],
    "two channels": [[("kv", 1), ("dkv", 2)]],
    # a training step: the forward's exchange and the backward's, which shares its channel
    "forward and backward": [[("kv", 1)], [("kv", 1), ("dkv", 1), ("home", 1)]],
}


@pytest.mark.parametrize("fake", ["device"], indirect=True)
@pytest.mark.parametrize("pattern", list(REPLAY_PATTERNS))
@pytest.mark.parametrize("graph_ranks", [(0,), (0, 1)])
@pytest.mark.parametrize("starved", [False, True])
def test_replayed_exchanges_pair_with_eager_ones_and_with_each_other(
    fake, pattern, graph_ranks, starved
):
    """Ring calls replayed as CUDA graphs, on the fake GPU: each call of the pattern (its
    exchanges by tag, fresh data per call and exchange) is captured by the ranks in
    ``graph_ranks`` (``FakeGpu.capturing`` records its operations as one graph, the ring's
    capture records its flag operations) and replayed by ``ring_graphs.CapturedRingCall``:
    one graph per slot parity as ``GraphSlot`` keeps them, each instantiated once per state of
    its channels' counts modulo 4 and given that state's flag values once; the other ranks call
    eagerly. At every call every rank must receive what its neighbour sent at that call: a
    replay's flag values must pair with an eager peer's and with another replaying peer's, call
    after call, round the cycle of values several times, also where two kinds of call share a
    channel (``starved``: rank 0's copy stream and rank 1's side stream run only when nothing
    else can, so pushes and reads lag behind everything else). Once each graph has met its
    states (within the first cycles), no replay gives a flag node a value (counted at the
    driver)."""
    rings = fake(2)
    if starved:
        fake.gpu.starve.update({rings[0].stream, rings[1]._join})
    plans = REPLAY_PATTERNS[pattern]
    calls = 10 * len(plans) + 3
    steady = calls - 4 * len(plans)  # every state has been met by then (at most 2 per graph)
    gpu, driver = fake.gpu, fake.driver
    logs = {0: [], 1: []}

    def rank_main(ring):
        caller = fake.cupy.cuda.get_current_stream()
        graph_driver = fake_gpu.FakeGraphDriver(driver)
        now = {"call": 0}
        buffers = {}  # (plan, tag, e) -> the array that exchange sends

        def one_call(index):
            for tag, count in plans[index]:
                for e in range(count):
                    buf = buffers.setdefault((index, tag, e), _dev(np.zeros(4, np.float32)))
                    caller.launch(lambda buf=buf, e=e: buf.__setitem__(
                        slice(None), now["call"] * 100 + e * 10 + ring.rank))  # fmt: skip
                    got = ring.exchange([buf], 1, tag).wait()[0]
                    caller.launch(lambda got=got, tag=tag, e=e: logs[ring.rank].append(
                        (now["call"], tag, e, float(got[0]))))  # fmt: skip

        graphs = {index: [] for index in range(len(plans))}
        patched_before_steady = None
        for call in range(calls):
            now["call"] = call
            index = call % len(plans)
            if call == steady:
                patched_before_steady = graph_driver.patches()
            if ring.rank not in graph_ranks or call < len(plans):  # (first calls: channels)
                one_call(index)
            else:
                kept = next((g for g in graphs[index] if g.matches), None)
                if kept is None:  # a new slot parity: capture (nothing runs), then replay
                    with gpu.capturing({caller, ring.stream, ring._join}) as graph:
                        with ring.capturing() as record:
                            one_call(index)
                    kept = CapturedRingCall(graph_driver, graph, graph_driver.instantiate(graph),
                                            [], (1,), [], None, caller.ptr, 0, record)  # fmt: skip
                    graphs[index].append(kept)
                kept.replay((1,), (), caller.ptr)
            caller.synchronize()
        ring.synchronize()
        counts = {"graphs": [len(g) for g in graphs.values()],
                  "instantiated": len(graph_driver.instantiated),
                  "launched": graph_driver.launched, "patched": graph_driver.patches(),
                  "patched before steady": patched_before_steady}  # fmt: skip
        for captured in (g for kept in graphs.values() for g in kept):
            captured.release()
        # each instantiation, and each graph
        assert len(graph_driver.destroyed) == counts["instantiated"] + sum(counts["graphs"])
        return counts

    results = _threads([lambda ring=ring: rank_main(ring) for ring in rings], timeout=60)
    for rank, result in enumerate(results):
        assert not isinstance(result, BaseException), result
        if rank not in graph_ranks:
            assert result["graphs"] == [0] * len(plans) and result["launched"] == 0
        else:  # one graph per slot parity its channels take at the call's start
            assert all(1 <= n <= 2 for n in result["graphs"]), result
            assert result["launched"] == calls - len(plans)
            # each graph meets at most two states here (its counts move by an even number),
            # and every pattern moves some channel by 2 between two replays of one graph
            assert sum(result["graphs"]) < result["instantiated"] <= 2 * sum(result["graphs"])
            assert result["patched"] > 0
            assert result["patched"] == result["patched before steady"], result
            if pattern in ("one exchange", "two exchanges"):
                assert result["graphs"] == [2 if pattern == "one exchange" else 1]
                assert result["instantiated"] == 2 * result["graphs"][0]
                # four flag operations per exchange, one exchange per call, given values once
                # per instantiation beyond each graph's first
                per_graph = 4 * (1 if pattern == "one exchange" else 2)
                assert result["patched"] == per_graph * result["graphs"][0]
        want = [(c, tag, e, float(c * 100 + e * 10 + 1 - rank)) for c in range(calls)
                for tag, count in plans[c % len(plans)] for e in range(count)]  # fmt: skip
        assert logs[rank] == want


def test_the_fake_gpu_keeps_concurrent_captures_apart():
    """As the driver does, each capture records only its own streams' operations, whatever
    other captures run beside it or end before it; a stream is captured by one at a time."""
    gpu = fake_gpu.FakeGpu()
    try:
        first, second, plain = (fake_gpu.FakeStream(gpu) for _ in range(3))
        with gpu.capturing({first}) as a:
            with gpu.capturing({second}) as b:
                first.launch(lambda: None)
                second.launch(lambda: None)
                with pytest.raises(RuntimeError, match="already being captured"):
                    with gpu.capturing({first}):
                        pass
            first.launch(lambda: None)  # after the other capture ended: still recorded here
            plain.launch(lambda: None)
        assert [s for s, _ in a.ops] == [first, first] and [s for s, _ in b.ops] == [second]
        assert not first.ops and not second.ops
        plain.synchronize()
    finally:
        gpu.close()
