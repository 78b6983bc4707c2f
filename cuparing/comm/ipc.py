"""The copy-engine ring: GPUs of one host push K/V into each other's memory through CUDA IPC.

Chosen with ``Ring.from_env(transport="ipc")`` or ``CUPARING_TRANSPORT=ipc``, and by default on
rings of GPUs of one host (``cuparing.comm.base.default_transport``). NCCL's send/recv
runs on SMs and slows the attention kernels it overlaps; a ``cudaMemcpyAsync`` into a peer's
buffer runs on a copy engine (BENCHMARKS.md, "Transport: NCCL vs the copy-engine push").
Everything but the transfer is the ring core's (:mod:`cuparing.comm.gpu_ring`: watchdog, failure
channel, trace, ``wait()``, ownership rules, barrier and collective); the ring joins like the NCCL
ring (:func:`cuparing.comm.nccl.join_from_env`) and keeps that NCCL communicator for the
collective that sets the links up and for :meth:`IpcRing.release_buffers`.

Per channel ``(tag, shift, shapes, dtypes)`` every rank allocates, at its first exchange, one
``cudaMalloc`` holding two receive slots and four 32-bit flag words, and gives its IPC memory
handle to the rank that writes into it (``source = rank - shift``) and to the rank it writes into
(``dest = rank + shift``) over :mod:`cuparing.comm.peerlink`. Exchange ``k`` of a channel uses
slot ``s = k % 2``. The copy stream first waits for the caller's stream: the arrays to send are
written, and everything queued before the call is done, which includes every read of this rank's
slot ``s`` from exchange ``k - 2`` (the ownership rule of :mod:`cuparing.comm.base`). Then, in
this order: this rank tells ``source`` that its slot ``s`` is free again (*freed*) and the copy
stream waits until ``dest`` has said so of the slot it writes (*await freed*), both trivially
true for ``k < 2`` (the host handshake skips them there); the copy stream copies the arrays into
``dest``'s slot ``s`` and tells ``dest`` (*pushed*); a side stream waits for those copies and
until ``source`` has pushed into this rank's slot ``s`` (*await pushed*), then records the
exchange's *received* event, which ``wait()`` hands to the caller's stream as on every GPU ring.
``ring.sync`` says how the four are carried:

``"device"`` (device flags): by the GPUs alone, through ``cuStreamWriteValue32`` and
``cuStreamWaitValue32`` (NVIDIA's cuda-bindings); after a channel's setup no exchange sends a host
message or waits for another process. A rank's flag words are ``ready[s]`` and ``done[s]``. Each
lives in the memory of the GPU whose stream waits on it, so every wait polls local memory and the
only access to a peer's memory is a write through its IPC mapping, as the copies are.

The words hold one-hot *phases*, which repeat every four exchanges of a channel: exchange
``k`` has ``phase(k) = 1 << ((k >> 1) & 1)``, 1 or 2, so the exchanges that use one slot take 1
and 2 in turn (``phase(-2) = phase(-1) = 2``). A wait is CUDA's ``CU_STREAM_WAIT_VALUE_AND``:
it ends once ``word & phase != 0``.

- ``ready[s]``, in the reader's memory: after its copies of exchange ``k`` the writer's copy
  stream writes ``phase(k)`` into ``dest``'s ``ready[s]`` (*pushed*); the reader's side stream
  waits until its own ``ready[s] & phase(k)`` (*await pushed*).
- ``done[s]``, in the writer's memory: the reader's copy stream, at the reader's exchange ``k``,
  writes ``phase(k - 2)`` (the phase exchange ``k - 2`` pushed) into ``source``'s ``done[s]``
  (*freed*); the writer's copy stream waits until its own ``done[s] & phase(k - 2)`` (*await
  freed*).

A channel's setup writes 0 into its ``ready`` words, which no wait accepts, and ``phase(-2) =
2`` into its ``done`` words, so that *await freed* of exchanges 0 and 1 (``phase(-2)``,
``phase(-1)``) holds at once and their *freed* writes the value the word already holds; both
before any peer learns of the memory (``cudaMalloc`` does not clear, and a stale word would
satisfy a wait). Issuing them anyway gives every exchange the same operations, which a captured
call relies on (:mod:`cuparing.backends.ring_graphs`). Since the values depend on ``k mod 4``
only, a graph of exchanges replays with the values it was given once: one instantiation of the
graph per channel count modulo 4 (:class:`cuparing.comm.ipc_capture.CapturedExchanges`).

One rule more than the host handshake needs: exchange ``k``'s *await pushed* must have been
evaluated before the reader's exchange ``k + 2`` on the channel frees the slot (the argument below
rests on it). The copy stream therefore waits for exchange ``k``'s *received* event (recorded on
the side stream after *await pushed*) before *freed* of exchange ``k + 2``, always: one stream wait
per exchange (about a microsecond of host time), already satisfied on the GPU where the caller
waited for exchange ``k`` on the stream it issues from. A caller's ``wait()`` is not relied on: it
may come on another stream, late, or never (an exception between exchange and wait, then a retry),
and the ring would otherwise have to track which exchanges were waited for where, through captures
and replays, keeping their flights alive. Each channel keeps per slot only an event that follows
its last exchange's *await pushed*. Inside a CUDA-graph capture
(:class:`cuparing.comm.ipc_capture.CapturedExchanges`) the wait is an edge of the graph where
exchange ``k`` was captured too; where it was issued before the capture, each launch of the graph
first makes the launch stream wait for the last exchange on every slot the graph uses, and after the
launch an event recorded on that stream stands for the graph's exchanges (a graph ends only when all
its nodes have, the side stream's waits included), which the next exchange on the slot waits for in
turn.

Which values a word can hold when a wait is evaluated (on one channel; ``s = k % 2``; the writes
into one word come from one peer's copy stream, in order, and a word holds the last of them):

- *await freed* of exchange ``k`` (the writer's ``done[s]``): the reader's *freed* of exchange
  ``k + 2`` comes after the reader's *await pushed* of exchange ``k`` ended (the rule above),
  hence after the writer's push of ``k``, hence after this wait ended; so the word holds a value
  the reader wrote at an exchange ``<= k``. The writer's *await freed* of exchange ``k - 2``
  ended earlier (its copy stream runs them in order), and by the same argument one step back
  only once the reader's *freed* of ``k - 2`` had landed (for ``k < 4`` that is the setup's
  value or one equal to it). So the word holds ``phase(k - 4)`` (*freed* of ``k - 2``, not yet
  that of ``k``) or ``phase(k - 2)`` (*freed* of ``k``): two different one-hot values, of which
  only the second satisfies the wait.
- *await pushed* of exchange ``k`` (the reader's ``ready[s]``): the writer pushes exchange
  ``k + 2`` only after its *await freed* of ``k + 2`` ended, which by the above needs the
  reader's *freed* of ``k + 2``, which comes after this wait was evaluated (the rule above).
  The reader's *await pushed* of ``k - 2`` ended before (its side stream runs them in order)
  and, by induction, only on the push of ``k - 2``. So the word holds ``phase(k - 2)`` (0 for
  ``k < 2``: the setup's value) or ``phase(k)``, and only the push of exchange ``k`` satisfies
  the wait.

No stale read: *await pushed* of ``k`` thus ends only once the push of exchange ``k`` has been
written, and a stream memory write is ordered after the copies queued before it on its stream and,
by default, behind a system-wide memory barrier: the ordering an interprocess event recorded after
the copies gives the host handshake. No early overwrite: the writer pushes exchange ``k + 2`` into
slot ``s`` only after *await freed* of ``k + 2``, which by the above ends only on the reader's
*freed* of exchange ``k + 2``, issued after every read of exchange ``k``'s data queued before that
call. No deadlock: every rank issues the same exchanges in the same order, and within one exchange
*freed* comes before *await freed* and *pushed* before *await pushed*. Each wait is thus satisfied
by a peer's write issued at an earlier point of the common sequence, or by this rank's own earlier
work (the copy stream's wait for the *received* event of exchange ``k - 2``, and a launch's wait
for the exchanges before the graph, refer to earlier exchanges too), and no chain of waits leads
back to itself, also where a GPU runs some streams' work behind others' (the caveat the driver's
documentation gives for stream memory operations).

A dead or stuck peer leaves an exchange's *received* event unfinished; the host never blocks on
it, and the ring core's watchdog raises :class:`RingTimeoutError` after ``timeout`` (the failure
channel of rings built by ``from_env`` tells every rank of a process's death within about a
second). On that failure the device mode releases its own streams, as NCCL's abort ends its
kernels: it writes all ones (``0xFFFFFFFF``, which satisfies every AND wait) into this rank's
own flag words, so the copy and side streams' waits end and work queued behind them (the
caller's stream) runs on void data instead of never (a blocking synchronisation, a loss's
``.item()``, returns; the next call of the ring raises). The watchdog writes them again every
few polls until the ring closes, since a neighbour's flag write queued before the failure may
land after the release and undo it. The host handshake cannot: a stream waiting on a dead
peer's event (once its host sent the message) waits for good, and work queued behind it never
runs. With it, after
a failure poll (``ring.synchronize()``, ``ring.check()``) rather than block in a CUDA
synchronisation, and end the process. After a failure nothing is freed.

The device mode needs cuda-bindings (the ``cuda12``/``cuda13`` extras) and stream memory
operations: a driver with CUDA 11.7's v2 memory operations (available on every platform) or,
before that, ``CU_DEVICE_ATTRIBUTE_CAN_USE_STREAM_MEM_OPS_V1``. It assumes what the copies
already need: the GPUs are peers, so the mapping ``cudaIpcOpenMemHandle`` gives (peer access
enabled) accepts a stream memory write. Without cuda-bindings or stream memory operations, or with
``CUPARING_IPC_FLAGS=0``, the ring uses the host handshake and ``ring.sync_reason`` says why.
Rings built by ``from_env`` agree: if one rank cannot use device flags, every rank uses the host
handshake. Neighbours in different modes refuse the channel with :class:`RingError`.

``"host"`` (host handshake): interprocess events and host messages over the links. Each rank
creates two *done* events (its slot is free again) and two *ready* events (it has written
``dest``'s slot) per channel, and gives ``source`` its done handles and ``dest`` its ready
handles. *Freed* records ``done[s]`` on the copy stream and sends ``DONE k-2`` to ``source``;
*await freed* waits (host) for ``DONE k-2`` from ``dest``, then makes the copy stream wait on
``dest``'s ``done[s]``; *pushed* records ``ready[s]`` and sends ``READY k`` to ``dest``; *await
pushed* waits (host) for ``READY k`` from ``source``, then makes the side stream wait on its
``ready[s]``. The host messages exist because ``cudaStreamWaitEvent`` waits for the event's
*latest record at the time of the call*: waiting on a peer's event before the peer has recorded it
for this step waits for nothing. A peer cannot re-record ``ready[s]`` (exchange ``k + 2``) before
it has this rank's ``DONE k``, sent at this rank's exchange ``k + 2``, after *await pushed* of
exchange ``k``; the same argument covers ``done[s]``. Every rank sends before it waits, so the
host messages cannot deadlock; every GPU wait refers to a record issued earlier in the same
exchange order on every rank, so the streams cannot either. The host never waits for the GPU:
``exchange`` returns once both neighbours' hosts have reached the same exchange (usually at once:
hosts run ahead of their GPUs), and each of those waits gives up after ``timeout`` with
:class:`RingTimeoutError` naming the rank, tag, exchange number and peer, reported through the
failure channel. A peer whose process ends closes its link: waits on it raise :class:`RingError`
at once. Those host waits were ~60% of a 2-GPU ring call's host time (PERF.md, "Call plans for
every call"); the device mode has none.

Teardown is collective in the sense that a rank frees the memory and events it exported only
after every peer said it has left (:meth:`close` sends and awaits a BYE, bounded by the timeout),
because a peer's queued copies, flag writes and waits may still refer to them. After a failure
nothing is freed (a stream may still wait on a dead peer's event or flag; the process is about to
end).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from .base import CaptureDeferred, RingError, RingTimeoutError
from .gpu_ring import Flight, GpuRing, fresh
from .ipc_capture import CapturedExchanges, Received, flag_phase
from .nccl import collective_of, join_from_env
from .peerlink import Address, LinkError, PeerLinks
from .trace import COMM

_READY, _DONE, _SETUP_RECV, _SETUP_SEND = 1, 2, 3, 4  # peerlink message kinds (0 is BYE)
_ALIGN = 256  # byte alignment of each array inside a slot, and of the flag words after them
_HANDLE = 64  # bytes of a cudaIpcMemHandle_t / cudaIpcEventHandle_t
_DIGEST = 16
_SLOT_BYTES = struct.Struct("!Q")
# a setup message: the channel's digest, the sender's mode, its slot size, its memory handle
_HEADER = _DIGEST + 1 + _SLOT_BYTES.size + _HANDLE
_READY_AT, _DONE_AT = 0, 8  # byte offsets of ready[0..1] and done[0..1] in the flag words
_WORD = 0xFFFFFFFF  # all ones: satisfies every AND wait (the failure release)
FLAGS_ENV = "CUPARING_IPC_FLAGS"  # "0": the host handshake even where device flags would work


def import_driver():
    """NVIDIA's ``cuda.bindings.driver``, or None where cuda-bindings is not installed."""
    try:
        from cuda.bindings import driver
    except ImportError:
        return None
    return driver


@dataclass
class _Channel:
    """One ``(tag, shift, shapes, dtypes)`` stream of exchanges: both directions on this rank."""

    index: int  # creation order, the same on every rank
    key: tuple
    dest: int  # rank + shift: we write into its slots
    source: int  # rank - shift: it writes into ours
    offsets: list[int]  # of each array inside a slot
    slot_bytes: int
    memory: Any  # our two receive slots and flag words (one cudaMalloc, exported to both)
    received: list  # [slot 0 arrays, slot 1 arrays], views of `memory`
    remote_base: int = 0  # dest's slots, opened
    count: int = 0  # exchanges issued
    # the host handshake's events: ours (done: opened by source; ready: opened by dest), and
    # the raw handles of dest's done and source's ready events, opened
    done: list = field(default_factory=list)
    ready: list = field(default_factory=list)
    remote_done: list = field(default_factory=list)
    remote_ready: list = field(default_factory=list)
    # device flags: source's memory, opened (remote_base where source is dest), and the words
    source_base: int = 0
    words: _Words | None = None
    # device flags, per slot: where the last exchange on it has evaluated its *await pushed*
    # (a Received; None: no exchange on the slot yet), which the copy stream waits for before
    # the slot's next *freed* (the module doc)
    previous: list = field(default_factory=lambda: [None, None])

    @property
    def flags_at(self) -> int:
        """Byte offset of the flag words in a channel's memory (the same on every rank)."""
        return 2 * self.slot_bytes


@dataclass
class _Words:
    """A channel's flag words, slot-indexed, as the driver takes addresses (``CUdeviceptr``)."""

    ready: list  # ours: source pushed into our slot s (the side stream awaits it)
    done: list  # ours: dest has read the slot s we write into (the copy stream awaits it)
    dest_ready: list  # dest's ready words: written after our copies
    source_done: list  # source's done words: written once our slot s is read


class IpcRing(GpuRing):
    """One rank of a ring of GPUs of one host that moves data by copy-engine pushes (CUDA IPC).

    Build it with :meth:`from_env` (or ``Ring.from_env(transport="ipc")``). Same protocol,
    ownership rules, tracing and failure handling as every
    :class:`~cuparing.comm.gpu_ring.GpuRing`; see the module doc for the two ways pushes are
    ordered, :attr:`sync`.

    Args:
        rank, size, device, timeout, trace: as in :class:`~cuparing.comm.gpu_ring.GpuRing`.
        comm: a ``cupy.cuda.nccl.NcclCommunicator`` for the collective (``None`` only when
            ``size == 1``).
        links: this rank's connected :class:`~cuparing.comm.peerlink.PeerLinks` (``from_env``
            makes them; needed when ``size > 1``).

    Attributes:
        sync: ``"device"`` (device flags) or ``"host"`` (host handshake).
        sync_reason: why the host handshake is used (``None`` with device flags).
    """

    def __init__(self, rank: int, size: int, comm: Any = None, device: int | None = None,
                 timeout: float = 300.0, trace: bool = False,
                 links: PeerLinks | None = None):  # fmt: skip
        self._links = links  # before the watchdog starts: _interrupt reads it
        self._channels: dict[tuple, _Channel] = {}
        self._channel_count = 0
        super().__init__(rank, size, collective_of(comm), device, timeout, trace)
        with self.device:  # self.stream (the core's comm stream) is the copy stream
            self._join = self._cupy.cuda.Stream(non_blocking=True)
            # recorded after each exchange's copies and waited on at once by the side stream: a
            # wait takes the record current at the call, so one event serves every exchange
            self._sent = self._cupy.cuda.Event(disable_timing=True)
            self._sync = _choose_sync(self)

    @property
    def sync(self) -> str:
        return self._sync.name

    @property
    def _transport_capturable(self) -> bool:
        # device flags: the exchange is copies and stream memory operations, which a graph
        # holds (their values set per instantiation: CapturedExchanges); the host
        # handshake's host messages are not GPU work
        return self._sync.name == "device"

    def _start_capture(self) -> CapturedExchanges:
        with self.device:
            record = CapturedExchanges(self._sync.driver, list(self._channels.values()),
                                       self._cupy.cuda, self._fail_replay)  # fmt: skip
        self._sync.capture = record
        return record

    def _fail_replay(self, why: str) -> RingError:
        """A replay's driver call after its launch failed: the ring is unusable; the error to
        raise."""
        self._fail(self._error or RingError(f"rank {self.rank}: {why}"))
        return fresh(self._error)

    def _end_capture(self, record: CapturedExchanges) -> None:
        self._sync.capture = None
        record.finish()

    @property
    def sync_reason(self) -> str | None:
        return self._sync.reason

    def __repr__(self) -> str:
        return (f"IpcRing(rank={self.rank}, size={self.size}, device={self.device.id}, "
                f"sync={self.sync!r})")  # fmt: skip

    @classmethod
    def from_env(cls, timeout: float = 300.0, init_file: str | None = None,
                 device: int | None = None, trace: bool = False,
                 health: bool | None = None) -> IpcRing:  # fmt: skip
        """As :meth:`cuparing.comm.nccl.NcclRing.from_env`, then connects the ranks' host links
        and agrees on :attr:`sync` (collective).

        Raises:
            RuntimeError: as :meth:`cuparing.comm.nccl.NcclRing.from_env`; or the ranks are not
                all on one host, or the links could not be set up within ``timeout``.
        """
        ring = join_from_env(timeout, init_file, device, health).build(cls, timeout, trace)
        if ring.size > 1:
            try:
                ring._connect_links(timeout)
            except BaseException:
                ring._links = None
                ring.close()
                raise
        return ring

    def _connect_links(self, timeout: float) -> None:
        """Connect the links; every rank takes the host handshake if one rank must."""
        links, address = PeerLinks.listen(self.rank, self.size)
        try:
            records = self.allgather_bytes(_host_identity() + address.pack() + self._sync.code)
            hosts = {r[:_DIGEST] for r in records}
            if len(hosts) != 1:
                raise RuntimeError(
                    f"rank {self.rank}: transport='ipc' needs every rank on one host, but the "
                    f"{self.size} ranks run on {len(hosts)} hosts; use transport='nccl'"
                )
            links.connect([Address.unpack(r[_DIGEST:-1]) for r in records], timeout)
        except BaseException:
            links.close(0)
            raise
        self._links = links
        hosts_only = [r for r, record in enumerate(records) if record[-1:] != _DeviceFlags.code]
        if hosts_only and self.sync == "device":
            self._sync = _HostHandshake(self, f"ranks {hosts_only} cannot use device flags")

    # --- the transfer ---

    def _require_connected(self) -> None:
        if self._links is None:
            raise RuntimeError(f"rank {self.rank}: an IpcRing of {self.size} ranks has no "
                               "links; build it with IpcRing.from_env")  # fmt: skip

    def _push(self, flight: Flight, sends: list) -> list:
        """Push ``sends`` into ``rank + shift``'s slot, take ``rank - shift``'s push into ours.

        Returns at once with device flags; with the host handshake once both peers' hosts
        reached this exchange (see the module doc).
        """
        key = self._channel_key(flight, sends)
        channel = self._channels.get(key)
        if channel is None:
            channel = self._channels[key] = self._open_channel(key, sends, flight)
        k = channel.count
        channel.count += 1
        self._push_channel(channel, k, flight, sends)
        return channel.received[k % 2]

    def _channel_key(self, flight: Flight, sends: list) -> tuple:
        step = flight.shift % self.size
        return flight.tag, step, tuple((tuple(a.shape), str(a.dtype)) for a in sends)

    def _check_capturable(self, flight: Flight, sends: list) -> None:
        if self._channel_key(flight, sends) not in self._channels:
            # a channel's setup (host messages, an allocation) cannot be captured
            raise CaptureDeferred(f"rank {self.rank}: {flight.describe(self.rank)} sets up a "
                                  "channel: an eager call does it first")  # fmt: skip

    def _own_streams(self) -> list:
        return [self.stream, self._join]

    def _push_channel(self, channel: _Channel, k: int, flight: Flight, sends: list) -> None:
        """Exchange ``k`` of ``channel``, in the module doc's order."""
        sync, slot = self._sync, k % 2
        runtime = self._cupy.cuda.runtime
        # our slot's previous contents (exchange k-2) are read by now, and so are those of
        # dest's slot (for k < 2 there were none: the host handshake says nothing, the device
        # flags write and await the value the setup gave the words; see the module doc)
        sync.freed(channel, k, flight)
        sync.await_freed(channel, k, flight)
        start = self._mark(COMM)
        base = channel.remote_base + slot * channel.slot_bytes
        for send, offset in zip(sends, channel.offsets, strict=True):
            if send.nbytes:
                runtime.memcpyAsync(base + offset, send.data.ptr, send.nbytes,
                                    runtime.memcpyDeviceToDevice, self.stream.ptr)  # fmt: skip
        sync.pushed(channel, k, flight)
        self._trace_transfer(flight, start, sends)
        self._sent.record(self.stream)
        self._join.wait_event(self._sent)
        sync.await_pushed(channel, k, flight)  # the source's push into our slot
        flight.event = self._event_on(self._join)
        sync.received(channel, k, flight)
        # the watchdog takes over from here (host waits of the handshake had their own timeout)
        flight.issued_at = time.monotonic()
        self._arm(flight)

    def _open_channel(self, key: tuple, sends: list, flight: Flight) -> _Channel:
        """Allocate, export and swap handles for a new channel (every rank does it in turn)."""
        cupy = self._cupy
        runtime = cupy.cuda.runtime
        offsets, total = [], 0
        for a in sends:
            offsets.append(total)
            total += -(-a.nbytes // _ALIGN) * _ALIGN
        slot_bytes = max(total, _ALIGN)
        # its own cudaMalloc (exportable as a whole): two slots, then the flag words
        memory = cupy.cuda.Memory(2 * slot_bytes + _ALIGN)
        received = [
            [cupy.ndarray(a.shape, a.dtype, memptr=cupy.cuda.MemoryPointer(memory, s * slot_bytes
                                                                           + off))
             for a, off in zip(sends, offsets, strict=True)]
            for s in range(2)
        ]  # fmt: skip
        channel = _Channel(self._channel_count, key, flight.dest, flight.source, offsets,
                           slot_bytes, memory, received)  # fmt: skip
        self._channel_count += 1
        to_source, to_dest = self._sync.exports(channel)
        header = (hashlib.sha256(repr(key).encode()).digest()[:_DIGEST] + self._sync.code
                  + _SLOT_BYTES.pack(slot_bytes) + runtime.ipcGetMemHandle(memory.ptr))  # fmt: skip
        self._send(channel.source, _SETUP_RECV, channel, 0, flight, header + to_source)
        self._send(channel.dest, _SETUP_SEND, channel, 0, flight, header + to_dest)
        dest_handle, from_dest = self._setup_from(channel.dest, _SETUP_RECV, channel, flight,
                                                  header)  # fmt: skip
        channel.remote_base = runtime.ipcOpenMemHandle(dest_handle)
        source_handle, from_source = self._setup_from(channel.source, _SETUP_SEND, channel,
                                                      flight, header)  # fmt: skip
        self._sync.open(channel, from_dest, source_handle, from_source)
        return channel

    def _setup_from(self, peer: int, kind: int, channel: _Channel, flight: Flight,
                    header: bytes) -> tuple[bytes, bytes]:  # fmt: skip
        """``peer``'s setup message, checked against ours: its memory handle and the rest."""
        theirs = self._await(peer, kind, channel, 0, flight, "set up the same exchange")
        if theirs[:_DIGEST] != header[:_DIGEST]:
            self._refuse(peer, flight, "issued a different exchange sequence (its tag, shift, "
                         "shapes or dtypes differ)")  # fmt: skip
        mode = theirs[_DIGEST : _DIGEST + 1]
        if mode != self._sync.code:
            their_mode = "device" if mode == _DeviceFlags.code else "host"
            reason = f" ({self.sync_reason})" if self.sync_reason else ""
            self._refuse(peer, flight, f"orders pushes by {their_mode} sync, this rank by "
                         f"{self.sync}{reason}; see {FLAGS_ENV} in cuparing/comm/ipc.py")
        (their_slot,) = _SLOT_BYTES.unpack(theirs[_DIGEST + 1 : _HEADER - _HANDLE])
        if their_slot != channel.slot_bytes:
            self._refuse(peer, flight, f"issued a different exchange sequence (its slots hold "
                         f"{their_slot} bytes, ours {channel.slot_bytes})")  # fmt: skip
        return theirs[_HEADER - _HANDLE : _HEADER], theirs[_HEADER:]

    def _refuse(self, peer: int, flight: Flight, what: str) -> None:
        error = RingError(f"rank {self.rank}: {flight.describe(self.rank)}: rank {peer} {what}")
        self._fail(error)
        raise fresh(error)

    # --- host messages ---

    def _send(self, peer: int, kind: int, channel: _Channel, seq: int, flight: Flight,
              payload: bytes = b"") -> None:  # fmt: skip
        try:
            self._links.send(peer, kind, channel.index, seq, payload)
        except LinkError as exc:
            self._link_failed(exc, peer, flight, None)

    def _await(self, peer: int, kind: int, channel: _Channel, seq: int, flight: Flight,
               what: str) -> bytes:  # fmt: skip
        try:
            return self._links.wait(peer, kind, channel.index, seq, self.timeout)
        except LinkError as exc:
            self._link_failed(exc, peer, flight, what)

    def _link_failed(self, exc: LinkError, peer: int, flight: Flight, what: str | None):
        if self._error is not None:  # the watchdog or the failure channel got there first
            raise fresh(self._error) from None
        kind = RingTimeoutError if exc.timed_out else RingError
        doing = f"waited for rank {peer} to {what}" if what else f"could not message rank {peer}"
        error = kind(
            f"rank {self.rank}: {flight.describe(self.rank)}: {doing}: {exc}. A peer is dead, "
            "stuck, or issued a different exchange sequence."
        )
        self._fail(error)
        raise fresh(error) from exc

    # --- teardown ---

    def _interrupt(self, reason: str) -> None:
        if self._links is not None:
            self._links.interrupt(reason)  # wake an exchange waiting on a peer
        # end this rank's streams' waits on its peers: the caller's stream waits behind them,
        # and a blocking sync of it (a loss's .item()) would hang on a dead peer (no abort ends
        # a stream wait as it ends NCCL's kernels)
        with contextlib.suppress(Exception), self.device:
            self._sync.release(list(self._channels.values()))

    def release_buffers(self) -> None:
        """Drop every channel's buffers, events and opened handles. Collective: every rank calls
        it at the same point (two barriers keep a peer from writing into freed memory)."""
        self.synchronize()
        self._release_captures()  # (their nodes point at the channels' memory)
        if self.size > 1:
            self.barrier()  # every push and flag write has landed
        self._close_imports()
        if self.size > 1:
            self.barrier()  # nobody holds our exports open
        self._channels.clear()

    def _close_transport(self) -> None:
        """Leave the links (waiting, up to the timeout, until the peers left too) and free this
        rank's IPC memory and events (not after a failure)."""
        links, self._links = self._links, None
        if links is not None:
            links.close(self.timeout if self._error is None else 0.0)
        if self._error is None:
            with self.device:
                self._close_imports()
            self._channels.clear()

    def _close_imports(self) -> None:
        runtime = self._cupy.cuda.runtime
        for channel in self._channels.values():
            self._sync.close(channel)
            if channel.remote_base:
                runtime.ipcCloseMemHandle(channel.remote_base)
                channel.remote_base = 0


class _HostHandshake:
    """``sync == "host"``: interprocess events, ordered by host messages (the module doc)."""

    name, code = "host", b"h"

    def __init__(self, ring: IpcRing, reason: str):
        self._ring, self.reason = ring, reason
        self._runtime = ring._cupy.cuda.runtime

    def exports(self, channel: _Channel) -> tuple[bytes, bytes]:
        """Create the channel's events; their handles for ``source`` (done) and ``dest``
        (ready)."""
        cupy = self._ring._cupy

        def ipc_events():
            return [cupy.cuda.Event(block=False, disable_timing=True, interprocess=True)
                    for _ in range(2)]  # fmt: skip

        channel.done, channel.ready = ipc_events(), ipc_events()
        handles = lambda events: b"".join(self._runtime.ipcGetEventHandle(e.ptr) for e in events)  # noqa: E731
        return handles(channel.done), handles(channel.ready)

    def open(self, channel: _Channel, from_dest: bytes, source_handle: bytes,
             from_source: bytes) -> None:  # fmt: skip
        """Open dest's done and source's ready events (source's memory is not needed)."""
        channel.remote_done = _open_events(self._runtime, from_dest)
        channel.remote_ready = _open_events(self._runtime, from_source)

    def freed(self, channel: _Channel, k: int, flight: Flight) -> None:
        if k < 2:  # nothing was read from slot k yet
            return
        ring = self._ring
        channel.done[k % 2].record(ring.stream)
        ring._send(channel.source, _DONE, channel, k - 2, flight)

    def await_freed(self, channel: _Channel, k: int, flight: Flight) -> None:
        if k < 2:
            return
        ring = self._ring
        ring._await(channel.dest, _DONE, channel, k - 2, flight,
                    "finish reading the buffer this rank writes into")  # fmt: skip
        self._runtime.streamWaitEvent(ring.stream.ptr, channel.remote_done[k % 2], 0)

    def pushed(self, channel: _Channel, k: int, flight: Flight) -> None:
        ring = self._ring
        channel.ready[k % 2].record(ring.stream)
        ring._send(channel.dest, _READY, channel, k, flight)

    def await_pushed(self, channel: _Channel, k: int, flight: Flight) -> None:
        ring = self._ring
        ring._await(channel.source, _READY, channel, k, flight, "push its data into this rank")
        self._runtime.streamWaitEvent(ring._join.ptr, channel.remote_ready[k % 2], 0)

    def received(self, channel: _Channel, k: int, flight: Flight) -> None:
        """Nothing to note: the host messages order a slot's reuse (the module doc)."""

    def release(self, channels: list) -> None:
        """Nothing to release: a stream's wait on a peer's event cannot be ended from here (the
        module doc)."""

    def close(self, channel: _Channel) -> None:
        for event in channel.remote_done + channel.remote_ready:
            self._runtime.eventDestroy(event)
        channel.remote_done, channel.remote_ready = [], []


class _DeviceFlags:
    """``sync == "device"``: flag words written and awaited by the streams (the module doc).

    The driver's functions, the flags and the raw stream handles are looked up once: an exchange
    costs four driver calls here, and one stream wait for the slot's previous exchange, and
    creates no Python object beyond their arguments and that exchange's note (``received``).
    """

    name, code, reason = "device", b"d", None

    def __init__(self, ring: IpcRing, driver: Any):
        self._ring, self.driver = ring, driver
        self._wait_value = driver.cuStreamWaitValue32
        self._write_value = driver.cuStreamWriteValue32
        # a wait ends once the word and the awaited phase share a bit: all ones (the failure
        # release) satisfies every wait, 0 (a ready word before the first push) none
        self._and = int(driver.CUstreamWaitValue_flags.CU_STREAM_WAIT_VALUE_AND)
        # the default write is preceded by a system-wide memory barrier: the copies before it
        # are visible to whoever sees the flag
        self._fenced = int(driver.CUstreamWriteValue_flags.CU_STREAM_WRITE_VALUE_DEFAULT)
        self._copy = driver.CUstream(ring.stream.ptr)
        self._side = driver.CUstream(ring._join.ptr)
        self._side_handle = ring._join.ptr
        self.capture: CapturedExchanges | None = None  # while the ring's exchanges are captured
        self._release_stream = None
        self._release_lock = threading.Lock()

    def exports(self, channel: _Channel) -> tuple[bytes, bytes]:
        """Give this rank's flag words their first values; the memory handle in the header is
        all peers need."""
        self._initialise(channel)
        return b"", b""

    def _initialise(self, channel: _Channel) -> None:
        """``ready`` words 0 (no push yet), ``done`` words ``flag_phase(-2)`` (nothing to read
        yet: the module doc)."""
        cupy, driver = self._ring._cupy, self.driver
        # a fresh stream: the ring's own may be waiting on a peer. Synchronised before any peer,
        # told of the memory only after this, can write a flag
        stream = cupy.cuda.Stream(non_blocking=True)
        flags = channel.memory.ptr + channel.flags_at
        cupy.cuda.runtime.memsetAsync(flags, 0, _ALIGN, stream.ptr)
        for s in range(2):
            word = driver.CUdeviceptr(flags + _DONE_AT + 4 * s)
            self._issue_write(driver.CUstream(stream.ptr), word, flag_phase(s - 2))
        stream.synchronize()

    def open(self, channel: _Channel, from_dest: bytes, source_handle: bytes,
             from_source: bytes) -> None:  # fmt: skip
        """Map source's memory (where source is dest, its one mapping serves both) and
        address the four pairs of words."""
        if channel.source == channel.dest:
            channel.source_base = channel.remote_base
        else:
            channel.source_base = self._ring._cupy.cuda.runtime.ipcOpenMemHandle(source_handle)
        at = channel.flags_at

        def words(base: int, offset: int) -> list:
            return [self.driver.CUdeviceptr(base + at + offset + 4 * s) for s in range(2)]

        ours = channel.memory.ptr
        channel.words = _Words(words(ours, _READY_AT), words(ours, _DONE_AT),
                               words(channel.remote_base, _READY_AT),
                               words(channel.source_base, _DONE_AT))  # fmt: skip

    def freed(self, channel: _Channel, k: int, flight: Flight) -> None:
        self._after_previous(channel, k % 2)
        self._write(self._copy, channel.words.source_done[k % 2], k - 2, channel)

    def await_freed(self, channel: _Channel, k: int, flight: Flight) -> None:
        self._wait(self._copy, channel.words.done[k % 2], k - 2, channel)

    def pushed(self, channel: _Channel, k: int, flight: Flight) -> None:
        self._write(self._copy, channel.words.dest_ready[k % 2], k, channel)

    def await_pushed(self, channel: _Channel, k: int, flight: Flight) -> None:
        self._wait(self._side, channel.words.ready[k % 2], k, channel)

    def received(self, channel: _Channel, k: int, flight: Flight) -> None:
        """Exchange ``k`` is issued (``flight.event``, on the side stream, follows its *await
        pushed*): the copy stream's *freed* of exchange ``k + 2`` waits for it."""
        channel.previous[k % 2] = Received(flight.event, self._side_handle, self.capture)

    def _after_previous(self, channel: _Channel, slot: int) -> None:
        """Before *freed* of exchange ``k`` (``slot = k % 2``): the copy stream waits for the
        *received* event of exchange ``k - 2``, so that its *await pushed* was evaluated before
        the writer may push exchange ``k`` (whose phase that wait would not accept: the module
        doc). Inside a capture the wait is a graph edge where exchange ``k - 2`` was captured
        too; one issued before the capture is waited for by each launch of the graph instead
        (:meth:`cuparing.comm.ipc_capture.CapturedExchanges.before_launch`): a captured stream
        cannot wait for work outside its graph."""
        previous = channel.previous[slot]
        if previous is None or previous.capture is not self.capture:
            return
        self._ring.stream.wait_event(previous.event)

    def _write(self, stream: Any, word: Any, step: int, channel: _Channel) -> None:
        """An exchange's flag write of ``flag_phase(step)`` on one of the ring's streams
        (recorded while captured)."""
        self._issue_write(stream, word, flag_phase(step))
        if self.capture is not None:
            self.capture.add(stream, channel, True, word, step, self._fenced)

    def _issue_write(self, stream: Any, word: Any, value: int) -> None:
        (err,) = self._write_value(stream, word, value, self._fenced)
        if err:
            raise RuntimeError(f"cuStreamWriteValue32 of {value} failed: {err!r}")

    def _wait(self, stream: Any, word: Any, step: int, channel: _Channel) -> None:
        """An exchange's wait for ``flag_phase(step)`` on one of the ring's streams (recorded
        while captured)."""
        value = flag_phase(step)
        (err,) = self._wait_value(stream, word, value, self._and)
        if err:
            raise RuntimeError(f"cuStreamWaitValue32 for {value} failed: {err!r}")
        if self.capture is not None:
            self.capture.add(stream, channel, False, word, step, self._and)

    def release(self, channels: list) -> None:
        """After a failure: write all ones into this rank's own flag words, so every wait of its
        streams ends (an AND wait accepts any word that shares a bit with its phase). What they
        then read is void (every call of the failed ring raises), and a peer that is in fact
        alive has been told of the failure by the failure channel; this rank's pushes that the
        release lets through land in slots only a failed ring reads. The watchdog writes it
        again every few polls until the ring closes: a peer's write queued before the failure
        may land after it."""
        with self._release_lock:  # (the failing thread and the watchdog's renewals)
            if self._release_stream is None:
                # a stream of its own (the ring's are waiting), kept until the ring goes: its
                # writes may be queued; it only ever holds writes, so it never blocks
                self._release_stream = self._ring._cupy.cuda.Stream(non_blocking=True)
            handle = self.driver.CUstream(self._release_stream.ptr)
        # straight to the driver, each word on its own: a failure may come while the main
        # thread captures exchanges, and these writes belong to no capture (nor does one refused
        # write stop the others)
        for channel in channels:
            if channel.words is None:
                continue
            for word in (*channel.words.ready, *channel.words.done):
                with contextlib.suppress(Exception):
                    self._write_value(handle, word, _WORD, self._fenced)

    def close(self, channel: _Channel) -> None:
        if channel.source_base and channel.source_base != channel.remote_base:
            self._ring._cupy.cuda.runtime.ipcCloseMemHandle(channel.source_base)
        channel.source_base, channel.words = 0, None


def _choose_sync(ring: IpcRing) -> _HostHandshake | _DeviceFlags:
    """Device flags where cuda-bindings and the device allow them (the module doc)."""
    driver, why = _flags_driver()
    if why is None:
        why = _stream_mem_ops_missing(driver, ring.device.id)
    return _HostHandshake(ring, why) if why else _DeviceFlags(ring, driver)


def _flags_driver() -> tuple[Any, str | None]:
    """(cuda-bindings' driver, None) where device flags may be used, else (None, why not:
    ``CUPARING_IPC_FLAGS=0`` or no cuda-bindings)."""
    if os.environ.get(FLAGS_ENV, "1").strip() == "0":
        return None, f"{FLAGS_ENV}=0"
    driver = import_driver()
    if driver is None:
        return None, "cuda-bindings is not installed (the cuda12/cuda13 extras)"
    return driver, None


def copy_engines_unavailable(world_size: int) -> str | None:
    """Why a ring of ``world_size`` processes on this host, bound to GPUs ``0 .. world_size - 1``
    (their local ranks), could not run on the copy engines with device flags, or None: device
    flags switched off, no cuda-bindings, fewer GPUs visible to this process than ranks, a GPU
    without stream memory operations, or a pair of those GPUs without peer access (MIG slices,
    PCIe servers without peer-to-peer). Asks the driver only (no context is created); every
    process of one host that sees the same GPUs gets the same answer."""
    driver, why = _flags_driver()
    if why is not None:
        return why
    try:
        return _peers_unavailable(driver, world_size)
    except Exception as exc:  # noqa: BLE001 - e.g. no libcuda to load: then NCCL, not a crash
        return f"the driver could not be asked ({type(exc).__name__}: {exc})"


def _peers_unavailable(driver: Any, world_size: int) -> str | None:
    """:func:`copy_engines_unavailable`'s driver queries (cuda-bindings' ``driver``)."""
    (err,) = driver.cuInit(0)
    if err:
        return f"cuInit failed: {err!r}"
    err, count = driver.cuDeviceGetCount()
    if err or count < world_size:
        return f"this process sees {0 if err else count} GPUs, fewer than the {world_size} ranks"
    devices = []
    for ordinal in range(world_size):
        missing = _stream_mem_ops_missing(driver, ordinal)
        if missing:
            return missing
        err, device = driver.cuDeviceGet(ordinal)
        if err:
            return f"cuDeviceGet({ordinal}) failed: {err!r}"
        devices.append(device)
    for a, device in enumerate(devices):
        for b, peer in enumerate(devices):
            if a == b:
                continue
            err, can = driver.cuDeviceCanAccessPeer(device, peer)
            if err or not can:
                return f"GPU {a} cannot access GPU {b}'s memory directly (no peer access)"
    return None


def _stream_mem_ops_missing(driver: Any, ordinal: int) -> str | None:
    """Why GPU ``ordinal`` cannot run ``cuStreamWaitValue32``/``cuStreamWriteValue32``, or None.

    The v2 stream memory operations (CUDA 11.7 on) are there on every platform and have no
    attribute of their own; before them ``CU_DEVICE_ATTRIBUTE_CAN_USE_STREAM_MEM_OPS_V1`` says.
    """
    (err,) = driver.cuInit(0)
    if err:
        return f"cuInit failed: {err!r}"
    err, version = driver.cuDriverGetVersion()
    if err:
        return f"cuDriverGetVersion failed: {err!r}"
    if version >= 11070:
        return None
    err, device = driver.cuDeviceGet(ordinal)
    attribute = driver.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_CAN_USE_STREAM_MEM_OPS_V1
    enabled = 0 if err else driver.cuDeviceGetAttribute(attribute, device)[1]
    if enabled:
        return None
    return (f"the CUDA driver ({version}) has no stream memory operations on GPU {ordinal} "
            "(CU_DEVICE_ATTRIBUTE_CAN_USE_STREAM_MEM_OPS_V1 is 0; NVreg_EnableStreamMemOPs=1 "
            "enables them)")  # fmt: skip


def _open_events(runtime, data: bytes) -> list[int]:
    return [runtime.ipcOpenEventHandle(data[i : i + _HANDLE]) for i in (0, _HANDLE)]


def _host_identity() -> bytes:
    """16 bytes naming this machine (its boot id, else its host name)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            name = f.read().strip()
    except OSError:
        name = socket.gethostname()
    return hashlib.sha256(name.encode()).digest()[:_DIGEST]
