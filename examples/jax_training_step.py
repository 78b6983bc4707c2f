"""One jitted training step of a sequence-parallel attention layer in JAX, through the ring.

Each rank holds a zigzag shard of the sequence, projects it to q, k, v, runs
``cuparing.jax.ring_attention`` inside ``jax.jit(jax.value_and_grad(...))``, and gets its share of
the projection gradients; they are then summed over ranks, as a trainer would all-reduce them.
The script checks the result against the same step done densely on the whole sequence.

    python examples/jax_training_step.py        # 4 simulated ranks on the CPU

On GPUs the same ``ring_step`` runs once per process (``ring = cuparing.Ring.from_env()`` under
``python -m cuparing.launch``), with ``XLA_PYTHON_CLIENT_MEM_FRACTION`` leaving cuparing room.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

import cuparing as cr
import cuparing.jax as crj

BATCH, SEQLEN, MODEL, HEADS, KV_HEADS = 1, 256, 64, 4, 2
HEADDIM = MODEL // HEADS


def make_params() -> dict[str, np.ndarray]:
    """q/k/v projection weights, seeded: the same on every rank."""
    rng = np.random.default_rng(0)
    kv = KV_HEADS * HEADDIM
    shapes = {"q": (MODEL, MODEL), "k": (MODEL, kv), "v": (MODEL, kv)}
    return {n: (rng.standard_normal(s) * MODEL**-0.5).astype(np.float32) for n, s in shapes.items()}


def inputs() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((BATCH, SEQLEN, MODEL)).astype(np.float32)
    target = rng.standard_normal((BATCH, SEQLEN, HEADS, HEADDIM)).astype(np.float32)
    return x, target


def project(params, x):
    """x [B, S, MODEL] -> q [B, S, H, D], k and v [B, S, Hkv, D]."""
    b, s, _ = x.shape
    return (
        (x @ params["q"]).reshape(b, s, HEADS, HEADDIM),
        (x @ params["k"]).reshape(b, s, KV_HEADS, HEADDIM),
        (x @ params["v"]).reshape(b, s, KV_HEADS, HEADDIM),
    )


def ring_step(ring) -> dict[str, np.ndarray]:
    """This rank's share of the projection gradients for one step on its zigzag shard."""
    x, target = inputs()
    x_local = cr.shard(x, ring.rank, ring.size, layout="zigzag")
    target_local = cr.shard(target, ring.rank, ring.size, layout="zigzag")

    def loss(params):
        out = crj.ring_attention(*project(params, x_local), ring, causal=True, layout="zigzag")
        return ((out - target_local) ** 2).sum() / target.size

    _, grads = jax.jit(jax.value_and_grad(loss))(make_params())
    return {name: np.asarray(g, dtype=np.float64) for name, g in grads.items()}


def dense_step() -> dict[str, np.ndarray]:
    """The same step on the whole sequence in float64 NumPy, with dense attention written out."""
    params = {n: w.astype(np.float64) for n, w in make_params().items()}
    x, target = (a.astype(np.float64) for a in inputs())
    q, k, v = project(params, x)
    out = cr.reference_attention(q, k, v, causal=True)
    dout = 2 * (out - target) / target.size  # d loss / d out
    dq, dk, dv = cr.reference_attention_backward(dout, q, k, v, causal=True)
    flat = x.reshape(-1, MODEL)  # projection weight gradient: x^T (d loss / d projection)
    grads = zip("qkv", (dq, dk, dv), strict=True)
    return {n: flat.T @ g.reshape(flat.shape[0], -1) for n, g in grads}


def main(ranks: int = 4) -> int:
    results = cr.simulate(ranks, ring_step)
    # a trainer all-reduces these; here the simulated ranks' gradients are simply summed
    grads = {name: sum(r[name] for r in results) for name in results[0]}
    print(f"{ranks} simulated ranks on the CPU, float32, jax {jax.__version__}:")
    worst = 0.0
    for name, want in dense_step().items():
        err = float(np.linalg.norm(grads[name] - want) / np.linalg.norm(want))
        worst = max(worst, err)
        print(f"  grad {name}: relative error {err:.2e}")
    tolerance = 1e-4
    print(f"ring step matches the dense step: {worst <= tolerance} (tolerance {tolerance:g})")
    return 0 if worst <= tolerance else 1


if __name__ == "__main__":
    jnp.zeros(())  # start JAX's backend before the simulated ranks' threads do
    sys.exit(main())
