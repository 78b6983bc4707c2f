"""Forward attention throughput: cuparing's kernel families vs PyTorch SDPA (flash and cuDNN).

All runs share the process, the card and the inputs (bf16 or ``--dtype float16``, [B, S, H, D],
B=1, H=32). Time is measured with CUDA events (tools/timing.py: back-to-back calls). Every
kernel is timed in turn, one sample each, for ``--rounds`` rounds (default 10), and the medians
are taken over rounds: the card's clock drifts by up to 10% within seconds, and a table that
timed each kernel's samples in one block (as this one did before) moved short causal rows'
ratios by as much (tools/run_spread.py shows it: per alternating sample the ratio stays within
a few %).
FLOPs = 4 * B * H * S^2 * D, halved for causal. Prints TFLOP/s of each kernel family asked for
(``CUPARING_KERNELS`` set per row: sm90 = wgmma with TMA loads, Hopper only; sm90-cp.async = its
cp.async producer; sm80 = mma.sync) and of each peer,
the first family's ratio to each peer, and its registers and local memory (spills).

Usage:
    python tools/bench_attention.py [--quick] [--json PATH] [--repeats N] [--families sm90,sm80]
        [--rounds R] [--shapes D:S:causal|full,...]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import time_ms  # noqa: E402

FULL_SHAPES = [(128, s, c) for s in (4096, 8192, 16384, 32768) for c in (False, True)] + [
    (64, 16384, False), (64, 16384, True), (256, 16384, False), (256, 16384, True),
    (96, 8192, False), (96, 8192, True),
]  # fmt: skip
QUICK_SHAPES = [(128, 8192, False), (128, 8192, True), (64, 16384, False), (256, 16384, True)]


def parse_shapes(text: str) -> list[tuple[int, int, bool]]:
    """``"128:8192:causal,64:16384:full"`` as [(128, 8192, True), (64, 16384, False)]."""
    shapes = []
    for item in text.split(","):
        parts = item.strip().split(":")
        if len(parts) != 3 or parts[2] not in ("causal", "full"):
            raise argparse.ArgumentTypeError(f"a shape is D:S:causal or D:S:full, got {item!r}")
        shapes.append((int(parts[0]), int(parts[1]), parts[2] == "causal"))
    return shapes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="four shapes only")
    parser.add_argument("--json", help="write results as JSON to this path")
    parser.add_argument("--repeats", type=int, default=1, help="samples per kernel and round")
    parser.add_argument(
        "--calls", type=int, default=5, help="calls per timed sample (1: one call at a time)"
    )
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--families", default="sm90,sm80", help="kernel families, first is 'ours'")
    parser.add_argument("--rounds", type=int, default=10,
                        help="time every kernel R times per shape, alternating (medians)")
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--shapes", type=parse_shapes, default=None,
                        help="these rows only, e.g. 128:8192:causal,64:16384:full")
    args = parser.parse_args(argv)
    families = [f.strip() for f in args.families.split(",") if f.strip()]

    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import cuparing as cr
    from cuparing.kernels import loader

    card = torch.cuda.get_device_name()
    print(
        f"card: {card}; torch {torch.__version__}; {args.dtype}, B={args.batch}, H={args.heads}, "
        f"{args.calls} call(s) per timed sample"
    )
    rows = []
    peers = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}
    header = (
        f"{'D':>4} {'S':>6} {'causal':>6} "
        + " ".join(f"{f:>7}" for f in families)
        + " "
        + " ".join(f"{n:>7} {'ratio':>6}" for n in peers)
    )
    print(header + f" {'regs':>5} {'local':>5}")
    shapes = args.shapes or (QUICK_SHAPES if args.quick else FULL_SHAPES)
    for d, s, causal in shapes:
        gen = torch.Generator(device="cuda").manual_seed(0)
        dtype = getattr(torch, args.dtype)
        q, k, v = (
            torch.randn(args.batch, s, args.heads, d, device="cuda", dtype=dtype, generator=gen)
            for _ in range(3)
        )  # fmt: skip
        flops = 4 * args.batch * args.heads * s * s * d / (2 if causal else 1)
        result = {"card": card, "dtype": args.dtype, "D": d, "S": s, "causal": causal}
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # SDPA wants [B, H, S, D]
        samples = {name: [] for name in (*families, *peers)}
        # rounds alternate every kernel, so a drift of the card's clock reaches all of them
        for _ in range(max(args.rounds, 1)):
            for family in reversed(families):  # the first family ends up active for the stats
                os.environ["CUPARING_KERNELS"] = family.split("-")[0]
                os.environ["CUPARING_TMA"] = "0" if family.endswith("cp.async") else "1"
                ms = time_ms(
                    functools.partial(cr.attention, q, k, v, causal=causal),
                    args.repeats,
                    calls=args.calls,
                )
                samples[family].append(flops / ms / 1e9)
            for name, backend in peers.items():
                try:
                    with sdpa_kernel([backend]):
                        sdpa = torch.nn.functional.scaled_dot_product_attention
                        peer_ms = time_ms(
                            functools.partial(sdpa, qt, kt, vt, is_causal=causal),
                            args.repeats,
                            calls=args.calls,
                        )
                    samples[name].append(flops / peer_ms / 1e9)
                except RuntimeError as exc:  # backend not available for this shape/card
                    result[f"{name}_error"] = str(exc).splitlines()[0]
        for name, values in samples.items():
            result[f"{name}_tflops"] = statistics.median(values) if values else None
            result[f"{name}_samples"] = len(values)  # rounds it ran in (a peer may refuse)
        result["ours_tflops"] = result[f"{families[0]}_tflops"]
        kernel, _, _ = loader.get_fwd_kernel(
            loader.forward_head_dim(d, loader.device_arch()), args.dtype)
        result["regs"], result["local_bytes"] = kernel.num_regs, kernel.local_size_bytes
        rows.append(result)
        cells = []
        for name in peers:
            peer = result[f"{name}_tflops"]
            cells.append(
                f"{peer:7.1f} {result['ours_tflops'] / peer:6.2f}"
                if peer
                else f"{'n/a':>7} {'':>6}"
            )
        print(
            f"{d:>4} {s:>6} {str(causal):>6} "
            + " ".join(f"{result[f'{f}_tflops']:7.1f}" for f in families)
            + " "
            + " ".join(cells)
            + f" {result['regs']:>5} {result['local_bytes']:>5}"
        )
        del q, k, v, qt, kt, vt
        torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
