"""Caller-owned outputs: ``out=`` / ``lse=`` on the forward calls, ``dq=`` / ``dk=`` / ``dv=`` on
the backward, on the CPU backend (the GPU twin is in test_gpu_attention.py).

The result written into the caller's arrays must be exactly what the call returns without them
(the same computation, only the destination differs), every element must be written (the arrays
are poisoned with NaN first), strided destinations must work, and a destination that cannot take
the result must be refused before any work.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import LOW_PRECISION, np_dtype, ring_cases

import cuparing as cr
from cuparing.comm.local import SoloRing


def _poisoned_view(shape, dtype, layout: str):
    """A NaN-filled destination of ``shape`` laid out as ``layout``: 'dense', 'bhsd' (a
    [B, H, S, D] buffer seen as [B, S, H, D]) or 'padded' (every row inside a wider buffer)."""
    b, s, h, d = shape
    if layout == "bhsd":
        return np.full((b, h, s, d), np.nan, dtype=dtype).transpose(0, 2, 1, 3)
    if layout == "padded":
        return np.full((b, s, h, d + 3), np.nan, dtype=dtype)[..., :d]
    return np.full(shape, np.nan, dtype=dtype)


def _same(got, want):
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape
    assert np.array_equal(got, want, equal_nan=True)


@settings(deadline=None)
@given(
    case=ring_cases(dtypes=("float64", *LOW_PRECISION), max_world=4, max_local=6),
    layout=st.sampled_from(["dense", "bhsd", "padded"]),
)
def test_ring_forward_and_backward_write_into_caller_arrays(case, layout):
    q, k, v, dout = case.arrays()
    dtype = np_dtype(case.dtype)
    lse_dtype = np.float64 if case.dtype == "float64" else np.float32
    opts = {**case.mask, "layout": case.layout}

    def rank_fn(ring):
        ql, kl, vl, dl = (
            cr.shard(x, ring.rank, ring.size, layout=case.layout) for x in (q, k, v, dout)
        )
        want_out, want_lse = cr.ring_attention(ql, kl, vl, ring, return_lse=True, **opts)
        out = _poisoned_view(ql.shape, dtype, layout)
        b, s, h, _ = ql.shape
        lse = np.full((b, h, s), np.nan, dtype=lse_dtype)
        got = cr.ring_attention(ql, kl, vl, ring, return_lse=True, out=out, lse=lse, **opts)
        assert got[0] is out and got[1] is lse
        _same(out, want_out)
        _same(lse, want_lse)
        want = cr.ring_attention_backward(dl, ql, kl, vl, want_out, want_lse, ring, **opts)
        dests = [_poisoned_view(x.shape, dtype, layout) for x in (ql, kl, vl)]
        dests[ring.rank % 3] = None  # any subset of the gradients may be given
        grads = cr.ring_attention_backward(
            dl, ql, kl, vl, want_out, want_lse, ring, dq=dests[0], dk=dests[1], dv=dests[2], **opts
        )
        for dest, got_grad, want_grad in zip(dests, grads, want, strict=True):
            if dest is not None:
                assert got_grad is dest
            _same(got_grad, want_grad)
        return True

    assert all(cr.simulate(case.world_size, rank_fn))


@given(
    dtype=st.sampled_from(["float64", *LOW_PRECISION]),
    causal=st.booleans(),
    sq=st.integers(1, 20),
    sk=st.integers(1, 20),
    seed=st.integers(0, 2**32 - 1),
)
def test_attention_writes_into_caller_arrays(dtype, causal, sq, sk, seed):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((2, sq, 4, 8)).astype(np_dtype(dtype))
    k, v = (rng.standard_normal((2, sk, 2, 8)).astype(np_dtype(dtype)) for _ in range(2))
    want_out, want_lse = cr.attention(q, k, v, causal=causal, return_lse=True)
    out = _poisoned_view(q.shape, np_dtype(dtype), "bhsd")
    lse = np.full((2, 4, sq), np.nan, dtype=np.float64 if dtype == "float64" else np.float32)
    assert cr.attention(q, k, v, causal=causal, out=out) is out
    _same(out, want_out)
    out[...] = np.nan
    got_out, got_lse = cr.attention(q, k, v, causal=causal, return_lse=True, out=out, lse=lse)
    assert got_out is out and got_lse is lse
    _same(out, want_out)
    _same(lse, want_lse)


def test_empty_batch_and_rows_without_keys_fill_caller_arrays():
    q = k = v = np.ones((0, 4, 2, 8))
    out, lse = np.empty((0, 4, 2, 8)), np.empty((0, 2, 4))
    assert cr.attention(q, k, v, out=out, lse=lse, return_lse=True) == (out, lse)
    q = np.random.default_rng(1).standard_normal((1, 6, 2, 8))
    want_out, want_lse = cr.attention(q, q, q, window=(5, -1), return_lse=True)
    out, lse = np.full((1, 6, 2, 8), np.nan), np.full((1, 2, 6), np.nan)
    cr.attention(q, q, q, window=(5, -1), out=out, lse=lse)  # query 0 sees no key
    assert np.all(out[:, 0] == 0) and np.all(np.isneginf(lse[:, :, 0]))
    _same(out, want_out)
    _same(lse, want_lse)


def _bad_destinations():
    q = np.zeros((1, 8, 4, 16))
    k = v = np.zeros((1, 8, 2, 16))
    lse = np.zeros((1, 4, 8))
    cases = [
        ({"out": np.zeros((1, 8, 4, 8))}, ValueError, "out must have shape"),
        ({"out": np.zeros((1, 8, 4, 16), np.float32)}, TypeError, "out must have dtype float64"),
        ({"out": np.zeros((1, 8, 4, 32))[..., ::2]}, ValueError, "contiguous last axis"),
        ({"out": q}, ValueError, "out shares memory with q"),
        ({"out": np.zeros((1, 8, 4, 16)), "lse": lse.astype(np.float32)}, TypeError, "float64"),
        ({"lse": np.zeros((1, 4, 16))[:, :, ::2]}, ValueError, "lse must be C-contiguous"),
        ({"lse": np.zeros((1, 8, 4))}, ValueError, r"lse must have shape \(1, 4, 8\)"),
        ({"out": [[0.0]]}, TypeError, "out: expected a NumPy, CuPy, PyTorch or JAX array"),
    ]
    buffer = np.zeros(2 * 8 * 4 * 16)
    shared = buffer[: 8 * 4 * 16].reshape(1, 8, 4, 16)
    overlapping_lse = buffer[8 * 4 * 16 - 4 :][: 4 * 8].reshape(1, 4, 8)
    overlap = ({"out": shared, "lse": overlapping_lse}, ValueError, "lse shares memory with out")
    cases.append(overlap)
    return q, k, v, cases


def test_bad_destinations_are_refused_before_any_work():
    q, k, v, cases = _bad_destinations()
    for kwargs, error, message in cases:
        before = {name: x.copy() for name, x in kwargs.items() if isinstance(x, np.ndarray)}
        with pytest.raises(error, match=message):
            cr.attention(q, k, v, **kwargs)
        for name, x in before.items():  # nothing was written
            assert np.array_equal(kwargs[name], x)


def test_bad_gradient_destinations_are_refused():
    q, k, v, _ = _bad_destinations()
    out, lse = cr.attention(q, k, v, return_lse=True)
    dq = np.zeros_like(q)
    backward = cr.ring_attention_backward
    solo = SoloRing()
    with pytest.raises(ValueError, match="dk must have shape"):
        backward(q, q, k, v, out, lse, solo, dk=np.zeros_like(q))
    with pytest.raises(ValueError, match="dv shares memory with dk"):
        dkv = np.zeros_like(k)
        backward(q, q, k, v, out, lse, solo, dk=dkv, dv=dkv)
    with pytest.raises(ValueError, match="dq shares memory with dout"):
        backward(dq, q, k, v, out, lse, solo, dq=dq)
    with pytest.raises(ValueError, match=r"dlse must have shape \(1, 4, 8\)"):
        backward(q, q, k, v, out, lse, solo, dlse=np.zeros((1, 8, 4)))
    with pytest.raises(TypeError, match="dlse must have dtype float64"):
        cr.attention_backward(q, q, k, v, out, lse, dlse=lse.astype(np.float32))


def test_a_destination_of_another_framework_is_refused():
    torch = pytest.importorskip("torch")
    q = np.zeros((1, 4, 2, 8))
    with pytest.raises(TypeError, match="out lives on torch/cpu but the inputs on numpy/cpu"):
        cr.attention(q, q, q, out=torch.zeros(1, 4, 2, 8, dtype=torch.float64))


def test_torch_cpu_destinations_are_written_in_place():
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 9, 2, 16, generator=gen, dtype=torch.bfloat16) for _ in range(3))
    want_out, want_lse = cr.attention(q, k, v, causal=True, return_lse=True)
    out = torch.full((1, 9, 2, 16), float("nan"), dtype=torch.bfloat16)
    lse = torch.full((1, 2, 9), float("nan"))
    got = cr.attention(q, k, v, causal=True, return_lse=True, out=out, lse=lse)
    assert got[0] is out and got[1] is lse
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse)
    with pytest.raises(TypeError, match="out requires grad"):
        tracked = torch.zeros(1, 9, 2, 16, dtype=torch.bfloat16, requires_grad=True)
        cr.attention(q, k, v, out=tracked)


@given(
    shape=st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 3), st.integers(1, 4)),
    pad=st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(0, 3)),
    offsets=st.tuples(st.integers(0, 60), st.integers(0, 60)),
)
def test_overlap_test_against_numpy(shape, pad, offsets):
    """interop.may_overlap never misses shared memory (checked against NumPy's exact
    shares_memory on two views with the same nested strides at any two offsets of one buffer,
    slices of a packed buffer among them) and, for such views, finds exactly the overlaps."""
    from numpy.lib.stride_tricks import as_strided

    from cuparing.interop import may_overlap

    b, s, h, d = shape
    row = d + pad[0]  # nested strides with gaps: each larger than the span inside it
    token = h * row + pad[1]
    batch = s * token + pad[2]
    strides = tuple(8 * x for x in (batch, token, row, 1))
    flat = np.zeros(b * batch + 64)
    x, y = (as_strided(flat[o:], shape=shape, strides=strides) for o in offsets)
    assert may_overlap(x, y) == bool(np.shares_memory(x, y))
