"""Where one replayed ring call's host time goes, piece by piece, one call at a time.

    CUPARING_TRANSPORT=nccl|ipc python -m cuparing.launch --nproc-per-node 2 \\
        tools/replay_breakdown.py [--calls 200]

For the ring forward (``out=`` given) and backward at 512 and 2048 tokens per GPU (causal zigzag,
H/Hkv 32/8, D=128, bf16 torch tensors: repeats replay CUDA graphs), rank 0 prints the median host
microseconds of one call made after a synchronisation and, per call, the time spent inside each
piece of the replay path (means over the calls): the graph launch, the copy-engine ring's
flag-value patch, the watchdog's flight (``watch``), the call's signature, the replay as a
whole ("replay (all)"). The pieces are timed by wrapping the functions, private ones included
(a diagnostic of this package's internals), with ``time.perf_counter``; a piece a tree lacks is
left out, so the script times other trees of the graph-replay era too (``PYTHONPATH=<tree>``:
the cuparing it imports is named first).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict

PIECES = [  # (module path, attribute owner, function, label)
    ("cuparing.backends.ring_graphs", "GraphDriver", "launch", "cuGraphLaunch"),
    ("cuparing.backends.ring_graphs", "GraphDriver", "copy", "K/V copies"),
    ("cuparing.comm.ipc", "_CapturedExchanges", "patch", "flag patch"),
    ("cuparing.comm.gpu_ring", "GpuRing", "watch", "watch"),
    ("cuparing.call_plans", None, "signature", "signature"),
    ("cuparing.backends.ring_graphs", "CapturedRingCall", "replay", "replay (all)"),
]


def wrap_pieces(spent: dict) -> None:
    """Wrap every piece this tree has so that its time adds up in ``spent[label]``."""
    import importlib

    for module_name, owner_name, name, label in PIECES:
        module = importlib.import_module(module_name)
        owner = getattr(module, owner_name, None) if owner_name else module
        inner = getattr(owner, name, None)
        if inner is None:
            continue

        def wrapper(*args, _inner=inner, _label=label, **kwargs):
            start = time.perf_counter()
            try:
                return _inner(*args, **kwargs)
            finally:
                spent[_label] += time.perf_counter() - start

        setattr(owner, name, wrapper)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args(argv)

    import torch

    import cuparing as cr

    spent: dict = defaultdict(float)
    wrap_pieces(spent)
    ring = cr.Ring.from_env()
    opts = {"causal": True, "layout": "zigzag"}
    b, h, hkv, d = 1, 32, 8, 128
    if ring.rank == 0:
        print(f"cuparing from {cr.__file__}; {type(ring).__name__}, {ring.size} GPUs")
    for tokens in (512, 2048):
        gen = torch.Generator(device="cuda").manual_seed(ring.rank)
        q = torch.randn(b, tokens, h, d, device="cuda", dtype=torch.bfloat16, generator=gen)
        k, v = (torch.randn(b, tokens, hkv, d, device="cuda", dtype=torch.bfloat16,
                            generator=gen) for _ in range(2))  # fmt: skip
        out, lse = cr.ring_attention(q, k, v, ring, return_lse=True, **opts)
        dout = torch.randn_like(out)
        out2, lse2 = torch.empty_like(out), torch.empty_like(lse)

        def forward(q=q, k=k, v=v, out2=out2, lse2=lse2):
            cr.ring_attention(q, k, v, ring, out=out2, lse=lse2, **opts)

        def backward(dout=dout, q=q, k=k, v=v, out=out, lse=lse):
            cr.ring_attention_backward(dout, q, k, v, out, lse, ring, **opts)

        for name, fn in (("forward out=", forward), ("backward", backward)):
            for _ in range(20):
                fn()
            ring.barrier()
            torch.cuda.synchronize()
            spent.clear()
            totals = []
            for _ in range(args.calls):
                torch.cuda.synchronize()
                start = time.perf_counter()
                fn()
                totals.append(time.perf_counter() - start)
            torch.cuda.synchronize()
            if ring.rank == 0:
                ranked = sorted(spent.items(), key=lambda item: -item[1])
                pieces = ", ".join(f"{label} {seconds / args.calls * 1e6:.1f}"
                                   for label, seconds in ranked)  # fmt: skip
                print(f"{tokens:5d} tokens/GPU {name:13s} median "
                      f"{statistics.median(totals) * 1e6:6.1f} us; per call: {pieces}")
            ring.barrier()
    ring.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
