"""Timelines of a ring: when transfers and compute ran, as Chrome/Perfetto trace JSON.

A :class:`TraceRecorder` collects *marks* (opaque timestamps: CUDA events on the GPU, plain floats
in tests) in pairs, one pair per interval, on named tracks (``"comm"``, ``"compute"``). Marks are
resolved to microseconds only when :meth:`TraceRecorder.intervals` is called, so recording costs
one event record per mark and never synchronises the host.

:func:`hidden_transfer_fraction` answers the question a ring is built around: of the time spent
moving K/V, how much ran while compute was busy (hidden), rather than exposed?

Trace files open in https://ui.perfetto.dev or chrome://tracing: one process per rank, one thread
per track, ``ts``/``dur`` in microseconds since the recorder's first mark on that rank. Clocks of
different ranks are not aligned; compare ranks by shape, not by absolute offset.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

COMM, COMPUTE = "comm", "compute"


@dataclass(frozen=True)
class Interval:
    """One span of work on one track, in microseconds since the recorder's base mark."""

    track: str
    name: str
    start_us: float
    end_us: float
    args: dict = field(default_factory=dict)

    @property
    def dur_us(self) -> float:
        return self.end_us - self.start_us


def _union(spans: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for start, end in sorted(s for s in spans if s[1] > s[0]):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def _overlap(span: tuple[float, float], union: Sequence[tuple[float, float]]) -> float:
    start, end = span
    return sum(max(0.0, min(end, b) - max(start, a)) for a, b in union)


def hidden_transfer_fraction(
    intervals: Iterable[Interval], transfer: str = COMM, compute: str = COMPUTE
) -> float:
    """Fraction of transfer time that overlaps compute on the same rank, in ``[0, 1]``.

    Sums, over the ``transfer`` intervals, the time covered by the union of ``compute`` intervals,
    divided by the total transfer time. ``nan`` when there is no transfer time (a ring of one).
    """
    intervals = list(intervals)
    busy = _union((i.start_us, i.end_us) for i in intervals if i.track == compute)
    moves = [(i.start_us, i.end_us) for i in intervals if i.track == transfer and i.dur_us > 0]
    total = sum(end - start for start, end in moves)
    if total <= 0:
        return float("nan")
    return sum(_overlap(span, busy) for span in moves) / total


def chrome_trace(intervals: Iterable[Interval], rank: int = 0) -> dict:
    """Trace-event JSON (a dict) for one rank: complete (``"X"``) events, one thread per track."""
    intervals = list(intervals)
    tracks = sorted({i.track for i in intervals}, key=lambda t: (t != COMPUTE, t))
    tid = {track: n for n, track in enumerate(tracks)}
    events: list[dict[str, Any]] = [
        {"ph": "M", "name": "process_name", "pid": rank, "tid": 0, "args": {"name": f"rank {rank}"}}
    ]
    events += [
        {"ph": "M", "name": "thread_name", "pid": rank, "tid": n, "args": {"name": f"{t} stream"}}
        for t, n in tid.items()
    ]
    events += [
        {
            "ph": "X",
            "name": i.name,
            "cat": i.track,
            "pid": rank,
            "tid": tid[i.track],
            "ts": round(i.start_us, 3),
            "dur": round(max(i.dur_us, 0.0), 3),
            "args": dict(i.args),
        }
        for i in sorted(intervals, key=lambda i: i.start_us)
    ]
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def write_chrome_trace(path: str | os.PathLike, intervals: Iterable[Interval], rank: int = 0):
    """Write :func:`chrome_trace` to ``path`` (``{rank}`` in the path is replaced by the rank)."""
    path = os.fspath(path).replace("{rank}", str(rank))
    with open(path, "w") as f:
        json.dump(chrome_trace(intervals, rank), f)
    return path


def read_chrome_trace(path: str | os.PathLike) -> list[Interval]:
    """The intervals of a trace file written by :func:`write_chrome_trace` (its ``"X"`` events)."""
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    return [
        Interval(e["cat"], e["name"], e["ts"], e["ts"] + e["dur"], dict(e.get("args", {})))
        for e in events
        if e.get("ph") == "X"
    ]


def merge_traces(paths: Iterable[str | os.PathLike], out: str | os.PathLike) -> str:
    """Concatenate per-rank trace files into one (each keeps its rank as its process)."""
    events: list[dict] = []
    for path in paths:
        with open(path) as f:
            events += json.load(f)["traceEvents"]
    with open(out, "w") as f:
        json.dump({"traceEvents": events, "displayTimeUnit": "ms"}, f)
    return os.fspath(out)


class TraceRecorder:
    """Collects intervals as pairs of marks; resolves them to microseconds on demand.

    Args:
        mark: ``mark(track)`` records a timestamp for work queued on ``track`` so far (a CUDA
            event recorded on that track's stream) and returns it.
        elapsed_ms: ``elapsed_ms(a, b)`` milliseconds from mark ``a`` to mark ``b``; only called
            from :meth:`intervals`, after the marks have completed.
    """

    def __init__(self, mark: Callable[[str], Any], elapsed_ms: Callable[[Any, Any], float]):
        self._mark = mark
        self._elapsed_ms = elapsed_ms
        self._base: Any = None
        self._spans: list[tuple[str, str, Any, Any, dict]] = []

    def mark(self, track: str) -> Any:
        """A mark on ``track`` now (the first mark ever becomes time zero)."""
        stamp = self._mark(track)
        if self._base is None:
            self._base = stamp
        return stamp

    def add(self, track: str, name: str, start: Any, end: Any, **args: Any) -> None:
        """Record the interval between two marks taken with :meth:`mark`."""
        self._spans.append((track, name, start, end, args))

    @contextlib.contextmanager
    def span(self, track: str, name: str, **args: Any) -> Iterator[None]:
        """Context manager: marks ``track`` on entry and exit and records the interval."""
        start = self.mark(track)
        yield
        self.add(track, name, start, self.mark(track), **args)

    def clear(self) -> None:
        """Forget every interval (the next mark becomes the new time zero)."""
        self._spans.clear()
        self._base = None

    def __len__(self) -> int:
        return len(self._spans)

    def intervals(self) -> list[Interval]:
        """Every recorded interval in microseconds since the first mark.

        The marks must have completed (on the GPU: synchronise first).
        """
        if self._base is None:
            return []
        to_us = lambda m: 1000.0 * self._elapsed_ms(self._base, m)  # noqa: E731
        return [
            Interval(track, name, to_us(start), to_us(end), args)
            for track, name, start, end, args in self._spans
        ]
