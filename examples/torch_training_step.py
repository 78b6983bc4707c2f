"""One training step of a sequence-parallel attention layer in PyTorch, through the ring.

Each rank holds a zigzag shard of the sequence, projects it to q, k, v, runs
``cuparing.ring_attention_torch`` (differentiable), and back-propagates a loss; the projection
gradients are then summed over ranks, as a data/sequence-parallel trainer would all-reduce them.
The script checks the result against the same step done densely on the whole sequence.

    python examples/torch_training_step.py        # 4 simulated ranks on the CPU

On GPUs the same ``ring_step`` runs once per process: ``ring = cuparing.Ring.from_env()`` under
``python -m cuparing.launch`` / torchrun, tensors on ``cuda``, and the gradients all-reduced by
the trainer (tests/multigpu/ring_worker.py checks this autograd path through the NCCL ring).
"""

from __future__ import annotations

import sys

import torch

import cuparing as cr

BATCH, SEQLEN, MODEL, HEADS, KV_HEADS = 1, 512, 128, 8, 2
HEADDIM = MODEL // HEADS


def make_layer(device, dtype) -> torch.nn.ModuleDict:
    """q/k/v projections with fixed seeded weights, the same on every rank (a local generator:
    simulated ranks are threads, and the global torch seed is shared between them)."""
    generator = torch.Generator().manual_seed(0)
    kv = KV_HEADS * HEADDIM
    layer = torch.nn.ModuleDict({
        "q": torch.nn.Linear(MODEL, MODEL, bias=False),
        "k": torch.nn.Linear(MODEL, kv, bias=False),
        "v": torch.nn.Linear(MODEL, kv, bias=False),
    })  # fmt: skip
    with torch.no_grad():
        for linear in layer.values():
            weight = torch.randn(linear.weight.shape, generator=generator) * MODEL**-0.5
            linear.weight.copy_(weight)
    return layer.to(device=device, dtype=dtype)


def project(layer, x):
    """x [B, S, MODEL] -> q [B, S, H, D], k and v [B, S, Hkv, D]."""
    b, s, _ = x.shape
    return (
        layer["q"](x).view(b, s, HEADS, HEADDIM),
        layer["k"](x).view(b, s, KV_HEADS, HEADDIM),
        layer["v"](x).view(b, s, KV_HEADS, HEADDIM),
    )


def inputs(device, dtype):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, SEQLEN, MODEL, generator=generator)
    target = torch.randn(BATCH, SEQLEN, HEADS, HEADDIM, generator=generator)
    return x.to(device, dtype), target.to(device, dtype)


def ring_step(ring, device, dtype) -> dict[str, torch.Tensor]:
    """This rank's share of the projection gradients for one step on its zigzag shard."""
    layer = make_layer(device, dtype)
    x, target = inputs(device, dtype)
    x_local = cr.shard(x, ring.rank, ring.size, layout="zigzag")
    target_local = cr.shard(target, ring.rank, ring.size, layout="zigzag")
    q, k, v = project(layer, x_local)
    out = cr.ring_attention_torch(q, k, v, ring, causal=True, layout="zigzag")
    loss = ((out.float() - target_local.float()) ** 2).sum() / target.numel()
    loss.backward()
    return {name: p.grad.detach().double().cpu() for name, p in layer.named_parameters()}


def dense_step() -> dict[str, torch.Tensor]:
    """The same step on the whole sequence, in float64 on the CPU, with dense attention."""
    layer = make_layer("cpu", torch.float64)
    x, target = inputs("cpu", torch.float64)
    q, k, v = project(layer, x)
    group = HEADS // KV_HEADS
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.repeat_interleave(group, 2).transpose(1, 2),
        v.repeat_interleave(group, 2).transpose(1, 2), is_causal=True,
    ).transpose(1, 2)  # fmt: skip
    loss = ((out - target) ** 2).sum() / target.numel()
    loss.backward()
    return {name: p.grad.detach() for name, p in layer.named_parameters()}


def report(grads: dict[str, torch.Tensor], tolerance: float) -> int:
    worst = 0.0
    for name, want in dense_step().items():
        err = ((grads[name] - want).norm() / want.norm()).item()
        worst = max(worst, err)
        print(f"  grad {name}: relative error {err:.2e}")
    print(f"ring step matches the dense step: {worst <= tolerance} (tolerance {tolerance:g})")
    return 0 if worst <= tolerance else 1


def main(ranks: int = 4) -> int:
    results = cr.simulate(ranks, lambda ring: ring_step(ring, "cpu", torch.float32))
    # a trainer all-reduces these; here the simulated ranks' gradients are simply summed
    grads = {name: sum(r[name] for r in results) for name in results[0]}
    print(f"{ranks} simulated ranks on the CPU, float32:")
    return report(grads, tolerance=1e-4)


if __name__ == "__main__":
    sys.exit(main())
