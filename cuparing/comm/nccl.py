"""The NCCL ring: one process per GPU, K/V moved by grouped NCCL send/recv on the comm stream.

Everything but the transfer is the core's (:mod:`cuparing.comm.gpu_ring`: streams, ordering,
double buffers, watchdog, failure channel, trace, collective). One exchange here is one
``groupStart()``; per array a send to ``rank + shift`` and a receive from ``rank - shift``;
``groupEnd()``; then the *received* event on the comm stream. Ungrouped send/recv would deadlock,
and every rank must issue the same sequence of NCCL calls.

This module also joins a ring from the launcher's environment (:func:`join_from_env`): bind the
GPU, settle the run token, exchange the NCCL unique id (and where rank 0's failure channel
listens), create the communicator. The copy-engine ring (:mod:`cuparing.comm.ipc`) joins the same
way and keeps the communicator for its setup.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from . import gpu_ring as core
from . import health as health_channel
from .gpu_ring import Flight, GpuRing
from .rendezvous import UNIQUE_ID_BYTES, RankInfo, exchange_payload, id_bytes, share_run_token
from .trace import COMM


def import_nccl():
    """``cupy.cuda.nccl``, or a RuntimeError that says what to install."""
    core.import_cupy()
    from cupy.cuda import nccl  # sets nccl.available = False (with a warning) when NCCL is absent

    if not getattr(nccl, "available", False):
        raise RuntimeError(
            "CuPy cannot load NCCL (cupy.cuda.nccl.available is False): install "
            "nvidia-nccl-cu13 (or -cu12) matching your CuPy, or run with world size 1"
        )
    return nccl


class NcclCollective:
    """A CuPy ``NcclCommunicator`` as a ring core's :class:`~cuparing.comm.gpu_ring.Collective`,
    plus the grouped send/recv of one ring step. Every dtype moves as the bytes it is stored as
    (``ml_dtypes.bfloat16`` included)."""

    def __init__(self, comm: Any, nccl: Any):
        self.comm, self._nccl = comm, nccl

    def allgather(self, send_ptr: int, recv_ptr: int, nbytes: int, stream_ptr: int) -> None:
        self.comm.allGather(send_ptr, recv_ptr, nbytes, self._nccl.NCCL_UINT8, stream_ptr)

    def send_recv(self, pairs: Iterable[tuple[Any, Any]], dest: int, source: int,
                  stream_ptr: int) -> None:  # fmt: skip
        """One NCCL group: each ``(send, recv)`` array pair goes to ``dest`` / comes from
        ``source`` (empty arrays are skipped on both sides alike)."""
        nccl, comm = self._nccl, self.comm
        byte = nccl.NCCL_UINT8
        nccl.groupStart()
        try:
            for send, recv in pairs:
                if send.nbytes:
                    comm.send(send.data.ptr, send.nbytes, byte, dest, stream_ptr)
                    comm.recv(recv.data.ptr, recv.nbytes, byte, source, stream_ptr)
        finally:
            nccl.groupEnd()

    def check(self) -> None:
        check = getattr(self.comm, "check_async_error", None)
        if check is not None:
            check()

    def abort(self) -> None:
        self.comm.abort()

    def destroy(self) -> None:
        self.comm.destroy()


def collective_of(comm: Any) -> NcclCollective | None:
    """``comm`` (a CuPy ``NcclCommunicator``; ``None`` for a ring of one) wrapped for the core."""
    return NcclCollective(comm, import_nccl()) if comm is not None else None


class NcclRing(GpuRing):
    """One rank of a ring of GPUs joined by NCCL (or a GPU ring of one, without NCCL).

    Build it with :meth:`from_env`; the constructor takes an existing communicator.

    Args:
        rank, size: this rank and the world size.
        comm: a ``cupy.cuda.nccl.NcclCommunicator`` (``None`` only when ``size == 1``).
        device, timeout, trace: as in :class:`~cuparing.comm.gpu_ring.GpuRing`.
    """

    def __init__(self, rank: int, size: int, comm: Any = None, device: int | None = None,
                 timeout: float = 300.0, trace: bool = False):  # fmt: skip
        super().__init__(rank, size, collective_of(comm), device, timeout, trace)

    @classmethod
    def from_env(cls, timeout: float = 300.0, init_file: str | None = None,
                 device: int | None = None, trace: bool = False,
                 health: bool | None = None) -> NcclRing:  # fmt: skip
        """Join the ring the launcher describes (torchrun, mpirun, srun, ``cuparing.launch``).

        See :func:`join_from_env` for what happens and for ``timeout``, ``init_file``,
        ``device`` and ``health``; ``trace`` is as in :class:`~cuparing.comm.gpu_ring.GpuRing`.

        Raises:
            RuntimeError: CuPy or NCCL missing, too few GPUs, or the rendezvous failed.
            ValueError: inconsistent launcher variables.
        """
        return join_from_env(timeout, init_file, device, health).build(cls, timeout, trace)

    _transport_capturable = True  # NCCL's grouped send/recv can be captured into a CUDA graph

    def _push(self, flight: Flight, sends: list) -> list:
        received = self._receive_buffers(flight.tag, sends)
        self._arm(flight)  # before NCCL is called: groupEnd itself may block on a peer
        start = self._mark(COMM)
        self._collective.send_recv(zip(sends, received, strict=True), flight.dest, flight.source,
                                   self.stream.ptr)  # fmt: skip
        flight.event = self._event_on(self.stream)
        self._trace_transfer(flight, start, sends)
        return received


@dataclass
class Membership:
    """What :func:`join_from_env` found out: enough to build any NCCL-based ring."""

    rank: int
    size: int
    device: int
    comm: Any  # the NCCL communicator; None for a world of one
    run_token: str
    health_address: tuple[str, int] | None  # None: no failure channel for this rank
    health_server: health_channel.HealthServer | None  # rank 0's own server

    def build(self, ring_class: type, timeout: float, trace: bool) -> Any:
        """``ring_class(rank, size, comm, device, timeout, trace)``, joined to the failure
        channel."""
        ring = ring_class(self.rank, self.size, self.comm, self.device, timeout, trace)
        ring.join_health(self.health_address, self.run_token, min(timeout, 30.0),
                         self.health_server)  # fmt: skip
        return ring


def join_from_env(timeout: float = 300.0, init_file: str | None = None, device: int | None = None,
                  health: bool | None = None) -> Membership:  # fmt: skip
    """Join the job the launcher's environment describes and create the NCCL communicator.

    Binds GPU ``local_rank`` (or ``device``) *before* creating the communicator, settles the run
    token (:func:`cuparing.comm.rendezvous.share_run_token`), exchanges the NCCL unique id and the
    address of rank 0's failure channel
    (:func:`cuparing.comm.rendezvous.exchange_payload`), and creates the communicator. World
    size 1 needs none of it. ``NCCL_NVLS_ENABLE`` defaults to ``0`` (NVLink multicast is never
    needed for a ring) unless already set.

    Args:
        timeout: seconds for the rendezvous, and for any exchange to make progress.
        init_file: rendezvous through this shared file instead of TCP.
        device: GPU index to use instead of ``local_rank``.
        health: join the failure channel, so that one rank's failure aborts every rank at once.
            Default: on unless ``CUPARING_HEALTH=0``. Rank 0 decides for the ring: if it runs no
            channel, no rank joins one. A rank that cannot reach the channel warns on stderr and
            relies on its watchdog alone.

    Raises:
        RuntimeError: CuPy or NCCL missing, too few GPUs, or the rendezvous failed.
        ValueError: inconsistent launcher variables.
    """
    cupy = core.import_cupy()
    info = RankInfo.from_env()
    index = info.local_rank if device is None else int(device)
    count = cupy.cuda.runtime.getDeviceCount()
    if not 0 <= index < count:
        raise RuntimeError(
            f"rank {info.rank}: needs GPU {index} (local rank {info.local_rank}) but "
            f"{count} are visible (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}); start at most one "
            "process per GPU on each host"
        )
    cupy.cuda.Device(index).use()  # NCCL binds the communicator to the current device
    if info.world_size == 1:
        return Membership(0, 1, index, None, info.run_token, None, None)
    nccl = import_nccl()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    info = share_run_token(info, timeout)  # the secret every channel below demands proof of
    if health is None:
        health = os.environ.get("CUPARING_HEALTH", "1").strip().lower() not in ("0", "false")
    server = None
    if info.rank == 0 and health:
        # listening before the exchange: its address travels with the unique id
        server = health_channel.HealthServer.for_rank0(info.world_size, info.run_token,
                                                       info.master_addr)  # fmt: skip
    try:

        def payload() -> bytes:
            uid = id_bytes(nccl.get_unique_id())
            return uid + (health_channel.encode_address(*server.address) if server else b"")

        data = exchange_payload(info, payload, timeout, init_file)
        comm = _communicator(nccl, info, data[:UNIQUE_ID_BYTES], timeout)
    except BaseException:
        if server is not None:
            server.close(linger=False)
        raise
    address = health_channel.decode_address(data[UNIQUE_ID_BYTES:])
    if server is not None:
        address = server.local_address  # rank 0 reaches its own server on loopback
    return Membership(info.rank, info.world_size, index, comm, info.run_token,
                      address if health else None, server)  # fmt: skip


def _communicator(nccl, info: RankInfo, unique_id: bytes, timeout: float):
    """``NcclCommunicator(world, id, rank)``, whichever id form this CuPy takes; warns on stderr
    if it has not returned after ``timeout`` seconds (NCCL init itself cannot time out)."""
    warn = threading.Timer(timeout, lambda: print(
        f"[cuparing] rank {info.rank}: NCCL communicator init has not finished after "
        f"{timeout:g} s; is every one of the {info.world_size} ranks alive?",
        file=sys.stderr, flush=True,
    ))  # fmt: skip
    warn.daemon = True
    warn.start()
    try:
        try:
            return nccl.NcclCommunicator(info.world_size, unique_id, info.rank)
        except TypeError:
            # CuPy before 14 takes the id as a tuple of 128 C chars (signed)
            signed = tuple(b - 256 if b > 127 else b for b in unique_id)
            return nccl.NcclCommunicator(info.world_size, signed, info.rank)
    except nccl.NcclError as exc:
        raise RuntimeError(
            f"rank {info.rank}: creating the NCCL communicator ({info.world_size} ranks) "
            f"failed: {exc}"
        ) from exc
    finally:
        warn.cancel()
