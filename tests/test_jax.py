"""cuparing.jax: attention and ring_attention inside jax.jit, differentiated by jax.grad, against
the dense float64 reference (tests/numerics.py): on the CPU (inputs placed there, whatever JAX's
default device), the ring on simulated ranks and inside ``shard_map`` across processes; and on
GPUs through XLA's buffers and stream (one GPU, and ``shard_map`` over two)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import gpu_count, record_deterministic_flags, requires_gpu
from hypothesis import given, settings
from hypothesis import strategies as st
from numerics import check_backward, check_forward, check_kernel_forward
from strategies import np_dtype

import cuparing as cr

jax = pytest.importorskip("jax")
crj = pytest.importorskip("cuparing.jax")
WORKER = Path(__file__).parent / "multigpu" / "jax_worker.py"


def _loss_and_grads(fn, q, k, v, dout, platform="cpu"):
    """out and (dq, dk, dv) of sum(fn(q, k, v) * dout), through jit(value_and_grad), with the
    inputs on the first ``platform`` device."""
    q, k, v, dout = jax.device_put((q, k, v, dout), jax.devices(platform)[0])

    def loss(q, k, v):
        out = fn(q, k, v)
        return (out.astype(np.float32) * dout.astype(np.float32)).sum(), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return np.asarray(out), [np.asarray(g) for g in grads]


@settings(deadline=None, max_examples=25)
@given(
    dtype=st.sampled_from(["float32", "bfloat16"]),
    seqlen=st.integers(1, 40),
    heads=st.sampled_from([(2, 1), (2, 2), (4, 2)]),
    mask=st.sampled_from(["none", "causal", "window", "documents"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_jitted_gradient_matches_the_reference(dtype, seqlen, heads, mask, seed):
    rng = np.random.default_rng(seed)
    h, hkv = heads
    q, dout = (rng.standard_normal((2, seqlen, h, 8)).astype(np_dtype(dtype)) for _ in range(2))
    k, v = (rng.standard_normal((2, seqlen, hkv, 8)).astype(np_dtype(dtype)) for _ in range(2))
    documents = {"causal": True, "cu_seqlens": [0, seqlen // 3, seqlen]}
    opts = {"none": {}, "causal": {"causal": True}, "window": {"window": (3, 2)},
            "documents": documents}[mask]  # fmt: skip
    out, grads = _loss_and_grads(lambda q, k, v: crj.attention(q, k, v, **opts), q, k, v, dout)
    assert str(out.dtype) == dtype and all(str(g.dtype) == dtype for g in grads)
    check_forward(out, None, q, k, v, **opts)
    check_backward(grads, dout, q, k, v, **opts)


@pytest.mark.parametrize("world,layout", [(2, "zigzag"), (3, "contiguous")])
def test_ring_inside_jit_on_simulated_ranks(world, layout):
    rng = np.random.default_rng(world)
    seqlen = 2 * world * 7
    q, dout = (rng.standard_normal((1, seqlen, 4, 8)).astype(np.float32) for _ in range(2))
    k, v = (rng.standard_normal((1, seqlen, 2, 8)).astype(np.float32) for _ in range(2))

    def rank_fn(ring):
        local = [cr.shard(x, ring.rank, ring.size, layout=layout) for x in (q, k, v, dout)]

        def ours(q, k, v):
            return crj.ring_attention(q, k, v, ring, causal=True, layout=layout)

        return _loss_and_grads(ours, *local)

    results = cr.simulate(world, rank_fn)

    def whole(parts):
        return cr.unshard(parts, layout=layout)

    check_forward(whole([r[0] for r in results]), None, q, k, v, causal=True)
    grads = [whole([r[1][i] for r in results]) for i in range(3)]
    check_backward(grads, dout, q, k, v, causal=True)


def test_a_jitted_step_traces_once():
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((1, 16, 2, 8)).astype(np.float32) for _ in range(3))
    q, k, v = jax.device_put((q, k, v), jax.devices("cpu")[0])
    traces = []

    @jax.jit
    def step(q, k, v):
        traces.append(1)
        return jax.grad(lambda q: crj.attention(q, k, v, causal=True).sum())(q)

    first = np.asarray(step(q, k, v))
    second = np.asarray(step(q + 1, k, v))
    assert len(traces) == 1 and not np.array_equal(first, second)


def test_bad_calls_fail_at_trace_time_with_cuparing_messages():
    q = np.zeros((1, 8, 4, 8), np.float32)
    k = v = np.zeros((1, 8, 3, 8), np.float32)  # 4 query heads over 3 kv heads
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        jax.jit(crj.attention).lower(q, k, v)
    k = v = np.zeros((1, 8, 2, 8), np.float32)
    with pytest.raises(ValueError, match="hides every key"):
        jax.jit(lambda q, k, v: crj.attention(q, k, v, causal=True, window=(-1, 0))).lower(q, k, v)
    with pytest.raises(ValueError, match="cu_seqlens"):
        crj.attention(q, k, v, cu_seqlens=[0, 3, 7])  # ends before S = 8
    with pytest.raises(TypeError, match="deterministic must be a bool"):
        crj.attention(q, k, v, deterministic=1)


@pytest.mark.parametrize("deterministic", [False, True])
def test_deterministic_reaches_the_backward(deterministic, monkeypatch):
    """``deterministic`` travels from the jitted ops to cuparing's backward, one device and ring
    (what it does to the kernels: the GPU test; the CPU backend is ordered anyway)."""
    seen = record_deterministic_flags(monkeypatch)
    from cuparing.comm.local import SoloRing

    rng = np.random.default_rng(2)
    q, k, v, dout = (rng.standard_normal((1, 10, 2, 8)).astype(np.float32) for _ in range(4))
    ring = SoloRing()
    for fn in (lambda q, k, v: crj.attention(q, k, v, causal=True, deterministic=deterministic),
               lambda q, k, v: crj.ring_attention(q, k, v, ring, deterministic=deterministic)):
        seen.clear()
        _loss_and_grads(fn, q, k, v, dout)
        assert seen == [deterministic]


def _gpu_platform():
    try:
        return jax.devices("gpu")[0].platform
    except RuntimeError:  # JAX without a GPU plugin
        return None


@requires_gpu(1)
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("mask", ["causal", "window", "documents"])
def test_jitted_gradient_on_gpu(mask, deterministic):
    """On a GPU the callbacks view XLA's own buffers and run the kernels on XLA's stream: the
    output and gradients of jit(value_and_grad) in bfloat16 against the float64 reference, on
    fresh random data (the results land in buffers XLA allocated, so nothing stale can pass);
    ``deterministic``: two more runs give bit-identical gradients (where the GPU's backward
    kernels have that mode)."""
    platform = _gpu_platform()
    if platform is None:
        pytest.skip("JAX has no GPU backend here")
    if deterministic:
        import cupy

        from cuparing.kernels import loader

        with cupy.cuda.Device(0):
            if loader.backward_family(64, loader.device_arch()) != "sm90":
                pytest.skip("no deterministic backward kernels on this GPU")
    rng = np.random.default_rng()
    seqlen = int(rng.integers(200, 600))
    bf16 = np_dtype("bfloat16")
    q, dout = (rng.standard_normal((2, seqlen, 4, 64)).astype(bf16) for _ in range(2))
    k, v = (rng.standard_normal((2, seqlen, 2, 64)).astype(bf16) for _ in range(2))
    cut = sorted(int(x) for x in rng.integers(0, seqlen, 3))
    opts = {"causal": {"causal": True}, "window": {"window": (100, 20)},
            "documents": {"causal": True, "cu_seqlens": [0, *cut, seqlen]}}[mask]  # fmt: skip
    def run():
        return _loss_and_grads(
            lambda q, k, v: crj.attention(q, k, v, deterministic=deterministic, **opts),
            q, k, v, dout, platform=platform,
        )  # fmt: skip

    out, grads = run()
    for _ in range(2 if deterministic else 0):
        _, again = run()
        assert all(a.tobytes() == b.tobytes() for a, b in zip(grads, again, strict=True))
    assert str(out.dtype) == "bfloat16" and all(str(g.dtype) == "bfloat16" for g in grads)
    check_kernel_forward(out, None, q, k, v, **opts)
    check_backward(grads, dout, q, k, v, **opts)


def test_ring_mesh_of_one_rank_holds_this_process_cpu():
    from cuparing.comm.local import SoloRing

    mesh = crj.ring_mesh(SoloRing(), "seq")
    assert mesh.axis_names == ("seq",)
    assert mesh.devices.tolist() == [jax.devices("cpu")[0]]


def _shard_map_worker(mode: str, world: int) -> subprocess.CompletedProcess:
    """tests/multigpu/jax_worker.py on ``world`` processes through cuparing.launch."""
    command = [sys.executable, "-m", "cuparing.launch", "--nproc-per-node", str(world),
               "--timeout", "600", str(WORKER), mode]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=660)


def _assert_every_rank_ok(proc, world: int, platform: str) -> None:
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
    assert proc.returncode == 0, tail
    assert not re.search(r"^\[rank \d+\] FAIL", proc.stdout, re.M), tail
    for rank in range(world):
        ok = rf"^\[rank {rank}\] WORKER OK rank {rank} .* devices={platform} "
        assert re.search(ok, proc.stdout, re.M), tail


@pytest.mark.parametrize("world", [2, 3])
def test_ring_inside_shard_map_across_cpu_processes(world):
    """One process per rank, JAX's multi-process runtime and mesh from ``ring_mesh``, the ring on
    a gloo process group: jit(shard_map(value_and_grad)) of the ring op against the float64
    reference, a replicated weight's gradient summed over the ranks (the worker's docstring)."""
    pytest.importorskip("torch")
    _assert_every_rank_ok(_shard_map_worker("cpu", world), world, "cpu")


@requires_gpu(2)
@pytest.mark.gpu
@pytest.mark.parametrize("world", [2, 4])
def test_ring_inside_shard_map_on_gpus(world):
    """The same on GPUs: ``Ring.from_env``'s default ring (the copy engines between GPUs of
    one host), XLA's buffers and streams, bfloat16 kernels."""
    if _gpu_platform() is None:
        pytest.skip("JAX has no GPU backend here")
    if gpu_count() < world:
        pytest.skip(f"needs {world} GPUs, found {gpu_count()}")
    _assert_every_rank_ok(_shard_map_worker("gpu", world), world, "gpu")


_REPLICATED_KEYS_CHECK = """
import numpy as np, jax
import cuparing.jax as crj
from jax.sharding import PartitionSpec as P
rng = np.random.default_rng(7)
q, dout = (rng.standard_normal((1, 8, 2, 8)).astype(np.float32) for _ in range(2))
k, v = (rng.standard_normal((1, 8, 2, 8)).astype(np.float32) for _ in range(2))
mesh = jax.sharding.Mesh(np.array(jax.devices("cpu")[:2]), ("seq",))
def loss(q, k, v, dout):
    return (crj.attention(q, k, v) * dout).sum()
def body(q, k, v, dout):
    value, grads = jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v, dout)
    return jax.lax.psum(value, "seq"), *grads
seq = P(None, "seq")
step = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(seq, P(), P(), seq),
                             out_specs=(P(), seq, P(), P())))
inside = step(q, k, v, dout)
outside = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v, dout)
errors = [abs(float(inside[0]) - float(outside[0])) / abs(float(outside[0]))]
errors += [float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())
           for a, b in zip(inside[1:], outside[1])]
print("relative errors", errors)
"""


def test_replicated_keys_inside_shard_map_get_summed_gradients():
    """Inside shard_map over 2 CPU devices, k and v replicated next to sharded queries (a
    non-ring use: each shard's queries against all keys): their gradients must be the two shards'
    parts summed (JAX's transpose of the broadcast); out and every gradient match the op outside
    shard_map. Without the sum, dk and dv would hold one shard's part (relative error ~1). A
    subprocess: JAX's CPU device count is fixed when it starts."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", _REPLICATED_KEYS_CHECK], capture_output=True,
                          text=True, timeout=300, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    errors = [float(x) for x in re.findall(r"[-+0-9.e]+", proc.stdout.split("errors", 1)[1])]
    # float32 sums of 8 keys and 2 shards, in other orders than outside: a few units of 2^-24
    assert len(errors) == 4 and max(errors) < 1e-5, proc.stdout
