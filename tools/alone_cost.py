"""What a call made alone costs over the same call queued, split into the host's part and the
GPU's: ours (``cr.attention``, plain, ``out=``, and replayed as a ``torch.cuda.graph``), SDPA
flash and cuDNN, and a fixed-length GPU spin (``torch.cuda._sleep``) of about the same time,
which has almost no host work: whatever a lone spin loses is what the GPU itself loses when a
launch finds it idle.

    python tools/alone_cost.py [--shape 128:8192:full] [--rounds 5] [--samples 30]

Per implementation, interleaved over ``--rounds`` rounds (medians of the rounds' medians):
- queued ms: five calls between one pair of CUDA events, divided by five (the host queues the
  next while the GPU runs one: the kernel's own time);
- alone ms: one call between the events, the stream synchronised before (a call made one at a
  time: the events' start is recorded on an idle GPU, so the host's work up to the launch and
  the GPU's start from idle both count);
- lost us = alone - queued; ratio = queued / alone (1.0: nothing lost);
- host us: wall time of one call's Python after a synchronisation (``timing.host_us_alone``).
The spin's cycle count is calibrated so that its queued time matches ours.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_attention import parse_shapes  # noqa: E402
from timing import checkout_commit, host_us_alone, time_ms  # noqa: E402


def implementations(d: int, s: int, causal: bool, heads: int = 32, kv_heads: int = 8):
    """name -> a no-argument callable running one forward of the shape (torch bf16, B=1)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import cuparing as cr

    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, s, heads, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    k, v = (torch.randn(1, s, kv_heads, d, device="cuda", dtype=torch.bfloat16, generator=gen)
            for _ in range(2))  # fmt: skip
    out, lse = torch.empty_like(q), torch.empty(1, heads, s, device="cuda")
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))

    def ours():
        cr.attention(q, k, v, causal=causal)

    def ours_out():
        cr.attention(q, k, v, causal=causal, out=out, lse=lse)

    def sdpa(backend):
        def call():
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, enable_gqa=True)

        return call

    ours_out()  # compile, cache positions and tensor maps before the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ours_out()
    return {"ours": ours, "ours out=": ours_out, "ours graph": graph.replay,
            "sdpa flash": sdpa(SDPBackend.FLASH_ATTENTION),
            "sdpa cudnn": sdpa(SDPBackend.CUDNN_ATTENTION)}  # fmt: skip


def calibrated_spin(target_ms: float):
    """A ``torch.cuda._sleep`` call whose queued time is about ``target_ms``."""
    import torch

    cycles = 1_000_000
    for _ in range(3):
        took = time_ms(lambda c=cycles: torch.cuda._sleep(c), repeats=5, warmup=2)
        cycles = max(1000, int(cycles * target_ms / took))
    return lambda: torch.cuda._sleep(cycles)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", type=parse_shapes, default=parse_shapes("128:8192:full"),
                        help="D:S:causal or D:S:full (the first of a list)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--samples", type=int, default=30, help="timed samples per round")
    args = parser.parse_args(argv)

    import torch

    (d, s, causal), *_ = args.shape
    mask = "causal" if causal else "full"
    fns = implementations(d, s, causal)
    fns["gpu spin"] = calibrated_spin(time_ms(fns["ours out="], repeats=10, warmup=3))
    measured = {name: {"queued": [], "alone": [], "host": []} for name in fns}
    for _ in range(args.rounds):
        for name, fn in fns.items():
            measured[name]["queued"].append(time_ms(fn, repeats=args.samples, warmup=3, calls=5))
            measured[name]["alone"].append(time_ms(fn, repeats=args.samples, warmup=3, calls=1))
            measured[name]["host"].append(host_us_alone(fn, calls=args.samples, warmup=3))
    print(f"# {torch.cuda.get_device_name()}, commit {checkout_commit()}, d={d} S={s} {mask}, "
          f"B=1 H/Hkv 32/8 bf16; medians of {args.rounds} rounds x {args.samples} samples")
    print(f"{'implementation':<14}{'queued ms':>10}{'alone ms':>10}{'lost us':>9}{'ratio':>7}"
          f"{'host us':>9}")  # fmt: skip
    for name, m in measured.items():
        queued, alone = statistics.median(m["queued"]), statistics.median(m["alone"])
        print(f"{name:<14}{queued:>10.3f}{alone:>10.3f}{(alone - queued) * 1e3:>9.1f}"
              f"{queued / alone:>7.3f}{statistics.median(m['host']):>9.1f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
