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
