"""Ring timelines from synthetic intervals: overlap accounting and Chrome/Perfetto JSON."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

import cuparing as cr
from cuparing.comm.trace import (
    COMM,
    COMPUTE,
    Interval,
    TraceRecorder,
    chrome_trace,
    hidden_transfer_fraction,
    merge_traces,
    write_chrome_trace,
)


def _iv(track, start, end, name="x"):
    return Interval(track, name, float(start), float(end))


@pytest.mark.parametrize(
    "transfers, computes, expected",
    [
        ([(0, 10)], [(0, 10)], 1.0),  # fully hidden
        ([(0, 10)], [], 0.0),  # nothing to hide behind
        ([(0, 10)], [(5, 20)], 0.5),
        ([(0, 10), (20, 30)], [(0, 25)], 0.75),
        ([(0, 10)], [(0, 4), (2, 6), (8, 9)], 0.7),  # overlapping compute counted once
        ([(10, 20)], [(0, 5), (25, 30)], 0.0),
    ],
)
def test_hidden_transfer_fraction(transfers, computes, expected):
    intervals = [_iv(COMM, *t) for t in transfers] + [_iv(COMPUTE, *c) for c in computes]
    assert hidden_transfer_fraction(intervals) == pytest.approx(expected)


def test_no_transfer_is_nan():
    assert math.isnan(hidden_transfer_fraction([_iv(COMPUTE, 0, 5)]))


spans = st.lists(
    st.tuples(st.integers(0, 1000), st.integers(1, 200)).map(lambda t: (t[0], t[0] + t[1])),
    max_size=12,
)


@given(spans, spans)
def test_fraction_is_bounded_and_monotone(transfers, computes):
    intervals = [_iv(COMM, *t) for t in transfers] + [_iv(COMPUTE, *c) for c in computes]
    fraction = hidden_transfer_fraction(intervals)
    if not transfers:
        assert math.isnan(fraction)
        return
    assert -1e-12 <= fraction <= 1 + 1e-12
    # more compute can only hide more
    more = intervals + [_iv(COMPUTE, 0, 50)]
    assert hidden_transfer_fraction(more) >= fraction - 1e-12


def test_chrome_trace_has_one_thread_per_track_and_microseconds():
    intervals = [_iv(COMPUTE, 0, 10, "block 0"), _iv(COMM, 1.5, 7.25, "kv#0")]
    doc = chrome_trace(intervals, rank=3)
    events = doc["traceEvents"]
    complete = [e for e in events if e["ph"] == "X"]
    assert [(e["name"], e["ts"], e["dur"], e["pid"]) for e in complete] == [
        ("block 0", 0.0, 10.0, 3), ("kv#0", 1.5, 5.75, 3),
    ]  # fmt: skip
    names = {e["tid"]: e["args"]["name"] for e in events if e["name"] == "thread_name"}
    assert names == {0: "compute stream", 1: "comm stream"}
    assert any(e["name"] == "process_name" and e["args"]["name"] == "rank 3" for e in events)
    json.dumps(doc)  # serialisable as is


def test_write_and_merge(tmp_path):
    paths = [
        write_chrome_trace(tmp_path / "t.rank{rank}.json", [_iv(COMM, 0, 1)], rank=r)
        for r in range(2)
    ]
    assert paths == [str(tmp_path / "t.rank0.json"), str(tmp_path / "t.rank1.json")]
    merged = merge_traces(paths, tmp_path / "all.json")
    events = json.loads(open(merged).read())["traceEvents"]
    assert {e["pid"] for e in events if e["ph"] == "X"} == {0, 1}


def test_written_trace_reads_back_and_keeps_its_hidden_fraction(tmp_path):
    from cuparing.comm.trace import read_chrome_trace

    intervals = [_iv(COMPUTE, 0, 10), _iv(COMM, 5, 15), _iv(COMM, 20, 22)]
    path = write_chrome_trace(tmp_path / "t.json", intervals, rank=3)
    back = read_chrome_trace(path)
    assert sorted((i.track, i.start_us, i.end_us) for i in back) == sorted(
        (i.track, i.start_us, i.end_us) for i in intervals
    )
    assert hidden_transfer_fraction(back) == pytest.approx(5 / 12)


class FakeClock:
    """Marks are the clock's time in ms; ``advance`` stands for GPU work."""

    def __init__(self):
        self.now_ms = 100.0
        self.tracks = []

    def mark(self, track):
        self.tracks.append(track)
        return self.now_ms

    @staticmethod
    def elapsed_ms(a, b):
        return b - a


def test_recorder_resolves_marks_relative_to_the_first():
    clock = FakeClock()
    rec = TraceRecorder(clock.mark, clock.elapsed_ms)
    assert rec.intervals() == []
    with rec.span(COMPUTE, "block", step=0):
        start = rec.mark(COMM)
        clock.now_ms += 2.0
        rec.add(COMM, "kv#0", start, rec.mark(COMM), bytes=64)
        clock.now_ms += 1.0
    got = rec.intervals()
    assert [(i.track, i.name, i.start_us, i.end_us) for i in got] == [
        (COMM, "kv#0", 0.0, 2000.0), (COMPUTE, "block", 0.0, 3000.0),
    ]  # fmt: skip
    assert got[0].args == {"bytes": 64} and got[1].args == {"step": 0}
    assert hidden_transfer_fraction(got) == 1.0
    rec.clear()
    assert len(rec) == 0 and rec.intervals() == []


def test_trace_compute_is_a_noop_on_cpu_rings():
    def fn(ring):
        with ring.trace_compute("block"):
            return ring.rank

    assert cr.simulate(2, fn) == [0, 1]
