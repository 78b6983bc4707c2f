"""The GPU ring core: everything one rank of a GPU ring does except moving the bytes.

A :class:`GpuRing` drives one GPU. It owns the comm stream, the double-buffered receive buffers,
the *flights* (each exchange or collective between issue and observed completion), the watchdog,
the failure channel, the trace, and the one collective (:meth:`GpuRing.allgather_bytes`, which
:meth:`GpuRing.barrier` uses too). A transport subclasses it and moves the bytes of one exchange:
:class:`cuparing.comm.nccl.NcclRing` (grouped NCCL send/recv) and
:class:`cuparing.comm.ipc.IpcRing` (copy-engine pushes through CUDA IPC).

Ordering (no host synchronisation anywhere on the hot path):

- ``exchange`` records a *ready* event on the caller's current stream and makes the comm stream
  wait on it, so the transfer reads finished data, and receive buffers being reused are no longer
  read by work queued before the call. The transport then queues the transfer and records the
  exchange's *received* event.
- ``wait()`` makes the caller's current stream wait on *received* and returns the buffers. The
  host does not block.

Work on received buffers must be queued on the stream that is current when ``wait()`` and the
next ``exchange`` are called (or be joined to it): that stream is what the events order.

Receive buffers a transport takes from :meth:`GpuRing._receive_buffers` are allocated once per
``(tag, shapes, dtypes)`` as a pair and used alternately, which is the ownership rule of
:mod:`cuparing.comm.base`: a buffer returned by ``wait()`` is overwritten by the second following
exchange on its tag. :meth:`GpuRing.release_buffers` drops them (for programs whose shapes keep
changing).

Transfers have no timeout of their own. A watchdog thread polls the oldest unfinished flight; if
it makes no progress for ``timeout`` seconds (measured from when the flight before it finished, so
a long queue of work is not mistaken for a hang), the watchdog prints the diagnosis to stderr,
aborts the communicator (which releases the GPU kernels and any host call stuck in it) and the
next ``exchange``/``wait``/``synchronize`` raises :class:`RingTimeoutError`. A single exchange step
(including the compute it waits for) must therefore fit in ``timeout``.

A watchdog only sees its own flights, so alone it finds a dead rank one hop per ``timeout``. Rings
built by ``from_env`` therefore also join the failure channel of :mod:`cuparing.comm.health`: a
rank whose watchdog fires or whose transfer fails reports it there, rank 0 relays it (or the death
of a rank's process) to every rank, and each aborts its communicator and raises
:class:`RingError` naming the failed rank, within about a second. Leaving the ring by
:meth:`GpuRing.close` or by the interpreter's normal exit is no failure; leaving a ``with ring:``
block or the program on an exception is reported as one.

A ring whose transport can be captured into a CUDA graph (:attr:`GpuRing.capturable`: NCCL's
send/recv can, and the copy-engine ring's device flags) lets a repeated ring call run as one
graph (:mod:`cuparing.backends.ring_graphs`): exchanges issued inside
:meth:`GpuRing.capturing` become graph nodes and are kept off the watchdog (their events exist
only in the graph); each replay is one flight, :meth:`GpuRing.watch`, so a dead peer still ends
a replayed call within the timeout.

What a transport supplies: ``_push(flight, sends)`` (queue one exchange on :attr:`stream`, set
``flight.event`` and arm the flight with :meth:`_arm`; return the arrays that will hold what
arrives) and, where it has state of its own, ``_require_connected``, ``_interrupt`` and
``_close_transport``. The collective goes through a :class:`Collective`.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import struct
import sys
import threading
import time
import weakref
from collections import defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from . import health as health_channel
from . import trace as tracing
from .base import (
    CaptureDeferred,
    PendingExchange,
    ReadyExchange,
    Ring,
    RingError,
    RingTimeoutError,
)

POLL_S = 0.02  # watchdog period: one cudaEventQuery per poll, far below any sane timeout
RENEW_POLLS = 5  # after a failure, the transport is interrupted again every this many polls
_LENGTH = struct.Struct("!Q")  # allgather_bytes: each rank's length, gathered first


def import_cupy():
    """The ``cupy`` module, or a RuntimeError that says what to install."""
    try:
        import cupy
    except ImportError as exc:
        raise RuntimeError(
            "the GPU ring needs CuPy: pip install 'cuparing[cuda13]' (or cupy-cuda12x)"
        ) from exc
    return cupy


class Collective(Protocol):
    """The group operation a :class:`GpuRing` needs from its communicator, and its lifetime."""

    def allgather(self, send_ptr: int, recv_ptr: int, nbytes: int, stream_ptr: int) -> None:
        """Queue on ``stream_ptr``: every rank's ``nbytes`` at ``send_ptr`` into ``recv_ptr``
        (``nbytes * size`` bytes, rank order)."""

    def check(self) -> None:
        """Raise if the communicator has seen an asynchronous error (a vanished peer)."""

    def abort(self) -> None:
        """Abort: release every queued and blocked operation (after a failure)."""

    def destroy(self) -> None:
        """Free the communicator after a clean run."""


@dataclass
class Flight:
    """One exchange (or collective) between issue and observed completion."""

    tag: str
    seq: int
    shift: int
    dest: int  # -1 for a collective or a replayed graph
    source: int
    issued_at: float
    event: Any = None  # the 'received' event; None while the transfer is being issued
    keep: list = field(default_factory=list)  # arrays the transfer reads, alive until it is done
    kind: str = "collective"  # what a flight without a peer is (see GpuRing.watch)

    def describe(self, rank: int) -> str:
        if self.dest < 0:
            return f"{self.kind} {self.tag!r} #{self.seq}"
        return (
            f"exchange {self.tag!r} #{self.seq} (shift {self.shift}: rank {rank} sends to rank "
            f"{self.dest}, receives from rank {self.source})"
        )


def fresh(error: RingError) -> RingError:
    """A new exception of the same type and message (one object raised from many call sites
    would pile up tracebacks)."""
    return type(error)(str(error))


class GpuPending(PendingExchange):
    """An exchange in flight on a :class:`GpuRing`: ``wait()`` orders the caller's stream after
    the transfer and returns the receive buffers (see the module doc)."""

    def __init__(self, ring: GpuRing, flight: Flight, received: list, window_start: Any):
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
                    tracing.COMPUTE, f"compute during {flight.tag}#{flight.seq}",
                    self._window_start, ring._trace.mark(tracing.COMPUTE),
                )  # fmt: skip
                self._window_start = None
            caller.wait_event(self._flight.event)
        return list(self._received)


class GpuRing(Ring):
    """One rank of a ring of GPUs (or a GPU ring of one, which needs no communicator).

    Build a transport's ring with its ``from_env``; the constructor takes an existing
    communicator.

    Args:
        rank, size: this rank and the world size.
        collective: the communicator's :class:`Collective` (``None`` only when ``size == 1``).
        device: the CUDA device index this rank drives (default: the current device).
        timeout: seconds an exchange may make no progress before the ring is aborted.
        trace: record CUDA events around every exchange for :meth:`write_trace`. Also enabled by
            the environment variable ``CUPARING_TRACE=path``, which writes the trace to
            ``path`` (``{rank}`` replaced, else ``.rank<r>`` inserted) on :meth:`close`.

    Raises:
        RuntimeError: CuPy is missing.
        ValueError: ``rank`` outside ``[0, size)``, ``timeout <= 0``, or no collective for
            ``size > 1``.
    """

    def __init__(self, rank: int, size: int, collective: Collective | None = None,
                 device: int | None = None, timeout: float = 300.0,
                 trace: bool = False):  # fmt: skip
        cupy = import_cupy()
        if size > 1 and collective is None:
            raise ValueError(f"a ring of size {size} needs a communicator, got comm=None")
        if not 0 <= rank < size:
            raise ValueError(f"rank must be in [0, {size}), got {rank=}")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout=}")
        self._cupy = cupy
        self.rank, self.size, self.timeout = rank, size, float(timeout)
        self.device = cupy.cuda.Device(device) if device is not None else cupy.cuda.Device()
        with self.device:
            self.stream = cupy.cuda.Stream(non_blocking=True)  # the legacy stream would serialise
        self._collective = collective
        self._buffers: dict[tuple, list] = {}  # (tag, specs) -> [pair of buffer lists, next index]
        self._seq: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()
        self._flights: deque[Flight] = deque()
        self._progress_at = time.monotonic()
        self._error: RingError | None = None
        self._closed = False
        self._capturing = False
        self._captures: weakref.WeakSet = weakref.WeakSet()  # see adopt_capture
        self._trace_path = os.environ.get("CUPARING_TRACE") or None
        self._trace: tracing.TraceRecorder | None = None
        self._stopped_trace: tracing.TraceRecorder | None = None
        if trace or self._trace_path:
            self.start_trace()
        self._health: health_channel.HealthClient | None = None  # see join_health
        self._health_server: health_channel.HealthServer | None = None
        self._at_exit = None
        self._stop = threading.Event()
        self._watchdog = None
        if collective is not None:
            self._watchdog = threading.Thread(
                target=self._watch, name=f"cuparing-watchdog-rank{rank}", daemon=True
            )
            self._watchdog.start()

    def join_health(self, address: tuple[str, int] | None, run_token: str, timeout: float,
                    server: health_channel.HealthServer | None = None) -> None:  # fmt: skip
        """Connect to rank 0's failure channel (:mod:`cuparing.comm.health`); on failure warn on
        stderr and go on with the watchdog alone.

        Args:
            address: where the channel listens (``None``: no channel, nothing to do).
            run_token: the run's token, which the channel demands proof of.
            timeout: seconds to keep trying to connect.
            server: on rank 0, its own server, which this ring then closes on :meth:`close`.
        """
        self._health_server = server
        if address is None:
            return
        try:
            self._health = health_channel.HealthClient(address, self.rank, self.size, run_token,
                                                       self._peer_failed, timeout)  # fmt: skip
        except RuntimeError as exc:
            print(f"[cuparing] warning: {exc}; this rank learns of other ranks' failures only "
                  "through its own watchdog", file=sys.stderr, flush=True)  # fmt: skip
            return
        # a program that ends without close() must not look dead to ranks still finishing
        self._at_exit = functools.partial(leave_at_exit, weakref.ref(self))
        atexit.register(self._at_exit)

    # --- the protocol ---

    def exchange(self, arrays: Sequence[Any], shift: int = 1, tag: str = "kv") -> PendingExchange:
        """Send ``arrays`` (C-contiguous or not) to ``rank + shift``, receive from ``rank - shift``.

        Non-contiguous inputs are copied on the caller's stream first. Returns without waiting
        for the GPU (a transport may wait for its peers' hosts; see its module doc).

        Raises:
            TypeError: an input is not a CuPy array.
            ValueError: an input lives on another GPU.
            RingTimeoutError, RingError: this or an earlier exchange timed out or failed.
        """
        self._raise_if_failed()
        if self._closed:
            raise RingError(f"rank {self.rank}: exchange {tag!r} on a closed ring")
        arrays = list(arrays)
        if self.size == 1 or shift % self.size == 0:
            return ReadyExchange(arrays)  # to ourselves: nothing moves
        self._require_connected()
        cupy = self._cupy
        with self.device:
            caller = cupy.cuda.get_current_stream()
            sends = [self._contiguous(a, i, tag) for i, a in enumerate(arrays)]
            seq = self._seq[tag]
            self._seq[tag] += 1
            step = shift % self.size
            flight = Flight(
                tag, seq, shift, (self.rank + step) % self.size, (self.rank - step) % self.size,
                time.monotonic(), keep=sends,
            )  # fmt: skip
            if self._capturing:
                self._check_capturable(flight, sends)  # (before anything is queued)
            window_start = self._mark(tracing.COMPUTE)
            self.stream.wait_event(self._event_on(caller))
            try:
                received = self._push(flight, sends)
            except (RingError, CaptureDeferred):
                raise
            except Exception as exc:
                if self._capturing:
                    # nothing ran: the transport refused to be captured, the ring is intact
                    raise RuntimeError(f"{flight.describe(self.rank)} could not be captured: "
                                       f"{type(exc).__name__}: {exc}") from exc  # fmt: skip
                # NcclError, a CUDA error: the ring is unusable
                error = self._error or RingError(
                    f"rank {self.rank}: {flight.describe(self.rank)} failed: "
                    f"{type(exc).__name__}: {exc}"
                )
                self._fail(error)
                raise fresh(error) from exc
        return GpuPending(self, flight, received, window_start)

    def _push(self, flight: Flight, sends: list) -> list:
        """The transport's part of :meth:`exchange` (see the module doc)."""
        raise NotImplementedError

    def _require_connected(self) -> None:
        """Raise if the transport cannot move data yet (called before each real exchange)."""

    def _check_capturable(self, flight: Flight, sends: list) -> None:
        """Inside a capture, before anything of the exchange is queued: raise
        :class:`CaptureDeferred` if the transport must run this exchange eagerly first."""

    def _contiguous(self, a: Any, index: int, tag: str) -> Any:
        cupy = self._cupy
        name = type(self).__name__
        if not isinstance(a, cupy.ndarray):
            raise TypeError(
                f"{name}.exchange({tag!r}): arrays[{index}] must be a CuPy array, got "
                f"{type(a).__module__}.{type(a).__name__}"
            )
        if a.device.id != self.device.id:
            raise ValueError(
                f"{name}.exchange({tag!r}): arrays[{index}] is on GPU {a.device.id}, this rank "
                f"drives GPU {self.device.id}"
            )
        return a if a.flags.c_contiguous else cupy.ascontiguousarray(a)

    def _receive_buffers(self, tag: str, sends: list) -> list:
        """This exchange's half of the ``(tag, shapes, dtypes)`` buffer pair."""
        key = (tag, tuple((a.shape, a.dtype) for a in sends))
        entry = self._buffers.get(key)
        if entry is None:
            pair = [[self._cupy.empty(a.shape, a.dtype) for a in sends] for _ in range(2)]
            entry = self._buffers[key] = [pair, 0]
        pair, index = entry
        entry[1] = 1 - index
        return pair[index]

    def _event_on(self, stream: Any) -> Any:
        """A fresh event recorded on ``stream`` now."""
        event = self._cupy.cuda.Event(disable_timing=True)
        event.record(stream)
        return event

    def _arm(self, flight: Flight) -> None:
        """Hand ``flight`` to the watchdog (from now on it must make progress in time); not
        while capturing: a captured exchange runs only when its graph is replayed."""
        if self._capturing:
            return
        with self._lock:
            self._flights.append(flight)

    # --- CUDA graphs ---

    _transport_capturable = False  # a transport whose exchanges can be captured sets it

    @property
    def capturable(self) -> bool:
        """Whether this ring's exchanges can be captured into a CUDA graph now: the transport
        allows it, the ring has peers, and it is not tracing (the trace's events would be
        captured). A ring is driven from one thread at a time: an exchange of another thread
        during a capture would be captured too."""
        return self._transport_capturable and self.size > 1 and self._trace is None

    @contextlib.contextmanager
    def capturing(self):
        """Within the block the caller's stream is being captured into a CUDA graph: exchanges
        are queued as usual (the comm stream joins the capture through the events that order
        it) but arm no flight.

        Yields:
            What replays of the graph need of the transport's captured operations, or None
            (nothing: NCCL's). Otherwise an object with ``matches()`` (whether the graph may
            replay now), ``key()`` (the transport's state now: instantiations of the graph
            given one state's values replay alike), ``patch(executable)`` (gives an
            instantiation the values of the state now, before its launch; raises RuntimeError
            if the driver refuses), ``before_launch(stream, after_last)`` (orders the launch
            stream, a raw handle, after what the graph's exchanges depend on outside it, but
            for the last launch where ``after_last`` says the stream waits for it already;
            raises RuntimeError if the driver refuses), ``advance(stream)`` (after a launch on
            ``stream``: records ``launched``; where the record is refused the ring fails and
            it raises RingError) and ``launched`` (an event, the last launch's end, which the
            caller's replays wait for on another stream; it outlives ``release()``).

        Raises:
            RuntimeError: the ring is not :attr:`capturable`.
        """
        if not self.capturable:
            raise RuntimeError(f"{type(self).__name__} exchanges cannot be captured now "
                               "(transport, or tracing)")  # fmt: skip
        record = self._start_capture()
        self._capturing = True
        try:
            yield record
        finally:
            self._capturing = False
            self._end_capture(record)

    def capture_failed(self) -> None:
        """After a capture that failed (its graph dropped by the caller): a stream of this ring
        that the capture had drawn in and that did not leave it would capture (and never run)
        every later exchange, so the ring fails now instead, with a clear error.

        Raises:
            RingError: one of the ring's streams is still capturing.
        """
        with self.device:
            stuck = [stream for stream in self._own_streams() if stream.is_capturing()]
        if stuck:
            error = RingError(f"rank {self.rank}: a failed CUDA-graph capture left "
                              f"{len(stuck)} of the ring's streams capturing")  # fmt: skip
            self._fail(error)
            raise fresh(error)

    def _own_streams(self) -> list:
        """The streams this ring queues exchanges on (a capture can draw them in)."""
        return [self.stream]

    def _start_capture(self) -> Any:
        """The transport's record of a capture about to start (see :meth:`capturing`)."""
        return None

    def _end_capture(self, record: Any) -> None:
        """The capture ended (whether or not it succeeded): nothing it queued ran."""

    def adopt_capture(self, captured: Any) -> None:
        """Remember a graph captured on this ring (anything with a ``release()`` method, held
        weakly): :meth:`close` releases it before destroying the communicator (whose destroy
        waits for every graph that holds its operations), :meth:`release_buffers` before
        freeing the receive buffers its nodes point at."""
        self._captures.add(captured)

    def watch(self, tag: str, stream: int) -> None:
        """Arm one flight on the work queued so far on ``stream`` (a raw CUDA stream handle),
        a replayed graph of ring calls: the watchdog aborts the
        ring if it makes no progress in time. The whole replayed call is one flight, so the
        call (not each of its exchanges) must fit in the timeout. Nothing to watch on a ring
        without a watchdog (a ring of one).

        Raises:
            RingTimeoutError, RingError: the ring has failed.
        """
        self._raise_if_failed()
        if self._watchdog is None:
            return
        seq = self._seq[tag]
        self._seq[tag] += 1
        flight = Flight(tag, seq, 0, -1, -1, time.monotonic(), kind="replayed graph")
        cuda = self._cupy.cuda
        with self.device:
            flight.event = cuda.Event(disable_timing=True)
            cuda.runtime.eventRecord(flight.event.ptr, stream)
        self._arm(flight)

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

    def allgather_bytes(self, data: bytes) -> list[bytes]:
        """Every rank's ``data``, in rank order (lengths may differ), through the communicator.

        Collective: every rank calls it at the same point of its ring calls. The comm stream
        first waits for the caller's queued work; the host then waits (polling, bounded by the
        timeout) until the bytes are back. For setup and agreement checks, not the hot path.

        Raises:
            RingTimeoutError: a rank did not take part within the timeout.
            RingError: the ring failed or is closed.
        """
        data = bytes(data)
        if self.size == 1:
            return [data]
        sizes = self._allgather_fixed(_LENGTH.pack(len(data)), "allgather")
        lengths = [_LENGTH.unpack(x)[0] for x in sizes]
        width = max(max(lengths), 1)  # a collective of 0 bytes is not portable
        padded = self._allgather_fixed(data.ljust(width, b"\0"), "allgather")
        return [part[:n] for part, n in zip(padded, lengths, strict=True)]

    def barrier(self) -> None:
        """Block until every rank reaches this call (a one-byte :meth:`allgather_bytes`).
        Collective: every rank must call it at the same point of its ring calls."""
        if self.size > 1:
            self._allgather_fixed(b"\0", "barrier")

    def _allgather_fixed(self, data: bytes, tag: str) -> list[bytes]:
        """The one flight-wrapped collective: every rank's ``data`` (all of one length)."""
        import numpy as np

        cupy, n = self._cupy, len(data)
        self._raise_if_failed()
        if self._closed:
            raise RingError(f"rank {self.rank}: collective {tag!r} on a closed ring")
        with self.device:
            send = cupy.asarray(np.frombuffer(data, dtype=np.uint8))
            recv = cupy.zeros(n * self.size, dtype=cupy.uint8)
            self.stream.wait_event(self._event_on(cupy.cuda.get_current_stream()))
            seq = self._seq[tag]
            self._seq[tag] += 1
            flight = Flight(tag, seq, 0, -1, -1, time.monotonic(), keep=[send, recv])
            self._arm(flight)
            try:
                self._collective.allgather(send.data.ptr, recv.data.ptr, n, self.stream.ptr)
            except Exception as exc:
                error = self._error or RingError(
                    f"rank {self.rank}: {flight.describe(self.rank)} failed: {exc}"
                )
                self._fail(error)
                raise fresh(error) from exc
            flight.event = self._event_on(self.stream)
            self.synchronize()
            host = bytes(cupy.asnumpy(recv).tobytes())
        return [host[i * n : (i + 1) * n] for i in range(self.size)]

    def check(self) -> None:
        """Raise the ring's pending error, if any, without blocking (cheap; call it at the end
        of a step to learn of a timeout the watchdog found after the last ring call)."""
        self._raise_if_failed()

    def release_buffers(self) -> None:
        """Drop the cached receive buffers (after :meth:`synchronize`, when no buffer returned
        by ``wait()`` is still in use), and the graphs captured on them (a later repeat captures
        again)."""
        self.synchronize()
        self._release_captures()
        self._buffers.clear()

    def _release_captures(self) -> None:
        with self.device:
            for captured in list(self._captures):
                captured.release()

    def close(self) -> None:
        """Finish outstanding exchanges (bounded by the timeout), write the trace if
        ``CUPARING_TRACE`` asked for one, destroy the communicator, then let the transport
        release what it holds. Idempotent."""
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
        self._release_captures()
        self._leave_health(linger=True)
        self._stop.set()
        if self._watchdog is not None:
            self._watchdog.join()
        collective, self._collective = self._collective, None
        if collective is not None and self._error is None:  # after a failure _fail aborted it
            with self.device:
                collective.destroy()
        self._close_transport()

    def _close_transport(self) -> None:
        """Release the transport's own resources (called last by :meth:`close`)."""

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
                    self.stream if track == tracing.COMM else cupy.cuda.get_current_stream()
                )
                return event

            self._trace = tracing.TraceRecorder(mark, cupy.cuda.get_elapsed_time)
        self._trace.clear()

    def stop_trace(self) -> None:
        """Stop recording (what was recorded stays readable until :meth:`start_trace`)."""
        recorder, self._trace = self._trace, None
        self._stopped_trace = recorder

    def trace_compute(self, label: str):
        """Context manager marking the work queued on the current stream inside it as compute."""
        if self._trace is None:
            return contextlib.nullcontext()
        return self._trace.span(tracing.COMPUTE, label)

    def trace_intervals(self) -> list[tracing.Interval]:
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
        return tracing.write_chrome_trace(path, self.trace_intervals(), self.rank)

    def hidden_transfer_fraction(self) -> float:
        """Fraction of recorded transfer time that overlapped compute (``nan`` if none)."""
        return tracing.hidden_transfer_fraction(self.trace_intervals())

    def _mark(self, track: str) -> Any:
        """A trace mark on ``track`` now, or ``None`` when not tracing."""
        return self._trace.mark(track) if self._trace is not None else None

    def _trace_transfer(self, flight: Flight, start: Any, sends: list) -> None:
        """Record the transfer queued on the comm stream since the mark ``start``."""
        if self._trace is not None:
            self._trace.add(tracing.COMM, f"{flight.tag}#{flight.seq}", start,
                            self._trace.mark(tracing.COMM), bytes=sum(a.nbytes for a in sends),
                            peer_send=flight.dest, peer_recv=flight.source)  # fmt: skip

    # --- failure handling ---

    def _watch(self) -> None:
        self.device.use()  # CUDA calls from this thread must target this rank's device
        polls = 0
        while not self._stop.wait(POLL_S):
            if self._error is not None:
                # after a failure, until close(): interrupt the transport again (what ended its
                # streams' waits, a peer's late write can undo)
                polls += 1
                if polls % RENEW_POLLS == 0:
                    with contextlib.suppress(Exception):
                        self._interrupt(str(self._error))
                continue
            try:
                self._poll()
                collective = self._collective
                if collective is not None:
                    collective.check()  # the communicator's own view: a vanished network peer
            except RingError:
                return
            except Exception as exc:  # NcclError or a CUDA error: the ring is unusable
                self._fail(RingError(f"rank {self.rank}: the ring failed: {exc}"))
                return

    def _poll(self) -> None:
        """Retire finished flights; abort the ring if the oldest one made no progress."""
        timed_out = None
        with self._lock:
            now = time.monotonic()
            while self._flights:
                flight = self._flights[0]
                if flight.event is not None and flight.event.done:
                    self._flights.popleft()  # its transfer is done: drop our references
                    self._progress_at = now
                    continue
                if now - max(flight.issued_at, self._progress_at) > self.timeout:
                    timed_out = flight
                break
        if timed_out is not None and self._error is None:
            self._fail(RingTimeoutError(
                f"rank {self.rank}: {timed_out.describe(self.rank)} made no progress within "
                f"{self.timeout:g} s; the communicator was aborted. A peer is dead, stuck, "
                "or issued a different exchange sequence."
            ))  # fmt: skip

    def _peer_failed(self, rank: int, reason: str) -> None:
        """The failure channel's callback (its reader thread): another rank failed."""
        error = RingError(f"rank {self.rank}: ring aborted because rank {rank} failed: {reason}")
        self._fail(error, report=False)  # it came from the channel: do not send it back

    def _fail(self, error: RingError, report: bool = True) -> None:
        """Record the ring's first error, say it, report it, abort; then wake the transport."""
        with self._lock:
            first = self._error is None
            if first:
                self._error = error
        if first:
            # say it now: the main thread may be blocked in a CUDA call until the abort frees it
            print(f"[cuparing] {type(error).__name__}: {error}", file=sys.stderr, flush=True)
            if report and self._health is not None:
                self._health.report(str(error))  # before the abort, which may take a while
            collective = self._collective
            if collective is not None:
                with contextlib.suppress(Exception):
                    collective.abort()
        self._interrupt(str(self._error))

    def _interrupt(self, reason: str) -> None:
        """Wake host waits and end device waits of the transport's own: called on every
        failure, then again by the watchdog every ``RENEW_POLLS`` polls until close (so it
        must be idempotent)."""

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise fresh(self._error)


def leave_at_exit(ref: weakref.ref) -> None:
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
