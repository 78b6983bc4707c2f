"""Time forward tile shapes of one head dim, each variant in its own process (fresh compile).

Variants are ``CUPARING_FWD_TILES`` rows (see cuparing/kernels/loader.py). Inputs are bf16 CuPy
arrays [B, S, H, D] with B=1, H=32; CUDA-event timing after warm-up, median of repeats;
TFLOP/s = 4*B*H*S^2*D / time (halved when causal).

Usage:
    python tools/tune_forward.py --head-dim 128 --variant 128,64,4,2,0,1 --variant 128,32,4,3,0,2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[1])
sys.path.insert(0, ROOT)


def child(head_dim: int, seqlens: list[int], repeats: int) -> None:
    import cupy
    import ml_dtypes

    import cuparing as cr
    from cuparing.kernels import loader

    rows = []
    rng = cupy.random.default_rng(0)
    for seqlen in seqlens:
        shape = (1, seqlen, 32, head_dim)
        q, k, v = (rng.standard_normal(shape, dtype=cupy.float32).astype(ml_dtypes.bfloat16)
                   for _ in range(3))  # fmt: skip
        for causal in (False, True):
            for _ in range(3):
                cr.attention(q, k, v, causal=causal)
            times = []
            for _ in range(repeats):
                start, end = cupy.cuda.Event(), cupy.cuda.Event()
                start.record()
                cr.attention(q, k, v, causal=causal)
                end.record()
                end.synchronize()
                times.append(cupy.cuda.get_elapsed_time(start, end))
            ms = statistics.median(times)
            flops = 4 * 32 * seqlen**2 * head_dim / (2 if causal else 1)
            rows.append({"seqlen": seqlen, "causal": causal, "ms": ms,
                         "tflops": flops / ms / 1e9})  # fmt: skip
    kernel, _, _ = loader.get_fwd_kernel(head_dim, "bfloat16")
    print(json.dumps({"rows": rows, "regs": kernel.num_regs, "local": kernel.local_size_bytes}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--variant", action="append", default=[],
                        help="block_m,block_n,warps,stages,q_in_regs,min_blocks")  # fmt: skip
    parser.add_argument("--seqlen", type=int, action="append", default=[])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    seqlens = args.seqlen or [8192, 16384]
    if args.child:
        child(args.head_dim, seqlens, args.repeats)
        return 0
    print(f"head dim {args.head_dim}, bf16, B=1, H=32; TFLOP/s (full / causal)")
    for variant in args.variant or [""]:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
        if variant:
            env["CUPARING_FWD_TILES"] = f"{args.head_dim}:{variant}"
        cmd = [sys.executable, __file__, "--child", "--head-dim", str(args.head_dim),
               "--repeats", str(args.repeats)] + [f"--seqlen={s}" for s in seqlens]  # fmt: skip
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            print(f"{variant or 'default':>22}  FAILED: {proc.stderr.strip().splitlines()[-1:]}")
            continue
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        cells = "  ".join(
            f"S={r['seqlen']}{'c' if r['causal'] else 'f'} {r['tflops']:6.1f}"
            for r in result["rows"]
        )
        name = variant or "default"
        print(f"{name:>22}  regs {result['regs']:3d} local {result['local']:3d}  {cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
