"""Train a small causal attention block in PyTorch through the ring; the loss curve matches one
device.

The block: RMS-normalised input, q/k/v projections (grouped-query heads), causal attention, an
output projection and a residual; the loss is the mean squared error against a fixed random
target, so it falls as the block fits. ``torch.optim.Adam``, the same initial weights and data
for both runs, the block compiled with ``torch.compile(fullgraph=True)`` (cuparing's custom ops
make no graph break).

- Ring: every rank holds a zigzag shard of the sequence and back-propagates its shard's share of
  the loss through ``cuparing.torch.ring_attention``; the gradients are summed over the ranks
  (an all-gather, added in rank order: what a trainer's all-reduce does), then every rank takes
  the same Adam step.
- One device: the same block on the whole sequence through ``cuparing.torch.attention``.

    python examples/train_torch.py [--ranks 4] [--steps 30] [--eager]   # simulated CPU ranks
    python -m cuparing.launch --nproc-per-node 2 examples/train_torch.py  # one GPU per rank

On the CPU everything is float32 and the curves agree within 1e-4 relative at every step (the
runs differ only in the order of float32 sums, ~1e-7 relative per step, which Adam's normalised
updates carry from step to step). Launched on GPUs (torchrun, mpirun, srun or
``cuparing.launch``: one process per GPU) the block is larger, its attention runs in
bfloat16 through cuparing's kernels, and every rank also trains the one-device block on its own
GPU; the curves then agree within 2^-8 relative (bfloat16's unit roundoff): the two runs round
the same float32 attention results to bfloat16, apart from the last bit of the few elements
whose float32 value the ring's merge order moves across a rounding boundary, and the loss
averages over every element.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch

import cuparing as cr
import cuparing.torch as crt

LAYOUT = "zigzag"


@dataclass(frozen=True)
class Setup:
    """The block's and the data's sizes, and where attention runs."""

    batch: int
    seqlen: int  # global
    model: int
    heads: int
    kv_heads: int
    device: str = "cpu"
    attention_dtype: torch.dtype = torch.float32

    @property
    def headdim(self) -> int:
        return self.model // self.heads


CPU = Setup(batch=2, seqlen=192, model=64, heads=4, kv_heads=2)
GPU = Setup(batch=1, seqlen=8192, model=1024, heads=8, kv_heads=2, device="cuda",
            attention_dtype=torch.bfloat16)  # fmt: skip


class Block(torch.nn.Module):
    """x + attention(RMS-normalised x), projected back; ``ring`` None: one device."""

    def __init__(self, setup: Setup, ring=None):
        super().__init__()
        generator = torch.Generator().manual_seed(0)  # the same weights on every rank
        kv = setup.kv_heads * setup.headdim
        self.setup, self.ring = setup, ring
        if ring is not None:
            crt.ring_handle(ring)  # registered before compiling (the compiled forward reads it)
        model = setup.model
        self.proj = torch.nn.ModuleDict({
            "q": torch.nn.Linear(model, model, bias=False),
            "k": torch.nn.Linear(model, kv, bias=False),
            "v": torch.nn.Linear(model, kv, bias=False),
            "o": torch.nn.Linear(model, model, bias=False),
        })  # fmt: skip
        with torch.no_grad():
            for linear in self.proj.values():
                linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator))
                linear.weight.mul_(model**-0.5)
        self.to(setup.device)

    def forward(self, x):
        setup = self.setup
        b, s, _ = x.shape
        h = x * torch.rsqrt((x * x).mean(-1, keepdim=True) + 1e-6)
        dtype = setup.attention_dtype
        q = self.proj["q"](h).view(b, s, setup.heads, setup.headdim).to(dtype)
        k = self.proj["k"](h).view(b, s, setup.kv_heads, setup.headdim).to(dtype)
        v = self.proj["v"](h).view(b, s, setup.kv_heads, setup.headdim).to(dtype)
        if self.ring is None:
            out = crt.attention(q, k, v, causal=True)
        else:
            out = crt.ring_attention(q, k, v, self.ring, causal=True, layout=LAYOUT)
        return x + self.proj["o"](out.to(x.dtype).reshape(b, s, setup.model))


def data(setup: Setup) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    shape = (setup.batch, setup.seqlen, setup.model)
    x = torch.randn(shape, generator=generator)
    target = torch.randn(shape, generator=generator)
    return x, target


def summed_over_ranks(ring, values: list[np.ndarray]) -> list[np.ndarray]:
    """Every rank's float32 ``values`` summed, on every rank, through the ring's all-gather;
    added in rank order, so every rank gets the same bits (the weights must stay identical)."""
    flat = np.concatenate([np.asarray(v, dtype=np.float32).ravel() for v in values])
    parts = [np.frombuffer(b, dtype=np.float32) for b in ring.allgather_bytes(flat.tobytes())]
    total = parts[0].copy()
    for part in parts[1:]:
        total += part
    bounds = np.cumsum([0] + [np.size(v) for v in values])
    return [
        total[start:stop].reshape(np.shape(v))
        for start, stop, v in zip(bounds[:-1], bounds[1:], values, strict=True)
    ]


def train(setup: Setup, steps: int, ring=None, compiled: bool = True) -> list[float]:
    """The loss before each of ``steps`` Adam steps: through ``ring`` on its shard (the loss
    summed over the ranks), or on one device when ``ring`` is None."""
    x, target = data(setup)
    if ring is not None:
        x, target = (cr.shard(a, ring.rank, ring.size, layout=LAYOUT) for a in (x, target))
    x, target = x.to(setup.device), target.to(setup.device)
    block = Block(setup, ring)
    forward = torch.compile(block, fullgraph=True, backend="aot_eager") if compiled else block
    optimizer = torch.optim.Adam(block.parameters(), lr=3e-3)
    count = setup.batch * setup.seqlen * setup.model  # the global mean: shard losses add up to it
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = ((forward(x) - target) ** 2).sum() / count
        loss.backward()
        params = list(block.parameters())
        if ring is not None:
            host = [loss.detach().reshape(1).cpu().numpy()]
            summed = summed_over_ranks(ring, host + [p.grad.cpu().numpy() for p in params])
            loss = torch.from_numpy(summed[0])
            for p, g in zip(params, summed[1:], strict=True):
                p.grad.copy_(torch.from_numpy(g))
        losses.append(float(loss.detach().reshape(-1)[0]))
        optimizer.step()
    return losses


def compare(one: list[float], ring: list[float], tolerance: float, title: str) -> bool:
    """Print both curves at three steps and whether they agree within ``tolerance`` (relative,
    at every step) while the loss falls."""
    print(title)
    print(f"{'step':>5} {'one device':>12} {'ring':>12}")
    for i in sorted({0, len(one) // 2, len(one) - 1}):
        print(f"{i + 1:>5} {one[i]:>12.6f} {ring[i]:>12.6f}")
    worst = max(abs(a - b) / abs(a) for a, b in zip(one, ring, strict=True))
    falls = ring[-1] < 0.8 * ring[0]
    print(f"loss falls: {falls}; worst relative difference {worst:.2e}")
    ok = falls and worst <= tolerance
    print(f"ring loss curve matches one device: {ok} (tolerance {tolerance:g})")
    return ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=4, help="simulated ranks (CPU)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--eager", action="store_true", help="no torch.compile")
    args = parser.parse_args(argv)
    compiled = not args.eager
    mode = "compiled" if compiled else "eager"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        with cr.Ring.from_env() as ring:
            curve = train(GPU, args.steps, ring, compiled)
            one = train(GPU, args.steps, compiled=compiled)  # the whole sequence on this GPU
            curves = ring.allgather_bytes(np.asarray(curve, dtype=np.float64).tobytes())
            if any(other != curves[0] for other in curves):
                raise AssertionError("ranks saw different losses")
            if ring.rank != 0:
                return 0
            title = (f"{ring.size} GPUs ({torch.cuda.get_device_name()}) vs one, bf16 "
                     f"attention, {mode}, S={GPU.seqlen}, torch {torch.__version__}")  # fmt: skip
            return 0 if compare(one, curve, 2.0**-8, title) else 1
    one = train(CPU, args.steps, compiled=compiled)
    ring = cr.simulate(args.ranks, lambda r: train(CPU, args.steps, r, compiled), timeout=600)
    assert all(curve == ring[0] for curve in ring), "ranks saw different losses"
    title = (f"{args.ranks} simulated ranks on the CPU vs one device, float32, {mode}, "
             f"torch {torch.__version__}")  # fmt: skip
    return 0 if compare(one, ring[0], 1e-4, title) else 1


if __name__ == "__main__":
    sys.exit(main())
