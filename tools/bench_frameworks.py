"""Ring attention inside the frameworks' compilers, against the same work called without them.

    python -m cuparing.launch --nproc-per-node 2 tools/bench_frameworks.py torch [--json PATH]
    python -m cuparing.launch --nproc-per-node 2 tools/bench_frameworks.py jax [--json PATH]

``torch``: a training step of one attention block (RMS norm, q/k/v/o projections in bfloat16,
``cuparing.torch.ring_attention``, a float32 mean-square loss, backward) on each rank's shard,
eager and under ``torch.compile(fullgraph=True)`` (inductor), H/Hkv 32/8, D=128, 8k tokens per
GPU by default, causal zigzag and full contiguous. The op is opaque to the compiler, so the
compiled step should be no slower than the eager one (target: within 5%).

``jax``: the ring's forward and backward (``jax.vjp`` of ``cuparing.jax.ring_attention``) jitted
inside ``shard_map`` over a mesh from ``cuparing.jax.ring_mesh``, against
``cuparing.ring_attention`` + ``cuparing.ring_attention_backward`` called directly on CuPy arrays
of the same shapes (target: within 10%).

Timing: median over ``--repeats`` samples (ranks aligned by a barrier before each) of ``--calls``
steps back to back, host clock from before the first call to the end of the last one's GPU work,
divided by ``--calls``; the table takes the slowest rank. Rank 0 prints the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import numpy as np

import cuparing as cr

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import checkout_commit  # noqa: E402

HEADS, KV_HEADS, HEADDIM = 32, 8, 128
MASKS = [("causal", "zigzag", True), ("full", "contiguous", False)]


def time_steps(step, ring, wait, repeats: int, calls: int, warmup: int = 3) -> float:
    """Median milliseconds per ``step()`` (module docstring); ``wait(result)`` returns when the
    GPU work of the step that returned ``result`` (and of every step before it) is done."""
    for _ in range(warmup):
        last = step()
    wait(last)
    samples = []
    for _ in range(repeats):
        ring.barrier()
        start = time.perf_counter()
        for _ in range(calls):
            last = step()
        wait(last)
        samples.append((time.perf_counter() - start) / calls * 1e3)
    return statistics.median(samples)


def slowest(ring, value: float) -> float:
    """The largest ``value`` over the ranks (the step is done when the slowest rank is)."""
    return max(float(b) for b in ring.allgather_bytes(repr(value).encode()))


def torch_block(ring, layout: str, causal: bool):
    """The benchmark's attention block (module docstring), bfloat16 on this rank's GPU."""
    import torch

    import cuparing.torch as crt

    model, kv = HEADS * HEADDIM, KV_HEADS * HEADDIM

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q = torch.nn.Linear(model, model, bias=False)
            self.k = torch.nn.Linear(model, kv, bias=False)
            self.v = torch.nn.Linear(model, kv, bias=False)
            self.o = torch.nn.Linear(model, model, bias=False)

        def forward(self, x):
            b, s, _ = x.shape
            h = x * torch.rsqrt((x.float() ** 2).mean(-1, keepdim=True) + 1e-6).to(x.dtype)
            q = self.q(h).view(b, s, HEADS, HEADDIM)
            k = self.k(h).view(b, s, KV_HEADS, HEADDIM)
            v = self.v(h).view(b, s, KV_HEADS, HEADDIM)
            out = crt.ring_attention(q, k, v, ring, causal=causal, layout=layout)
            return x + self.o(out.reshape(b, s, model))

    torch.manual_seed(0)
    return Block().to(device="cuda", dtype=torch.bfloat16)


def bench_torch(ring, tokens: int, repeats: int, calls: int) -> list[dict]:
    import torch

    import cuparing.torch as crt

    torch.cuda.set_device(ring.device.id)
    crt.ring_handle(ring)  # registered before compiling
    x = torch.randn(1, tokens, HEADS * HEADDIM, device="cuda", dtype=torch.bfloat16)
    rows = []
    for mask, layout, causal in MASKS:
        block = torch_block(ring, layout, causal)
        times = {}
        for name, forward in (("eager", block), ("compiled", torch.compile(block, fullgraph=True))):

            def step(forward=forward, block=block):
                block.zero_grad(set_to_none=True)
                forward(x).float().square().mean().backward()

            ms = time_steps(step, ring, lambda _: torch.cuda.synchronize(), repeats, calls)
            times[name] = slowest(ring, ms)
        rows.append({"framework": "torch", "mask": mask, "layout": layout,
                     "tokens_per_gpu": tokens, "baseline": "eager", "baseline_ms": times["eager"],
                     "framework_ms": times["compiled"],
                     "ratio": times["compiled"] / times["eager"]})  # fmt: skip
    return rows


def bench_jax(ring, tokens: int, repeats: int, calls: int) -> list[dict]:
    import cupy
    import jax
    import ml_dtypes
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import cuparing.jax as crj

    mesh = crj.ring_mesh(ring, "seq")
    seq = P(None, "seq")
    rng = np.random.default_rng(ring.rank)
    shapes = {"q": (1, tokens, HEADS, HEADDIM), "k": (1, tokens, KV_HEADS, HEADDIM),
              "v": (1, tokens, KV_HEADS, HEADDIM), "dout": (1, tokens, HEADS, HEADDIM)}  # fmt: skip
    host = {n: rng.standard_normal(s).astype(ml_dtypes.bfloat16) for n, s in shapes.items()}
    sharding = NamedSharding(mesh, seq)
    on_jax = [jax.make_array_from_process_local_data(sharding, host[n]) for n in shapes]
    on_cupy = [cupy.asarray(host[n]) for n in shapes]
    rows = []
    for mask, layout, causal in MASKS:

        def forward_backward(q, k, v, dout, layout=layout, causal=causal):
            def attend(q, k, v):
                return crj.ring_attention(q, k, v, ring, causal=causal, layout=layout)

            out, pullback = jax.vjp(attend, q, k, v)
            return out, *pullback(dout)

        jitted = jax.jit(jax.shard_map(forward_backward, mesh=mesh, in_specs=(seq,) * 4,
                                       out_specs=(seq,) * 4))  # fmt: skip

        def jax_step(jitted=jitted):
            return jitted(*on_jax)

        def direct_step(layout=layout, causal=causal):
            q, k, v, dout = on_cupy
            out, lse = cr.ring_attention(q, k, v, ring, causal=causal, layout=layout,
                                         return_lse=True)  # fmt: skip
            return cr.ring_attention_backward(dout, q, k, v, out, lse, ring, causal=causal,
                                              layout=layout)  # fmt: skip

        times = {
            "direct": time_steps(direct_step, ring, lambda _: cupy.cuda.Device().synchronize(),
                                 repeats, calls),
            "jax": time_steps(jax_step, ring, jax.block_until_ready, repeats, calls),
        }  # fmt: skip
        times = {name: slowest(ring, ms) for name, ms in times.items()}
        rows.append({"framework": "jax", "mask": mask, "layout": layout,
                     "tokens_per_gpu": tokens, "baseline": "direct", "baseline_ms": times["direct"],
                     "framework_ms": times["jax"],
                     "ratio": times["jax"] / times["direct"]})  # fmt: skip
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("framework", choices=["torch", "jax"])
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per GPU")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--calls", type=int, default=3, help="steps back to back per sample")
    parser.add_argument("--json", metavar="PATH", help="write rows and metadata (rank 0)")
    args = parser.parse_args(argv)
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # CuPy needs memory too
    import cupy

    ring = cr.Ring.from_env(timeout=600)
    bench = bench_torch if args.framework == "torch" else bench_jax
    rows = bench(ring, args.tokens, args.repeats, args.calls)
    card = cupy.cuda.runtime.getDeviceProperties(ring.device.id)["name"]
    card = card.decode() if isinstance(card, bytes) else str(card)
    if ring.rank == 0:
        meta = {"card": card, "C": ring.size, "commit": checkout_commit(), "dtype": "bfloat16",
                "H/Hkv/D": f"{HEADS}/{KV_HEADS}/{HEADDIM}", "calls": args.calls,
                "repeats": args.repeats, "command": " ".join(sys.argv),
                "date": datetime.datetime.now().isoformat(timespec="seconds")}  # fmt: skip
        print(f"{card} x {ring.size}, bf16, B=1, H/Hkv/D {meta['H/Hkv/D']}, commit "
              f"{meta['commit']}, {meta['date']}")  # fmt: skip
        print(f"{'framework':<10}{'mask':<8}{'layout':<12}{'tok/GPU':>8}  {'baseline':<9}"
              f"{'base ms':>9}{'framework ms':>14}{'ratio':>8}")  # fmt: skip
        for r in rows:
            print(f"{r['framework']:<10}{r['mask']:<8}{r['layout']:<12}{r['tokens_per_gpu']:>8}  "
                  f"{r['baseline']:<9}{r['baseline_ms']:>9.2f}{r['framework_ms']:>14.2f}"
                  f"{r['ratio']:>8.3f}")  # fmt: skip
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"meta": meta, "rows": rows}, f, indent=1)
    ring.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
