"""Train a small causal attention block in JAX through the ring; the loss curve matches one device.

The block: RMS-normalised input, q/k/v projections (grouped-query heads), causal attention, an
output projection and a residual; the loss is the mean squared error against a fixed random
target, so it falls as the block fits. Adam, the same initial weights and data for both runs.

- Ring: every rank holds a zigzag shard of the sequence; a step is ``jax.jit(value_and_grad)``
  of its shard's share of the loss through ``cuparing.jax.ring_attention``, the gradients summed
  over the ranks (ring exchanges: what a trainer's all-reduce does), then the same Adam update on
  every rank.
- One device: the same block on the whole sequence through ``cuparing.jax.attention``.

    python examples/train_jax.py [--ranks 4] [--steps 30]     # simulated ranks on the CPU

Prints both loss curves and whether they agree: within 1e-4 relative at every step. The two runs
differ only in the order of float32 sums (attention merged over ranks, gradients added over
ranks: ~1e-7 relative per step), but Adam's normalised updates carry such differences from step
to step, so the bound leaves them room to grow over the run (1.5e-7 seen over 30 steps).
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

import cuparing as cr
import cuparing.jax as crj

BATCH, SEQLEN, MODEL, HEADS, KV_HEADS = 2, 192, 64, 4, 2
HEADDIM = MODEL // HEADS
LAYOUT = "zigzag"


def initial_params() -> dict[str, np.ndarray]:
    """Seeded weights: the same on every rank and in the one-device run."""
    rng = np.random.default_rng(0)
    kv = KV_HEADS * HEADDIM
    shapes = {"q": (MODEL, MODEL), "k": (MODEL, kv), "v": (MODEL, kv), "o": (MODEL, MODEL)}
    return {n: (rng.standard_normal(s) * MODEL**-0.5).astype(np.float32) for n, s in shapes.items()}


def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((BATCH, SEQLEN, MODEL)).astype(np.float32)
    target = rng.standard_normal((BATCH, SEQLEN, MODEL)).astype(np.float32)
    return x, target


def block(params, x, attend):
    """x [B, S, MODEL] -> x + attention(x) projected back; ``attend(q, k, v)`` is the attention."""
    b, s, _ = x.shape
    h = x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + 1e-6)
    q = (h @ params["q"]).reshape(b, s, HEADS, HEADDIM)
    k = (h @ params["k"]).reshape(b, s, KV_HEADS, HEADDIM)
    v = (h @ params["v"]).reshape(b, s, KV_HEADS, HEADDIM)
    return x + attend(q, k, v).reshape(b, s, MODEL) @ params["o"]


def adam(params, grads, state, step, lr=3e-3, betas=(0.9, 0.999), eps=1e-8):
    """One Adam update (NumPy, float32): the same arithmetic on every rank."""
    m, v = state
    new_params, new_m, new_v = {}, {}, {}
    for name, g in grads.items():
        new_m[name] = betas[0] * m[name] + (1 - betas[0]) * g
        new_v[name] = betas[1] * v[name] + (1 - betas[1]) * g * g
        m_hat = new_m[name] / (1 - betas[0] ** step)
        v_hat = new_v[name] / (1 - betas[1] ** step)
        new_params[name] = (params[name] - lr * m_hat / (np.sqrt(v_hat) + eps)).astype(np.float32)
    return new_params, (new_m, new_v)


def summed_over_ranks(ring, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every rank's ``values`` summed, on every rank, through C - 1 ring exchanges; added in
    rank order, so every rank gets the same bits (the weights must stay identical)."""
    names = sorted(values)
    by_rank = [None] * ring.size
    by_rank[ring.rank] = [values[n] for n in names]
    for shift in range(1, ring.size):
        received = ring.exchange(by_rank[ring.rank], shift, tag=f"grads-{shift}").wait()
        by_rank[(ring.rank - shift) % ring.size] = [np.asarray(x) for x in received]
    return {name: sum(part[i] for part in by_rank) for i, name in enumerate(names)}


def train(steps: int, ring=None) -> list[float]:
    """The loss before each of ``steps`` Adam steps: through ``ring`` on its shard (the loss
    summed over the ranks), or on one device when ``ring`` is None."""
    x, target = data()
    if ring is not None:
        x, target = (cr.shard(a, ring.rank, ring.size, layout=LAYOUT) for a in (x, target))

        def attend(q, k, v):
            return crj.ring_attention(q, k, v, ring, causal=True, layout=LAYOUT)
    else:

        def attend(q, k, v):
            return crj.attention(q, k, v, causal=True)

    count = BATCH * SEQLEN * MODEL  # the global mean, so shard losses add up to it

    def loss_fn(params):
        return ((block(params, x, attend) - target) ** 2).sum() / count

    step_fn = jax.jit(jax.value_and_grad(loss_fn))
    params = initial_params()
    state = ({n: np.zeros_like(w) for n, w in params.items()},) * 2
    losses = []
    for step in range(1, steps + 1):
        loss, grads = step_fn(params)
        values = {n: np.asarray(g) for n, g in grads.items()}
        values["loss"] = np.asarray(loss, dtype=np.float32).reshape(1)
        if ring is not None:
            values = summed_over_ranks(ring, values)
        losses.append(float(values.pop("loss")[0]))
        params, state = adam(params, values, state, step)
    return losses


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args(argv)
    one = train(args.steps)
    ring = cr.simulate(args.ranks, lambda r: train(args.steps, r))
    assert all(curve == ring[0] for curve in ring), "ranks saw different losses"
    print(f"{args.ranks} simulated ranks on the CPU vs one device, float32, jax {jax.__version__}")
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
    jnp.zeros(())  # start JAX's backend before the simulated ranks' threads do
    sys.exit(main())
