"""The copy-engine ring: GPUs of one host push K/V into each other's memory through CUDA IPC.

Opt in with ``Ring.from_env(transport="ipc")`` or ``CUPARING_TRANSPORT=ipc``. NCCL's send/recv
runs on SMs and slows the attention kernels it overlaps; a ``cudaMemcpyAsync`` into a peer's
buffer runs on a copy engine (BENCHMARKS.md, "Transport: NCCL vs the copy-engine push").
Everything but the transfer is the ring core's (:mod:`cuparing.comm.gpu_ring`: watchdog, failure
channel, trace, ``wait()``, ownership rules, barrier and collective); the ring joins like the NCCL
ring (:func:`cuparing.comm.nccl.join_from_env`) and keeps that NCCL communicator for the
collective that sets the links up and for :meth:`IpcRing.release_buffers`.

Per channel ``(tag, shift, shapes, dtypes)`` every rank allocates, at its first exchange, one
``cudaMalloc`` holding two receive slots, and creates interprocess events: two *done* events (its
slot is free again) and two *ready* events (it has written the destination's slot). It gives the
rank that writes into it (``rank - shift``) its memory handle and done handles, and the rank it
writes into (``rank + shift``) its ready handles, over :mod:`cuparing.comm.peerlink`.

Exchange ``k`` of a channel uses slot ``s = k % 2``. On this rank, in this order:

1. The copy stream waits for the caller's stream (the arrays to send are written; everything
   queued before this call, which includes every read of the slot's previous contents, exchange
   ``k - 2``, is done). If ``k >= 2``: record ``done[s]`` on the copy stream and send
   ``DONE k-2`` to ``rank - shift``.
2. If ``k >= 2``: wait (host) for ``DONE k-2`` from ``rank + shift``, then make the copy stream
   wait on that rank's ``done[s]``. Copy the arrays into its slot ``s``, record ``ready[s]`` and a
   local *sent* event on the copy stream, send ``READY k`` to ``rank + shift``.
3. Wait (host) for ``READY k`` from ``rank - shift``; a side stream waits on *sent* and on that
   rank's ``ready[s]``, then records the exchange's *received* event, which ``wait()`` hands to
   the caller's stream as on every GPU ring.

The host messages exist because ``cudaStreamWaitEvent`` waits for the event's *latest record at
the time of the call*: waiting on a peer's event before the peer has recorded it for this step
waits for nothing. A peer cannot re-record ``ready[s]`` (exchange ``k + 2``) before it has this
rank's ``DONE k``, sent at this rank's exchange ``k + 2``, after step 3 of exchange ``k``; the
same argument covers ``done[s]``. Every rank sends before it waits, so the host messages cannot
deadlock; every GPU wait refers to a record issued earlier in the same exchange order on every
rank, so the streams cannot either. The host never waits for the GPU: ``exchange`` returns once
both neighbours' hosts have reached the same exchange (usually at once: hosts run ahead of their
GPUs), and each of those waits gives up after ``timeout`` with :class:`RingTimeoutError` naming
the rank, tag, exchange number and peer, reported through the failure channel. A peer whose
process ends closes its link: waits on it raise :class:`RingError` at once.

Teardown is collective in the sense that a rank frees the memory and events it exported only
after every peer said it has left (:meth:`close` sends and awaits a BYE, bounded by the timeout),
because a peer's queued copies and waits may still refer to them. After a failure nothing is
freed (a stream may still wait on a dead peer's event; the process is about to end).
"""

from __future__ import annotations

import hashlib
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from .base import RingError, RingTimeoutError
from .gpu_ring import Flight, GpuRing, fresh
from .nccl import collective_of, join_from_env
from .peerlink import Address, LinkError, PeerLinks
from .trace import COMM

_READY, _DONE, _SETUP_RECV, _SETUP_SEND = 1, 2, 3, 4  # peerlink message kinds (0 is BYE)
_ALIGN = 256  # byte alignment of each array inside a slot
_HANDLE = 64  # bytes of a cudaIpcMemHandle_t / cudaIpcEventHandle_t
_DIGEST = 16


@dataclass
class _Channel:
    """One ``(tag, shift, shapes, dtypes)`` stream of exchanges: both directions on this rank."""

    index: int  # creation order, the same on every rank
    key: tuple
    dest: int  # rank + shift: we write into its slots
    source: int  # rank - shift: it writes into ours
    offsets: list[int]  # of each array inside a slot
    slot_bytes: int
    memory: Any  # our two receive slots (one cudaMalloc, exported to `source`)
    received: list  # [slot 0 arrays, slot 1 arrays], views of `memory`
    done: list  # our IPC events: our slot s is free again (opened by `source`)
    ready: list  # our IPC events: we wrote dest's slot s (opened by `dest`)
    remote_base: int = 0  # dest's slots, opened
    remote_done: list = field(default_factory=list)  # dest's done events, opened (raw handles)
    remote_ready: list = field(default_factory=list)  # source's ready events, opened
    count: int = 0  # exchanges issued


class IpcRing(GpuRing):
    """One rank of a ring of GPUs of one host that moves data by copy-engine pushes (CUDA IPC).

    Build it with :meth:`from_env` (or ``Ring.from_env(transport="ipc")``). Same protocol,
    ownership rules, tracing and failure handling as every
    :class:`~cuparing.comm.gpu_ring.GpuRing`; see the module doc for the handshake.

    Args:
        rank, size, device, timeout, trace: as in :class:`~cuparing.comm.gpu_ring.GpuRing`.
        comm: a ``cupy.cuda.nccl.NcclCommunicator`` for the collective (``None`` only when
            ``size == 1``).
        links: this rank's connected :class:`~cuparing.comm.peerlink.PeerLinks` (``from_env``
            makes them; needed when ``size > 1``).
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

    @classmethod
    def from_env(cls, timeout: float = 300.0, init_file: str | None = None,
                 device: int | None = None, trace: bool = False,
                 health: bool | None = None) -> IpcRing:  # fmt: skip
        """As :meth:`cuparing.comm.nccl.NcclRing.from_env`, then connects the ranks' host links
        (collective).

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
        links, address = PeerLinks.listen(self.rank, self.size)
        try:
            records = self.allgather_bytes(_host_identity() + address.pack())
            hosts = {r[:_DIGEST] for r in records}
            if len(hosts) != 1:
                raise RuntimeError(
                    f"rank {self.rank}: transport='ipc' needs every rank on one host, but the "
                    f"{self.size} ranks run on {len(hosts)} hosts; use the default NCCL transport"
                )
            links.connect([Address.unpack(r[_DIGEST:]) for r in records], timeout)
        except BaseException:
            links.close(0)
            raise
        self._links = links

    # --- the transfer ---

    def _require_connected(self) -> None:
        if self._links is None:
            raise RuntimeError(f"rank {self.rank}: an IpcRing of {self.size} ranks has no "
                               "links; build it with IpcRing.from_env")  # fmt: skip

    def _push(self, flight: Flight, sends: list) -> list:
        """Push ``sends`` into ``rank + shift``'s slot, take ``rank - shift``'s push into ours.

        Returns once both peers' hosts reached this exchange (see the module doc).
        """
        step = flight.shift % self.size
        key = (flight.tag, step, tuple((tuple(a.shape), str(a.dtype)) for a in sends))
        channel = self._channels.get(key)
        if channel is None:
            channel = self._channels[key] = self._open_channel(key, sends, flight)
        k = channel.count
        channel.count += 1
        self._push_channel(channel, k, flight, sends)
        return channel.received[k % 2]

    def _push_channel(self, channel: _Channel, k: int, flight: Flight, sends: list) -> None:
        """Steps 1-3 of the module doc for exchange ``k`` of ``channel``."""
        cupy, slot = self._cupy, k % 2
        runtime = cupy.cuda.runtime
        if k >= 2:  # 1. our slot's previous contents (exchange k-2) are read by now
            channel.done[slot].record(self.stream)
            self._send(channel.source, _DONE, channel, k - 2, flight)
            self._after_peer_freed(channel, k, flight)  # 2. ... and so is dest's
        start = self._mark(COMM)
        base = channel.remote_base + slot * channel.slot_bytes
        for send, offset in zip(sends, channel.offsets, strict=True):
            if send.nbytes:
                runtime.memcpyAsync(base + offset, send.data.ptr, send.nbytes,
                                    runtime.memcpyDeviceToDevice, self.stream.ptr)  # fmt: skip
        channel.ready[slot].record(self.stream)
        sent = self._event_on(self.stream)
        self._trace_transfer(flight, start, sends)
        self._send(channel.dest, _READY, channel, k, flight)
        self._after_peer_pushed(channel, k, flight)  # 3. the source's push into our slot
        self._join.wait_event(sent)
        flight.event = self._event_on(self._join)
        # the watchdog takes over from here: the host waits above had their own timeout
        flight.issued_at = time.monotonic()
        self._arm(flight)

    def _after_peer_freed(self, channel: _Channel, k: int, flight: Flight) -> None:
        """The copy stream waits until ``dest`` has finished with its slot (exchange k-2)."""
        self._await(channel.dest, _DONE, channel, k - 2, flight,
                    "finish reading the buffer this rank writes into")  # fmt: skip
        self._cupy.cuda.runtime.streamWaitEvent(self.stream.ptr, channel.remote_done[k % 2], 0)

    def _after_peer_pushed(self, channel: _Channel, k: int, flight: Flight) -> None:
        """The side stream waits until ``source`` has written our slot (exchange k)."""
        self._await(channel.source, _READY, channel, k, flight,
                    "push its data into this rank")  # fmt: skip
        self._cupy.cuda.runtime.streamWaitEvent(self._join.ptr, channel.remote_ready[k % 2], 0)

    def _open_channel(self, key: tuple, sends: list, flight: Flight) -> _Channel:
        """Allocate, export and swap handles for a new channel (every rank does it in turn)."""
        cupy = self._cupy
        runtime = cupy.cuda.runtime
        offsets, total = [], 0
        for a in sends:
            offsets.append(total)
            total += -(-a.nbytes // _ALIGN) * _ALIGN
        slot_bytes = max(total, _ALIGN)
        memory = cupy.cuda.Memory(2 * slot_bytes)  # its own cudaMalloc: exportable as a whole
        received = [
            [cupy.ndarray(a.shape, a.dtype, memptr=cupy.cuda.MemoryPointer(memory, s * slot_bytes
                                                                           + off))
             for a, off in zip(sends, offsets, strict=True)]
            for s in range(2)
        ]  # fmt: skip

        def ipc_event():
            return cupy.cuda.Event(block=False, disable_timing=True, interprocess=True)

        channel = _Channel(self._channel_count, key, flight.dest, flight.source, offsets,
                           slot_bytes, memory, received, [ipc_event(), ipc_event()],
                           [ipc_event(), ipc_event()])  # fmt: skip
        self._channel_count += 1
        digest = hashlib.sha256(repr(key).encode()).digest()[:_DIGEST]
        handles = lambda events: b"".join(runtime.ipcGetEventHandle(e.ptr) for e in events)  # noqa: E731
        self._send(channel.source, _SETUP_RECV, channel, 0, flight, digest
                   + struct.pack("!Q", slot_bytes) + runtime.ipcGetMemHandle(memory.ptr)
                   + handles(channel.done))  # fmt: skip
        self._send(channel.dest, _SETUP_SEND, channel, 0, flight, digest + handles(channel.ready))
        theirs = self._await(channel.dest, _SETUP_RECV, channel, 0, flight,
                             "set up the same exchange")  # fmt: skip
        self._check_digest(theirs, digest, channel.dest, flight)
        (their_slot,) = struct.unpack("!Q", theirs[_DIGEST : _DIGEST + 8])
        if their_slot != slot_bytes:
            self._mismatch(channel.dest, flight, f"its slots hold {their_slot} bytes, ours "
                           f"{slot_bytes}")  # fmt: skip
        handles_at = _DIGEST + 8
        channel.remote_base = runtime.ipcOpenMemHandle(theirs[handles_at : handles_at + _HANDLE])
        channel.remote_done = _open_events(runtime, theirs[handles_at + _HANDLE :])
        theirs = self._await(channel.source, _SETUP_SEND, channel, 0, flight,
                             "set up the same exchange")  # fmt: skip
        self._check_digest(theirs, digest, channel.source, flight)
        channel.remote_ready = _open_events(runtime, theirs[_DIGEST:])
        return channel

    def _check_digest(self, payload: bytes, digest: bytes, peer: int, flight: Flight) -> None:
        if payload[:_DIGEST] != digest:
            self._mismatch(peer, flight, "its tag, shift, shapes or dtypes differ")

    def _mismatch(self, peer: int, flight: Flight, what: str) -> None:
        error = RingError(f"rank {self.rank}: {flight.describe(self.rank)}: rank {peer} issued a "
                          f"different exchange sequence ({what})")  # fmt: skip
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

    def release_buffers(self) -> None:
        """Drop every channel's buffers, events and opened handles. Collective: every rank calls
        it at the same point (two barriers keep a peer from writing into freed memory)."""
        self.synchronize()
        if self.size > 1:
            self.barrier()  # every push has landed
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
            if channel.remote_base:
                runtime.ipcCloseMemHandle(channel.remote_base)
                channel.remote_base = 0
            for event in channel.remote_done + channel.remote_ready:
                runtime.eventDestroy(event)
            channel.remote_done, channel.remote_ready = [], []


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
