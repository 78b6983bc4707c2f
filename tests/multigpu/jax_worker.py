"""One rank of the JAX ``shard_map`` checks; started by tests/test_jax.py through cuparing.launch.

    python -m cuparing.launch --nproc-per-node N tests/multigpu/jax_worker.py gpu
    python -m cuparing.launch --nproc-per-node N tests/multigpu/jax_worker.py cpu

One process per device: the ring is ``Ring.from_env()`` on GPUs (``gpu``), or a ring on a gloo
``torch.distributed`` group on the CPU (``cpu``: no GPU needed, so CI runs it); JAX's
multi-process runtime and the mesh come from ``cuparing.jax.ring_mesh``. Every rank draws the
same fresh random q/k/v/dout (rank 0 draws the seed) and a step is
``jit(shard_map(value_and_grad(loss)))`` over the sequence axis: each rank's body runs
``cuparing.jax.ring_attention`` on its shard, and the gradient of a replicated weight ``w``
(q is scaled by it) comes out summed over the ranks (JAX's transpose of the weight's implicit
broadcast to the shards is a ``psum``). The gathered output and gradients are
compared with the dense float64 reference (tests/numerics.py's table) for a causal zigzag case and
a full contiguous one. Prints ``WORKER OK rank r cases=...`` at the end.
"""

from __future__ import annotations

import os
import sys

import numpy as np

import cuparing as cr

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from numerics import UNIT_ROUNDOFF, Reference, gamma, to_f64  # noqa: E402

# (layout, causal) per case
CASES = (("zigzag", True), ("contiguous", False))


def make_ring(mode: str):
    if mode == "gpu":
        return cr.Ring.from_env()
    import torch.distributed as dist

    dist.init_process_group("gloo")  # the launcher's MASTER_ADDR / MASTER_PORT / RANK
    return cr.Ring.from_torch()


def norm_error(got, want) -> float:
    got = to_f64(got)
    assert np.isfinite(got).all(), "result holds NaN or inf"
    return float(np.linalg.norm(got - to_f64(want)))


def main(mode: str) -> None:
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # CuPy needs memory too
    ring = make_ring(mode)
    import jax
    import jax.numpy as jnp
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import cuparing.jax as crj

    mesh = crj.ring_mesh(ring, "seq")
    seq = P(None, "seq")  # the sequence axis (1) split over the mesh
    c, rank = ring.size, ring.rank
    seed = int(ring.allgather_bytes(str(np.random.SeedSequence().entropy).encode())[0])
    if rank == 0:
        print(f"seed {seed}", flush=True)  # replay a failing draw with this seed
    rng = np.random.default_rng(seed)
    if mode == "gpu":
        import ml_dtypes

        dtype, heads, headdim = ml_dtypes.bfloat16, (8, 2), int(rng.choice([64, 128]))
        local = 2 * int(rng.integers(64, 257))
    else:
        dtype, heads, headdim, local = np.float32, (4, 2), 16, 2 * int(rng.integers(5, 15))
    seqlen, (h, hkv) = c * local, heads
    checked = []
    for layout, causal in CASES:
        q, dout = (rng.standard_normal((1, seqlen, h, headdim)).astype(dtype) for _ in range(2))
        k, v = (rng.standard_normal((1, seqlen, hkv, headdim)).astype(dtype) for _ in range(2))
        weight = np.float32(2.0)  # a power of two: q * w is exact in every dtype

        def body(w, q, k, v, dout, layout=layout, causal=causal):
            def loss(w, q, k, v):
                scaled = (q.astype(jnp.float32) * w).astype(q.dtype)
                out = crj.ring_attention(scaled, k, v, ring, causal=causal, layout=layout)
                return (out.astype(jnp.float32) * dout.astype(jnp.float32)).sum(), out

            (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(
                w, q, k, v
            )
            return out, *grads

        step = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), seq, seq, seq, seq),
                                     out_specs=(seq, P(), seq, seq, seq)))  # fmt: skip

        def sharded(x, layout=layout):  # this rank's shard -> the global array
            return jax.make_array_from_process_local_data(
                NamedSharding(mesh, seq), cr.shard(x, rank, c, layout=layout)
            )

        replicated = jax.make_array_from_process_local_data(NamedSharding(mesh, P()), weight)
        results = step(replicated, *(sharded(x) for x in (q, k, v, dout)))
        out, dw, dq, dk, dv = (
            np.asarray(multihost_utils.process_allgather(x, tiled=True)) for x in results
        )

        def whole(x, layout=layout):  # the global array holds the shards in rank order
            return cr.unshard(np.split(x, c, axis=1), layout=layout)

        scaled = (q.astype(np.float32) * weight).astype(dtype)
        ref = Reference(scaled, k, v, dout, causal=causal)
        out_bound = ref.kernel_out_bound() if mode == "gpu" else ref.bound("out")
        errors = {"out": (norm_error(whole(out), ref.out), out_bound)}
        # the body's dq is w dq' (q' = w q, w a power of two: exact)
        grads = {"dq'": to_f64(whole(dq)) / float(weight), "dk": whole(dk), "dv": whole(dv)}
        for i, (name, got) in enumerate(grads.items()):
            errors[name] = (norm_error(got, ref.grads[i]), ref.bound("grad", i))
        # dw = sum(dq' q), summed in float32 by each rank, then over the ranks: the dq'
        # bound times |q| (Cauchy-Schwarz) plus the float32 sum's rounding
        dw_want = float((ref.grads[0] * to_f64(q)).sum())
        dw_sum_err = gamma(q.size + c, UNIT_ROUNDOFF["float32"]) * float(
            np.abs(ref.grads[0] * to_f64(q)).sum()
        )
        dw_bound = ref.bound("grad", 0) * float(np.linalg.norm(to_f64(q))) + dw_sum_err
        errors["dw"] = (abs(float(dw) - dw_want), dw_bound)
        for name, (err, bound) in errors.items():
            verdict = "PASS" if err <= bound else "FAIL"
            print(f"{verdict} {layout} causal={causal} {name}: error {err:.3g} bound {bound:.3g}",
                  flush=True)  # fmt: skip
            if err > bound:
                sys.exit(1)
        checked.append(f"{layout}/{'causal' if causal else 'full'}")
    platform = jax.devices()[0].platform
    print(f"WORKER OK rank {rank} cases={','.join(checked)} d={headdim} S={seqlen} "
          f"devices={platform} ring={type(ring).__name__}", flush=True)  # fmt: skip
    ring.close()


if __name__ == "__main__":
    main(sys.argv[1])
