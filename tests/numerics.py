"""The one tolerance table, and the comparisons every numerical test uses.

Errors are Frobenius norms against dense float64 attention on the unsharded sequence
(``cuparing.reference_attention``), computed on the very inputs the code under test received
(low-precision inputs are upcast exactly), divided by the norm of the same computation done on
absolute values (``|P| |V|`` for the output, ``|dS| |K|`` for dq, ...). That is the scale floating
point error is proportional to, so a saturated softmax, whose gradient is a tiny difference of
large terms, is judged fairly; for ordinary inputs it is within a small factor of ‖reference‖.

- float64 and float32: fixed bounds, ~1e-12 and ~1e-5.
- float16 and bfloat16: the output and the gradients are *stored* in that dtype, and the backward
  pass only sees the stored output. The unavoidable error is therefore that of a "storage
  reference": float64 attention whose output is rounded to the dtype, whose ``D = rowsum(dO * O)``
  uses that rounded output, and whose gradients are rounded to the dtype. We require our error to
  be at most twice that reference's error, plus a float32-arithmetic floor (the flash-attention
  convention: at most ~2x the error of a low-precision reference).
- The GPU forward kernel (``check_kernel_out``) also rounds P to the input dtype before P.V, as
  every tensor-core attention kernel does, which perturbs each output by a relative ~u (unit
  roundoff: bf16 2^-8, fp16 2^-11) on top of the final rounding: its relative Frobenius error may
  be ``2 * e_round + u``, e_round being the error of the float64 reference rounded to the dtype.
  float32 inputs (cuBLAS path): 1e-5. Its LSE (``check_kernel_lse``): 1e-3 relative-or-absolute
  (float32 accumulation and ex2.approx), -inf exactly where the reference has -inf.
- Multi-GPU shards (tests/multigpu/ring_worker.py, each rank checks only its own rows, so the
  storage reference is not recomputed there): fixed relative bounds ``SHARD_FORWARD_BOUND`` of
  about one rounding to the dtype (bf16 2^-8, fp16 2^-11, fp32 accumulation), and
  ``BACKWARD_FACTOR`` times that for gradients (D = rowsum(dO * O) sees the stored output and
  dS = P (dP - D) cancels; flash-attention's tests allow the same factor).
- Error must not grow with the ring: a ring of C ranks may be at most ``RING_VS_SOLO`` times the
  error of the same kernels on one device.
"""

from __future__ import annotations

import numpy as np

FIXED = {
    "float64": {"out": 1e-12, "lse": 1e-12, "dq": 1e-12, "dk": 1e-12, "dv": 1e-12},
    "float32": {"out": 1e-5, "lse": 1e-5, "dq": 1e-5, "dk": 1e-5, "dv": 1e-5},
}
STORAGE_FACTOR = 2.0  # low precision: allowed multiple of the storage reference's error
FLOAT32_FLOOR = 1e-5  # arithmetic floor added to the low-precision bound (float32 accumulation)
LSE_LOW_PRECISION = 1e-5  # lse is float32 from exactly upcast inputs


def to_f64(x) -> np.ndarray:
    """Any backend/framework array as a float64 NumPy array."""
    module = type(x).__module__.split(".")[0]
    if module == "cupy":
        x = x.get()
    elif module == "torch":
        x = x.detach().float().cpu().numpy()
    return np.asarray(x).astype(np.float64)


def scaled_err(actual, expected, magnitude) -> float:
    """‖actual − expected‖ / ‖magnitude‖, where ``magnitude >= |expected|`` element-wise."""
    a, e = to_f64(actual), to_f64(expected)
    assert a.shape == e.shape, f"shape {a.shape} != expected {e.shape}"
    assert np.isfinite(a).all(), "result holds NaN or inf"
    denom = np.linalg.norm(magnitude)
    return float(np.linalg.norm(a - e) / (denom if denom > 0 else 1.0))


UNIT_ROUNDOFF = {"bfloat16": 2.0**-8, "float16": 2.0**-11}
SHARD_FORWARD_BOUND = {"bfloat16": 4e-3, "float16": 1e-3, "float32": 1e-5}
BACKWARD_FACTOR = 2.0
RING_VS_SOLO = 1.5


def rel_err(actual, expected) -> float:
    """‖actual − expected‖ / ‖expected‖ in float64."""
    a, e = to_f64(actual), to_f64(expected)
    return float(np.linalg.norm(a - e) / max(np.linalg.norm(e), 1e-30))


def check_kernel_out(out, ref, dtype_name: str) -> None:
    """The GPU forward kernel's output against the float64 reference (see module docstring)."""
    out = to_f64(out)
    assert np.isfinite(out).all(), "NaN/inf in the output"
    err = rel_err(out, ref)
    if dtype_name == "float32":
        assert err <= 1e-5, f"float32 rel err {err:.3g}"
        return
    bound = 2 * rel_err(round_to(to_f64(ref), dtype_name), ref) + UNIT_ROUNDOFF[dtype_name]
    assert err <= bound, f"{dtype_name} rel err {err:.3g} > bound {bound:.3g}"


def check_kernel_lse(lse, ref_lse) -> None:
    """The GPU forward kernel's LSE: -inf pattern exact, else within 1e-3 (see docstring)."""
    lse, ref_lse = to_f64(lse), to_f64(ref_lse)
    assert not np.isnan(lse).any() and not np.isposinf(lse).any()
    empty = np.isneginf(ref_lse)
    np.testing.assert_array_equal(np.isneginf(lse), empty)
    np.testing.assert_allclose(lse[~empty], ref_lse[~empty], rtol=1e-3, atol=1e-3)


def round_to(x: np.ndarray, dtype_name: str) -> np.ndarray:
    """float64 ``x`` rounded to ``dtype_name`` and back."""
    if dtype_name == "bfloat16":
        import ml_dtypes

        return x.astype(ml_dtypes.bfloat16).astype(np.float64)
    return x.astype(dtype_name).astype(np.float64)


def check_lse(lse, ref_lse, dtype_name: str) -> None:
    """Same -inf pattern (rows that see no key); finite parts close relative to max(1, |lse|)."""
    lse, ref_lse = to_f64(lse), to_f64(ref_lse)
    assert not np.isnan(lse).any(), "lse holds NaN"
    assert not np.isposinf(lse).any(), "lse holds +inf"
    assert (np.isneginf(lse) == np.isneginf(ref_lse)).all(), "rows without keys differ"
    finite = np.isfinite(ref_lse)
    tol = FIXED.get(dtype_name, {}).get("lse", LSE_LOW_PRECISION)
    err = np.abs(lse[finite] - ref_lse[finite]) / np.maximum(1.0, np.abs(ref_lse[finite]))
    assert err.size == 0 or err.max() <= tol, f"lse error {err.max():.3g} > {tol:g} ({dtype_name})"


class Reference:
    """Dense float64 attention on the case's inputs: values, magnitudes, and storage references."""

    def __init__(self, q, k, v, dout=None, causal=False, scale=None, window=None):
        from cuparing.reference import _dense_probs

        self.dtype = str(q.dtype).rsplit(".", 1)[-1]
        q64, k64, v64 = (to_f64(x) for x in (q, k, v))
        probs, self.lse, scale = _dense_probs(q64, k64, causal, scale, window, None, None)
        h, hkv = q64.shape[2], k64.shape[2]
        group = h // hkv
        k_full, v_full = np.repeat(k64, group, axis=2), np.repeat(v64, group, axis=2)
        self.out = np.einsum("bhqk,bkhd->bqhd", probs, v_full)
        self.out_mag = np.einsum("bhqk,bkhd->bqhd", probs, np.abs(v_full))
        if dout is None:
            return
        do64 = to_f64(dout)
        b, s = k64.shape[:2]

        def fold(x):  # sum the query heads of each group onto their key/value head
            return x.reshape(b, s, hkv, group, -1).sum(axis=3)

        def grads(delta, dprobs):
            dscores = probs * (dprobs - delta.transpose(0, 2, 1)[..., None])
            dq = np.einsum("bhqk,bkhd->bqhd", dscores, k_full) * scale
            dk = fold(np.einsum("bhqk,bqhd->bkhd", dscores, q64) * scale)
            return dq, dk

        dprobs = np.einsum("bqhd,bkhd->bhqk", do64, v_full)
        self.grads = list(grads((do64 * self.out).sum(-1), dprobs))
        self.grads.append(fold(np.einsum("bhqk,bqhd->bkhd", probs, do64)))
        # magnitudes: the same sums over absolute values
        abs_dprobs = np.einsum("bqhd,bkhd->bhqk", np.abs(do64), np.abs(v_full))
        abs_delta = (np.abs(do64) * self.out_mag).sum(-1)
        abs_ds = probs * (abs_dprobs + abs_delta.transpose(0, 2, 1)[..., None])
        self.grad_mags = [
            np.einsum("bhqk,bkhd->bqhd", abs_ds, np.abs(k_full)) * scale,
            fold(np.einsum("bhqk,bqhd->bkhd", abs_ds, np.abs(q64)) * scale),
            fold(np.einsum("bhqk,bqhd->bkhd", probs, np.abs(do64))),
        ]
        if self.dtype not in FIXED:
            # what a perfect implementation storing this dtype returns: the backward pass sees
            # only the stored output, so D = rowsum(dO * stored O); gradients are stored too
            stored_out = round_to(self.out, self.dtype)
            stored = list(grads((do64 * stored_out).sum(-1), dprobs)) + [self.grads[2]]
            self.stored_grads = [round_to(g, self.dtype) for g in stored]


def check_forward(out, lse, q, k, v, **mask) -> float:
    """Assert out/lse match the float64 reference within the table; return out's error."""
    ref = Reference(q, k, v, **mask)
    err = scaled_err(out, ref.out, ref.out_mag)
    if ref.dtype in FIXED:
        bound = FIXED[ref.dtype]["out"]
    else:
        stored_err = scaled_err(round_to(ref.out, ref.dtype), ref.out, ref.out_mag)
        bound = STORAGE_FACTOR * stored_err + FLOAT32_FLOOR
    assert err <= bound, f"out error {err:.3g} > {bound:.3g} ({ref.dtype})"
    if lse is not None:
        check_lse(lse, ref.lse, ref.dtype)
    return err


def check_backward(grads, dout, q, k, v, **mask) -> None:
    """Assert (dq, dk, dv) match the float64 reference within the table."""
    ref = Reference(q, k, v, dout, **mask)
    for i, name in enumerate(("dq", "dk", "dv")):
        err = scaled_err(grads[i], ref.grads[i], ref.grad_mags[i])
        if ref.dtype in FIXED:
            bound = FIXED[ref.dtype][name]
        else:
            stored_err = scaled_err(ref.stored_grads[i], ref.grads[i], ref.grad_mags[i])
            bound = STORAGE_FACTOR * stored_err + FLOAT32_FLOOR
        assert err <= bound, f"{name} error {err:.3g} > {bound:.3g} ({ref.dtype})"
