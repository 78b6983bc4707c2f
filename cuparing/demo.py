"""The ring attention demo: zigzag causal attention over C ranks, checked against dense attention.

- No GPU: ``C`` simulated ranks on the CPU (NumPy backend).
- One GPU: ``C`` simulated ranks sharing that GPU (our kernels, in-process ring).
- Several GPUs: relaunches itself with one process per GPU and a real ring (the copy engines
  between GPUs of one host, else NCCL: ``Ring.from_env``'s default).
- Started by a launcher (``WORLD_SIZE`` set): joins that ring with ``Ring.from_env()``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import numpy as np

import cuparing as cr


def _gpu_count() -> int:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount()
    except Exception:  # noqa: BLE001 - no CuPy, no driver, or no device: run on the CPU
        return 0


def _problem(args, dtype):
    rng = np.random.default_rng(args.seed)
    shape = (1, args.seqlen, args.heads, args.headdim)
    kv_shape = (1, args.seqlen, args.kv_heads, args.headdim)
    return [rng.standard_normal(s).astype(dtype) for s in (shape, kv_shape, kv_shape)]


def _per_rank(ring, q, k, v, xp, layout):
    local = [xp.asarray(cr.shard(x, ring.rank, ring.size, layout=layout)) for x in (q, k, v)]
    if xp is not np:  # the first GPU call compiles the kernels: keep that out of the timing
        cr.ring_attention(*local, ring, causal=True, layout=layout)
        xp.cuda.get_current_stream().synchronize()
    start = time.perf_counter()
    out, lse = cr.ring_attention(*local, ring, causal=True, layout=layout, return_lse=True)
    if xp is not np:
        xp.cuda.get_current_stream().synchronize()
    seconds = time.perf_counter() - start
    if xp is not np:
        out, lse = out.get(), lse.get()
    return out, lse, seconds


def _report(args, q, k, v, outs, where):
    from cuparing.masks import BlockKind, MaskSpec
    from cuparing.schedule import plan_ring

    out = cr.unshard([o[0] for o in outs], layout=args.layout)
    ref = cr.reference_attention(q, k, v, causal=True)
    err = float(np.abs(out.astype(np.float64) - ref).max())
    world = len(outs)
    print(f"cuparing {cr.__version__}: causal ring attention, layout={args.layout}, on {where}")
    print(f"  S={args.seqlen} H={args.heads} Hkv={args.kv_heads} D={args.headdim}, C={world}")
    print(f"  {'rank':>4} {'tokens':>7} {'full':>5} {'masked':>6} {'skipped':>7} {'ms':>8}")
    for rank, (_, _, seconds) in enumerate(outs):
        plan = plan_ring(args.layout, rank, world, args.seqlen // world, MaskSpec(causal=True))
        kinds = [plan.kinds[t] for t in range(world)]
        counts = [sum(kind == c for kind in kinds) for c in (BlockKind.FULL, BlockKind.PARTIAL)]
        print(
            f"  {rank:>4} {args.seqlen // world:>7} {counts[0]:>5} {counts[1]:>6} "
            f"{world - sum(counts):>7} {seconds * 1e3:>8.2f}"
        )
    print(f"  max |ring - dense float64| = {err:.2e}")
    return err


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=4, help="ring size C (default 4)")
    parser.add_argument("--seqlen", type=int, default=1024, help="global sequence length")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--headdim", type=int, default=64)
    parser.add_argument("--layout", default="zigzag", choices=cr.LAYOUTS)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    gpus = 0 if args.device == "cpu" else _gpu_count()
    if args.device == "gpu" and gpus == 0:
        print("no GPU found (see `python -m cuparing` for why)", file=sys.stderr)
        return 2

    if "WORLD_SIZE" in os.environ and gpus:
        return _launched(args)
    if gpus >= 2 and args.ranks >= 2:
        nproc = min(gpus, args.ranks)
        cmd = [sys.executable, "-m", "cuparing.launch", "--nproc-per-node", str(nproc),
               "-m", "cuparing.demo", *(argv if argv is not None else sys.argv[1:])]  # fmt: skip
        return subprocess.call(cmd)

    if gpus:
        import cupy as xp
        import ml_dtypes

        dtype, where = ml_dtypes.bfloat16, f"1 GPU ({args.ranks} simulated ranks, bfloat16)"
    else:
        xp, dtype, where = np, np.float32, f"the CPU ({args.ranks} simulated ranks, float32)"
    q, k, v = _problem(args, dtype)
    outs = cr.simulate(args.ranks, lambda ring: _per_rank(ring, q, k, v, xp, args.layout))
    err = _report(args, q, k, v, outs, where)
    return 0 if err < (5e-2 if gpus else 1e-4) else 1


def _launched(args) -> int:
    import cupy
    import ml_dtypes

    with cr.Ring.from_env() as ring:
        q, k, v = _problem(args, ml_dtypes.bfloat16)
        mine = _per_rank(ring, q, k, v, cupy, args.layout)
        gathered = _gather(ring, mine)
        if ring.rank != 0:
            return 0
        transport = "copy-engine" if type(ring).__name__ == "IpcRing" else "NCCL"
        where = f"{ring.size} GPUs ({transport} ring, bfloat16)"
        err = _report(args, q, k, v, gathered, where)
        return 0 if err < 5e-2 else 1


def _gather(ring, mine):
    """Every rank's (out, lse, seconds) on rank 0, passed hop by hop around the ring."""
    import cupy

    out, lse, seconds = mine
    results = {ring.rank: mine}
    payload = [cupy.asarray(out.view(np.uint16)), cupy.asarray(lse),
               cupy.asarray(np.array([seconds]))]  # fmt: skip
    for step in range(1, ring.size):
        payload = ring.exchange(payload, 1, "demo_gather").wait()
        cupy.cuda.get_current_stream().synchronize()
        source = (ring.rank - step) % ring.size
        results[source] = (payload[0].get().view(out.dtype), payload[1].get(),
                           float(payload[2].get()[0]))  # fmt: skip
    return [results[r] for r in range(ring.size)]


if __name__ == "__main__":
    sys.exit(main())
