"""Train a small causal attention block in JAX through the ring; the loss curve matches one device.

The block: RMS-normalised input, q/k/v projections (grouped-query heads), causal attention, an
output projection and a residual; the loss is the mean squared error against a fixed random
target, so it falls as the block fits. Adam, the same initial weights and data for both runs.

- Launched, one process per GPU (torchrun or ``cuparing.launch``, which set ``WORLD_SIZE``): the
  step is ``jax.jit`` of ``shard_map`` over the sequence axis of a mesh from
  ``cuparing.jax.ring_mesh`` (JAX's multi-process runtime on the ring's processes): each rank's
  body back-propagates its zigzag shard's share of the loss through
  ``cuparing.jax.ring_attention``; the replicated weights' gradients come out summed over the
  ranks (JAX's transpose of their broadcast to the shards is a ``psum``) and Adam runs in the
  same jitted step. The block is larger there and its attention runs in bfloat16 through
  cuparing's kernels; every rank also trains the one-device block on its own GPU. Without GPUs
  the processes run on the CPU with a ring on a gloo ``torch.distributed`` group (needs torch).
- Not launched: the ranks are simulated threads on the CPU, each jitting its shard's step, the
  gradients summed over the ranks by ring exchanges.
- One device: the same block on the whole sequence through ``cuparing.jax.attention``.

    python examples/train_jax.py [--ranks 4] [--steps 30]                 # simulated CPU ranks
    python -m cuparing.launch --nproc-per-node 2 examples/train_jax.py     # one GPU per rank

On the CPU everything is float32 and the curves agree within 1e-4 relative at every step: the runs
differ only in the order of float32 sums (attention merged over ranks, gradients added over
ranks: ~1e-7 relative per step), which Adam's normalised updates carry from step to step (a few
1e-6 seen over 30 steps). With bfloat16 attention on GPUs the bound is 2^-8 (bfloat16's unit
roundoff): the runs round the same float32 attention results to bfloat16 apart from the last bit
of the few elements whose value the ring's merge order moves across a rounding boundary.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

import numpy as np

import cuparing as cr

LAYOUT = "zigzag"


@dataclass(frozen=True)
class Setup:
    """The block's and the data's sizes, and the dtype attention runs in."""

    batch: int
    seqlen: int  # global
    model: int
    heads: int
    kv_heads: int
    attention_dtype: str = "float32"
    tolerance: float = 1e-4  # relative, loss curve of the ring vs one device (module docstring)

    @property
    def headdim(self) -> int:
        return self.model // self.heads


CPU = Setup(batch=2, seqlen=192, model=64, heads=4, kv_heads=2)
GPU = Setup(batch=1, seqlen=8192, model=1024, heads=8, kv_heads=2, attention_dtype="bfloat16",
            tolerance=2.0**-8)  # fmt: skip


def initial_params(setup: Setup) -> dict[str, np.ndarray]:
    """Seeded weights: the same on every rank and in the one-device run."""
    rng = np.random.default_rng(0)
    model, kv = setup.model, setup.kv_heads * setup.headdim
    shapes = {"q": (model, model), "k": (model, kv), "v": (model, kv), "o": (model, model)}
    return {n: (rng.standard_normal(s) * model**-0.5).astype(np.float32) for n, s in shapes.items()}


def data(setup: Setup) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    shape = (setup.batch, setup.seqlen, setup.model)
    return tuple(rng.standard_normal(shape).astype(np.float32) for _ in range(2))


def block(setup: Setup, params, x, attend):
    """x [B, S, MODEL] -> x + attention(x) projected back; ``attend(q, k, v)`` is the attention."""
    import jax
    import jax.numpy as jnp

    b, s, _ = x.shape
    h = x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + 1e-6)
    dtype = jnp.dtype(setup.attention_dtype)
    q = (h @ params["q"]).reshape(b, s, setup.heads, setup.headdim).astype(dtype)
    k = (h @ params["k"]).reshape(b, s, setup.kv_heads, setup.headdim).astype(dtype)
    v = (h @ params["v"]).reshape(b, s, setup.kv_heads, setup.headdim).astype(dtype)
    out = attend(q, k, v).astype(x.dtype)
    return x + out.reshape(b, s, setup.model) @ params["o"]


def adam(params, grads, state, step, xp=np, lr=3e-3, betas=(0.9, 0.999), eps=1e-8):
    """One Adam update in float32 with the array namespace ``xp``: ``jax.numpy`` traced inside a
    jitted step, NumPy on the host. (The simulated ranks update with NumPy: eager JAX ops from
    their threads would wait for XLA's CPU threads, which ranks blocked in a ring exchange inside
    their attention callbacks may all be holding.)"""
    m, v = state
    new_params, new_m, new_v = {}, {}, {}
    for name, g in grads.items():
        new_m[name] = betas[0] * m[name] + (1 - betas[0]) * g
        new_v[name] = betas[1] * v[name] + (1 - betas[1]) * g * g
        m_hat = new_m[name] / (1 - betas[0] ** step)
        v_hat = new_v[name] / (1 - betas[1] ** step)
        new_params[name] = (params[name] - lr * m_hat / (xp.sqrt(v_hat) + eps)).astype(np.float32)
    return new_params, (new_m, new_v)


def loss_of(setup: Setup, attend):
    """``loss(params, x, target)``: the shard's (or whole sequence's) share of the global mean
    squared error."""
    count = setup.batch * setup.seqlen * setup.model  # the global mean: shard losses add up

    def loss(params, x, target):
        return ((block(setup, params, x, attend) - target) ** 2).sum() / count

    return loss


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


def train_one_device(setup: Setup, steps: int, device=None) -> list[float]:
    """The loss before each of ``steps`` Adam steps of the block on the whole sequence."""
    import jax
    import jax.numpy as jnp

    import cuparing.jax as crj

    def attend(q, k, v):
        return crj.attention(q, k, v, causal=True)

    @jax.jit
    def step(params, state, count, x, target):
        loss, grads = jax.value_and_grad(loss_of(setup, attend))(params, x, target)
        params, state = adam(params, grads, state, count, jnp)
        return loss, params, state

    params, batch = jax.device_put((initial_params(setup), data(setup)), device)
    return run_steps(step, params, batch, steps)


def run_steps(step, params, batch, steps: int) -> list[float]:
    """``steps`` calls of a jitted ``step(params, state, count, *batch) -> (loss, params,
    state)``; the loss before each."""
    import jax

    state = (jax.tree.map(lambda w: w * 0, params),) * 2
    losses = []
    for count in range(1, steps + 1):
        loss, params, state = step(params, state, count, *batch)
        losses.append(float(np.asarray(loss.addressable_data(0))))
    return losses


def train_sharded(setup: Setup, steps: int, ring, mesh) -> list[float]:
    """The ring's loss curve: one jitted ``shard_map`` step over ``mesh`` (rank r's device at
    position r), this process feeding its shard of the data."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import cuparing.jax as crj

    axis = mesh.axis_names[0]
    sequence, replicated = P(None, axis), P()

    def attend(q, k, v):
        return crj.ring_attention(q, k, v, ring, causal=True, layout=LAYOUT)

    def shard_step(params, x, target):
        loss, grads = jax.value_and_grad(loss_of(setup, attend))(params, x, target)
        return jax.lax.psum(loss, axis), grads  # the weights' gradients arrive summed

    sharded_grad = jax.shard_map(shard_step, mesh=mesh, in_specs=(replicated, sequence, sequence),
                                 out_specs=(replicated, replicated))  # fmt: skip

    def as_global(array, spec):
        return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), array)

    batch = [as_global(cr.shard(a, ring.rank, ring.size, layout=LAYOUT), sequence)
             for a in data(setup)]  # fmt: skip

    @jax.jit
    def step(params, state, count, x, target):
        loss, grads = sharded_grad(params, x, target)
        params, state = adam(params, grads, state, count, jnp)
        return loss, params, state

    params = {n: as_global(w, replicated) for n, w in initial_params(setup).items()}
    return run_steps(step, params, batch, steps)


def train_simulated_rank(setup: Setup, steps: int, ring) -> list[float]:
    """One simulated rank (a thread): its shard's jitted gradients, summed over the ranks by ring
    exchanges, then the same Adam update as every other rank."""
    import jax

    import cuparing.jax as crj

    x, target = (cr.shard(a, ring.rank, ring.size, layout=LAYOUT) for a in data(setup))

    def attend(q, k, v):
        return crj.ring_attention(q, k, v, ring, causal=True, layout=LAYOUT)

    grad_fn = jax.jit(jax.value_and_grad(loss_of(setup, attend)))
    params = initial_params(setup)
    state = ({n: np.zeros_like(w) for n, w in params.items()},) * 2
    losses = []
    for count in range(1, steps + 1):
        loss, grads = grad_fn(params, x, target)
        values = {n: np.asarray(g) for n, g in grads.items()}
        values["loss"] = np.asarray(loss, dtype=np.float32).reshape(1)
        values = summed_over_ranks(ring, values)
        losses.append(float(values.pop("loss")[0]))
        params, state = adam(params, values, state, count)
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


def launched_ring():
    """This process's ring: NCCL between GPUs where CuPy sees any, else a gloo process group."""
    try:
        import cupy

        gpus = cupy.cuda.runtime.getDeviceCount()
    except Exception:  # noqa: BLE001 - no CuPy, driver or GPU: the CPU
        gpus = 0
    if gpus:
        return cr.Ring.from_env()
    import torch.distributed as dist

    dist.init_process_group("gloo")
    return cr.Ring.from_torch()


def main_launched(steps: int) -> int:
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # CuPy needs memory too
    with launched_ring() as ring:
        import jax

        import cuparing.jax as crj

        mesh = crj.ring_mesh(ring)  # before anything else asks JAX for its devices
        device = jax.local_devices()[0]
        setup = GPU if device.platform == "gpu" else CPU
        curve = train_sharded(setup, steps, ring, mesh)
        one = train_one_device(setup, steps, device)  # the whole sequence on this device
        curves = ring.allgather_bytes(np.asarray(curve, dtype=np.float64).tobytes())
        if any(other != curves[0] for other in curves):
            raise AssertionError("ranks saw different losses")
        if ring.rank != 0:
            return 0
        title = (f"{ring.size} processes ({device.device_kind}) vs one device, "
                 f"{setup.attention_dtype} attention, S={setup.seqlen}, "
                 f"jax {jax.__version__}")  # fmt: skip
        return 0 if compare(one, curve, setup.tolerance, title) else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=4, help="simulated ranks (not launched)")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return main_launched(args.steps)
    import jax
    import jax.numpy as jnp

    jnp.zeros(())  # start JAX's backend before the simulated ranks' threads do
    one = train_one_device(CPU, args.steps, jax.devices("cpu")[0])
    ring = cr.simulate(args.ranks, lambda r: train_simulated_rank(CPU, args.steps, r))
    assert all(curve == ring[0] for curve in ring), "ranks saw different losses"
    title = f"{args.ranks} simulated ranks on the CPU vs one device, float32, jax {jax.__version__}"
    return 0 if compare(one, ring[0], CPU.tolerance, title) else 1


if __name__ == "__main__":
    sys.exit(main())
