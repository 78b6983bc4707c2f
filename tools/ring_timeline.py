"""What one ring call spends beyond its kernels: the calling stream's busy time and its gaps.

    python -m cuparing.launch --nproc-per-node 2 tools/ring_timeline.py [--tokens 8192]
        [--heads 32/8] [--layouts contiguous,zigzag,striped] [--calls fwd,bwd]
        [--transport nccl|ipc] [--gap-us 15] [--documents] [--nocomm]

For each layout (``contiguous`` runs without a mask, the others causal; ``--documents``:
bench_varlen.py's packed causal batch, every layout by its documents) and call (the ring
forward, or its backward after one forward), on bf16 torch CUDA tensors (repeats run the kept
plans, and CUDA graphs where the ring captures), every rank prints one line (and with
``--nocomm`` one more for the same call on bench_ring.py's ring that moves nothing):

- alone: median ms of one call timed with CUDA events after the ranks met at a barrier (as
  ``bench_ring.py`` times it); five: the same per call with five calls queued back to back;
- host: wall ms one call took to return on the host (after a synchronisation, outside the
  profiler, which slows the host);
- span / busy: from one call under ``torch.profiler``, ms from the first to the last kernel of
  the calling stream, and the sum of those kernels (transfers and NCCL's kernels left out);
- gaps: the gaps between consecutive kernels longer than ``--gap-us``, their sum, and the
  three longest with the kernels on either side (what the stream waited for there: a transfer,
  a peer, the host).

A gap that recurs on every rank at the same place is the schedule's; one that moves between
ranks is their skew (a rank that entered the call later).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_ring import NoCommRing, as_inputs, time_ms  # noqa: E402
from bench_varlen import global_inputs, packed_batch  # noqa: E402


def kernel_gaps(prof, gap_us: float) -> tuple[float, float, list]:
    """(span ms, busy ms, gaps as (µs, kernel before, kernel after), longest first) of the
    calling stream's kernels in a ``torch.profiler`` run."""
    kernels = sorted(
        (e.time_range.start, e.time_range.end, e.name) for e in prof.events()
        if e.device_type.name == "CUDA" and "nccl" not in e.name.lower()
        and not e.name.startswith("Memcpy")
    )  # fmt: skip
    if not kernels:
        return 0.0, 0.0, []
    gaps = [(b[0] - a[1], a[2][:32], b[2][:32]) for a, b in zip(kernels[:-1], kernels[1:],
                                                                  strict=True)
            if b[0] - a[1] > gap_us]  # fmt: skip
    busy = sum(end - start for start, end, _ in kernels)
    return (kernels[-1][1] - kernels[0][0]) / 1e3, busy / 1e3, sorted(gaps, reverse=True)


def layout_calls(ring, layout: str, tokens: int, heads: int, heads_kv: int,
                 documents: bool = False) -> dict:
    """``{"fwd", "bwd"}``: the ring forward and backward of one layout on ``ring`` (any ring
    of its rank and size) on fresh bf16 torch inputs, D = 128: one sequence (``contiguous``
    without a mask, the others causal), or (``documents``) this rank's shard of bench_varlen's
    packed causal batch of ``size * tokens`` tokens."""
    import cupy
    import ml_dtypes

    import cuparing as cr

    if documents:
        seqlen = ring.size * tokens
        cu = packed_batch(seqlen, seed=0)
        whole = global_inputs(seqlen, seed=0, heads=heads, heads_kv=heads_kv)
        shards = [cr.shard(x, ring.rank, ring.size, layout=layout, cu_seqlens=cu)
                  for x in whole]  # fmt: skip
        q, k, v, dout = as_inputs(shards, "torch")
        opts = {"causal": True, "layout": layout, "cu_seqlens": cu}
    else:
        def rand(h):
            x = cupy.random.standard_normal((1, tokens, h, 128), dtype=cupy.float32)
            return as_inputs([x.astype(ml_dtypes.bfloat16)], "torch")[0]

        q, k, v, dout = rand(heads), rand(heads_kv), rand(heads_kv), rand(heads)
        opts = {"causal": layout != "contiguous", "layout": layout}
    out, lse = cr.ring_attention(q, k, v, ring, return_lse=True, **opts)
    return {
        "fwd": lambda r: cr.ring_attention(q, k, v, r, **opts),
        "bwd": lambda r: cr.ring_attention_backward(dout, q, k, v, out, lse, r, **opts),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per GPU")
    parser.add_argument("--heads", default="32/8", help="query heads / key-value heads")
    parser.add_argument("--layouts", default="contiguous,zigzag,striped")
    parser.add_argument("--calls", default="fwd,bwd")
    parser.add_argument("--transport", choices=["nccl", "ipc"], default=None)
    parser.add_argument("--gap-us", type=float, default=15.0)
    parser.add_argument("--documents", action="store_true", help="bench_varlen's packed batch")
    parser.add_argument("--nocomm", action="store_true", help="also on a ring moving nothing")
    args = parser.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile

    import cuparing as cr

    ring = cr.Ring.from_env(timeout=600, transport=args.transport)
    heads, heads_kv = (int(x) for x in args.heads.split("/"))
    rings = [ring, NoCommRing(ring.rank, ring.size)] if args.nocomm else [ring]
    for layout in args.layouts.split(","):
        calls = layout_calls(ring, layout, args.tokens, heads, heads_kv, args.documents)
        for name, on in itertools.product(args.calls.split(","), rings):
            call = functools.partial(calls[name], on)
            alone = time_ms(call, ring, repeats=9, warmup=5)
            five = time_ms(lambda call=call: [call() for _ in range(5)], ring, 5, 1) / 5
            torch.cuda.synchronize()
            ring.barrier()
            start = time.perf_counter()
            call()
            host = (time.perf_counter() - start) * 1e3
            torch.cuda.synchronize()
            ring.barrier()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                call()
                torch.cuda.synchronize()
            span, busy, gaps = kernel_gaps(prof, args.gap_us)
            top = "; ".join(f"{us:.0f} us {a} -> {b}" for us, a, b in gaps[:3])
            print(f"[{type(on).__name__} rank {ring.rank}] {layout:<10} {name} alone "
                  f"{alone:6.2f} five {five:6.2f} ms | host {host:5.2f} ms | span {span:6.2f} "
                  f"busy {busy:6.2f} ms | {len(gaps)} gaps, {sum(g[0] for g in gaps) / 1e3:.2f} "
                  f"ms: {top}", flush=True)  # fmt: skip
    ring.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
