"""Wall time of the simulated CPU ring (``cr.simulate``), per mask and layout.

    python tools/bench_cpu_ring.py [--world 4] [--seqlen 4096] [--heads 8] [--headdim 64]
        [--dtype float32] [--repeats 5] [--backward] [--no-thread-cap]

Each row is the median wall and CPU time, over ``repeats`` runs after one warm-up, of one
``cr.simulate(world, fn)`` whose ranks each shard Q, K, V and run ``ring_attention`` (and, with
``--backward``, ``ring_attention_backward``) on their shard. Sharding is inside the timed call but
is a copy, negligible next to the attention. Causal rows do about half the work of the full row,
so on a machine that skips what the mask hides their time should be about half as well.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

import numpy as np

import cuparing as cr

CASES = [("full", "contiguous", False), ("causal", "zigzag", True),
         ("causal", "contiguous", True), ("causal", "striped", True)]  # fmt: skip


def run_ring(world, q, k, v, dout, layout, causal, backward):
    """One simulated ring: forward, and backward when asked; returns nothing (timing only)."""

    def per_rank(ring):
        local = [cr.shard(x, ring.rank, ring.size, layout=layout) for x in (q, k, v, dout)]
        out, lse = cr.ring_attention(*local[:3], ring, causal=causal, layout=layout,
                                     return_lse=True)  # fmt: skip
        if backward:
            cr.ring_attention_backward(local[3], *local[:3], out, lse, ring, causal=causal,
                                       layout=layout)  # fmt: skip

    cr.simulate(world, per_rank)


def median_seconds(fn, repeats: int) -> tuple[float, float]:
    """Median (wall, CPU) seconds of ``fn()`` over ``repeats`` calls after one warm-up call.

    CPU seconds are this process's, all threads: unlike wall time they barely move when other
    processes load the machine, so they show a change even on a busy one.
    """
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seqlen", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--headdim", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backward", action="store_true", help="also run the backward ring")
    parser.add_argument(
        "--no-thread-cap", action="store_true",
        help="hide threadpoolctl, so each rank's BLAS pool keeps every core (the old behaviour)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.no_thread_cap:
        sys.modules["threadpoolctl"] = None  # its import now fails: simulate caps nothing

    rng = np.random.default_rng(0)
    shape = (args.batch, args.seqlen, args.heads, args.headdim)
    q, k, v, dout = (rng.standard_normal(shape).astype(args.dtype) for _ in range(4))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    what = "forward + backward" if args.backward else "forward"
    cap = "no BLAS thread cap" if args.no_thread_cap else "BLAS threads capped per rank"
    print(f"C={args.world} B={args.batch} S={args.seqlen} H={args.heads} D={args.headdim} "
          f"{args.dtype}, {what}, {cores} CPU cores, {cap}, median of {args.repeats}")  # fmt: skip
    print("| mask | layout | wall s | CPU s |")
    print("|---|---|---|---|")
    for mask, layout, causal in CASES:
        case = functools.partial(run_ring, args.world, q, k, v, dout, layout, causal, args.backward)
        wall, cpu = median_seconds(case, args.repeats)
        print(f"| {mask} | {layout} | {wall:.3f} | {cpu:.3f} |", flush=True)


if __name__ == "__main__":
    main()
