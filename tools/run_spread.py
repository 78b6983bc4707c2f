"""How one shape's forward time spreads between samples: ours against SDPA cuDNN, alternating.

The full tables time each shape once (a median of 10 samples) and some rows (short causal
launches) swing by 10% between runs of one tree while cuDNN's stay put. This prints, per
kernel, the sorted per-sample TFLOP/s over ``--samples`` alternating samples, each on inputs
allocated afresh (``--fresh``: new addresses every sample) or on one set, so a bimodal kernel
or an address-dependent one shows itself.

    python tools/run_spread.py [--shape 128:8192:causal] [--samples 30] [--fresh] \\
        [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_attention import parse_shapes  # noqa: E402
from timing import time_ms  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", type=parse_shapes, default=parse_shapes("128:8192:causal"))
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--calls", type=int, default=5, help="calls per sample")
    parser.add_argument("--fresh", action="store_true", help="new inputs for every sample")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    args = parser.parse_args(argv)

    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import cuparing as cr

    (d, s, causal), *_ = args.shape
    dtype = getattr(torch, args.dtype)
    flops = 4 * args.heads * s * s * d / (2 if causal else 1)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def inputs():
        return [torch.randn(1, s, args.heads, d, device="cuda", dtype=dtype) for _ in range(3)]

    q, k, v = inputs()
    rates = {"ours": [], "cudnn": []}
    for _ in range(args.samples):
        if args.fresh:
            q, k, v = inputs()  # (the old ones freed after: new addresses, mostly)
        ours = functools.partial(cr.attention, q, k, v, causal=causal)
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        rates["ours"].append(flops / time_ms(ours, 1, warmup=1, calls=args.calls) / 1e9)
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            peer = functools.partial(sdpa, qt, kt, vt, is_causal=causal)
            rates["cudnn"].append(flops / time_ms(peer, 1, warmup=1, calls=args.calls) / 1e9)
    print(f"card: {torch.cuda.get_device_name()}; D={d} S={s} causal={causal} H={args.heads} "
          f"{args.dtype}; {args.samples} samples of {args.calls} calls, fresh={args.fresh}")
    for name, values in rates.items():
        ordered = sorted(values)
        print(f"{name:>6}: median {statistics.median(values):6.1f}  min {ordered[0]:6.1f}  "
              f"max {ordered[-1]:6.1f}  sorted " + " ".join(f"{x:.0f}" for x in ordered))
    ratio = [a / b for a, b in zip(rates["ours"], rates["cudnn"], strict=True)]
    print(f"ratio per sample: median {statistics.median(ratio):.3f} min {min(ratio):.3f} "
          f"max {max(ratio):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
