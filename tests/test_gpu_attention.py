"""GPU forward and backward (our kernels; cuBLAS for float32) against float64 references.

Forward tests run once per kernel family (the ``kernel_family`` fixture sets CUPARING_KERNELS):
sm80 (mma.sync) everywhere, sm90 (wgmma) on Hopper GPUs only; head dims the sm90 family has no
tiles for run the sm80 kernel either way. The backward kernel tests run once per backward family
(``backward_family``: CUPARING_BWD=sm80, and the sm90 one on Hopper, head dims 40 to 128).

Tolerances come from tests/numerics.py (one table for CPU and GPU): ``check_kernel_forward``
for the forward (the kernels round P to the input dtype before P.V), and ``check_backward`` for
gradients.

Every test here needs a CUDA GPU and CuPy (``requires_gpu(1)``); on the CPU they are skipped.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from conftest import (
    record_direct_grads,
    record_plan_reuse,
    record_plan_runs,
    requires_gpu,
    torch_on_gpu,
)
from gpu_arrays import (
    poison_pool,
    poison_torch_pools,
    random_array,
    ring_on_gpu,
    skip_unless_backward_family_runs,
    skip_unless_family_runs,
    to_gpu,
    to_host,
)
from numerics import (
    ARITHMETIC_FACTOR,
    UNIT_ROUNDOFF,
    Reference,
    check_backward,
    check_kernel_forward,
    gamma,
    ring_vs_solo_limit,
)

import cuparing as cr
from cuparing.comm.local import SoloRing

ml_dtypes = pytest.importorskip("ml_dtypes")

MASKS = {"none": (False, None), "causal": (True, None), "window": (False, (13, 7)),
         "causal_window": (True, (29, 0))}  # fmt: skip


SHAPES = [  # (B, Sq, Sk, H, Hkv)
    (2, 59, 97, 4, 2),
    (1, 97, 59, 6, 3),
    (1, 1025, 1025, 2, 1),
    (3, 128, 200, 4, 4),
]
HEADDIMS = [32, 64, 96, 128, 256, 40, 80, 136, 200]  # 40, 80: sm90 runs them with zero columns


@requires_gpu(1)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("headdim", HEADDIMS)
@pytest.mark.parametrize("mask", list(MASKS))
def test_attention_matches_reference(dtype, headdim, mask, kernel_family, fresh_rng):
    skip_unless_family_runs(kernel_family, dtype, headdim)
    causal, window = MASKS[mask]
    rng = fresh_rng
    b, sq, sk, h, hkv = SHAPES[int(rng.integers(len(SHAPES)))]
    q = random_array(rng, (b, sq, h, headdim), dtype)
    k = random_array(rng, (b, sk, hkv, headdim), dtype)
    v = random_array(rng, (b, sk, hkv, headdim), dtype)
    poison_pool()
    out, lse = cr.attention(*map(to_gpu, (q, k, v)), causal=causal, window=window,
                            return_lse=True)  # fmt: skip
    assert str(out.dtype) == dtype and str(lse.dtype) == "float32"
    check_kernel_forward(to_host(out), to_host(lse), q, k, v, causal=causal, window=window)


@requires_gpu(1)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.usefixtures("kernel_family")
def test_transposed_view_and_gqa(dtype, fresh_rng):
    import cupy

    rng = fresh_rng
    b, s, h, hkv, d = 2, 257, 8, 2, 128
    # [B, H, S, D] storage, passed as a [B, S, H, D] view (no copy)
    qh = to_gpu(random_array(rng, (b, h, s, d), dtype))
    kh = to_gpu(random_array(rng, (b, hkv, s, d), dtype))
    vh = to_gpu(random_array(rng, (b, hkv, s, d), dtype))
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (qh, kh, vh))
    assert not q.flags.c_contiguous
    out, lse = cr.attention(q, k, v, causal=True, return_lse=True)
    check_kernel_forward(to_host(out), to_host(lse), *map(to_host, (q, k, v)), causal=True)
    cupy.cuda.Device().synchronize()


@requires_gpu(1)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.usefixtures("kernel_family")
def test_fully_masked_rows(dtype, fresh_rng):
    rng = fresh_rng
    q, k, v = (random_array(rng, (1, 97, 2, 64), dtype) for _ in range(3))
    poison_pool()
    out, lse = cr.attention(*map(to_gpu, (q, k, v)), window=(5, -1), return_lse=True)
    out, lse = to_host(out).astype(np.float64), to_host(lse)
    assert np.all(out[:, 0] == 0) and np.all(np.isneginf(lse[:, :, 0]))
    check_kernel_forward(out, lse, q, k, v, window=(5, -1))


RING_CASES = list(
    itertools.product(
        ["contiguous", "zigzag", "striped"], [1, 2, 3, 4], ["causal", "window", "none"]
    )
)


@requires_gpu(1)
@pytest.mark.parametrize("layout,world,mask", RING_CASES)
def test_ring_on_one_gpu_matches_reference(layout, world, mask, kernel_family, fresh_rng):
    """Every layout's positions through the CuPy backend: first block writes the float32
    accumulator, later ones merge in the kernel epilogue (MERGE mode)."""
    causal, window = MASKS[mask]
    dtype = "bfloat16"
    rng = fresh_rng
    s = 2 * world * 53  # awkward, split by every layout
    d = 128 if kernel_family.startswith("sm90") else 96  # a head dim each family has tiles for
    q, k, v = (random_array(rng, (2, s, 4, d), dtype) for _ in range(3))
    k, v = k[:, :, :2], v[:, :, :2]  # GQA 4:2

    def rank_fn(ring):
        # shard on the host (ml_dtypes indexing), then upload this rank's shard
        shards = [to_gpu(cr.shard(x, ring.rank, ring.size, layout=layout)) for x in (q, k, v)]
        return cr.ring_attention(*shards, ring, causal=causal, window=window, layout=layout,
                                 return_lse=True)  # fmt: skip

    results = cr.simulate(world, rank_fn)
    out = cr.unshard([to_host(o) for o, _ in results], layout=layout)
    lse = cr.unshard([to_host(x) for _, x in results], layout=layout, axis=2)
    check_kernel_forward(out, lse, q, k, v, causal=causal, window=window)


@requires_gpu(1)
@pytest.mark.usefixtures("kernel_family")
def test_merge_error_does_not_grow_with_ring_size(fresh_rng):
    rng = fresh_rng
    q, k, v = (random_array(rng, (1, 8 * 64, 2, 64), "bfloat16") for _ in range(3))
    ref = Reference(q, k, v)
    errors = []
    for world in (1, 8):

        def rank_fn(ring):
            shards = [to_gpu(cr.shard(x, ring.rank, ring.size)) for x in (q, k, v)]
            return cr.ring_attention(*shards, ring)

        out = cr.unshard([to_host(o) for o in cr.simulate(world, rank_fn)])
        errors.append(np.linalg.norm(out.astype(np.float64) - ref.out))
        check_kernel_forward(out, None, q, k, v)
    assert errors[1] <= ring_vs_solo_limit(errors[0], ref), errors


@requires_gpu(1)
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_ring_backward_matches_reference(dtype, fresh_rng):
    rng = fresh_rng
    q, k, v, dout = (random_array(rng, (1, 4 * 24, 2, 32), dtype) for _ in range(4))
    host = dict(zip("qkvd", (q, k, v, dout), strict=True))

    def rank_fn(ring):
        sh = {
            n: to_gpu(cr.shard(x, ring.rank, ring.size, layout="zigzag")) for n, x in host.items()
        }
        out, lse = cr.ring_attention(sh["q"], sh["k"], sh["v"], ring, causal=True,
                                     layout="zigzag", return_lse=True)  # fmt: skip
        return cr.ring_attention_backward(sh["d"], sh["q"], sh["k"], sh["v"], out, lse, ring,
                                          causal=True, layout="zigzag")  # fmt: skip

    results = cr.simulate(2, rank_fn)
    grads = [cr.unshard([to_host(r[i]) for r in results], layout="zigzag") for i in range(3)]
    assert all(str(g.dtype) == dtype for g in grads)
    check_backward(grads, dout, q, k, v, causal=True)


@requires_gpu(1)
def test_torch_round_trip(fresh_rng):
    torch = torch_on_gpu()
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    gen = torch.Generator(device="cuda").manual_seed(int(fresh_rng.integers(2**62)))
    q, k, v = (torch.randn(2, 130, 4, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
               for _ in range(3))  # fmt: skip
    out, lse = cr.attention(q, k, v, causal=True, return_lse=True)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.bfloat16 and out.is_cuda
    assert lse.dtype == torch.float32 and lse.shape == (2, 4, 130)
    ref = torch.nn.functional.scaled_dot_product_attention(
        *(x.transpose(1, 2).double() for x in (q, k, v)), is_causal=True
    ).transpose(1, 2)
    check_kernel_forward(out, lse, q, k, v, causal=True)
    # and the float64 oracle agrees with PyTorch's own float64 attention: each is within the
    # float64 arithmetic bound of the exact result, so they are within twice it of each other
    exact = Reference(*(x.double() for x in (q, k, v)), causal=True)
    assert np.linalg.norm(exact.out - ref.cpu().numpy()) <= 2 * exact.bound("out")


@requires_gpu(1)
def test_jax_round_trip(fresh_rng):
    jax = pytest.importorskip("jax")
    jnp = pytest.importorskip("jax.numpy")
    if not any(d.platform == "gpu" for d in jax.devices()):
        pytest.skip("JAX without a GPU")
    rng = fresh_rng
    host = [random_array(rng, (1, 97, 2, 64), "bfloat16") for _ in range(3)]
    q, k, v = (jnp.asarray(x) for x in host)
    out = cr.attention(q, k, v, causal=True)
    assert type(out).__module__.split(".")[0] in ("jax", "jaxlib") and out.dtype == jnp.bfloat16
    check_kernel_forward(np.asarray(out), None, *host, causal=True)


@requires_gpu(1)
@pytest.mark.usefixtures("kernel_family")
@pytest.mark.parametrize("causal", [False, True])
def test_forward_is_deterministic(causal, fresh_rng):
    """The same inputs twice give bit-identical output and LSE (a race in the shared-memory
    pipeline would show as a difference between the runs)."""
    import cupy

    rng = fresh_rng
    q, k, v = (to_gpu(random_array(rng, (2, 1000, 8, 128), "bfloat16")) for _ in range(3))
    first = [x.copy() for x in cr.attention(q, k, v, causal=causal, return_lse=True)]
    for _ in range(2):
        again = cr.attention(q, k, v, causal=causal, return_lse=True)
        for a, b in zip(first, again, strict=True):
            bits = cupy.uint16 if a.dtype.itemsize == 2 else cupy.uint32
            assert cupy.array_equal(a.view(bits), b.view(bits))


@requires_gpu(1)
@pytest.mark.usefixtures("kernel_family")
def test_kernel_resources_on_device():
    """Every forward instantiation the family runs (both sm90 producers) loads on this device
    without local memory, within the registers and the opt-in shared memory it has."""
    import cupy

    from cuparing.kernels import loader

    runtime = cupy.cuda.runtime
    optin = getattr(runtime, "cudaDevAttrMaxSharedMemoryPerBlockOptin", 97)  # CUDA's enum value
    limit = runtime.deviceGetAttribute(optin, cupy.cuda.Device().id)
    for d in loader.HEAD_DIMS:
        for tma in (False, True):
            kernel, cfg, smem = loader.get_fwd_kernel(d, "bfloat16", tma=tma)
            where = (d, tma, kernel.num_regs, smem)
            assert kernel.num_regs <= 255 and kernel.local_size_bytes == 0, where
            assert smem <= limit, where
            if isinstance(cfg, loader.Sm90FwdConfig):  # the launch's allocation fits one SM
                assert kernel.num_regs * cfg.threads <= 65536, (*where, cfg.threads)


# (Sq, Sk) at the edges of the sm90 forward's tiles (head dim 64: 192 query rows in three
# consumers of 64, 112 keys): consumers with no rows, a last tile of 2, 141 or 65 rows, one key
# tile, a one-key tail
TILE_EDGES = [(59, 300), (130, 113), (333, 112), (1025, 1025), (200, 1)]


@requires_gpu(1)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("edge", TILE_EDGES, ids=[f"{q}x{k}" for q, k in TILE_EDGES])
@pytest.mark.parametrize("mask", ["none", "causal", "window"])
def test_forward_at_tile_edges(dtype, edge, mask, kernel_family, fresh_rng):
    """Query and key counts that leave consumers without rows and tiles part-filled, and
    windows that leave whole CTAs without keys, against the float64 reference (head dim 64;
    40 runs the same instantiation with zero columns, in test_attention_matches_reference)."""
    headdim = 64
    skip_unless_family_runs(kernel_family, dtype, headdim)
    causal, window = MASKS[mask]
    sq, sk = edge
    q = random_array(fresh_rng, (1, sq, 4, headdim), dtype)
    k = random_array(fresh_rng, (1, sk, 2, headdim), dtype)
    v = random_array(fresh_rng, (1, sk, 2, headdim), dtype)
    poison_pool()
    out, lse = cr.attention(*map(to_gpu, (q, k, v)), causal=causal, window=window,
                            return_lse=True)  # fmt: skip
    check_kernel_forward(to_host(out), to_host(lse), q, k, v, causal=causal, window=window)


# ---- backward kernel (cuparing_bwd): several ring blocks accumulate into the float32 dq/dk/dv


def _ring_backward_on_gpu(host, world, layout, causal, window, transposed=False,
                          deterministic=False, cu_seqlens=None):  # fmt: skip
    """Forward + backward through ``cr.simulate`` (LocalRing .copy()s CuPy arrays) on one GPU;
    returns the unsharded (dq, dk, dv) on the host. ``host``: dict q, k, v, d of host arrays."""
    docs = {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens}

    def upload(x):
        if not transposed:
            return to_gpu(x)
        # [B, H, S, D] storage passed as a [B, S, H, D] view
        return to_gpu(np.ascontiguousarray(x.transpose(0, 2, 1, 3))).transpose(0, 2, 1, 3)

    def rank_fn(ring):
        sh = {
            n: upload(cr.shard(x, ring.rank, ring.size, layout=layout, **docs))
            for n, x in host.items()
        }
        if transposed:
            assert not sh["q"].flags.c_contiguous
        poison_pool()
        out, lse = cr.ring_attention(sh["q"], sh["k"], sh["v"], ring, causal=causal,
                                     window=window, layout=layout, return_lse=True,
                                     **docs)  # fmt: skip
        return cr.ring_attention_backward(sh["d"], sh["q"], sh["k"], sh["v"], out, lse, ring,
                                          causal=causal, window=window, layout=layout,
                                          deterministic=deterministic, **docs)  # fmt: skip

    results = cr.simulate(world, rank_fn)
    return [cr.unshard([to_host(r[i]) for r in results], layout=layout, **docs) for i in range(3)]


# 40 -> padded 64; 112 -> 128 (the sm90 kernel's second dQ box partly filled); 200 -> 224 (split)
BWD_HEADDIMS = [64, 96, 128, 256, 40, 112, 200]
BWD_MASKS = ["causal", "none", "window"]


@requires_gpu(1)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("headdim", BWD_HEADDIMS)
@pytest.mark.parametrize("mask", BWD_MASKS)
def test_backward_kernel_matches_reference(dtype, headdim, mask, backward_family, fresh_rng):
    skip_unless_backward_family_runs(backward_family, headdim)
    causal, window = MASKS[mask]
    rng = fresh_rng
    world, layout = (2, "zigzag") if rng.integers(2) else (3, "contiguous")
    b, h, hkv = (2, 4, 2) if rng.integers(3) else (1, 6, 6)
    s = world * 2 * 83  # awkward tile tails; split by both layouts
    q, dout = (random_array(rng, (b, s, h, headdim), dtype) for _ in range(2))
    k, v = (random_array(rng, (b, s, hkv, headdim), dtype) for _ in range(2))
    grads = _ring_backward_on_gpu(dict(q=q, k=k, v=v, d=dout), world, layout, causal, window)
    for g, x in zip(grads, (q, k, v), strict=True):
        assert g.dtype == x.dtype and g.shape == x.shape
    check_backward(grads, dout, q, k, v, causal=causal, window=window)


@requires_gpu(1)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("mask", ["none", "causal", "unseen_keys", "documents"])
def test_direct_kv_gradients_match_reference(dtype, mask, monkeypatch, fresh_rng):
    """One device and one query head per K/V head: the Hopper backward writes dK / dV straight
    in the inputs' dtype (backends.direct_grads: no float32 accumulators, no casts), and they
    are dense attention's: where whole key tiles see no query ("unseen_keys": 100 queries, 700
    keys, a window of 5 each way: those CTAs write zeros), with packed documents, into
    caller-owned contiguous dk / dv (written in place) or strided ones (through a copy), in
    either mode (deterministic drawn). Gradients poisoned first."""
    monkeypatch.setenv("CUPARING_BWD", "sm90")
    torch = torch_on_gpu()
    rng = fresh_rng
    headdim = int(rng.choice([64, 96, 128]))
    skip_unless_backward_family_runs("sm90", headdim)
    made = record_direct_grads(monkeypatch)
    b, h = int(rng.integers(1, 3)), int(rng.integers(1, 5))
    sq = sk = int(rng.integers(130, 600))
    causal, window, docs = mask in ("causal", "documents"), None, {}
    if mask == "unseen_keys":
        sq, sk, window = 100, 700, (5, 5)
    if mask == "documents":
        cuts = np.sort(rng.choice(np.arange(1, sq), size=int(rng.integers(1, 8)), replace=False))
        docs = {"cu_seqlens": [0, *map(int, cuts), sq]}
    q, dout = (random_array(rng, (b, sq, h, headdim), dtype) for _ in range(2))
    k, v = (random_array(rng, (b, sk, h, headdim), dtype) for _ in range(2))
    tdtype, ndtype = getattr(torch, dtype), q.dtype

    def device(x):
        return torch.from_numpy(np.ascontiguousarray(x).view(np.int16)).cuda().view(tdtype)

    def host(x):
        return x.cpu().view(torch.int16).numpy().view(ndtype)

    qg, kg, vg, dg = map(device, (q, k, v, dout))
    out, lse = cr.attention(qg, kg, vg, causal=causal, window=window, return_lse=True, **docs)
    into = {}
    if rng.integers(2):  # caller-owned dk / dv: contiguous, or a strided view of [B, H, S, D]
        strided = bool(rng.integers(2))
        for name, x in (("dk", kg), ("dv", vg)):
            dest = torch.full_like(x, float("nan"))
            into[name] = dest.transpose(1, 2).contiguous().transpose(1, 2) if strided else dest
    poison_pool()
    grads = cr.attention_backward(dg, qg, kg, vg, out, lse, causal=causal, window=window,
                                  deterministic=bool(rng.integers(2)), **into, **docs)  # fmt: skip
    assert made == [tuple(k.shape), tuple(v.shape)], "the direct gradients were not used"
    for name, dest in into.items():
        assert grads[("dq", "dk", "dv").index(name)] is dest
    check_backward([host(g) for g in grads], dout, q, k, v, causal=causal, window=window, **docs)


@requires_gpu(1)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("mask", [*BWD_MASKS, "documents"])
def test_deterministic_backward_repeats_bit_for_bit(dtype, mask, monkeypatch, fresh_rng):
    """``deterministic=True`` (the Hopper kernels' ordered mode): three runs on the same inputs
    give bit-identical gradients, and they are right (float64 reference). Drawn: head dim (40,
    64, 96, 112, 128), GQA or not, ring size and layout, and for "documents" packed documents (gaps
    in the positions: the tiles a CTA walks must be the same seen from either side, or a turn
    never comes)."""
    monkeypatch.setenv("CUPARING_BWD", "sm90")
    rng = fresh_rng
    headdim = int(rng.choice([40, 64, 96, 112, 128]))
    skip_unless_backward_family_runs("sm90", headdim)
    world, layout = [(1, "contiguous"), (2, "zigzag"), (3, "contiguous")][int(rng.integers(3))]
    b, h, hkv = [(2, 4, 2), (1, 6, 6), (1, 8, 1)][int(rng.integers(3))]
    s = world * 2 * int(rng.integers(70, 200))
    causal, window = MASKS["causal" if mask == "documents" else mask]
    cu_seqlens = None
    if mask == "documents":
        cuts = np.sort(rng.choice(np.arange(1, s), size=int(rng.integers(1, 8)), replace=False))
        cu_seqlens = [0, *map(int, cuts), s]
    q, dout = (random_array(rng, (b, s, h, headdim), dtype) for _ in range(2))
    k, v = (random_array(rng, (b, s, hkv, headdim), dtype) for _ in range(2))
    host = dict(q=q, k=k, v=v, d=dout)
    runs = [
        _ring_backward_on_gpu(host, world, layout, causal, window, deterministic=True,
                              cu_seqlens=cu_seqlens)  # fmt: skip
        for _ in range(3)
    ]
    for again in runs[1:]:
        for name, first, g in zip(("dq", "dk", "dv"), runs[0], again, strict=True):
            assert first.tobytes() == g.tobytes(), f"{name} differs between deterministic runs"
    check_backward(runs[0], dout, q, k, v, causal=causal, window=window, cu_seqlens=cu_seqlens)


@requires_gpu(1)
@pytest.mark.parametrize("causal", [False, True])
def test_deterministic_backward_long_turn_chains_repeat_bit_for_bit(causal, monkeypatch,
                                                                    fresh_rng):  # fmt: skip
    """Few heads and a long sequence: tens of key-tile CTAs of one head run at once, each waiting
    for the one before it on every query tile (the producer counts a CTA's turns, three tiles
    behind its loads), so the turns' order is exercised where the other deterministic test's
    short sequences barely reach it. Three runs give bit-identical gradients (their values are
    the other test's business)."""
    monkeypatch.setenv("CUPARING_BWD", "sm90")
    rng = fresh_rng
    headdim = int(rng.choice([64, 128]))
    h, hkv = [(2, 2), (2, 1), (1, 1)][int(rng.integers(3))]
    s = 64 * int(rng.integers(48, 72)) + int(rng.integers(0, 64))  # 3k-4.6k tokens
    host = {n: random_array(rng, (1, s, heads, headdim), "bfloat16")
            for n, heads in (("q", h), ("k", hkv), ("v", hkv), ("d", h))}  # fmt: skip
    runs = [_ring_backward_on_gpu(host, 1, "contiguous", causal, None, deterministic=True)
            for _ in range(3)]  # fmt: skip
    for again in runs[1:]:
        for name, first, g in zip(("dq", "dk", "dv"), runs[0], again, strict=True):
            assert first.tobytes() == g.tobytes(), f"{name} differs between deterministic runs"
    assert all(np.isfinite(x).all() for x in runs[0])


@requires_gpu(1)
def test_deterministic_backward_refused_where_no_ordered_kernel(monkeypatch, fresh_rng):
    """The mma.sync backward has no ordered mode yet: ``deterministic=True`` there is a clear
    NotImplementedError before any work, not silently unordered gradients."""
    monkeypatch.setenv("CUPARING_BWD", "sm80")
    q, k, v, dout = (to_gpu(random_array(fresh_rng, (1, 64, 2, 64), "bfloat16")) for _ in "qkvd")
    out, lse = cr.attention(q, k, v, return_lse=True)
    with pytest.raises(NotImplementedError, match="deterministic=True needs the Hopper backward"):
        cr.attention_backward(dout, q, k, v, out, lse, deterministic=True)


@requires_gpu(1)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_backward_kernel_transposed_view_gqa(dtype, backward_family, fresh_rng):
    rng = fresh_rng
    b, s, h, hkv, d = 2, 2 * 2 * 131, 8, 2, 128
    skip_unless_backward_family_runs(backward_family, d)
    q, dout = (random_array(rng, (b, s, h, d), dtype) for _ in range(2))
    k, v = (random_array(rng, (b, s, hkv, d), dtype) for _ in range(2))
    grads = _ring_backward_on_gpu(dict(q=q, k=k, v=v, d=dout), 2, "zigzag", True, None,
                                  transposed=True)  # fmt: skip
    check_backward(grads, dout, q, k, v, causal=True)


@requires_gpu(1)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("headdim", [64, 256])
def test_backward_kernel_rows_without_keys(dtype, headdim, backward_family, fresh_rng):
    skip_unless_backward_family_runs(backward_family, headdim)
    # window (5, -1): query i sees keys i-5 .. i-1, so query 0 sees none (lse -inf)
    rng = fresh_rng
    q, k, v, dout = (random_array(rng, (1, 2 * 97, 2, headdim), dtype) for _ in range(4))
    grads = _ring_backward_on_gpu(dict(q=q, k=k, v=v, d=dout), 2, "contiguous", False, (5, -1))
    dq = grads[0].astype(np.float64)
    assert np.all(dq[:, 0] == 0), "a query that sees no key has zero gradient"
    check_backward(grads, dout, q, k, v, window=(5, -1))


@requires_gpu(1)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_backward_delta_kernel(dtype, fresh_rng):
    import cupy

    from cuparing.backends.cupy_backend import get_cupy_backend

    rng = fresh_rng
    dout, out = (random_array(rng, (2, 77, 3, 72), dtype) for _ in range(2))
    got = cupy.asnumpy(get_cupy_backend().backward_delta(to_gpu(dout), to_gpu(out)))
    ref = (dout.astype(np.float64) * out.astype(np.float64)).sum(-1).transpose(0, 2, 1)
    assert got.dtype == np.float32 and got.shape == (2, 3, 77)
    # a float32 dot product of exactly upcast inputs: gamma_D times the sum of |products|
    magnitude = np.abs(dout.astype(np.float64) * out.astype(np.float64)).sum(-1)
    u32 = UNIT_ROUNDOFF["float32"]
    bound = ARITHMETIC_FACTOR * gamma(dout.shape[-1], u32) * magnitude.transpose(0, 2, 1)
    assert (np.abs(got - ref) <= bound).all(), np.max(np.abs(got - ref) - bound)


@requires_gpu(1)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("with_part", [True, False])
def test_gradients_leave_for_home_rounded_once(dtype, with_part, fresh_rng):
    """The ring backward's last step hands dK / dV home as one rounding of the float32 sum
    (``kv_homeward``): bit for bit what the owner's cast of that sum gave before they travelled
    in float32, and the array it adds into holds what it held (the add does not go through
    it); the owner's copy out of the receive buffer (``copy``, through the bits) keeps every
    bit. An odd element count covers the grid-stride loop's tail."""
    import cupy

    from cuparing.backends.cupy_backend import get_cupy_backend

    rng = fresh_rng
    half = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float16
    shape = (1, 1023, 3, 65)
    acc = rng.standard_normal(shape).astype(np.float32) * 3
    part = rng.standard_normal(shape).astype(np.float32) if with_part else None
    acc_gpu = to_gpu(acc)
    backend = get_cupy_backend()
    poison_pool()  # (the result is a new array: none of it may be left unwritten)
    got = backend.kv_homeward(acc_gpu, None if part is None else to_gpu(part), half)
    total = acc if part is None else acc + part  # (float32 + float32: one rounding, as on GPU)
    want = total.astype(half)
    assert got.shape == shape
    assert np.array_equal(to_host(got).view(np.uint16), want.view(np.uint16))
    kept = backend.copy(got)
    assert kept.data.ptr != got.data.ptr and kept.dtype == got.dtype
    assert np.array_equal(to_host(kept).view(np.uint16), want.view(np.uint16))
    if with_part:
        assert np.array_equal(cupy.asnumpy(acc_gpu), acc)


@requires_gpu(1)
def test_backward_kernel_resources_on_device(backward_family):
    from cuparing.kernels import loader

    heads = loader.SM90_BWD_HEAD_DIMS if backward_family == "sm90" else loader.HEAD_DIMS
    for d in heads:
        kernels, cfg, smem = loader.get_bwd_kernels(d, "bfloat16")
        assert len(kernels) == (2 if cfg.split else 1)
        for kernel, _mode in kernels:
            assert kernel.num_regs <= 255 and kernel.local_size_bytes == 0, (d, kernel.num_regs)
            assert kernel.max_dynamic_shared_size_bytes >= smem
            if backward_family == "sm90":  # what Sm90BwdTraits' register hand-over assumes
                assert cfg is loader.SM90_BWD_CONFIG and kernel.num_regs == 168, kernel.num_regs


@requires_gpu(1)
def test_torch_autograd_ring_on_gpu(fresh_rng):
    torch = torch_on_gpu()
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    rng = fresh_rng
    q, k, v, dout = (
        random_array(rng, s, "bfloat16")
        for s in [(1, 256, 4, 64), (1, 256, 2, 64), (1, 256, 2, 64), (1, 256, 4, 64)]
    )

    def to_torch(x):
        return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16).cuda()

    def rank_fn(ring):
        local = [to_torch(cr.shard(x, ring.rank, ring.size, layout="zigzag")).requires_grad_()
                 for x in (q, k, v)]  # fmt: skip
        out = cr.ring_attention_torch(*local, ring, causal=True, layout="zigzag")
        assert out.is_cuda and out.dtype == torch.bfloat16
        out.backward(to_torch(cr.shard(dout, ring.rank, ring.size, layout="zigzag")))
        return [t.grad.view(torch.int16).cpu().numpy().view(ml_dtypes.bfloat16) for t in local]

    # one rank: PyTorch runs a device's backward work on a single engine thread, so two simulated
    # ranks sharing one GPU would wait on each other inside it (real rings use one process per
    # GPU); the ring exchanges themselves are covered by the multi-GPU tests
    results = cr.simulate(1, rank_fn)
    grads = [cr.unshard([r[i] for r in results], layout="zigzag") for i in range(3)]
    check_backward(grads, dout, q, k, v, causal=True)


@requires_gpu(1)
@pytest.mark.parametrize("entry", ["attention", "ring_attention", "torch_flag"])
def test_torch_autograd_deterministic_on_gpu(entry, monkeypatch, fresh_rng):
    """``deterministic`` through torch autograd (``cuparing.torch``: the argument, or
    ``torch.use_deterministic_algorithms``): three backward passes give bit-identical gradients
    on the Hopper kernels, within the float64 reference's bounds (GQA, causal)."""
    torch = torch_on_gpu()
    crt = pytest.importorskip("cuparing.torch")
    monkeypatch.setenv("CUPARING_BWD", "sm90")
    headdim = int(fresh_rng.choice([64, 128]))
    skip_unless_backward_family_runs("sm90", headdim)
    s = int(fresh_rng.integers(300, 700))
    q, dout = (random_array(fresh_rng, (2, s, 8, headdim), "bfloat16") for _ in range(2))
    k, v = (random_array(fresh_rng, (2, s, 2, headdim), "bfloat16") for _ in range(2))

    def to_torch(x):
        return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16).cuda()

    ring = cr.comm.local.SoloRing()
    crt.ring_handle(ring)

    def grads():
        leaves = [to_torch(x).requires_grad_() for x in (q, k, v)]
        if entry == "attention":
            out = crt.attention(*leaves, causal=True, deterministic=True)
        elif entry == "ring_attention":
            out = crt.ring_attention(*leaves, ring, causal=True, deterministic=True)
        else:
            out = crt.attention(*leaves, causal=True)
        out.backward(to_torch(dout))
        return [t.grad.view(torch.int16).cpu().numpy().view(ml_dtypes.bfloat16) for t in leaves]

    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(entry == "torch_flag")
    try:
        runs = [grads() for _ in range(3)]
    finally:
        torch.use_deterministic_algorithms(before)
    for again in runs[1:]:
        for name, a, b in zip(("dq", "dk", "dv"), runs[0], again, strict=True):
            assert a.tobytes() == b.tobytes(), f"{name} differs between deterministic runs"
    check_backward(runs[0], dout, q, k, v, causal=True)


# ---- caller-owned outputs and CUDA graphs


@requires_gpu(1)
@pytest.mark.usefixtures("kernel_family")
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dq_layout", ["contiguous", "transposed", "offset"])
def test_caller_owned_outputs_on_gpu(causal, dq_layout, fresh_rng):
    """out= / lse= (a strided torch view) receive exactly what the call returns without them;
    dq= / dk= / dv= receive the gradients (within the float64 reference's bound: the backward
    kernel adds with atomics, so two runs differ in the last bits); every element written
    (NaN-poisoned first). dq= also as a transposed view and one element into its storage (2-byte
    aligned): the Hopper backward's dq leaves its tiled accumulator by 4-byte stores where it
    can, through a copy where it cannot."""
    torch = torch_on_gpu()
    gen = torch.Generator(device="cuda").manual_seed(int(fresh_rng.integers(2**62)))
    b, s, h, hkv, d = 2, 300, 4, 2, 128
    q = torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    k, v = (torch.randn(b, s, hkv, d, device="cuda", dtype=torch.bfloat16, generator=gen)
            for _ in range(2))  # fmt: skip
    want_out, want_lse = cr.attention(q, k, v, causal=causal, return_lse=True)
    out = torch.full((b, h, s, d), float("nan"), device="cuda", dtype=torch.bfloat16)
    out = out.transpose(1, 2)  # [B, H, S, D] storage seen as [B, S, H, D]
    lse = torch.full((b, h, s), float("nan"), device="cuda")
    got = cr.attention(q, k, v, causal=causal, return_lse=True, out=out, lse=lse)
    assert got[0] is out and got[1] is lse
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse)
    dout = torch.randn_like(q)
    dests = [torch.full_like(x, float("nan")) for x in (q, k, v)]
    if dq_layout == "transposed":
        dests[0] = dests[0].transpose(1, 2).contiguous().transpose(1, 2)
    elif dq_layout == "offset":
        storage = torch.full((q.numel() + 1,), float("nan"), device="cuda", dtype=q.dtype)
        dests[0] = storage[1:].view(q.shape)
        assert dests[0].data_ptr() % 4 == 2
    into = dict(zip(("dq", "dk", "dv"), dests, strict=True))
    grads = cr.ring_attention_backward(
        dout, q, k, v, want_out, want_lse, SoloRing(), causal=causal, **into
    )
    assert all(g is dest for g, dest in zip(grads, dests, strict=True))

    def host(x):
        return x.cpu().view(torch.int16).numpy().view(ml_dtypes.bfloat16)

    check_backward([host(g) for g in grads], *map(host, (dout, q, k, v)), causal=causal)


@requires_gpu(1)
def test_pair_copy_copies_exactly_the_bytes_asked(fresh_rng):
    """The kernel node that copies a replayed ring call's K/V into its graph: two copies of any
    byte counts (16-byte words, then the tail) in one launch, nothing written past either."""
    import cupy

    from cuparing.backends import ring_graphs

    # (past 4 MiB the grid's 1024 blocks stride)
    sizes = [0, 1, 15, 16, 17, 4096 + 5, int(fresh_rng.integers(1, 3 << 20)), (5 << 20) + 7]
    for a_bytes, b_bytes in [tuple(fresh_rng.choice(sizes, 2)) for _ in range(6)]:
        a_bytes, b_bytes = int(a_bytes), int(b_bytes)
        a, b = (cupy.asarray(fresh_rng.integers(0, 256, n + 64, dtype=np.uint8))
                for n in (a_bytes, b_bytes))  # fmt: skip
        a_out, b_out = (cupy.full(n + 64, 0xA5, dtype=np.uint8) for n in (a_bytes, b_bytes))
        ring_graphs.copy_pair_launch(a_bytes, b_bytes).launch(a.data.ptr, a_out.data.ptr,
                                                              b.data.ptr, b_out.data.ptr)
        for src, dst, n in ((a, a_out, a_bytes), (b, b_out, b_bytes)):
            got = cupy.asnumpy(dst)
            np.testing.assert_array_equal(got[:n], cupy.asnumpy(src[:n]), err_msg=f"{n} bytes")
            assert (got[n:] == 0xA5).all(), f"written past {n} bytes"


@requires_gpu(1)
@pytest.mark.usefixtures("kernel_family")
def test_forward_replays_in_a_torch_cuda_graph(fresh_rng):
    """With out= and lse=, a forward call allocates nothing and syncs nothing: it can be captured
    in a CUDA graph, and replays compute the attention of whatever the input buffers hold."""
    torch = torch_on_gpu()
    gen = torch.Generator(device="cuda").manual_seed(int(fresh_rng.integers(2**62)))
    shape = (1, 1000, 8, 128)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen)
               for _ in range(3))  # fmt: skip
    out = torch.empty_like(q)
    lse = torch.empty(1, 8, 1000, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compile, cache positions and tensor maps
        cr.attention(q, k, v, causal=True, out=out, lse=lse)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cr.attention(q, k, v, causal=True, out=out, lse=lse)
    for _ in range(2):  # new inputs in the captured buffers, then replay
        for x in (q, k, v):
            x.copy_(torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen))
        out.fill_(float("nan"))
        lse.fill_(float("nan"))
        graph.replay()
        want_out, want_lse = cr.attention(q, k, v, causal=True, return_lse=True)
        assert torch.equal(out, want_out) and torch.equal(lse, want_lse)


@requires_gpu(1)
@pytest.mark.usefixtures("kernel_family")
def test_forward_that_drops_its_lse_repeats_and_replays(fresh_rng):
    """Repeats that drop the lse (``out=`` only, or nothing) write it into one the kept plan
    reuses on their stream: fresh inputs each call still give exactly the full path's output
    (the same kernel), a call that asks for the lse gets its own, and a capture (whose graph
    must not write into the plan's) replays correctly on new inputs."""
    torch = torch_on_gpu()
    from cuparing import call_plans

    call_plans.clear()
    gen = torch.Generator(device="cuda").manual_seed(int(fresh_rng.integers(2**62)))
    shapes = [(1, 777, 8, 128), (1, 777, 2, 128), (1, 777, 2, 128)]

    def fresh():
        return [torch.randn(s, device="cuda", dtype=torch.bfloat16, generator=gen) for s in shapes]

    def full_path(q, k, v):
        call_plans.clear()
        return cr.attention(q, k, v, causal=True, return_lse=True)

    cr.attention(*fresh(), causal=True)  # the full path keeps the launch
    inputs = [fresh() for _ in range(3)]
    poison_torch_pools()
    outs = [cr.attention(*x, causal=True) for x in inputs]  # (the plan's lse, written in turn)
    lses = [cr.attention(*x, causal=True, return_lse=True)[1] for x in inputs]
    assert len({x.data_ptr() for x in lses}) == len(lses)
    for x, out, lse in zip(inputs, outs, lses, strict=True):
        want_out, want_lse = full_path(*x)
        assert torch.equal(out, want_out) and torch.equal(lse, want_lse)

    q, k, v = fresh()
    out = torch.empty_like(q)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        cr.attention(q, k, v, causal=True, out=out)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cr.attention(q, k, v, causal=True, out=out)
    for _ in range(2):
        for x in (q, k, v):
            x.copy_(torch.randn(x.shape, device="cuda", dtype=torch.bfloat16, generator=gen))
        out.fill_(float("nan"))
        cr.attention(*fresh(), causal=True)  # the plan's own lse written between replays
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, full_path(q, k, v)[0])


@requires_gpu(1)
@pytest.mark.usefixtures("kernel_family")
def test_training_step_replays_in_a_torch_cuda_graph(fresh_rng):
    """Forward and backward with caller-owned outputs and gradients, captured together by
    torch.cuda.graph after one warm-up (the backward's float32 workspaces come from torch's
    allocator, so the graph's pool keeps them for its replays): replays on new inputs in the
    captured buffers give the eager forward bitwise and gradients within the float64
    reference's bounds (every output NaN-poisoned before each replay)."""
    torch = torch_on_gpu()
    gen = torch.Generator(device="cuda").manual_seed(int(fresh_rng.integers(2**62)))
    b, s, h, hkv, d = 1, 700, 8, 2, 128
    shapes = [(b, s, h, d), (b, s, hkv, d), (b, s, hkv, d), (b, s, h, d)]
    q, k, v, dout = (torch.empty(x, device="cuda", dtype=torch.bfloat16) for x in shapes)

    def refill():
        for x in (q, k, v, dout):
            x.copy_(torch.randn(x.shape, device="cuda", dtype=torch.bfloat16, generator=gen))

    out, lse = torch.empty_like(q), torch.empty(b, h, s, device="cuda")
    grads = [torch.empty_like(x) for x in (q, k, v)]
    opts = {"causal": True, "window": (300, 0)}

    def step():
        cr.attention(q, k, v, out=out, lse=lse, **opts)
        dq, dk, dv = grads
        cr.attention_backward(dout, q, k, v, out, lse, dq=dq, dk=dk, dv=dv, **opts)

    refill()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compile, cache positions, plans and tensor maps
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    def host(x):
        return x.cpu().view(torch.int16).numpy().view(ml_dtypes.bfloat16)

    for _ in range(2):
        refill()
        for x in (out, lse, *grads):
            x.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        want_out, want_lse = cr.attention(q, k, v, return_lse=True, **opts)
        assert torch.equal(out, want_out) and torch.equal(lse, want_lse)
        check_backward([host(g) for g in grads], *map(host, (dout, q, k, v)), **opts)


@requires_gpu(1)
def test_backward_replays_in_a_cupy_stream_capture(fresh_rng):
    """A backward with caller-owned dq / dk / dv captured by CuPy's stream capture (its
    workspaces then come from CUDA's stream-ordered allocator: allocation and free are graph
    nodes): a replay computes the gradients of whatever the captured buffers hold."""
    import cupy

    rng = fresh_rng
    shapes = [(2, 257, 4, 64), (2, 257, 2, 64), (2, 257, 2, 64), (2, 257, 4, 64)]
    host = [random_array(rng, x, "float16") for x in shapes]
    q, k, v, dout = map(to_gpu, host)
    out, lse = cr.attention(q, k, v, window=(64, 0), return_lse=True)
    grads = [cupy.empty_like(x) for x in (q, k, v)]
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        cr.attention_backward(dout, q, k, v, out, lse, window=(64, 0), dq=grads[0], dk=grads[1],
                              dv=grads[2])  # warm-up  # fmt: skip
        stream.begin_capture()
        cr.attention_backward(dout, q, k, v, out, lse, window=(64, 0), dq=grads[0], dk=grads[1],
                              dv=grads[2])  # fmt: skip
        graph = stream.end_capture()
        # arrays of the backward's workspace sizes (delta, the float32 accumulators), taken from
        # CuPy's pool after the capture: had the captured workspaces come from that pool, these
        # would get their blocks back and a replay would write into them
        sentinels = [cupy.full(shape, 7.0, dtype=cupy.float32)
                     for shape in ((2, 4, 257), *shapes[:3], *shapes[:3])]  # fmt: skip
        host[3] = random_array(rng, shapes[3], "float16")
        dout[...] = to_gpu(host[3])
        for g in grads:
            g.fill(cupy.nan)
        graph.launch(stream)
        stream.synchronize()
    check_backward([to_host(g) for g in grads], host[3], *host[:3], window=(64, 0))
    assert all(bool((x == 7.0).all()) for x in sentinels)


@requires_gpu(1)
def test_forward_replays_in_a_cupy_stream_capture(fresh_rng):
    import cupy

    rng = fresh_rng
    q, k, v = (to_gpu(random_array(rng, (2, 257, 4, 64), "float16")) for _ in range(3))
    out = cupy.empty_like(q)
    lse = cupy.empty((2, 4, 257), dtype=cupy.float32)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        cr.attention(q, k, v, window=(64, 0), out=out, lse=lse)  # warm-up
        stream.begin_capture()
        cr.attention(q, k, v, window=(64, 0), out=out, lse=lse)
        graph = stream.end_capture()
        fresh = to_gpu(random_array(rng, (2, 257, 4, 64), "float16"))
        q[...] = fresh
        out.fill(cupy.nan)
        graph.launch(stream)
        want_out, want_lse = cr.attention(q, k, v, window=(64, 0), return_lse=True)
        stream.synchronize()
    assert cupy.array_equal(out, want_out) and cupy.array_equal(lse, want_lse)


@requires_gpu(1)
@pytest.mark.usefixtures("kernel_family")
def test_torch_ops_on_cuda(fresh_rng):
    """cuparing.torch on CUDA tensors: the op's schema, fake and autograd registration
    (opcheck; the AOT-dispatch comparison runs on the CPU in test_torch_ops.py, since the
    backward kernel adds with atomics and two runs differ in the last bits), and a compiled
    (fullgraph) forward + backward: the same output as eager, gradients within the float64
    reference's bounds."""
    torch = torch_on_gpu()
    crt = pytest.importorskip("cuparing.torch")
    gen = torch.Generator(device="cuda").manual_seed(int(fresh_rng.integers(2**62)))
    q, k, v = (torch.randn(2, 200, 4, 64, device="cuda", dtype=torch.bfloat16, generator=gen,
                           requires_grad=True) for _ in range(3))  # fmt: skip
    dout = torch.randn(2, 200, 4, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
    mask = (True, 0.125, None, None, False, None, crt.NONDETERMINISTIC)
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(crt.attention_forward, (q, k, v, *mask), test_utils=checks)

    def run(fn):
        for x in (q, k, v):
            x.grad = None
        out = fn(q, k, v)
        out.backward(dout)
        return out.detach(), [x.grad.clone() for x in (q, k, v)]

    def ours(q, k, v):
        return crt.attention(q, k, v, causal=True)

    torch._dynamo.reset()
    compiled_out, compiled_grads = run(torch.compile(ours, fullgraph=True, backend="aot_eager"))
    eager_out, _ = run(ours)
    assert torch.equal(compiled_out, eager_out)  # the same forward kernel on the same inputs

    def host(x):
        return x.detach().cpu().view(torch.int16).numpy().view(ml_dtypes.bfloat16)

    inputs = [host(x) for x in (q, k, v)]
    check_kernel_forward(host(compiled_out), None, *inputs, causal=True)
    check_backward([host(g) for g in compiled_grads], host(dout), *inputs, causal=True)


# ---- packed documents (cu_seqlens)

DOCUMENT_CASES = list(
    itertools.product(["contiguous", "zigzag", "packed"], [1, 3], [True, False])
)


@requires_gpu(1)
@pytest.mark.parametrize("layout,world,causal", DOCUMENT_CASES)
def test_packed_documents_on_gpu(layout, world, causal, kernel_family, fresh_rng):
    """Packed documents (fresh random lengths, empty and one-token ones among them) through the
    kernels: the ring's forward and backward on one GPU against the float64 document-masked
    reference; padding rows come out 0 / -inf."""
    rng = fresh_rng
    lengths = rng.integers(0, 300, size=int(rng.integers(2, 9)))
    lengths[rng.integers(len(lengths))] = 1
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    seqlen, d = int(cu[-1]), 128 if kernel_family.startswith("sm90") else 64
    dtype = "bfloat16"
    q, dout = (random_array(rng, (1, seqlen, 4, d), dtype) for _ in range(2))
    k, v = (random_array(rng, (1, seqlen, 2, d), dtype) for _ in range(2))
    out, lse, *grads = ring_on_gpu((q, k, v, dout), world, layout, causal=causal, cu_seqlens=cu)
    check_kernel_forward(out, lse, q, k, v, causal=causal, cu_seqlens=cu)
    check_backward(grads, dout, q, k, v, causal=causal, cu_seqlens=cu)


GATHERED_CASES = list(
    itertools.product(["contiguous", "zigzag", "packed"], [2, 3], [True, False], [False, True])
)


@requires_gpu(1)
@pytest.mark.parametrize("layout,world,causal,documents", GATHERED_CASES)
def test_gathered_forward_on_gpu(layout, world, causal, documents, kernel_family, monkeypatch,
                                 fresh_rng):  # fmt: skip
    """``CUPARING_KV_GATHER=1``: the forward and the backward run two blocks per rank, its own
    shard and the other ranks' K/V gathered into one ascending order (the backward's dK / dV
    rows of those sent back to their owners),
    on packed documents (fresh random lengths) and on plain sequences, against the float64
    reference; padding rows come out 0 / -inf; both gathered paths ran on every rank."""
    from switches import ranks_calling

    from cuparing import schedule, validation

    monkeypatch.setenv(schedule.GATHER_ENV, "1")
    rng = fresh_rng
    d = 128 if kernel_family.startswith("sm90") else 64
    cu = None
    if documents:
        lengths = rng.integers(0, 300, size=int(rng.integers(2, 9)))
        lengths[rng.integers(len(lengths))] = 1
        cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        seqlen = int(cu[-1])
    else:
        seqlen = 2 * world * int(rng.integers(20, 90))
        layout = "zigzag" if layout == "packed" else layout  # (packed: documents only)
    batch = int(rng.integers(1, 3))
    q, dout = (random_array(rng, (batch, seqlen, 4, d), "bfloat16") for _ in range(2))
    k, v = (random_array(rng, (batch, seqlen, 2, d), "bfloat16") for _ in range(2))
    mask = {"causal": causal} if cu is None else {"causal": causal, "cu_seqlens": cu}
    with ranks_calling() as ran:
        out, lse, *grads = ring_on_gpu((q, k, v, dout), world, layout, **mask)
    check_kernel_forward(out, lse, q, k, v, **mask)
    check_backward(grads, dout, q, k, v, **mask)
    spec = validation.check_mask(causal, None)
    plan = (
        schedule.plan_documents(layout, 0, world, tuple(int(x) for x in cu), spec, True)
        if documents else schedule.plan_ring(layout, 0, world, seqlen // world, spec, True)
    )  # fmt: skip
    expected = list(range(world)) if schedule.gathers(plan) else []
    assert sorted(ran["gathered_forward"]) == sorted(ran["gathered_backward"]) == expected


def check_causal_ring_call(per_rank, host, layout, cu_seqlens):
    """One causal ring call's results of every rank (``per_rank[r]``: out, lse, dq, dk, dv as
    float32 host arrays of rank r's shard) unsharded and checked, bfloat16 ones as bfloat16,
    against the float64 reference of ``host`` = (q, k, v, dout) over documents
    ``cu_seqlens``."""
    got = [cr.unshard([r[i] for r in per_rank], layout=layout, axis=2 if i == 1 else 1,
                      cu_seqlens=cu_seqlens) for i in range(5)]  # fmt: skip
    check_kernel_forward(got[0].astype(ml_dtypes.bfloat16), got[1], *host[:3], causal=True,
                         cu_seqlens=cu_seqlens)  # fmt: skip
    check_backward([g.astype(ml_dtypes.bfloat16) for g in got[2:]], host[3], *host[:3],
                   causal=True, cu_seqlens=cu_seqlens)  # fmt: skip


def bf16_shards_in_poisoned_memory(torch, ring, host, layout, cu_seqlens):
    """This rank's shards (``cr.shard`` with ``cu_seqlens``) of the bfloat16 host arrays
    ``host`` as torch CUDA tensors, then torch's pools poisoned (``poison_torch_pools``) for
    the results of the call that follows."""
    shards = [
        torch.from_numpy(cr.shard(x.view(np.int16), ring.rank, ring.size, layout=layout,
                                  cu_seqlens=cu_seqlens)).cuda().view(torch.bfloat16)
        for x in host
    ]  # fmt: skip
    poison_torch_pools()
    return shards


@requires_gpu(1)
@pytest.mark.parametrize("world,layout",
                         [(2, "zigzag"), (3, "zigzag"), (4, "zigzag"), (4, "packed")])
def test_gathered_repeats_run_the_kept_gathers(world, layout, monkeypatch, fresh_rng):
    """``CUPARING_KV_GATHER=1`` with torch tensors: a repeat of a packed-document ring forward
    and backward runs the kept gathered launches (``PlannedGather``,
    ``PlannedGatherBackward``: pointer level) on every rank, on fresh data in NaN-poisoned
    memory, within the float64 reference's bounds; two batch rows, and the caller's K / V
    strided (views into one packed K/V tensor), as the gather reads them."""
    torch = torch_on_gpu()
    from switches import ranks_calling

    from cuparing import call_plans, schedule

    call_plans.clear()
    monkeypatch.setenv(schedule.GATHER_ENV, "1")
    planned = record_plan_runs(monkeypatch, (call_plans.RingForwardPlan,
                                             call_plans.RingBackwardPlan))  # fmt: skip
    rng = fresh_rng
    s, h, hkv, d = 150 * world + int(rng.integers(0, 40)), 4, 2, 128
    cuts = np.sort(rng.choice(np.arange(1, s), size=int(rng.integers(1, 7)), replace=False))
    cu = [0, *map(int, cuts), s]
    shapes = ((2, s, h, d), (2, s, hkv, d), (2, s, hkv, d), (2, s, h, d))
    calls = [[random_array(rng, shape, "bfloat16") for shape in shapes] for _ in range(2)]
    opts = {"causal": True, "layout": layout, "cu_seqlens": cu}

    def rank_fn(ring):
        results = []
        for host in calls:
            q, k, v, dout = bf16_shards_in_poisoned_memory(torch, ring, host, layout, cu)
            k, v = torch.stack([k, v], dim=2).unbind(2)  # rows 2 x Hkv x D apart
            out, lse = cr.ring_attention(q, k, v, ring, return_lse=True, **opts)
            grads = cr.ring_attention_backward(dout, q, k, v, out, lse, ring, **opts)
            torch.cuda.synchronize()
            results.append([x.float().cpu().numpy() for x in (out, lse, *grads)])
        return results

    names = ("run_planned_gathered_forward", "run_planned_gathered_backward")
    with ranks_calling(names, ring_at=0) as ran:
        per_rank = cr.simulate(world, rank_fn)
    assert planned == [True] * 2 * world
    assert all(sorted(ranks) == list(range(world)) for ranks in ran.values())
    for n, host in enumerate(calls):
        check_causal_ring_call([r[n] for r in per_rank], host, layout, cu)


# ---- call plans: repeats of a checked call on torch CUDA tensors


@requires_gpu(1)
@pytest.mark.usefixtures("kernel_family")
def test_repeat_torch_calls_run_the_kept_launch(monkeypatch, fresh_rng):
    """A repeat of a checked one-device call on torch CUDA tensors runs only the kept launch
    (cuparing.call_plans): on fresh random data it returns exactly what the full path returns
    (the same kernel: bitwise), within the float64 reference's bounds, on another stream too;
    tensors autograd tracks are still refused, and a misaligned view takes the full path."""
    torch = torch_on_gpu()
    from cuparing import call_plans

    call_plans.clear()
    runs = []
    real_run = call_plans.CallPlan.run

    def counted_run(self, *args, **kwargs):
        runs.append(1)
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(call_plans.CallPlan, "run", counted_run)
    gen = torch.Generator(device="cuda").manual_seed(int(fresh_rng.integers(2**62)))
    shapes = [(2, 333, 8, 128), (2, 333, 2, 128), (2, 333, 2, 128)]

    def fresh():
        return [torch.randn(s, device="cuda", dtype=torch.bfloat16, generator=gen) for s in shapes]

    opts = {"causal": True, "window": (200, 0)}
    cr.attention(*fresh(), **opts)  # the full path, which keeps its launch
    assert runs == []
    q, k, v = fresh()
    poison_torch_pools()
    out, lse = cr.attention(q, k, v, return_lse=True, **opts)
    assert len(runs) == 1
    call_plans.clear()
    want_out, want_lse = cr.attention(q, k, v, return_lse=True, **opts)
    assert len(runs) == 1  # (the full path again)
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse)

    def host(x):
        return x.cpu().view(torch.int16).numpy().view(ml_dtypes.bfloat16)

    check_kernel_forward(host(out), lse.cpu().numpy(), *map(host, (q, k, v)), **opts)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        poison_torch_pools()
        on_side = cr.attention(q, k, v, **opts)
    side.synchronize()
    assert len(runs) == 2 and torch.equal(on_side, want_out)

    q.requires_grad_(True)
    with pytest.raises(TypeError, match="requires grad"):
        cr.attention(q, k, v, **opts)
    q.requires_grad_(False)

    flat = torch.empty(q.numel() + 8, device="cuda", dtype=q.dtype)
    shifted = flat[1 : 1 + q.numel()].view(q.shape)  # same strides, address 2 bytes off
    shifted.copy_(q)
    assert torch.equal(cr.attention(shifted, k, v, **opts), want_out)


@requires_gpu(1)
@pytest.mark.usefixtures("kernel_family")
def test_repeats_with_caller_owned_outputs_run_the_kept_launch(monkeypatch, fresh_rng):
    """out= / lse= repeats of a checked call run the kept launch (call_plans.CallPlan) and write
    exactly what the full path returns (NaN-poisoned first, a strided out); a repeat whose out
    is an input's memory, or requires grad, is still refused with the full path's error."""
    torch = torch_on_gpu()
    from cuparing import call_plans

    call_plans.clear()
    launched = []
    real_run = call_plans.CallPlan.run

    def counted_run(self, *args, **kwargs):
        result = real_run(self, *args, **kwargs)
        launched.append(result is not None)
        return result

    monkeypatch.setattr(call_plans.CallPlan, "run", counted_run)
    gen = torch.Generator(device="cuda").manual_seed(int(fresh_rng.integers(2**62)))
    b, s, h, hkv, d = 2, 300, 4, 2, 128

    def fresh():
        q = torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, generator=gen)
        k, v = (torch.randn(b, s, hkv, d, device="cuda", dtype=torch.bfloat16, generator=gen)
                for _ in range(2))  # fmt: skip
        return q, k, v

    def poisoned(transposed):
        out = torch.full((b, h, s, d), float("nan"), device="cuda", dtype=torch.bfloat16)
        out = out.transpose(1, 2) if transposed else out.view(b, s, h, d)
        return out, torch.full((b, h, s), float("nan"), device="cuda")

    opts = {"causal": True, "window": (150, 0)}
    for transposed in (True, False):
        primer_out, primer_lse = poisoned(transposed)
        cr.attention(*fresh(), out=primer_out, lse=primer_lse, **opts)  # full path: kept
        q, k, v = fresh()
        out, lse = poisoned(transposed)
        got = cr.attention(q, k, v, return_lse=True, out=out, lse=lse, **opts)
        assert launched[-1] and got[0] is out and got[1] is lse
        want_out, want_lse = cr.attention(q, k, v, return_lse=True, **opts)
        assert torch.equal(out, want_out) and torch.equal(lse, want_lse)

    def host(x):
        return x.cpu().view(torch.int16).numpy().view(ml_dtypes.bfloat16)

    check_kernel_forward(host(out), lse.cpu().numpy(), *map(host, (q, k, v)), **opts)
    # the kept plan's signature, but out is q's memory / out requires grad: the full path refuses
    with pytest.raises(ValueError, match="out shares memory with q"):
        cr.attention(q, k, v, out=q, lse=lse, **opts)
    out.requires_grad_(True)
    with pytest.raises(TypeError, match="requires grad"):
        cr.attention(q, k, v, out=out, lse=lse, **opts)
    assert launched[-2:] == [False, False]


@requires_gpu(1)
@pytest.mark.parametrize("world", [1, 2, 3])
def test_repeat_backward_and_ring_calls_skip_the_checks(world, monkeypatch, fresh_rng):
    """Repeats of checked ring calls and one-device backward calls on torch CUDA tensors
    (call_plans.CheckedCall: the checks and plans of the first call reused; ring calls and the
    one-device backward at pointer level, its ring of one) give what the full
    path gives on fresh data: the forward bitwise, gradients within the float64 reference's
    bounds; a repeat whose dq= is dout's memory is still refused."""
    torch = torch_on_gpu()
    from cuparing import call_plans

    call_plans.clear()
    reused = record_plan_reuse(monkeypatch)
    # ring repeats run at pointer level (call_plans.RingForwardPlan, ...Backward)
    planned = record_plan_runs(monkeypatch, (call_plans.RingForwardPlan,
                                             call_plans.RingBackwardPlan))  # fmt: skip
    rng = fresh_rng
    b, s, h, hkv, d = 2, 96 * world, 4, 2, 64
    opts = {"causal": True, "layout": "zigzag"} if world > 1 else {"causal": True}

    def draws():
        shapes = [(b, s, h, d), (b, s, hkv, d), (b, s, hkv, d), (b, s, h, d)]
        return [random_array(rng, shape, "float16") for shape in shapes]

    layout = opts.get("layout", "contiguous")

    def rank_fn(ring, hosts):
        results = []
        for host in hosts:  # on the same ring: the first call checks, the next ones repeat
            q, k, v, dout = (
                torch.from_numpy(cr.shard(x, ring.rank, ring.size, layout=layout)).cuda()
                for x in host
            )
            poison_torch_pools()
            if world == 1:
                out, lse = cr.attention(q, k, v, return_lse=True, causal=True)
                grads = cr.attention_backward(dout, q, k, v, out, lse, causal=True)
            else:
                out, lse = cr.ring_attention(q, k, v, ring, return_lse=True, **opts)
                grads = cr.ring_attention_backward(dout, q, k, v, out, lse, ring, **opts)
            torch.cuda.synchronize()
            results.append([x.cpu().numpy() for x in (out, lse, *grads)])
        return results

    def run(hosts):
        per_rank = cr.simulate(world, lambda ring: rank_fn(ring, hosts))
        return [
            [
                cr.unshard([r[n][i] for r in per_rank], layout=layout, axis=2 if i == 1 else 1)
                for i in range(5)
            ]
            for n in range(len(hosts))
        ]

    host = draws()
    repeat = run([draws(), host])[1]
    # every rank's forward and backward repeat used what its first call decided, the ring's
    # at pointer level
    assert reused == [True] * (2 * world if world > 1 else 1)
    # (one device: the backward repeat at pointer level; its forward is one kept launch)
    assert planned == ([True] * 2 * world if world > 1 else [True])
    call_plans.clear()
    full = run([host])[0]
    assert np.array_equal(repeat[0], full[0]) and np.array_equal(repeat[1], full[1])
    check_kernel_forward(repeat[0], repeat[1], *host[:3], causal=True)
    check_backward(repeat[2:], host[3], *host[:3], causal=True)

    def refused(ring):
        """A kept plan's signature, but a destination over an input's memory: the per-call
        check refuses the repeat and the full path raises (on every rank). (Contiguous shards
        here, so that q itself has the kept out='s signature.)"""
        q, k, v, dout = (
            torch.from_numpy(cr.shard(x, ring.rank, ring.size, layout=layout)).cuda().contiguous()
            for x in host
        )
        if world == 1:
            out, lse = cr.attention(q, k, v, return_lse=True, causal=True)
            cr.attention_backward(dout, q, k, v, out, lse, causal=True, dq=torch.empty_like(q))
            with pytest.raises(ValueError, match="dq shares memory with dout"):
                cr.attention_backward(dout, q, k, v, out, lse, causal=True, dq=dout)
        else:
            def poisoned():
                lse = torch.full((b, h, q.shape[1]), float("nan"), device="cuda")
                return torch.full_like(q, float("nan")), lse

            want = cr.ring_attention(q, k, v, ring, return_lse=True, **opts)
            out, lse = poisoned()
            cr.ring_attention(q, k, v, ring, out=out, lse=lse, **opts)  # checked, kept
            out, lse = poisoned()
            got = cr.ring_attention(q, k, v, ring, out=out, lse=lse, return_lse=True, **opts)
            # the repeat wrote the caller's (NaN-poisoned) arrays: the same bits
            assert got[0] is out and got[1] is lse
            assert torch.equal(out, want[0]) and torch.equal(lse, want[1])
            with pytest.raises(ValueError, match="out shares memory with q"):
                cr.ring_attention(q, k, v, ring, out=q, lse=lse, **opts)

    call_plans.clear()  # (a kept plan of a ring since gone could meet a new ring's id)
    reused.clear()
    planned.clear()
    cr.simulate(world, refused)
    # per rank: the out= repeat at pointer level, then out=q, which the plan said no to
    if world > 1:
        assert sorted(reused) == [False] * world + [True] * world
        assert planned == [True] * world
    else:
        assert reused == [False]


@requires_gpu(1)
@pytest.mark.parametrize("world", [1, 2])
def test_packed_document_repeats_run_kept_plans(world, monkeypatch, fresh_rng):
    """Calls with the same ``cu_seqlens`` (on the host) repeat by their kept plans (one device:
    the forward's launch and the backward's launches; a ring: every step's launches) on fresh
    data in NaN-poisoned memory, within the float64 reference's bounds; other boundaries of
    the same length get their own plan, not the kept one."""
    torch = torch_on_gpu()
    from cuparing import call_plans

    call_plans.clear()
    planned = record_plan_runs(monkeypatch, (call_plans.CallPlan, call_plans.RingForwardPlan,
                                             call_plans.RingBackwardPlan))  # fmt: skip
    rng = fresh_rng
    b, s, h, hkv, d = 1, 160 * world, 4, 2, 64

    def boundaries():
        cuts = np.sort(rng.choice(np.arange(1, s), size=int(rng.integers(1, 6)), replace=False))
        return [0, *map(int, cuts), s]

    def draws():
        shapes = [(b, s, h, d), (b, s, hkv, d), (b, s, hkv, d), (b, s, h, d)]
        return [random_array(rng, shape, "bfloat16") for shape in shapes]

    layout = "zigzag"
    first, other = boundaries(), boundaries()
    while other == first:  # (the third call must be another signature)
        other = boundaries()
    calls = [(first, draws()), (first, draws()), (other, draws())]

    def rank_fn(ring):
        results = []
        for cu, host in calls:
            q, k, v, dout = bf16_shards_in_poisoned_memory(torch, ring, host, layout, cu)
            if world == 1:
                out, lse = cr.attention(q, k, v, causal=True, cu_seqlens=cu, return_lse=True)
                grads = cr.attention_backward(dout, q, k, v, out, lse, causal=True,
                                              cu_seqlens=cu)  # fmt: skip
            else:
                opts = {"causal": True, "layout": layout, "cu_seqlens": cu}
                out, lse = cr.ring_attention(q, k, v, ring, return_lse=True, **opts)
                grads = cr.ring_attention_backward(dout, q, k, v, out, lse, ring, **opts)
            torch.cuda.synchronize()
            results.append([x.float().cpu().numpy() for x in (out, lse, *grads)])
        return results

    per_rank = cr.simulate(world, rank_fn)
    # only the second call repeats: per rank its forward and its backward
    assert planned == [True] * 2 * world
    for n, (cu, host) in enumerate(calls):
        check_causal_ring_call([r[n] for r in per_rank], host, layout, cu)


@requires_gpu(1)
@pytest.mark.parametrize("headdim", [64, 128])
def test_inputs_at_misaligned_addresses_are_copied(headdim, kernel_family, fresh_rng):
    """q, k, v, dout whose base address is 2 bytes off a 16-byte boundary (contiguous, so only
    the address is wrong for the kernels' 16-byte loads): forward and backward copy them into
    aligned memory and match the float64 reference; they used to fault."""
    import cupy

    rng = fresh_rng
    heads = (4, 2, 2, 4)  # q, k, v, dout
    shapes = [(1, 130, h, headdim) for h in heads]
    q, k, v, dout = (random_array(rng, s, "bfloat16") for s in shapes)

    def shifted(x):
        bits = cupy.empty(x.size + 8, dtype=cupy.uint16)
        view = bits[1 : 1 + x.size].reshape(x.shape)
        view[...] = cupy.asarray(x.view(np.uint16))
        return view.view(x.dtype)

    gq, gk, gv, gdout = map(shifted, (q, k, v, dout))
    assert all(x.data.ptr % 16 == 2 for x in (gq, gk, gv, gdout))
    poison_pool()
    out, lse = cr.attention(gq, gk, gv, causal=True, return_lse=True)
    check_kernel_forward(to_host(out), to_host(lse), q, k, v, causal=True)
    grads = cr.attention_backward(gdout, gq, gk, gv, out, lse, causal=True)
    check_backward([to_host(g) for g in grads], dout, q, k, v, causal=True)
