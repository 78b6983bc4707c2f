"""Forward and backward milliseconds per call on one GPU, by mask: full, causal, a sliding window
and packed documents (where most tiles are partially masked).

For before/after comparisons of kernel changes that cost something only on partially masked
tiles (the other benchmarks time full and causal attention alone). Ours only, no peer: run it
under both trees in the same call on the same card (``PYTHONPATH=old`` / ``new``) and compare.
The kernel family follows ``CUPARING_KERNELS`` (sm80, sm90); the backward is the sm80 family's
kernel whatever the forward family (``--backward``; packed documents: forward only).

Inputs: bf16 [1, S, H, D] torch tensors (S=8192, H=32, D=128 by default), standard normal, the
documents 256-2047 tokens long (seed 0). ``--plant``: one NaN in k and one +inf in dout (head 0,
mid-sequence rows off the tile grid), so the kernels' rare path for non-finite values inside
partially masked tiles runs and its cost shows; ``--overflow``: every 16th dout row +inf (an
fp16 loss scale that overflowed), so that path runs in most CTAs. Time: CUDA events
(tools/timing.py: back-to-back calls), median of repeats. Prints one JSON line: {"family",
"plant", "overflow", "card", "fwd_<mask>": ms, "bwd_<mask>": ms, ...}.

Usage:
    CUPARING_KERNELS=sm90 python tools/bench_masks.py [--backward] [--plant | --overflow]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import time_ms  # noqa: E402


def document_bounds(rng, seqlen: int):
    """[0, e_1, ..., S]: documents of 256-2047 tokens (the last one cut at S)."""
    import numpy as np

    bounds = [0]
    while bounds[-1] < seqlen:
        bounds.append(min(seqlen, bounds[-1] + int(rng.integers(256, 2048))))
    return np.array(bounds, dtype=np.int32)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seqlen", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--headdim", type=int, default=128)
    parser.add_argument("--window", type=int, default=512, help="left side of the window mask")
    parser.add_argument("--backward", action="store_true", help="also time the backward")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--plant", action="store_true", help="one NaN in k, one +inf in dout")
    parser.add_argument("--overflow", action="store_true", help="every 16th dout row +inf")
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    import cuparing as cr
    from cuparing.comm.local import SoloRing

    rng = np.random.default_rng(0)
    shape = (1, args.seqlen, args.heads, args.headdim)
    q, k, v, dout = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    if args.plant:
        k[0, args.seqlen // 2 + 5, 0, 0] = float("nan")
        dout[0, args.seqlen // 3 + 7, 0, 0] = float("inf")
    if args.overflow:
        dout[:, 5::16] = float("inf")
    masks = {
        "full": {},
        "causal": {"causal": True},
        "window": {"window": (args.window, 0)},
        "documents": {"causal": True, "cu_seqlens": document_bounds(rng, args.seqlen)},
    }
    result = {"family": os.environ.get("CUPARING_KERNELS", "auto"), "plant": args.plant,
              "overflow": args.overflow, "card": torch.cuda.get_device_name()}  # fmt: skip
    for name, mask in masks.items():
        result[f"fwd_{name}"] = round(time_ms(lambda m=mask: cr.attention(q, k, v, **m),
                                              repeats=args.repeats), 4)  # fmt: skip
        if args.backward and "cu_seqlens" not in mask:
            out, lse = cr.attention(q, k, v, return_lse=True, **mask)

            def backward(m=mask, out=out, lse=lse):
                return cr.ring_attention_backward(dout, q, k, v, out, lse, SoloRing(), **m)

            result[f"bwd_{name}"] = round(time_ms(backward, repeats=args.repeats), 4)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
