"""The NCCL ring: one process per GPU, K/V moved by grouped send/recv on a dedicated stream.

Ordering (no host synchronisation anywhere on the hot path):

- ``exchange`` records a *ready* event on the caller's current stream and makes the comm stream
  wait on it, so the sends read finished data, and receive buffers being reused are no longer
  read by work queued before the call. Then one ``groupStart()``; per array a send to
  ``rank + shift`` and a receive from ``rank - shift``; ``groupEnd()``; then a *received* event
  on the comm stream.
- ``wait()`` makes the caller's current stream wait on *received* and returns the buffers. The
  host does not block.

Work on received buffers must be queued on the stream that is current when ``wait()`` and the
next ``exchange`` are called (or be joined to it): that stream is what the events order.

Receive buffers are allocated once per ``(tag, shapes, dtypes)`` as a pair and used alternately,
which is the ownership rule of :mod:`cuparing.comm.base`: a buffer returned by ``wait()`` is
overwritten by the second following exchange on its tag. :meth:`NcclRing.release_buffers` drops
them (for programs whose shapes keep changing).

NCCL calls have no timeout. A watchdog thread polls the oldest unfinished exchange; if it makes no
progress for ``timeout`` seconds (measured from when the exchange before it finished, so a long
queue of work is not mistaken for a hang), the watchdog prints the diagnosis to stderr, aborts the
communicator (which releases the GPU kernels and any host call stuck in NCCL) and the next
``exchange``/``wait``/``synchronize`` raises :class:`RingTimeoutError`. A single exchange step
(including the compute it waits for) must therefore fit in ``timeout``.

A watchdog only sees its own exchanges, so alone it finds a dead rank one hop per ``timeout``.
Rings built by :meth:`NcclRing.from_env` therefore also join the failure channel of
:mod:`cuparing.comm.health`: a rank whose watchdog fires or whose NCCL call fails reports it
there, rank 0 relays it (or the death of a rank's process) to every rank, and each aborts its
communicator and raises :class:`RingError` naming the failed rank, within about a second. Leaving
the ring by :meth:`NcclRing.close` or by the interpreter's normal exit is no failure; leaving a
``with ring:`` block or the program on an exception is reported as one.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import sys
import threading
import time
import weakref
from collections import defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from . import health as _health
from . import trace as _trace
from .base import PendingExchange, Ring, RingError, RingTimeoutError
from .local import _Ready
from .rendezvous import UNIQUE_ID_BYTES, RankInfo, exchange_payload, id_bytes

_POLL_S = 0.02  # watchdog period: one cudaEventQuery per poll, far below any sane timeout


def _import_cupy():
    try:
        import cupy
    except ImportError as exc:
        raise RuntimeError(
            "the NCCL ring needs CuPy: pip install 'cuparing[cuda13]' (or cupy-cuda12x)"
        ) from exc
    return cupy


def _import_nccl():
    _import_cupy()
    from cupy.cuda import nccl  # sets nccl.available = False (with a warning) when NCCL is absent

    if not getattr(nccl, "available", False):
        raise RuntimeError(
            "CuPy cannot load NCCL (cupy.cuda.nccl.available is False): install "
            "nvidia-nccl-cu13 (or -cu12) matching your CuPy, or run with world size 1"
        )
    return nccl


@dataclass
class _Flight:
    """One exchange between issue and observed completion."""

    tag: str
    seq: int
    shift: int
    dest: int
    source: int
    issued_at: float
    event: Any = None  # the 'received' event; None while the NCCL group is being issued
    keep: list = field(default_factory=list)  # send arrays, alive until the sends are done

    def describe(self, rank: int) -> str:
        return (
            f"exchange {self.tag!r} #{self.seq} (shift {self.shift}: rank {rank} sends to rank "
            f"{self.dest}, receives from rank {self.source})"
        )


class _NcclPending(PendingExchange):
    def __init__(self, ring: NcclRing, flight: _Flight, received: list, window_start: Any):
        self._ring, self._flight, self._received = ring, flight, received
        self._window_start = window_start

    def wait(self) -> list[Any]:
        ring = self._ring
        ring._raise_if_failed()
        with ring.device:
            caller = ring._cupy.cuda.get_current_stream()
            if self._window_start is not None and ring._trace is not None:
                # the caller's stream between exchange() and wait() is the compute this
                # transfer is meant to hide behind
                flight = self._flight
                ring._trace.add(
                    _trace.COMPUTE, f"compute during {flight.tag}#{flight.seq}",
                    self._window_start, ring._trace.mark(_trace.COMPUTE),
                )  # fmt: skip
                self._window_start = None
            caller.wait_event(self._flight.event)
        return list(self._received)


class NcclRing(Ring):
    """One rank of a ring of GPUs joined by NCCL (or a GPU ring of one, without NCCL).

    Build it with :meth:`from_env`; the constructor takes an existing communicator.

    Args:
        rank, size: this rank and the world size.
        comm: a ``cupy.cuda.nccl.NcclCommunicator`` (``None`` only when ``size == 1``).
        device: the CUDA device index this rank drives (default: the current device).
        timeout: seconds an exchange may make no progress before the ring is aborted.
        trace: record CUDA events around every exchange for :meth:`write_trace`. Also enabled by
            the environment variable ``CUPARING_TRACE=path``, which writes the trace to
            ``path`` (``{rank}`` replaced, else ``.rank<r>`` inserted) on :meth:`close`.
    """

    def __init__(self, rank: int, size: int, comm: Any = None, device: int | None = None,
                 timeout: float = 300.0, trace: bool = False):  # fmt: skip
        cupy = _import_cupy()
        if size > 1 and comm is None:
            raise ValueError(f"a ring of size {size} needs an NCCL communicator, got comm=None")
        if not 0 <= rank < size:
            raise ValueError(f"rank must be in [0, {size}), got {rank=}")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout=}")
        self._cupy = cupy
        self.rank, self.size, self.timeout = rank, size, float(timeout)
        self.device = cupy.cuda.Device(device) if device is not None else cupy.cuda.Device()
        with self.device:
            self.stream = cupy.cuda.Stream(non_blocking=True)  # the legacy stream would serialise
        self._comm = comm
        self._nccl = _import_nccl() if comm is not None else None
        self._buffers: dict[tuple, list] = {}  # (tag, specs) -> [pair of buffer lists, next index]
        self._seq: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()
        self._flights: deque[_Flight] = deque()
        self._progress_at = time.monotonic()
        self._error: RingError | None = None
        self._closed = False
        self._barrier_buf = None
        self._trace_path = os.environ.get("CUPARING_TRACE") or None
        self._trace: _trace.TraceRecorder | None = None
        self._stopped_trace: _trace.TraceRecorder | None = None
        if trace or self._trace_path:
            self.start_trace()
        self._health: _health.HealthClient | None = None  # see _join_health
        self._health_server: _health.HealthServer | None = None
        self._at_exit = None
        self._stop = threading.Event()
        self._watchdog = None
        if comm is not None:
            self._watchdog = threading.Thread(
                target=self._watch, name=f"cuparing-watchdog-rank{rank}", daemon=True
            )
            self._watchdog.start()

    # --- construction ---

    @classmethod
    def from_env(cls, timeout: float = 300.0, init_file: str | None = None,
                 device: int | None = None, trace: bool = False,
                 health: bool | None = None) -> NcclRing:  # fmt: skip
        """Join the ring the launcher describes (torchrun, mpirun, srun, ``cuparing.launch``).

        Binds GPU ``local_rank`` (or ``device``) *before* creating the communicator, exchanges
        the NCCL unique id and the address of rank 0's failure channel (see
        :func:`cuparing.comm.rendezvous.exchange_payload`), creates the communicator, then joins
        the failure channel (:mod:`cuparing.comm.health`). World size 1 needs neither.
        ``NCCL_NVLS_ENABLE`` defaults to ``0`` (NVLink multicast is never needed for a ring)
        unless already set.

        Args:
            timeout: seconds for the rendezvous, and for any exchange to make progress.
            init_file: rendezvous through this shared file instead of TCP.
            device: GPU index to use instead of ``local_rank``.
            trace: as in :class:`NcclRing`.
            health: join the failure channel, so that one rank's failure aborts every rank at
                once. Default: on unless ``CUPARING_HEALTH=0``. Rank 0 decides for the ring:
                if it runs no channel, no rank joins one. A rank that cannot reach the channel
                warns on stderr and relies on its watchdog alone.

        Raises:
            RuntimeError: CuPy or NCCL missing, too few GPUs, or the rendezvous failed.
            ValueError: inconsistent launcher variables.
        """
        cupy = _import_cupy()
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
            return cls(0, 1, None, index, timeout, trace)
        nccl = _import_nccl()
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        if health is None:
            health = os.environ.get("CUPARING_HEALTH", "1").strip().lower() not in ("0", "false")
        server = None
        if info.rank == 0 and health:
            # listening before the exchange: its address travels with the unique id
            server = _health.HealthServer.for_rank0(info.world_size, info.run_token,
                                                    info.master_addr)  # fmt: skip
        try:

            def payload() -> bytes:
                uid = id_bytes(nccl.get_unique_id())
                return uid + (_health.encode_address(*server.address) if server else b"")

            data = exchange_payload(info, payload, timeout, init_file)
            comm = _communicator(nccl, info, data[:UNIQUE_ID_BYTES], timeout)
        except BaseException:
            if server is not None:
                server.close(linger=False)
            raise
        ring = cls(info.rank, info.world_size, comm, index, timeout, trace)
        address = _health.decode_address(data[UNIQUE_ID_BYTES:])
        if server is not None:
            ring._health_server = server
            address = server.local_address  # rank 0 reaches its own server on loopback
        if address is not None and health:
            ring._join_health(address, info.run_token, min(timeout, 30.0))
        return ring

    def _join_health(self, address: tuple[str, int], run_token: str, timeout: float) -> None:
        """Connect to rank 0's failure channel; on failure warn and go on without it."""
        try:
            self._health = _health.HealthClient(address, self.rank, self.size, run_token,
                                                self._peer_failed, timeout)  # fmt: skip
        except RuntimeError as exc:
            print(f"[cuparing] warning: {exc}; this rank learns of other ranks' failures only "
                  "through its own watchdog", file=sys.stderr, flush=True)  # fmt: skip
            return
        # a program that ends without close() must not look dead to ranks still finishing
        self._at_exit = functools.partial(_leave_at_exit, weakref.ref(self))
        atexit.register(self._at_exit)

    @classmethod
    def solo(cls, device: int | None = None, trace: bool = False) -> NcclRing:
        """A GPU ring of one (no NCCL): exchanges hand the arrays straight back."""
        return cls(0, 1, None, device, float("inf"), trace)

    # --- the protocol ---

    def exchange(self, arrays: Sequence[Any], shift: int = 1, tag: str = "kv") -> PendingExchange:
        """Send ``arrays`` (C-contiguous or not) to ``rank + shift``, receive from ``rank - shift``.

        Non-contiguous inputs are copied on the caller's stream first. Returns at once.

        Raises:
            TypeError: an input is not a CuPy array.
            ValueError: an input lives on another GPU.
            RingTimeoutError, RingError: an earlier exchange timed out or NCCL failed.
        """
        self._raise_if_failed()
        if self._closed:
            raise RingError(f"rank {self.rank}: exchange {tag!r} on a closed ring")
        arrays = list(arrays)
        if self.size == 1 or shift % self.size == 0:
            return _Ready(arrays)  # to ourselves: nothing moves
        cupy = self._cupy
        with self.device:
            caller = cupy.cuda.get_current_stream()
            sends = [self._contiguous(a, i, tag) for i, a in enumerate(arrays)]
            received = self._receive_buffers(tag, sends)
            seq = self._seq[tag]
            self._seq[tag] += 1
            flight = _Flight(
                tag, seq, shift, (self.rank + shift) % self.size, (self.rank - shift) % self.size,
                time.monotonic(), keep=sends,
            )  # fmt: skip
            window_start = self._trace.mark(_trace.COMPUTE) if self._trace is not None else None
            ready = cupy.cuda.Event(disable_timing=True)
            ready.record(caller)
            self.stream.wait_event(ready)
            with self._lock:  # armed before NCCL is called: groupEnd itself may block on a peer
                self._flights.append(flight)
            start = self._trace.mark(_trace.COMM) if self._trace is not None else None
            self._issue(flight, sends, received)
            done = cupy.cuda.Event(disable_timing=True)
            done.record(self.stream)
            flight.event = done
            if self._trace is not None:
                self._trace.add(_trace.COMM, f"{tag}#{seq}", start, self._trace.mark(_trace.COMM),
                                bytes=sum(a.nbytes for a in sends), peer_send=flight.dest,
                                peer_recv=flight.source)  # fmt: skip
        return _NcclPending(self, flight, received, window_start)

    def _contiguous(self, a: Any, index: int, tag: str) -> Any:
        cupy = self._cupy
        if not isinstance(a, cupy.ndarray):
            raise TypeError(
                f"NcclRing.exchange({tag!r}): arrays[{index}] must be a CuPy array, got "
                f"{type(a).__module__}.{type(a).__name__}"
            )
        if a.device.id != self.device.id:
            raise ValueError(
                f"NcclRing.exchange({tag!r}): arrays[{index}] is on GPU {a.device.id}, this rank "
                f"drives GPU {self.device.id}"
            )
        return a if a.flags.c_contiguous else cupy.ascontiguousarray(a)

    def _receive_buffers(self, tag: str, sends: list) -> list:
        key = (tag, tuple((a.shape, a.dtype) for a in sends))
        entry = self._buffers.get(key)
        if entry is None:
            pair = [[self._cupy.empty(a.shape, a.dtype) for a in sends] for _ in range(2)]
            entry = self._buffers[key] = [pair, 0]
        pair, index = entry
        entry[1] = 1 - index
        return pair[index]

    def _issue(self, flight: _Flight, sends: list, received: list) -> None:
        nccl, comm, stream = self._nccl, self._comm, self.stream.ptr
        # bytes on the wire: every dtype (ml_dtypes.bfloat16 included) moves as it is stored
        byte = nccl.NCCL_UINT8
        try:
            nccl.groupStart()
            try:
                for send, recv in zip(sends, received, strict=True):
                    if send.nbytes:
                        comm.send(send.data.ptr, send.nbytes, byte, flight.dest, stream)
                        comm.recv(recv.data.ptr, recv.nbytes, byte, flight.source, stream)
            finally:
                nccl.groupEnd()
        except Exception as exc:  # NcclError, or a call on an aborted communicator
            error = self._error or RingError(
                f"rank {self.rank}: NCCL failed in {flight.describe(self.rank)}: {exc}"
            )
            self._fail(error)
            raise _fresh(error) from exc

    def synchronize(self) -> None:
        """Block until every exchange issued so far has completed; raise if one timed out.

        Polls events (never a blocking CUDA sync, which a dead peer would turn into a hang).
        """
        self._raise_if_failed()
        delay = 1e-5
        while True:
            self._poll()
            self._raise_if_failed()
            with self._lock:
                if not self._flights:
                    return
            time.sleep(delay)
            delay = min(delay * 2, 1e-3)

    def barrier(self) -> None:
        """Block until every rank reaches this call (an NCCL all-reduce of one int, then a
        poll). Collective: every rank must call it at the same point of its exchange sequence."""
        if self.size == 1:
            return
        self._raise_if_failed()
        cupy, nccl = self._cupy, self._nccl
        with self.device:
            if self._barrier_buf is None:
                self._barrier_buf = cupy.zeros(1, dtype=cupy.int32)
            seq = self._seq["barrier"]
            self._seq["barrier"] += 1
            flight = _Flight("barrier", seq, 0, -1, -1, time.monotonic())
            with self._lock:
                self._flights.append(flight)
            ptr = self._barrier_buf.data.ptr
            try:
                self._comm.allReduce(ptr, ptr, 1, nccl.NCCL_INT32, nccl.NCCL_SUM, self.stream.ptr)
            except Exception as exc:
                error = RingError(f"rank {self.rank}: NCCL barrier #{seq} failed: {exc}")
                self._fail(error)
                raise _fresh(error) from exc
            done = cupy.cuda.Event(disable_timing=True)
            done.record(self.stream)
            flight.event = done
        self.synchronize()

    def check(self) -> None:
        """Raise the ring's pending error, if any, without blocking (cheap; call it at the end
        of a step to learn of a timeout the watchdog found after the last ring call)."""
        self._raise_if_failed()

    def release_buffers(self) -> None:
        """Drop the cached receive buffers (after :meth:`synchronize`, when no buffer returned
        by ``wait()`` is still in use)."""
        self.synchronize()
        self._buffers.clear()

    def close(self) -> None:
        """Finish outstanding exchanges (bounded by the timeout), write the trace if
        ``CUPARING_TRACE`` asked for one, and destroy the communicator. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._error is None:
            with contextlib.suppress(RingError):
                self.synchronize()
        if self._trace_path and self._trace is not None and self._error is None:
            path = self._trace_path
            if "{rank}" not in path:
                stem, ext = os.path.splitext(path)
                path = f"{stem}.rank{{rank}}{ext or '.json'}"
            self.write_trace(path)
        self._leave_health(linger=True)
        self._stop.set()
        if self._watchdog is not None:
            self._watchdog.join()
        comm, self._comm = self._comm, None
        if comm is not None and self._error is None:  # after a failure _fail already aborted it
            with self.device:
                comm.destroy()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None and not isinstance(exc, RingError):
            # the others would wait for our exchanges until their watchdogs fire: tell them now
            self._fail(RingError(f"rank {self.rank}: left the ring on {exc_type.__name__}: {exc}"))
        self.close()

    def _leave_health(self, linger: bool) -> None:
        """Say BYE on the failure channel (our connection ending is no failure from now on) and,
        on rank 0, stop the server: lingering, it relays on among ranks still running."""
        if self._at_exit is not None:
            atexit.unregister(self._at_exit)
            self._at_exit = None
        if self._health is not None:
            self._health.close()
        if self._health_server is not None:
            self._health_server.close(linger=linger)
            if not linger:
                self._health_server.join(1.0)  # CLOSING must be out before the process ends

    # --- tracing ---

    def start_trace(self) -> None:
        """Start (or restart, forgetting earlier intervals) recording a timeline."""
        self._stopped_trace = None
        if self._trace is None:
            cupy = self._cupy

            def mark(track: str):
                event = cupy.cuda.Event()
                event.record(
                    self.stream if track == _trace.COMM else cupy.cuda.get_current_stream()
                )
                return event

            self._trace = _trace.TraceRecorder(mark, cupy.cuda.get_elapsed_time)
        self._trace.clear()

    def stop_trace(self) -> None:
        """Stop recording (what was recorded stays readable until :meth:`start_trace`)."""
        recorder, self._trace = self._trace, None
        self._stopped_trace = recorder

    def trace_compute(self, label: str):
        """Context manager marking the work queued on the current stream inside it as compute."""
        if self._trace is None:
            return contextlib.nullcontext()
        return self._trace.span(_trace.COMPUTE, label)

    def trace_intervals(self) -> list[_trace.Interval]:
        """The recorded intervals in microseconds (synchronises the current stream and ring)."""
        recorder = self._trace or self._stopped_trace
        if recorder is None:
            return []
        self.synchronize()
        with self.device:
            self._cupy.cuda.get_current_stream().synchronize()
        return recorder.intervals()

    def write_trace(self, path: str) -> str:
        """Write this rank's timeline as Chrome/Perfetto JSON; returns the path written."""
        return _trace.write_chrome_trace(path, self.trace_intervals(), self.rank)

    def hidden_transfer_fraction(self) -> float:
        """Fraction of recorded transfer time that overlapped compute (``nan`` if none)."""
        return _trace.hidden_transfer_fraction(self.trace_intervals())

    # --- failure handling ---

    def _watch(self) -> None:
        self.device.use()  # CUDA calls from this thread must target this rank's device
        while not self._stop.wait(_POLL_S):
            if self._error is not None:
                return
            try:
                self._poll()
                check = getattr(self._comm, "check_async_error", None)
                if check is not None and self._comm is not None:
                    check()  # NCCL's own view: a network peer that vanished, a remote error
            except RingError:
                return
            except Exception as exc:  # NcclError or a CUDA error: the ring is unusable
                self._fail(RingError(f"rank {self.rank}: the ring failed: {exc}"))
                return

    def _poll(self) -> None:
        """Retire finished exchanges; abort the ring if the oldest one made no progress."""
        timed_out = None
        with self._lock:
            now = time.monotonic()
            while self._flights:
                flight = self._flights[0]
                if flight.event is not None and flight.event.done:
                    self._flights.popleft()  # its sends are done: drop our references to them
                    self._progress_at = now
                    continue
                if now - max(flight.issued_at, self._progress_at) > self.timeout:
                    timed_out = flight
                break
        if timed_out is not None and self._error is None:
            self._fail(RingTimeoutError(
                f"rank {self.rank}: {timed_out.describe(self.rank)} made no progress within "
                f"{self.timeout:g} s; the NCCL communicator was aborted. A peer is dead, stuck, "
                "or issued a different exchange sequence."
            ))  # fmt: skip

    def _peer_failed(self, rank: int, reason: str) -> None:
        """The failure channel's callback (its reader thread): another rank failed."""
        error = RingError(f"rank {self.rank}: ring aborted because rank {rank} failed: {reason}")
        self._fail(error, report=False)  # it came from the channel: do not send it back

    def _fail(self, error: RingError, report: bool = True) -> None:
        with self._lock:
            if self._error is not None:
                return
            self._error = error
        # say it now: the main thread may be blocked in a CUDA call until the abort releases it
        print(f"[cuparing] {type(error).__name__}: {error}", file=sys.stderr, flush=True)
        if report and self._health is not None:
            self._health.report(str(error))  # before the abort, which may take a while
        comm = self._comm
        if comm is not None:
            with contextlib.suppress(Exception):
                comm.abort()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise _fresh(self._error)


def _leave_at_exit(ref: weakref.ref) -> None:
    """At interpreter exit, leave a ring that was not closed: after an uncaught exception (which
    the interpreter has stored in ``sys.last_value`` by now) as a failure, else cleanly."""
    ring = ref()
    if ring is None or ring._closed:
        return
    crash = getattr(sys, "last_value", None)
    if crash is not None:
        ring._fail(RingError(f"rank {ring.rank}: the process exits on {type(crash).__name__}: "
                             f"{crash}"))  # fmt: skip
    ring._leave_health(linger=False)


def _fresh(error: RingError) -> RingError:
    """A new exception of the same type and message (one object raised from many call sites
    would pile up tracebacks)."""
    return type(error)(str(error))


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
