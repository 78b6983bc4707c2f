"""Single-device attention, the merge, and the numerics contract on the CPU backend."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from numerics import check_backward, check_forward
from strategies import HEAD_DIMS, np_dtype

import cuparing as cr
from cuparing.backends import array_ops
from cuparing.masks import BlockKind, MaskSpec
from cuparing.schedule import plan_single


@given(
    sq=st.integers(1, 40),
    sk=st.integers(1, 40),
    hkv=st.integers(1, 3),
    group=st.integers(1, 3),
    d=HEAD_DIMS,
    causal=st.booleans(),
    dtype=st.sampled_from(["float64", "float32", "float16", "bfloat16"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_attention_matches_dense(sq, sk, hkv, group, d, causal, dtype, seed):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((2, sq, hkv * group, d)).astype(np_dtype(dtype))
    k, v = (rng.standard_normal((2, sk, hkv, d)).astype(np_dtype(dtype)) for _ in range(2))
    out, lse = cr.attention(q, k, v, causal=causal, return_lse=True)
    assert out.dtype == q.dtype
    assert lse.dtype == (np.float64 if dtype == "float64" else np.float32)
    check_forward(out, lse, q, k, v, causal=causal)


@given(
    sq=st.integers(1, 30),
    sk=st.integers(1, 30),
    hkv=st.integers(1, 3),
    group=st.integers(1, 3),
    d=st.integers(1, 16),
    causal=st.booleans(),
    dtype=st.sampled_from(["float64", "float32", "float16", "bfloat16"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_attention_backward_matches_dense(sq, sk, hkv, group, d, causal, dtype, seed):
    """One device's gradients, including Sq != Sk (queries aligned to the end of the keys)."""
    rng = np.random.default_rng(seed)
    q, dout = (rng.standard_normal((2, sq, hkv * group, d)).astype(np_dtype(dtype)) for _ in "qd")
    k, v = (rng.standard_normal((2, sk, hkv, d)).astype(np_dtype(dtype)) for _ in range(2))
    out, lse = cr.attention(q, k, v, causal=causal, return_lse=True)
    grads = cr.attention_backward(dout, q, k, v, out, lse, causal=causal)
    for g, x in zip(grads, (q, k, v), strict=True):
        assert g.dtype == x.dtype and g.shape == x.shape
    check_backward(grads, dout, q, k, v, causal=causal)


@given(
    world=st.integers(1, 4),
    layout=st.sampled_from(["contiguous", "zigzag", "striped"]),
    causal=st.booleans(),
    dtype=st.sampled_from(["float64", "float32", "bfloat16"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_deterministic_backward_is_the_same_backward(world, layout, causal, dtype, seed):
    """``deterministic=True`` on the CPU (whose array arithmetic has one order already): the
    very same gradients, bit for bit, as the default, through the ring schedule."""
    rng = np.random.default_rng(seed)
    x = {n: rng.standard_normal((1, 4 * world, 2, 8)).astype(np_dtype(dtype)) for n in "qkvd"}

    def rank_fn(ring, deterministic):
        sh = {n: cr.shard(a, ring.rank, ring.size, layout=layout) for n, a in x.items()}
        out, lse = cr.ring_attention(sh["q"], sh["k"], sh["v"], ring, causal=causal,
                                     layout=layout, return_lse=True)  # fmt: skip
        return cr.ring_attention_backward(sh["d"], sh["q"], sh["k"], sh["v"], out, lse, ring,
                                          causal=causal, layout=layout,
                                          deterministic=deterministic)  # fmt: skip

    plain, ordered = (cr.simulate(world, lambda ring, d=d: rank_fn(ring, d)) for d in (False, True))
    for a, b in zip(plain, ordered, strict=True):
        for ga, gb in zip(a, b, strict=True):
            assert ga.tobytes() == gb.tobytes()


def test_causal_aligns_queries_to_the_end_of_the_keys():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 1, 1, 4))
    k, v = rng.standard_normal((2, 1, 5, 1, 4))
    # one query after five keys sees all of them, so causal == full
    np.testing.assert_allclose(cr.attention(q, k, v, causal=True), cr.attention(q, k, v))


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
def test_huge_logits_stay_finite(dtype):
    rng = np.random.default_rng(1)
    q = (rng.standard_normal((1, 64, 2, 16)) * 30).astype(np_dtype(dtype))
    k = (rng.standard_normal((1, 64, 2, 16)) * 30).astype(np_dtype(dtype))
    v = rng.standard_normal((1, 64, 2, 16)).astype(np_dtype(dtype))
    scale = 2.0  # |q.k| * scale reaches ~1e4
    logits = np.einsum("bqhd,bkhd->bhqk", q.astype(np.float64), k.astype(np.float64)) * scale
    assert np.abs(logits).max() > 5e3

    def ring_fn(ring):
        local = [cr.shard(x, ring.rank, ring.size, layout="zigzag") for x in (q, k, v)]
        return cr.ring_attention(*local, ring, causal=True, scale=scale, layout="zigzag",
                                 return_lse=True)  # fmt: skip

    results = cr.simulate(4, ring_fn)
    out = cr.unshard([r[0] for r in results], layout="zigzag")
    lse = cr.unshard([r[1] for r in results], layout="zigzag", axis=2)
    assert np.isfinite(out.astype(np.float64)).all() and np.isfinite(lse).all()
    check_forward(out, lse, q, k, v, causal=True, scale=scale)


def test_rows_without_keys_give_zero_output_and_minus_inf_lse():
    rng = np.random.default_rng(2)
    q, k, v = rng.standard_normal((3, 1, 32, 2, 8))
    dout = rng.standard_normal(q.shape)
    window = (4, -1)  # strictly earlier tokens only: token 0 sees nothing

    def ring_fn(ring):
        ql, kl, vl, dl = (cr.shard(x, ring.rank, ring.size, layout="striped")
                          for x in (q, k, v, dout))  # fmt: skip
        out, lse = cr.ring_attention(ql, kl, vl, ring, window=window, layout="striped",
                                     return_lse=True)  # fmt: skip
        grads = cr.ring_attention_backward(dl, ql, kl, vl, out, lse, ring, window=window,
                                           layout="striped")  # fmt: skip
        return out, lse, grads

    results = cr.simulate(4, ring_fn)
    out = cr.unshard([r[0] for r in results], layout="striped")
    lse = cr.unshard([r[1] for r in results], layout="striped", axis=2)
    dq = cr.unshard([r[2][0] for r in results], layout="striped")
    assert np.isneginf(lse[:, :, 0]).all() and np.isfinite(lse[:, :, 1:]).all()
    assert (out[:, 0] == 0).all() and (dq[:, 0] == 0).all()
    assert not np.isnan(out).any() and not np.isnan(dq).any()
    check_forward(out, lse, q, k, v, window=window)


def test_merge_with_an_empty_block_changes_nothing():
    rng = np.random.default_rng(3)
    out = rng.standard_normal((1, 5, 2, 4)).astype(np.float32)
    lse = rng.standard_normal((1, 2, 5)).astype(np.float32)
    lse[0, 1, 2] = -np.inf
    out[0, 2, 1] = 0
    acc_out, acc_lse = out.copy(), lse.copy()
    empty_out = np.full_like(out, 0)
    empty_lse = np.full_like(lse, -np.inf)
    array_ops.merge_into(np, acc_out, acc_lse, empty_out, empty_lse)
    np.testing.assert_array_equal(acc_lse, lse)
    np.testing.assert_allclose(acc_out, out, rtol=1e-7)
    assert not np.isnan(acc_out).any()


def test_blocks_of_bfloat16_inputs_merge_in_float32():
    import ml_dtypes

    rng = np.random.default_rng(4)
    q, k, v = (rng.standard_normal((1, 64, 2, 8)).astype(ml_dtypes.bfloat16) for _ in range(3))
    backend = cr.backends.backend_for("numpy")
    positions = np.arange(64)
    state = backend.forward_state(q, blocks=2)
    assert state.out.dtype == np.float32 and state.lse.dtype == np.float32
    for keys in (slice(0, 32), slice(32, 64)):  # two key blocks folded into one running result
        backend.forward_block(state, q, k[:, keys], v[:, keys], positions, positions[keys],
                              BlockKind.FULL, MaskSpec(), 8**-0.5)  # fmt: skip
        assert state.out.dtype == np.float32
    out, lse = backend.forward_finish(state)
    assert out.dtype == ml_dtypes.bfloat16
    check_forward(out, lse, q, k, v)


def test_the_cpu_backend_meets_the_backend_contract():
    assert isinstance(cr.backends.backend_for("numpy"), cr.backends.Backend)
    assert isinstance(cr.backends.ArrayBackend(np), cr.backends.Backend)


def test_one_device_is_a_one_step_plan_with_queries_at_the_end_of_the_keys():
    plan = plan_single(3, 7, MaskSpec(causal=True))
    assert (plan.world_size, plan.last_step, plan.blocks) == (1, 0, 1)
    np.testing.assert_array_equal(plan.q_positions, [4, 5, 6])
    np.testing.assert_array_equal(plan.positions[0], np.arange(7))
    assert plan.kinds == (BlockKind.PARTIAL,)
    assert plan_single(1, 7, MaskSpec(causal=True)).kinds == (BlockKind.FULL,)
    assert plan_single(3, 7, MaskSpec(causal=True)).idle().blocks == 0


def test_torch_cpu_round_trip_returns_torch():
    torch = pytest.importorskip("torch")
    q = torch.randn(1, 16, 2, 8, dtype=torch.bfloat16)
    out, lse = cr.attention(q, q, q, causal=True, return_lse=True)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.bfloat16
    assert lse.dtype == torch.float32
    import ml_dtypes

    q_np = q.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    check_forward(out, lse, q_np, q_np, q_np, causal=True)


def test_bhsd_transposed_view_is_accepted():
    rng = np.random.default_rng(5)
    q_bhsd = rng.standard_normal((2, 3, 17, 8))
    q = q_bhsd.transpose(0, 2, 1, 3)  # [B, S, H, D] view, last axis still contiguous
    out = cr.attention(q, q, q)
    check_forward(out, None, q, q, q)


def test_torch_autograd_matches_the_reference_gradient():
    torch = pytest.importorskip("torch")
    from numerics import check_backward

    rng = np.random.default_rng(6)
    q, k, v, dout = (rng.standard_normal((1, 24, 2, 8)) for _ in range(4))

    def fn(ring):
        local = [
            torch.tensor(cr.shard(x, ring.rank, ring.size, layout="zigzag"), requires_grad=True)
            for x in (q, k, v)
        ]
        out = cr.ring_attention_torch(*local, ring, causal=True, layout="zigzag")
        out.backward(torch.tensor(cr.shard(dout, ring.rank, ring.size, layout="zigzag")))
        return [t.grad.numpy() for t in local]

    grads = cr.simulate(3, fn)
    full = [cr.unshard([g[i] for g in grads], layout="zigzag") for i in range(3)]
    check_backward(full, dout, q, k, v, causal=True)


def test_backward_through_lse_matches_finite_differences():
    """dlse= (the loss uses the lse too): central differences of L = <w_out, out> + <w_lse, lse>
    in float64 at random coordinates of q, k and v."""
    rng = np.random.default_rng(17)
    q = rng.standard_normal((1, 5, 2, 4))
    k, v = (rng.standard_normal((1, 7, 1, 4)) for _ in range(2))
    w_out, w_lse = rng.standard_normal(q.shape), rng.standard_normal((1, 2, 5))
    opts = {"causal": True, "window": (3, None)}

    def loss(q, k, v):
        out, lse = cr.attention(q, k, v, return_lse=True, **opts)
        return float((w_out * out).sum() + (w_lse * lse).sum())

    out, lse = cr.attention(q, k, v, return_lse=True, **opts)
    grads = cr.attention_backward(w_out, q, k, v, out, lse, dlse=w_lse, **opts)
    h = 1e-6
    for which, x in enumerate((q, k, v)):
        for _ in range(6):
            idx = tuple(rng.integers(0, n) for n in x.shape)
            args = [q.copy(), k.copy(), v.copy()]
            args[which][idx] += h
            up = loss(*args)
            args[which][idx] -= 2 * h
            numeric = (up - loss(*args)) / (2 * h)
            # central differences: O(h^2) truncation + O(eps / h) cancellation, both < 1e-8 here
            assert abs(grads[which][idx] - numeric) <= 1e-7, (which, idx)
