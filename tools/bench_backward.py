"""Backward attention throughput: cuparing's backward kernel families vs PyTorch SDPA (flash and
cuDNN) on one GPU.

Ours: ``cr.ring_attention_backward`` on a ring of one (``SoloRing``): the delta kernel, the
backward launch(es) into float32 accumulators, and the final casts, once per kernel family asked
for (``CUPARING_BWD`` set per row: sm90 = the wgmma backward, Hopper only, head dims 40 to 128;
sm80 = mma.sync; a family name ending in ``-det``, e.g. sm90-det, runs it with
``deterministic=True``). Peers: ``torch.nn.functional.scaled_dot_product_attention`` with the
FLASH and the CUDNN backend, timing only ``torch.autograd.grad`` of a retained graph (their backward
kernels, no forward). All see the same bf16 inputs [B, S, H, D] (B=1, H=32, D=128 by default) in
the same process, on the same card. Time: CUDA events (tools/timing.py: back-to-back calls); every
kernel timed in turn, one sample each, for ``--rounds`` rounds (default 10), medians over rounds
(the card's clock drifts within seconds: bench_attention.py says more). FLOPs = 2.5 * 4 * B * H *
S^2 * D (five GEMMs against the forward's two), halved for causal. The ratio columns compare the
first family with each peer.

Usage:
    python tools/bench_backward.py [--quick] [--json PATH] [--repeats N] [--rounds R]
        [--headdim D] [--families sm90,sm90-det,sm80]
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

FULL_SHAPES = [(s, c) for s in (4096, 8192, 16384) for c in (False, True)]
QUICK_SHAPES = [(8192, False), (8192, True)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="S=8k only")
    parser.add_argument("--json", help="write results as JSON to this path")
    parser.add_argument("--repeats", type=int, default=1, help="samples per kernel and round")
    parser.add_argument("--rounds", type=int, default=10,
                        help="time every kernel R times per shape, alternating (medians)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--headdim", type=int, default=128)
    parser.add_argument("--families", default="sm80", help="backward families, first is 'ours'")
    args = parser.parse_args(argv)
    families = [f.strip() for f in args.families.split(",") if f.strip()]

    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import cuparing as cr
    from cuparing.comm.local import SoloRing
    from cuparing.kernels import loader

    card = torch.cuda.get_device_name()
    b, h, d = args.batch, args.heads, args.headdim
    peers = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}
    print(f"card: {card}; torch {torch.__version__}; bf16, B={b}, H={h}, D={d}")
    header = (f"{'S':>6} {'causal':>6} " + " ".join(f"{f:>7}" for f in families) + " "
              + " ".join(f"{n:>7} {'ratio':>6}" for n in peers))  # fmt: skip
    print(header + f" {'regs':>5}")
    rows = []
    ring = SoloRing()
    for s, causal in QUICK_SHAPES if args.quick else FULL_SHAPES:
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v, dout = (
            torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, generator=gen)
            for _ in range(4)
        )
        flops = 2.5 * 4 * b * h * s * s * d / (2 if causal else 1)
        result = {"card": card, "D": d, "S": s, "causal": causal}

        out, lse = cr.ring_attention(q, k, v, ring, causal=causal, return_lse=True)
        arch = loader.device_arch()
        runs = {}  # name -> (CUPARING_BWD or None, the call)
        for family in families:
            kernels = family.removesuffix("-det")
            padded = loader.backward_head_dim(d, arch)
            if loader.backward_family(padded, arch) != kernels:  # not on this card / head dim
                result[f"{family}_ms"] = result[f"{family}_tflops"] = None
                continue
            runs[family] = (kernels, functools.partial(
                cr.ring_attention_backward, dout, q, k, v, out, lse, ring, causal=causal,
                deterministic=family.endswith("-det"),
            ))  # fmt: skip

        qt, kt, vt = (x.transpose(1, 2).detach().requires_grad_() for x in (q, k, v))
        dout_t = dout.transpose(1, 2)
        for name, backend in peers.items():
            try:
                with sdpa_kernel([backend]):
                    out_t = torch.nn.functional.scaled_dot_product_attention(
                        qt, kt, vt, is_causal=causal
                    )

                def peer(out_t=out_t, inputs=(qt, kt, vt), dout_t=dout_t):
                    return torch.autograd.grad(out_t, inputs, dout_t, retain_graph=True)

                peer()
                runs[name] = (None, peer)
            except RuntimeError as exc:  # backend not available for this shape/card
                result[f"{name}_tflops"] = None
                result[f"{name}_error"] = str(exc).splitlines()[0]

        # rounds alternate every kernel, so a drift of the card's clock reaches all of them
        samples = {name: [] for name in runs}
        for _ in range(max(args.rounds, 1)):
            for name in reversed(list(runs)):  # the first family ends up active for the stats
                kernels, call = runs[name]
                if kernels is not None:
                    os.environ["CUPARING_BWD"] = kernels
                samples[name].append(time_ms(call, args.repeats))
        for name, values in samples.items():
            ms = statistics.median(values)
            if name in families:
                result[f"{name}_ms"] = ms
            result[f"{name}_tflops"] = flops / ms / 1e9
        result["ours_tflops"] = result[f"{families[0]}_tflops"]
        os.environ["CUPARING_BWD"] = families[0].removesuffix("-det")

        kernels, _, _ = loader.get_bwd_kernels(loader.backward_head_dim(d, arch), "bfloat16")
        result["regs"] = [kernel.num_regs for kernel, _ in kernels]
        result["local_bytes"] = [kernel.local_size_bytes for kernel, _ in kernels]
        rows.append(result)
        cells = []
        ours_tf = result["ours_tflops"]
        for name in peers:
            peer = result[f"{name}_tflops"]
            if peer is None:
                cells.append(f"{'n/a':>7} {'':>6}")
            else:
                cells.append(f"{peer:7.1f} " + (f"{ours_tf / peer:6.2f}" if ours_tf else
                                                f"{'n/a':>6}"))  # fmt: skip

        rates = [result[f"{f}_tflops"] for f in families]
        print(f"{s:>6} {str(causal):>6} "
              + " ".join(f"{x:7.1f}" if x is not None else f"{'n/a':>7}" for x in rates) + " "
              + " ".join(cells) + f" {'/'.join(map(str, result['regs'])):>5}")  # fmt: skip
        del q, k, v, dout, out, lse, qt, kt, vt
        torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
