"""In-process ranks: the CPU mirror of the NCCL ring, and :func:`simulate`.

Each simulated rank is a thread holding a :class:`LocalRing`. An exchange posts copies of the
arrays into the receiver's mailbox (so nothing is shared between ranks, as on real devices) and
``wait()`` blocks until the matching message arrives, another rank fails, or the timeout passes.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

from .base import PendingExchange, ReadyExchange, Ring, RingError, RingTimeoutError


class _Hub:
    """Mailboxes shared by the ranks of one simulated ring."""

    def __init__(self, size: int, timeout: float):
        self.size = size
        self.timeout = timeout
        self.cond = threading.Condition()
        self.mail: dict[tuple, list] = {}
        self.failed_rank: int | None = None

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
            arrived = hub.cond.wait_for(
                lambda: self._key in hub.mail or hub.failed_rank is not None, timeout=ring.timeout
            )
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
    """A ring of one: exchanges hand the arrays straight back (``ring_attention`` on one device,
    e.g. in benchmarks and tests; :func:`cuparing.attention` needs no ring)."""

    rank = 0
    size = 1
    timeout = float("inf")

    def exchange(self, arrays: Sequence[Any], shift: int = 1, tag: str = "kv") -> PendingExchange:
        return ReadyExchange(arrays)

    def agree(self, fields) -> None:
        """Nothing to compare: a ring of one agrees with itself."""


def simulate(world_size: int, fn: Callable[[Ring], Any], timeout: float = 300.0) -> list[Any]:
    """Run ``fn(ring)`` on ``world_size`` in-process ranks (threads) and collect their results.

    Args:
        world_size: number of simulated ranks ``C >= 1``.
        fn: called once per rank with that rank's :class:`Ring`; must issue the same ring calls
            on every rank, as a real multi-process program would.
        timeout: seconds a rank may wait for a peer's data before raising ``RingTimeoutError``.

    Returns:
        ``[fn(ring_0), ..., fn(ring_{C-1})]``.

    Raises:
        The first exception raised inside ``fn`` (with a note naming its rank); the other ranks
        are released with ``RingError`` instead of hanging.

    Example:
        >>> import cuparing as cr
        >>> cr.simulate(3, lambda ring: ring.rank * 10)
        [0, 10, 20]
    """
    from ..validation import check_simulate_args

    world_size, timeout = check_simulate_args(world_size, fn, timeout)
    hub = _Hub(world_size, timeout)
    results: list[Any] = [None] * world_size
    errors: dict[int, BaseException] = {}

    def run(rank: int) -> None:
        try:
            results[rank] = fn(LocalRing(hub, rank))
        except BaseException as exc:  # noqa: BLE001 - reported to the caller below
            errors[rank] = exc
            hub.fail(rank)

    threads = [threading.Thread(target=run, args=(r,), daemon=True) for r in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        rank = hub.failed_rank if hub.failed_rank in errors else min(errors)
        exc = errors[rank]
        if hasattr(exc, "add_note"):
            exc.add_note(f"raised on simulated rank {rank} of {world_size}")
        raise exc
    return results
