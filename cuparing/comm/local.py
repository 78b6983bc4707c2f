"""In-process ranks: the CPU mirror of the NCCL ring, and :func:`simulate`.

Each simulated rank is a thread holding a :class:`LocalRing`. An exchange posts copies of the
arrays into the receiver's mailbox (so nothing is shared between ranks, as on real devices) and
``wait()`` blocks until the matching message arrives, another rank fails, or the ring's deadline
passes. :func:`simulate` returns or raises by that deadline (plus a short grace), whatever a
rank is doing: a rank blocked outside the ring cannot be stopped, so it is reported and left
behind as a daemon thread.
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

from .base import PendingExchange, ReadyExchange, Ring, RingError, RingTimeoutError


class _Hub:
    """Mailboxes shared by the ranks of one simulated ring, and its deadline.

    ``deadline`` (``time.monotonic()`` seconds) is ``timeout`` from the hub's creation: every
    wait of every rank ends by then, so the ring as a whole is bounded by ``timeout``.
    ``waiting`` maps each rank inside a wait to what it waits for (for the timeout report).
    """

    def __init__(self, size: int, timeout: float):
        self.size = size
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.cond = threading.Condition()
        self.mail: dict[tuple, list] = {}
        self.failed_rank: int | None = None
        self.waiting: dict[int, str] = {}

    def post(self, key: tuple, arrays: list) -> None:
        with self.cond:
            self.mail[key] = arrays
            self.cond.notify_all()

    def fail(self, rank: int) -> None:
        with self.cond:
            if self.failed_rank is None:
                self.failed_rank = rank
            self.cond.notify_all()


class _LocalPending(PendingExchange):
    def __init__(self, ring: LocalRing, key: tuple, peer: int, what: str):
        self._ring, self._key, self._peer, self._what = ring, key, peer, what

    def wait(self) -> list[Any]:
        hub, ring = self._ring._hub, self._ring
        with hub.cond:
            hub.waiting[ring.rank] = f"waiting for rank {self._peer} at {self._what}"
            try:
                arrived = hub.cond.wait_for(
                    lambda: self._key in hub.mail or hub.failed_rank is not None,
                    timeout=max(0.0, hub.deadline - time.monotonic()),
                )
            finally:
                del hub.waiting[ring.rank]
            if self._key in hub.mail:
                return hub.mail.pop(self._key)
            if arrived:
                raise RingError(
                    f"rank {ring.rank}: ring aborted while waiting for rank {self._peer} at "
                    f"{self._what}, because rank {hub.failed_rank} failed"
                )
        raise RingTimeoutError(
            f"rank {ring.rank}: no data from rank {self._peer} at {self._what} within "
            f"{ring.timeout:g} s; the peer is dead, stuck, or issued a different exchange sequence"
        )


class LocalRing(Ring):
    """One simulated rank of an in-process ring (NumPy or any array with ``.copy()``)."""

    def __init__(self, hub: _Hub, rank: int):
        self._hub = hub
        self.rank = rank
        self.size = hub.size
        self.timeout = hub.timeout
        self._sequence: dict[str, int] = defaultdict(int)

    def exchange(self, arrays: Sequence[Any], shift: int = 1, tag: str = "kv") -> PendingExchange:
        dest = (self.rank + shift) % self.size
        source = (self.rank - shift) % self.size
        seq = self._sequence[tag]
        self._sequence[tag] += 1
        self._hub.post((dest, self.rank, tag, seq), [a.copy() for a in arrays])
        what = f"exchange {tag!r} #{seq} (shift {shift})"
        return _LocalPending(self, (self.rank, source, tag, seq), source, what)

    def allgather_bytes(self, data: bytes) -> list[bytes]:
        """Every rank's ``data`` in rank order, through the hub's mailboxes (see
        :meth:`cuparing.comm.base.Ring.allgather_bytes`)."""
        data = bytes(data)
        channel = ("allgather",)  # not a str: no exchange tag can share its mailboxes
        seq = self._sequence[channel]
        self._sequence[channel] += 1
        peers = [r for r in range(self.size) if r != self.rank]
        for peer in peers:
            self._hub.post((peer, self.rank, channel, seq), [data])
        parts = {self.rank: data}
        for peer in peers:
            key = (self.rank, peer, channel, seq)
            parts[peer] = _LocalPending(self, key, peer, f"allgather #{seq}").wait()[0]
        return [parts[r] for r in range(self.size)]


class SoloRing(Ring):
    """A ring of one: exchanges hand the arrays straight back (what :func:`cuparing.attention`
    runs its one-step plan on, and ``ring_attention`` on one device in benchmarks and tests)."""

    rank = 0
    size = 1
    timeout = float("inf")

    def exchange(self, arrays: Sequence[Any], shift: int = 1, tag: str = "kv") -> PendingExchange:
        return ReadyExchange(arrays)

    def agree(self, fields) -> None:
        """Nothing to compare: a ring of one agrees with itself."""


def simulate(world_size: int, fn: Callable[[Ring], Any], timeout: float = 300.0) -> list[Any]:
    """Run ``fn(ring)`` on ``world_size`` in-process ranks (threads) and collect their results.

    While the ranks run, each BLAS thread pool of the process is capped at its share of the
    cores (``cuparing.backends.cpu_threads``, needs the optional ``threadpoolctl``).

    Args:
        world_size: number of simulated ranks ``C >= 1``.
        fn: called once per rank with that rank's :class:`Ring`; must issue the same ring calls
            on every rank, as a real multi-process program would.
        timeout: seconds the whole call may take. A rank waiting for a peer's data raises
            ``RingTimeoutError`` when they are up; ``simulate`` itself returns or raises within
            about a second after.

    Returns:
        ``[fn(ring_0), ..., fn(ring_{C-1})]``.

    Raises:
        RingTimeoutError: some rank was still running ``timeout`` seconds after the start
            (blocked outside the ring, or still computing). The message names each such rank
            and where it was (innermost frames: file:line in function; the whole stacks are in
            the exception's notes) and repeats the first error another rank raised, which is
            also its ``__cause__``. Such a rank's thread is a daemon, left behind: it cannot
            keep the interpreter alive.
        Otherwise the first exception raised inside ``fn`` (with a note naming its rank); the
        other ranks are released with ``RingError`` instead of hanging.

    Example:
        >>> import cuparing as cr
        >>> cr.simulate(3, lambda ring: ring.rank * 10)
        [0, 10, 20]
    """
    from ..backends.cpu_threads import limit_for_ranks
    from ..validation import check_simulate_args

    world_size, timeout = check_simulate_args(world_size, fn, timeout)
    results: list[Any] = [None] * world_size
    errors: dict[int, BaseException] = {}

    def run(rank: int) -> None:
        try:
            results[rank] = fn(LocalRing(hub, rank))
        except BaseException as exc:  # noqa: BLE001 - reported to the caller below
            errors[rank] = exc
            hub.fail(rank)

    threads = [
        threading.Thread(target=run, args=(r,), name=f"simulated rank {r}", daemon=True)
        for r in range(world_size)
    ]
    with limit_for_ranks(world_size):
        hub = _Hub(world_size, timeout)
        for thread in threads:
            thread.start()
        _join_until(threads, hub.deadline)
        _let_waits_time_out(hub, threads)
    stuck = [rank for rank, thread in enumerate(threads) if thread.is_alive()]
    if stuck:
        # a copy: a rank left behind may still add its error while the report is written
        raise _still_running(hub, threads, stuck, dict(errors), run.__code__)
    if errors:
        rank = _first_failure(hub, errors)
        exc = errors[rank]
        if hasattr(exc, "add_note"):
            exc.add_note(f"raised on simulated rank {rank} of {world_size}")
        raise exc
    return results


# How long simulate waits, past its deadline, for ranks that were inside a ring wait then: their
# waits end at the deadline and they raise at once, so this only covers a slow scheduler.
_EXIT_GRACE_S = 1.0


def _join_until(threads: list[threading.Thread], deadline: float) -> None:
    """Join ``threads`` until they end or ``time.monotonic()`` passes ``deadline``."""
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))


def _let_waits_time_out(hub: _Hub, threads: list[threading.Thread]) -> None:
    """After the deadline: give the ranks that were waiting on the ring the time to raise their
    ``RingTimeoutError`` and end, so the report below is about ranks blocked elsewhere."""
    with hub.cond:
        in_wait = [threads[rank] for rank in hub.waiting]
    _join_until(in_wait, time.monotonic() + _EXIT_GRACE_S)


def _first_failure(hub: _Hub, errors: dict[int, BaseException]) -> int:
    """The rank whose error came first (the others' are consequences of it)."""
    return hub.failed_rank if hub.failed_rank in errors else min(errors)


def _still_running(hub, threads, stuck, errors, stop_code) -> RingTimeoutError:
    """The error for ranks still running at the deadline: each with where it is, stacks in
    notes, and the first error of another rank (message and ``__cause__``)."""
    frames = sys._current_frames()  # every thread's innermost frame, at this moment
    with hub.cond:
        waiting = dict(hub.waiting)
    lines, stacks = [], []
    for rank in stuck:
        stack = _stack_of(frames.get(threads[rank].ident), stop_code)
        if rank in waiting:
            lines.append(f"  rank {rank}: {waiting[rank]}")
        else:
            lines.append(f"  rank {rank}: at {_innermost(stack)}")
        if stack:
            text = "".join(traceback.StackSummary.extract(stack).format())
            stacks.append(f"stack of simulated rank {rank} (innermost last):\n{text}")
    ranks = ", ".join(str(rank) for rank in stuck)
    message = (
        f"simulate: rank{'s' if len(stuck) > 1 else ''} {ranks} of {hub.size} still running "
        f"after the {hub.timeout:g} s timeout (left behind as daemon threads):\n" + "\n".join(lines)
    )
    cause = None
    if errors:
        rank = _first_failure(hub, errors)
        cause = errors[rank]
        message += f"\nfirst error, on rank {rank}: {type(cause).__name__}: {cause}"
    error = RingTimeoutError(message)
    error.__cause__ = cause
    if hasattr(error, "add_note"):
        for text in stacks:
            error.add_note(text)
    return error


def _stack_of(frame, stop_code) -> list:
    """(frame, line) pairs from ``frame`` outwards, innermost last, up to (not including) the
    frame running ``stop_code`` (simulate's thread body): the rank's own code and below."""
    stack = []
    while frame is not None and frame.f_code is not stop_code:
        stack.append((frame, frame.f_lineno))
        frame = frame.f_back
    return stack[::-1]


def _innermost(stack: list, depth: int = 3) -> str:
    """The innermost ``depth`` frames of ``stack`` as "file:line in function", innermost first."""
    if not stack:
        return "an unknown place (the thread ended just now)"
    places = [
        f"{frame.f_code.co_filename}:{line} in {frame.f_code.co_name}"
        for frame, line in reversed(stack[-depth:])
    ]
    return ", called from ".join(places)
