"""Train a small causal attention block in PyTorch through the ring; the loss curve matches one
device.

The block: RMS-normalised input, q/k/v projections (grouped-query heads), causal attention, an
output projection and a residual; the loss is the mean squared error against a fixed random
target, so it falls as the block fits. ``torch.optim.Adam``, the same initial weights and data
for both runs, the block compiled with ``torch.compile(fullgraph=True)`` (cuparing's custom ops
make no graph break).

- Ring: every rank holds a zigzag shard of the sequence and back-propagates its shard's share of
  the loss through ``cuparing.torch.ring_attention``; the gradients are summed over the ranks
  (ring exchanges, in rank order: what a trainer's all-reduce does), then every rank takes the
  same Adam step.
- One device: the same block on the whole sequence through ``cuparing.torch.attention``.

    python examples/train_torch.py [--ranks 4] [--steps 30] [--eager]   # simulated CPU ranks

Prints both loss curves and whether they agree: within 1e-4 relative at every step (the runs
differ only in the order of float32 sums, ~1e-7 relative per step, which Adam's normalised
updates carry from step to step).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

import cuparing as cr
import cuparing.torch as crt

BATCH, SEQLEN, MODEL, HEADS, KV_HEADS = 2, 192, 64, 4, 2
HEADDIM = MODEL // HEADS
LAYOUT = "zigzag"


class Block(torch.nn.Module):
    """x + attention(RMS-normalised x), projected back; ``ring`` None: one device."""

    def __init__(self, ring=None):
        super().__init__()
        generator = torch.Generator().manual_seed(0)  # the same weights on every rank
        kv = KV_HEADS * HEADDIM
        self.ring = ring
        if ring is not None:
            crt.ring_handle(ring)  # registered before compiling (the compiled forward reads it)
        self.proj = torch.nn.ModuleDict({
            "q": torch.nn.Linear(MODEL, MODEL, bias=False),
            "k": torch.nn.Linear(MODEL, kv, bias=False),
            "v": torch.nn.Linear(MODEL, kv, bias=False),
            "o": torch.nn.Linear(MODEL, MODEL, bias=False),
        })  # fmt: skip
        with torch.no_grad():
            for linear in self.proj.values():
                linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator))
                linear.weight.mul_(MODEL**-0.5)

    def forward(self, x):
        b, s, _ = x.shape
        h = x * torch.rsqrt((x * x).mean(-1, keepdim=True) + 1e-6)
        q = self.proj["q"](h).view(b, s, HEADS, HEADDIM)
        k = self.proj["k"](h).view(b, s, KV_HEADS, HEADDIM)
        v = self.proj["v"](h).view(b, s, KV_HEADS, HEADDIM)
        if self.ring is None:
            out = crt.attention(q, k, v, causal=True)
        else:
            out = crt.ring_attention(q, k, v, self.ring, causal=True, layout=LAYOUT)
        return x + self.proj["o"](out.reshape(b, s, MODEL))


def data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, SEQLEN, MODEL, generator=generator)
    target = torch.randn(BATCH, SEQLEN, MODEL, generator=generator)
    return x, target


def summed_over_ranks(ring, values: list[np.ndarray]) -> list[np.ndarray]:
    """Every rank's ``values`` summed, on every rank, through C - 1 ring exchanges; added in
    rank order, so every rank gets the same bits (the weights must stay identical)."""
    by_rank = [None] * ring.size
    by_rank[ring.rank] = values
    for shift in range(1, ring.size):
        received = ring.exchange(values, shift, tag=f"grads-{shift}").wait()
        by_rank[(ring.rank - shift) % ring.size] = [np.asarray(x) for x in received]
    return [sum(part[i] for part in by_rank) for i in range(len(values))]


def train(steps: int, ring=None, compiled: bool = True) -> list[float]:
    """The loss before each of ``steps`` Adam steps: through ``ring`` on its shard (the loss
    summed over the ranks), or on one device when ``ring`` is None."""
    x, target = data()
    if ring is not None:
        x, target = (cr.shard(a, ring.rank, ring.size, layout=LAYOUT) for a in (x, target))
    block = Block(ring)
    forward = torch.compile(block, fullgraph=True, backend="aot_eager") if compiled else block
    optimizer = torch.optim.Adam(block.parameters(), lr=3e-3)
    count = BATCH * SEQLEN * MODEL  # the global mean, so shard losses add up to it
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = ((forward(x) - target) ** 2).sum() / count
        loss.backward()
        params = list(block.parameters())
        if ring is not None:
            summed = summed_over_ranks(
                ring, [loss.detach().reshape(1).numpy()] + [p.grad.numpy() for p in params]
            )
            loss = torch.from_numpy(summed[0])
            for p, g in zip(params, summed[1:], strict=True):
                p.grad.copy_(torch.from_numpy(g))
        losses.append(float(loss.detach().reshape(-1)[0]))
        optimizer.step()
    return losses


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--eager", action="store_true", help="no torch.compile")
    args = parser.parse_args(argv)
    compiled = not args.eager
    one = train(args.steps, compiled=compiled)
    ring = cr.simulate(args.ranks, lambda r: train(args.steps, r, compiled), timeout=600)
    assert all(curve == ring[0] for curve in ring), "ranks saw different losses"
    mode = "compiled" if compiled else "eager"
    print(f"{args.ranks} simulated ranks on the CPU vs one device, float32, {mode}, "
          f"torch {torch.__version__}")  # fmt: skip
    print(f"{'step':>5} {'one device':>12} {'ring':>12}")
    for i in sorted({0, len(one) // 2, len(one) - 1}):
        print(f"{i + 1:>5} {one[i]:>12.6f} {ring[0][i]:>12.6f}")
    worst = max(abs(a - b) / abs(a) for a, b in zip(one, ring[0], strict=True))
    falls = ring[0][-1] < 0.8 * ring[0][0]
    tolerance = 1e-4
    print(f"loss falls: {falls}; worst relative difference {worst:.2e}")
    ok = falls and worst <= tolerance
    print(f"ring loss curve matches one device: {ok} (tolerance {tolerance:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
