"""Per-kernel GPU time of every rank's ring call, on one GPU, beside the whole sequence.

    python tools/profile_ring_steps.py [--ranks 4] [--tokens-per-gpu 8192] [--documents]
        [--layouts zigzag,contiguous]

For each rank ``r`` of a ring of ``--ranks``, one ``ring_attention`` call on a ring that hands
K/V straight back (bench_ring.NoCommRing: the same plan, kernels and merges, no transfer) runs
under ``torch.profiler``, which records every kernel on the device, CuPy's launches included. A
line per call: host wall time of the call (after warm-up, synchronised), the sum of its kernels'
GPU time, and each kernel's time in launch order (one forward kernel per ring step, then the
cast). The first lines run the whole sequence on one GPU, for comparison.

The batch is bench_varlen's (``--documents``: its packed causal documents) or one causal
sequence; bf16, B=1, H/Hkv 32/8, D=128. Answers "which step is slow, and is the GPU or the host
the limit" without a multi-GPU machine.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

# this checkout's package first (tools/ablate.py times copies of the tree)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_ring import NoCommRing  # noqa: E402
from bench_varlen import global_inputs, packed_batch  # noqa: E402

import cuparing as cr  # noqa: E402


def profile_call(fn, label: str) -> None:
    import cupy
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    cupy.cuda.Device().synchronize()
    start = time.perf_counter()
    fn()
    cupy.cuda.Device().synchronize()
    wall = (time.perf_counter() - start) * 1e3
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        cupy.cuda.Device().synchronize()
    kernels = [(e.name, e.device_time_total / 1e3) for e in prof.events()
               if e.device_type.name == "CUDA"]  # fmt: skip
    total = sum(ms for _, ms in kernels)
    each = " ".join(f"{name.split('<')[0].removeprefix('cuparing_')}:{ms:.2f}"
                    for name, ms in kernels if ms > 0.005)  # fmt: skip
    print(f"{label:<24} wall {wall:6.2f} ms  GPU {total:6.2f} ms | {each}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--tokens-per-gpu", type=int, default=8192)
    parser.add_argument("--documents", action="store_true", help="bench_varlen's packed batch")
    parser.add_argument("--layouts", default="zigzag,contiguous")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    world = args.ranks
    seqlen = args.tokens_per_gpu * world
    cu = packed_batch(seqlen, args.seed) if args.documents else None
    q, k, v, _ = global_inputs(seqlen, args.seed)
    docs = {"cu_seqlens": cu} if cu is not None else {}
    batch = "one sequence" if cu is None else f"documents {[int(x) for x in cu[1:] - cu[:-1]]}"
    print(f"S={seqlen}, {world} simulated ranks, causal, {batch}")
    profile_call(lambda: cr.attention(q, k, v, causal=True, **docs), "one GPU")
    for layout in args.layouts.split(","):
        for rank in range(world):
            shards = [cr.shard(x, rank, world, layout=layout, **docs) for x in (q, k, v)]
            call = functools.partial(cr.ring_attention, *shards, NoCommRing(rank, world),
                                     causal=True, layout=layout, **docs)  # fmt: skip
            profile_call(call, f"{layout} rank {rank}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
