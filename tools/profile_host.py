"""Host cost per call of ``cr.attention`` on torch CUDA tensors, beside SDPA, and where it goes.

For each size: microseconds of host time per call (``time.perf_counter`` over ``--calls`` calls
after warm-up, one synchronisation at the end; sizes are small enough that the GPU keeps up, so
the figure is the host's), for cuparing and for PyTorch SDPA (flash backend) in the same process.
Then a cProfile of cuparing's calls at one size: the functions with the most own time and the
most cumulative time, so the breakdown names the code to change.

With ``--ring C``: the same for one rank of a ring of C (rank 0, zigzag, causal, 1k tokens per
rank, H/Hkv 32/8, D=128) on a ring that hands K/V straight back (bench_ring.NoCommRing), forward
and backward, each profiled: the host cost of the schedule, plans and launches without a
multi-GPU machine.

Usage:
    python tools/profile_host.py [--calls N] [--profile-size INDEX] [--out DIR] [--ring C]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import host_us  # noqa: E402

SIZES = [(1, 128, 8, 64), (1, 1024, 16, 128), (1, 4096, 16, 128)]  # (B, S, H, D), Hkv = H


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--profile-size", type=int, default=1, help="index into SIZES")
    parser.add_argument("--out", help="directory for the full profile listing")
    parser.add_argument("--ring", type=int, default=0, help="also one rank of a ring of C")
    args = parser.parse_args(argv)

    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import cuparing as cr

    print(f"card: {torch.cuda.get_device_name()}; torch {torch.__version__}; bf16, causal")
    print(f"{'B':>2} {'S':>6} {'H':>3} {'D':>4} {'ours us':>9} {'sdpa us':>9} {'ratio':>6}")
    calls = {}
    for b, s, h, d in SIZES:
        q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))

        def ours(q=q, k=k, v=v):
            return cr.attention(q, k, v, causal=True)

        def sdpa(qt=qt, kt=kt, vt=vt):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)

        calls[(b, s, h, d)] = ours
        t_ours, t_sdpa = host_us(ours, args.calls), host_us(sdpa, args.calls)
        print(f"{b:>2} {s:>6} {h:>3} {d:>4} {t_ours:>9.1f} {t_sdpa:>9.1f} {t_ours / t_sdpa:>6.1f}")

    size = SIZES[args.profile_size]
    profile(calls[size], f"attention {size}", args.calls, args.out)
    if args.ring:
        for name, fn in ring_calls(args.ring).items():
            print(f"\n{name}: {host_us(fn, args.calls):.1f} us per call")
            profile(fn, name, args.calls, args.out)
    return 0


def ring_calls(world: int) -> dict:
    """Forward and backward of rank 0 of a ``world`` ring whose exchanges move nothing."""
    import torch
    from bench_ring import NoCommRing

    import cuparing as cr

    ring = NoCommRing(0, world)
    q, dout = (torch.randn(1, 1024, 32, 128, device="cuda", dtype=torch.bfloat16) for _ in "qd")
    k, v = (torch.randn(1, 1024, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in "kv")
    opts = {"causal": True, "layout": "zigzag"}
    out, lse = cr.ring_attention(q, k, v, ring, return_lse=True, **opts)
    return {
        f"ring_attention (rank 0 of {world})": lambda: cr.ring_attention(q, k, v, ring, **opts),
        f"ring_attention_backward (rank 0 of {world})": lambda: cr.ring_attention_backward(
            dout, q, k, v, out, lse, ring, **opts
        ),
    }


def profile(fn, name: str, calls: int, out_dir, echo: bool = True) -> None:
    """cProfile of ``calls`` calls of ``fn`` by own and by cumulative time: printed (unless not
    ``echo``) and written under ``out_dir`` (if given)."""
    import torch

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    torch.cuda.synchronize()
    for key, count in (("tottime", 25), ("cumulative", 40)):
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats(key).print_stats(count)
        listing = text.getvalue()
        if echo:
            print(f"\n== cProfile {name}, {calls} calls, sorted by {key}")
            print(listing[listing.find("ncalls"):])
        if out_dir:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            slug = "".join(c if c.isalnum() else "_" for c in name)
            Path(out_dir, f"profile_{slug}_{key}.txt").write_text(listing)


if __name__ == "__main__":
    sys.exit(main())
