"""Bad input is refused at the API boundary with a message naming the argument."""

from __future__ import annotations

import numpy as np
import pytest

import cuparing as cr
from cuparing.comm.local import SoloRing

RNG = np.random.default_rng(0)


def arrays(b=1, s=8, h=4, hkv=2, d=8, dtype=np.float32):
    q = RNG.standard_normal((b, s, h, d)).astype(dtype)
    k = RNG.standard_normal((b, s, hkv, d)).astype(dtype)
    v = RNG.standard_normal((b, s, hkv, d)).astype(dtype)
    return q, k, v


class Spy(SoloRing):
    """A ring of one that records exchanges: bad input must fail before any."""

    def __init__(self, size=1):
        self.size = size
        self.calls = 0

    def exchange(self, arrays, shift=1, tag="kv"):
        self.calls += 1
        return super().exchange(arrays, shift, tag)


BAD_FORWARD = [
    (lambda q, k, v: (q[0], k, v), {}, ValueError, r"q must be \[B, S, H, D\].*shape \(8, 4, 8"),
    (lambda q, k, v: (q, k[..., :4], v), {}, ValueError, "k and v must have the same shape"),
    (lambda q, k, v: (q, k[:, :, :1].repeat(3, 2), v[:, :, :1].repeat(3, 2)), {}, ValueError,
     "H=4 must be a multiple of key/value heads Hkv=3"),
    (lambda q, k, v: (q, k[..., :4], v[..., :4]), {}, ValueError, "head dim differs: q has D=8"),
    (lambda q, k, v: (q, k.astype(np.float64), v), {}, TypeError, "share one dtype.*k=float64"),
    (lambda q, k, v: (q.astype(np.int32), k, v), {}, TypeError, "q must have a dtype in"),
    (lambda q, k, v: (np.asfortranarray(q), k, v), {}, ValueError, "contiguous last axis"),
    (lambda q, k, v: (q, k[:, :4], v[:, :4]), {"ring": True}, ValueError, "same tokens"),
    (lambda q, k, v: (q.tolist(), k, v), {}, TypeError, "expected a NumPy, CuPy, PyTorch or JAX"),
]  # fmt: skip


@pytest.mark.parametrize(("mutate", "opts", "error", "message"), BAD_FORWARD)
def test_bad_arrays_are_refused_before_any_transfer(mutate, opts, error, message):
    q, k, v = mutate(*arrays())
    ring = Spy()
    with pytest.raises(error, match=message):
        cr.ring_attention(q, k, v, ring)
    assert ring.calls == 0
    if not opts.get("ring"):
        with pytest.raises(error, match=message):
            cr.attention(q, k, v)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"layout": "spiral"}, ValueError, "layout='spiral' is not one of"),
        ({"window": (3,)}, ValueError, r"window must be None or a pair \(left, right\)"),
        ({"window": (1.5, 2)}, TypeError, "window left must be an int or None"),
        ({"window": (2, -3)}, ValueError, "hides every key from every query"),
        ({"window": (-1, None), "causal": True}, ValueError, "left >= 0 when causal"),
        ({"scale": -1.0}, ValueError, "scale must be finite and > 0"),
        ({"scale": "big"}, TypeError, "scale must be a float"),
        ({"causal": 1}, TypeError, "causal must be a bool"),
    ],
)
def test_bad_options_are_refused(kwargs, error, message):
    q, k, v = arrays()
    ring = Spy()
    with pytest.raises(error, match=message):
        cr.ring_attention(q, k, v, ring, **kwargs)
    assert ring.calls == 0


def test_non_bool_deterministic_is_refused_before_any_transfer():
    q, k, v = arrays()
    ring = Spy()
    out, lse = np.zeros_like(q), np.zeros((q.shape[0], q.shape[2], q.shape[1]), np.float32)
    with pytest.raises(TypeError, match="deterministic must be a bool, got 1"):
        cr.ring_attention_backward(q, q, k, v, out, lse, ring, deterministic=1)
    assert ring.calls == 0
    with pytest.raises(TypeError, match="deterministic must be a bool, got 'yes'"):
        cr.attention_backward(q, q, k, v, out, lse, deterministic="yes")


def test_length_the_layout_cannot_split_names_what_would_work():
    q, k, v = arrays(s=3)
    ring = Spy(size=4)
    with pytest.raises(ValueError, match=r"global length is 12.*multiple of 8.*local length a"):
        cr.ring_attention(q, k, v, ring, layout="zigzag")
    assert ring.calls == 0


def test_world_size_below_one_is_refused():
    q, k, v = arrays()
    with pytest.raises(ValueError, match="world size must be >= 1, got 0"):
        cr.ring_attention(q, k, v, Spy(size=0))
    with pytest.raises(ValueError, match="world_size must be >= 1"):
        cr.simulate(0, lambda ring: None)


def test_non_ring_is_refused():
    q, k, v = arrays()
    with pytest.raises(TypeError, match="ring must be a cuparing.Ring, got str"):
        cr.ring_attention(q, k, v, "ring")


def test_backward_checks_out_and_lse():
    q, k, v = arrays()
    ring = Spy()
    out, lse = cr.ring_attention(q, k, v, ring, return_lse=True)
    with pytest.raises(ValueError, match=r"lse must be \[B, H, S\] = \(1, 4, 8\)"):
        cr.ring_attention_backward(out, q, k, v, out, lse[:, :2], ring)
    with pytest.raises(ValueError, match="dout must have q's shape"):
        cr.ring_attention_backward(out[:, :4], q, k, v, out, lse, ring)
    with pytest.raises(TypeError, match="lse must be float32 for float32 inputs, got float16"):
        cr.ring_attention_backward(out, q, k, v, out, lse.astype(np.float16), ring)


def test_window_accepts_numpy_integers_and_huge_sides():
    q, k, v = arrays()
    want = cr.ring_attention(q, k, v, Spy(), window=(3, 0))
    got = cr.ring_attention(q, k, v, Spy(), window=(np.int64(3), np.int32(0)))
    np.testing.assert_array_equal(got, want)
    # sides beyond any position mean "unbounded" and stay within the kernels' int32 bounds
    np.testing.assert_array_equal(cr.ring_attention(q, k, v, Spy(), window=(2**40, 2**40)),
                                  cr.ring_attention(q, k, v, Spy()))  # fmt: skip
    spec = cr.masks.MaskSpec(False, 2**40, -(2**40) + 1)
    assert -(2**31) < -spec.left_bound <= spec.right_bound < 2**31


def test_lse_on_another_device_is_named():
    torch = pytest.importorskip("torch")
    q, k, v = arrays()
    out, lse = cr.ring_attention(q, k, v, Spy(), return_lse=True)
    with pytest.raises(TypeError, match="lse is torch/cpu, q is numpy/cpu"):
        cr.ring_attention_backward(out, q, k, v, out, torch.from_numpy(lse), Spy())


# ---- papercuts (issue 13, item 5): each of these failed before the checks above learnt them


@pytest.mark.parametrize(
    ("name", "shape", "message"),
    [
        ("q", (1, 0, 4, 8), r"q has S=0 \(sequence length\)"),
        ("q", (1, 8, 0, 8), r"q has H=0 \(heads\)"),
        ("q", (1, 8, 4, 0), r"q has D=0 \(head dim\)"),
        ("k", (1, 8, 0, 8), r"k has Hkv=0 \(heads\)"),
    ],
)
def test_empty_dimensions_are_named(name, shape, message):
    q, k, v = arrays()
    if name == "q":
        q = np.zeros(shape, np.float32)
    else:
        k = v = np.zeros(shape, np.float32)
    ring = Spy()
    with pytest.raises(ValueError, match=message):
        cr.ring_attention(q, k, v, ring)
    assert ring.calls == 0
    with pytest.raises(ValueError, match=message):
        cr.attention(q, k, v)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_empty_batch_is_a_no_op_with_the_right_shapes(dtype):
    q, k, v = (x[:0] for x in arrays(b=2, dtype=dtype))
    lse_dtype = np.float64 if dtype == np.float64 else np.float32
    want = ((0, 8, 4, 8), dtype, (0, 4, 8), lse_dtype)
    out, lse = cr.attention(q, k[:, :5], v[:, :5], causal=True, return_lse=True)
    assert (out.shape, out.dtype, lse.shape, lse.dtype) == want
    ring = Spy(size=2)  # rank 0 of 2 with no peer: an empty batch must not communicate
    out, lse = cr.ring_attention(q, k, v, ring, causal=True, layout="zigzag", return_lse=True)
    assert (out.shape, out.dtype, lse.shape, lse.dtype) == want
    grads = cr.ring_attention_backward(out, q, k, v, out, lse, ring, causal=True, layout="zigzag")
    assert [(g.shape, g.dtype) for g in grads] == [(x.shape, x.dtype) for x in (q, k, v)]
    assert ring.calls == 0


def test_numpy_booleans_and_integers_are_accepted_like_python_ones():
    q, k, v = arrays()
    want = cr.ring_attention(q, k, v, Spy(), causal=True, window=(3, 0))
    got = cr.ring_attention(q, k, v, Spy(), causal=np.bool_(True), window=(np.int64(3), np.int8(0)))
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(cr.attention(q, k, v, causal=np.bool_(True)),
                                  cr.attention(q, k, v, causal=True))  # fmt: skip
    x = np.arange(16.0).reshape(1, 8, 2)
    shards = [cr.shard(x, np.int64(r), np.int32(2), layout="zigzag", axis=np.int64(1))
              for r in range(2)]  # fmt: skip
    np.testing.assert_array_equal(cr.unshard(shards, layout="zigzag", axis=np.int16(1)), x)
    np.testing.assert_array_equal(cr.global_positions("striped", np.int64(1), np.int64(2), 3),
                                  [1, 3, 5])  # fmt: skip
    assert cr.simulate(np.int64(2), lambda ring: ring.size) == [2, 2]


@pytest.mark.parametrize(
    ("scale", "error", "message"),
    [
        ("0.1", TypeError, "scale must be a float or None"),
        (True, TypeError, "scale must be a float or None"),
        (1j, TypeError, "scale must be a float or None"),
        (0.0, ValueError, "scale must be finite and > 0"),
        (float("nan"), ValueError, "scale must be finite and > 0"),
        (float("inf"), ValueError, "scale must be finite and > 0"),
    ],
)
def test_scale_must_be_a_finite_positive_real(scale, error, message):
    q, k, v = arrays()
    ring = Spy()
    with pytest.raises(error, match=message):
        cr.ring_attention(q, k, v, ring, scale=scale)
    assert ring.calls == 0
    with pytest.raises(error, match=message):
        cr.attention(q, k, v, scale=scale)


def test_scale_accepts_integers_and_numpy_reals():
    q, k, v = arrays()
    want = cr.attention(q, k, v, scale=0.5)
    np.testing.assert_array_equal(cr.attention(q, k, v, scale=np.float32(0.5)), want)
    np.testing.assert_array_equal(cr.attention(q, k, v, scale=1), cr.attention(q, k, v, scale=1.0))


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: cr.shard([[1, 2], [3, 4]], 0, 2, axis=0), TypeError,
         r"x: expected a NumPy, CuPy, PyTorch or JAX array, got builtins.list"),
        (lambda: cr.shard(np.zeros((1, 8)), 0, 2, axis=2), ValueError,
         "axis=2 is out of range for an array of 2 dims"),
        (lambda: cr.shard(np.zeros((1, 8)), 0, 2, axis=1.0), TypeError,
         r"axis must be an int, got 1.0 \(float\)"),
        (lambda: cr.shard(np.zeros((1, 8)), "0", 2), TypeError, "rank must be an int, got '0'"),
        (lambda: cr.shard(np.zeros((1, 8)), 0, 2.0), TypeError, "world_size must be an int"),
        (lambda: cr.unshard([[1, 2], [3, 4]]), TypeError,
         r"shards\[0\]: expected a NumPy, CuPy, PyTorch or JAX array, got builtins.list"),
        (lambda: cr.unshard(7), TypeError, "shards must be a list of arrays"),
        (lambda: cr.unshard([np.zeros((1, 4))] * 2, axis=-3), ValueError,
         "axis=-3 is out of range for an array of 2 dims"),
        (lambda: cr.unshard([np.zeros((1, 3))] * 2, layout="zigzag"), ValueError,
         "length on axis 1 must be even, got 3"),
        (lambda: cr.global_positions("zigzag", 0, 2, 3), ValueError, "even local length"),
        (lambda: cr.global_positions("spiral", 0, 2, 4), ValueError, "layout='spiral'"),
    ],
)  # fmt: skip
def test_shard_and_unshard_name_the_bad_argument(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_negative_axis_counts_from_the_end():
    x = np.arange(24.0).reshape(2, 12)
    shards = [cr.shard(x, r, 3, layout="striped", axis=-1) for r in range(3)]
    np.testing.assert_array_equal(shards[1], x[:, 1::3])
    np.testing.assert_array_equal(cr.unshard(shards, layout="striped", axis=-1), x)


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        ((2, None, "x"), TypeError, r"timeout must be a real number, got 'x' \(str\)"),
        ((2, None, 0), ValueError, "timeout must be finite and > 0"),
        ((2, None, float("inf")), ValueError, "timeout must be finite and > 0"),
        ((2, "fn", 1.0), TypeError, "fn must be callable as fn\\(ring\\), got str"),
        ((2.0, None, 1.0), TypeError, "world_size must be an int >= 1, got 2.0"),
    ],
)
def test_simulate_checks_its_arguments_before_starting_ranks(args, error, message):
    started = []
    world_size, fn, timeout = args
    fn = fn or (lambda ring: started.append(ring.rank))
    with pytest.raises(error, match=message):
        cr.simulate(world_size, fn, timeout=timeout)
    assert started == []


def test_torch_tensors_that_require_grad_are_refused_where_no_gradient_flows():
    torch = pytest.importorskip("torch")
    q, k, v = (torch.from_numpy(x).requires_grad_() for x in arrays())
    with pytest.raises(TypeError, match="q requires grad.*ring_attention_torch"):
        cr.attention(q, k, v)
    with pytest.raises(TypeError, match="q requires grad.*ring_attention_torch"):
        cr.ring_attention(q, k, v, Spy())
    with torch.no_grad():  # no graph to lose: fine
        out = cr.attention(q, k, v)
    np.testing.assert_array_equal(out.numpy(), cr.attention(*arrays_like(q, k, v)))
    out = cr.attention(q.detach(), k.detach(), v.detach())
    assert not out.requires_grad
    # the differentiable path still works on the same tensors
    cr.simulate(1, lambda ring: cr.ring_attention_torch(q, k, v, ring).sum().backward())
    assert q.grad is not None and q.grad.shape == q.shape


def arrays_like(*tensors):
    return [t.detach().numpy() for t in tensors]
