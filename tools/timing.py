"""CUDA-event timing shared by the benchmarks.

Each sample times ``calls`` back-to-back calls between one pair of events on the current torch
stream and divides by ``calls``: the host queues the next call while the GPU runs the previous
one, as in a training loop, so a function's Python overhead counts only where it exceeds its GPU
time. Every implementation in a table is timed the same way. Median of ``repeats`` samples after
``warmup`` calls.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import time


def time_ms(fn, repeats: int = 10, warmup: int = 3, calls: int = 5) -> float:
    """Median milliseconds per call of ``fn()`` (see module docstring)."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / calls)
    return statistics.median(samples)


def host_us(fn, calls: int = 300, warmup: int = 20) -> float:
    """Host microseconds per call of ``fn()``: ``time.perf_counter`` over ``calls`` calls after
    ``warmup``, one synchronisation at the end. For work small enough that the GPU keeps up, this
    is the caller's cost per call (what a training loop pays before the GPU becomes the limit)."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def host_us_alone(fn, calls: int = 300, warmup: int = 20) -> float:
    """Host microseconds of one call of ``fn()`` made alone: the median over ``calls`` calls,
    each timed by ``time.perf_counter`` after a synchronisation (nothing queued ahead of it).
    Where the GPU is slower than the host (a ring whose exchanges' latency exceeds the call's
    Python), :func:`host_us` measures the GPU, as the queue fills and launches wait; this is
    the caller's own cost either way."""
    import torch

    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(calls):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    torch.cuda.synchronize()
    return statistics.median(samples) * 1e6


def checkout_commit() -> str:
    """The checkout's commit (for a benchmark's record); ``CUPARING_COMMIT`` names it in a copy
    of the tree without .git."""
    if os.environ.get("CUPARING_COMMIT"):
        return os.environ["CUPARING_COMMIT"]
    try:
        here = os.path.dirname(os.path.abspath(__file__))  # the checkout, wherever the caller is
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True, cwd=here).stdout.strip()  # fmt: skip
    except Exception:  # noqa: BLE001 - no git, or not a checkout
        return "unknown"
