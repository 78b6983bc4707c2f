"""The one tolerance table, and the comparisons every numerical test uses.

Every bound is *derived from the arithmetic*: the magnitude of the computation, times the unit
roundoff ``u`` of the precision it runs in, times the length of the reductions involved, times a
stated factor. Nothing here is a tuned literal.

Reference: dense float64 attention on the unsharded sequence (``cuparing.reference``), computed on
the very inputs the code under test received (low-precision inputs are upcast exactly).

Arithmetic error (first order; Higham's ``gamma_n = n u / (1 - n u)`` for a sum of ``n`` terms):

- a score ``s_ij = scale * q_i . k_j`` is a ``D``-term dot product: ``|ds_ij| <= gamma_D M_ij``
  with ``M_ij = scale * sum_d |q_id k_jd|``. This, not ``|lse|``, is what grows with the head
  dimension and the scale (a scale-2, D=256 row has logits ~50 but ``M`` ~300).
- a probability ``p_ij = exp(s_ij - lse_i)`` then carries a relative error of at most
  ``gamma_D W_ij`` with ``W_ij = 1 + M_ij + Mbar_i + |lse_i|`` (its own score, the row's
  normaliser through ``Mbar_i = sum_j p_ij M_ij``, the rounding of ``s - lse``, and one rounding
  of exp), since ``gamma_D >= u``.
- LSE: ``gamma_D Mbar_i + gamma_K + u |lse_i|`` (the scores, the ``K``-term row sum, the log).
- output: ``gamma_D (P o W)|V| + gamma_K P|V|`` element-wise (``K``: reductions over keys).
- backward: ``dS = P o (dP - D)`` with ``dP = dO V^T`` and ``D = rowsum(dO o O)``, each bounded by
  ``A = |dO||V|^T + rowsum(|dO||O|)``; ``dS`` carries ``P o (gamma_D (W + 1) A + E_D)`` where
  ``E_D = rowsum(|dO| E_out)`` is the stored output's own error reaching ``D``. Then
  ``dq = scale dS K`` adds ``gamma_K``, ``dk = scale dS^T Q`` and ``dv = P^T dO`` add
  ``gamma_Q`` (reductions over queries, the ring's float32 accumulation included).
- ``K`` and ``Q`` count each key (query) twice: one addition and, in the blockwise/online
  algorithm, at most one rescaling per term.

The check is norm-wise: ``||got - ref|| <= ARITHMETIC_FACTOR * ||E||`` with ``E`` the element-wise
first-order bound above; ``ARITHMETIC_FACTOR = 2`` covers second-order terms and the few-ulp
error of exp/log. The same derivation serves float64 (u = 2^-53) and float32 (u = 2^-24).

Low precision (float16, bfloat16): the output and the gradients are *stored* in that dtype, and the
backward pass only sees the stored output. The unavoidable error is that of a "storage
reference": float64 attention whose output is rounded to the dtype, whose ``D`` uses that rounded
output, and whose gradients are rounded to the dtype. We require at most ``STORAGE_FACTOR`` (2, the
flash-attention convention) times that reference's error, plus the float32 arithmetic bound above
(the computation itself accumulates in float32).

The GPU forward kernel (``check_kernel_forward``) also rounds P to the input dtype before P.V, as
every tensor-core attention kernel does: one more rounding of relative ``u(dtype)`` per product,
``P_ROUNDING`` times ``u`` of ``||P|V|||`` on top. Its LSE is float32 arithmetic on exact products
(the bound above with ``u = 2^-24``; ex2.approx's 2-ulp error is inside ``gamma_K``).

Multi-GPU shards (tests/multigpu/ring_worker.py) use the same functions on each rank's rows.
Error must not grow with the ring: a ring of C ranks may be at most ``RING_VS_SOLO`` times the error
of the same kernels on one device, plus ``ARITHMETIC_FACTOR`` times the float32 arithmetic bound
(the ring merges in a different order, so its float32 rounding differs by up to that much).
"""

from __future__ import annotations

import numpy as np

from cuparing import interop
from cuparing.reference import probs_times, reference_probabilities

UNIT_ROUNDOFF = {"float64": 2.0**-53, "float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}
# the precision each input dtype's arithmetic runs in (low precision accumulates in float32)
ARITHMETIC = {"float64": "float64", "float32": "float32", "float16": "float32",
              "bfloat16": "float32"}  # fmt: skip
ARITHMETIC_FACTOR = 2.0  # first-order bound -> second-order terms and exp/log's few ulps
STORAGE_FACTOR = 2.0  # low precision: allowed multiple of the storage reference's error
P_ROUNDING = 1.0  # GPU kernels round P to the input dtype once before P.V
RING_VS_SOLO = 1.5  # the ring's error over the same kernels' error on one device
LOW_PRECISION = ("float16", "bfloat16")


def gamma(n: int, u: float) -> float:
    """Higham's bound on the relative error of an ``n``-term sum in arithmetic of roundoff ``u``."""
    nu = n * u
    assert nu < 0.5, f"{n} terms at u={u:g}: first-order bounds no longer hold"
    return nu / (1.0 - nu)


def to_f64(x) -> np.ndarray:
    """Any backend/framework array as a float64 NumPy array."""
    return np.asarray(interop.to_host(x)).astype(np.float64)


def rel_err(actual, expected) -> float:
    """‖actual − expected‖ / ‖expected‖ in float64."""
    a, e = to_f64(actual), to_f64(expected)
    return float(np.linalg.norm(a - e) / max(np.linalg.norm(e), 1e-300))


def round_to(x: np.ndarray, dtype_name: str) -> np.ndarray:
    """float64 ``x`` rounded to ``dtype_name`` and back."""
    if dtype_name == "bfloat16":
        import ml_dtypes

        return x.astype(ml_dtypes.bfloat16).astype(np.float64)
    return x.astype(dtype_name).astype(np.float64)


def _norm_err(actual, expected) -> float:
    a, e = to_f64(actual), to_f64(expected)
    assert a.shape == e.shape, f"shape {a.shape} != expected {e.shape}"
    assert np.isfinite(a).all(), "result holds NaN or inf"
    return float(np.linalg.norm(a - e))


class Reference:
    """Dense float64 attention on a case's inputs: values, arithmetic error bounds, and the
    storage reference (see the module docstring for every formula).

    Attributes:
        dtype: the inputs' dtype name.
        out, lse: the reference forward; grads: [dq, dk, dv] when ``dout`` is given.
        out_err, lse_err, grad_errs: element-wise first-order arithmetic bounds in the
            precision the dtype computes in (``ARITHMETIC``); pv_mag: ``|P||V|``.
        stored_out, stored_grads: low precision only, the storage reference.
    """

    def __init__(self, q, k, v, dout=None, causal=False, scale=None, window=None,
                 q_positions=None, k_positions=None, cu_seqlens=None):  # fmt: skip
        self.dtype = interop.dtype_name(q)
        q64, k64, v64 = (to_f64(x) for x in (q, k, v))
        probs, self.lse, visible, scale = reference_probabilities(
            q64, k64, causal, scale, window, q_positions, k_positions, cu_seqlens
        )
        b, sq, h, d = q64.shape
        sk, hkv = k64.shape[1], k64.shape[2]
        group = h // hkv
        u = UNIT_ROUNDOFF[ARITHMETIC[self.dtype]]
        g_dot, g_keys, g_queries = gamma(d, u), gamma(2 * sk, u), gamma(2 * sq, u)
        k_full, v_full = np.repeat(k64, group, axis=2), np.repeat(v64, group, axis=2)
        seen_t = visible.swapaxes(-1, -2)  # [B, H, Sk, Sq]: the pairs, keys first
        self.out = probs_times(probs, v_full, visible)

        def fold(x):  # sum the query heads of each group onto their key/value head
            return x.reshape(b, sk, hkv, group, -1).sum(axis=3)

        # magnitudes of the arithmetic (module docstring)
        score_mag = np.einsum("bqhd,bkhd->bhqk", np.abs(q64), np.abs(k_full)) * scale
        row_mag = (probs * score_mag).sum(-1, keepdims=True)
        abs_lse = np.where(np.isfinite(self.lse), np.abs(self.lse), 0.0)[..., None]
        weight = 1.0 + score_mag + row_mag + abs_lse  # relative error of p_ij, over gamma_D
        abs_v = np.abs(v_full)
        pv_mag = probs_times(probs, abs_v, visible)
        self.out_err = g_dot * probs_times(probs * weight, abs_v, visible) + g_keys * pv_mag
        self.lse_err = g_dot * row_mag[..., 0] + g_keys + u * abs_lse[..., 0]
        if self.dtype in LOW_PRECISION:
            self.stored_out = round_to(self.out, self.dtype)
        self.pv_mag = pv_mag  # |P||V|: what P's rounding in the GPU kernels scales with
        if dout is None:
            return
        do64 = to_f64(dout)
        dprobs = np.einsum("bqhd,bkhd->bhqk", do64, v_full)

        def grads(out_seen):
            """dq, dk, dv of the reference, with D computed from ``out_seen``."""
            delta = (do64 * out_seen).sum(-1).transpose(0, 2, 1)[..., None]
            dscores = np.where(visible, probs * (dprobs - delta), 0.0)
            return [
                probs_times(dscores, k_full, visible) * scale,
                fold(probs_times(dscores.swapaxes(-1, -2), q64, seen_t) * scale),
                fold(probs_times(probs.swapaxes(-1, -2), do64, seen_t)),
            ]

        self.grads = grads(self.out)
        abs_do = np.abs(do64)
        delta_mag = (abs_do * np.abs(self.out)).sum(-1).transpose(0, 2, 1)[..., None]
        delta_err = (abs_do * self.out_err).sum(-1).transpose(0, 2, 1)[..., None]
        a_mag = np.einsum("bqhd,bkhd->bhqk", abs_do, abs_v) + delta_mag
        ds_err = probs * (g_dot * (weight + 1.0) * a_mag + delta_err)
        ds_mag = probs * a_mag
        abs_k, abs_q = np.abs(k_full), np.abs(q64)
        self.grad_errs = [
            scale * (probs_times(ds_err, abs_k, visible)
                     + g_keys * probs_times(ds_mag, abs_k, visible)),
            fold(scale * (probs_times(ds_err.swapaxes(-1, -2), abs_q, seen_t)
                          + g_queries * probs_times(ds_mag.swapaxes(-1, -2), abs_q, seen_t))),
            fold(g_dot * probs_times((probs * weight).swapaxes(-1, -2), abs_do, seen_t)
                 + g_queries * probs_times(probs.swapaxes(-1, -2), abs_do, seen_t)),
        ]  # fmt: skip
        if self.dtype in LOW_PRECISION:
            # what a perfect implementation storing this dtype returns: the backward pass sees
            # only the stored output, so D = rowsum(dO * stored O); gradients are stored too
            self.stored_grads = [round_to(g, self.dtype) for g in grads(self.stored_out)]

    def bound(self, name: str, index: int | None = None, select=None) -> float:
        """Allowed ‖got − ref‖ for ``out`` or a gradient (``index`` 0, 1, 2 for dq, dk, dv).

        ``select`` (optional) maps a full array to the part being checked (one rank's rows)."""
        select = select or (lambda x: x)
        if name == "out":
            ref, err = self.out, self.out_err
            stored = getattr(self, "stored_out", None)
        else:
            ref, err = self.grads[index], self.grad_errs[index]
            stored = self.stored_grads[index] if self.dtype in LOW_PRECISION else None
        bound = ARITHMETIC_FACTOR * float(np.linalg.norm(select(err)))
        if stored is not None:
            bound += STORAGE_FACTOR * float(np.linalg.norm(select(stored) - select(ref)))
        return bound

    def kernel_out_bound(self, select=None) -> float:
        """Allowed ‖out − ref‖ for the GPU forward, which also rounds P to the input dtype."""
        bound = self.bound("out", select=select)
        if self.dtype in LOW_PRECISION:
            pv_mag = select(self.pv_mag) if select else self.pv_mag
            bound += P_ROUNDING * UNIT_ROUNDOFF[self.dtype] * float(np.linalg.norm(pv_mag))
        return bound

    def lse_excess(self, lse, select=None) -> tuple[float, float]:
        """``(error, bound)`` of the LSE row that exceeds its element-wise bound the most; an
        infinite error where the ``-inf`` pattern (rows that see no key) differs or a NaN or
        ``+inf`` appears."""
        select = select or (lambda x: x)
        lse, want, err = to_f64(lse), select(self.lse), select(self.lse_err)
        assert lse.shape == want.shape, f"lse shape {lse.shape} != {want.shape}"
        if np.isnan(lse).any() or np.isposinf(lse).any():
            return float("inf"), 0.0
        if not (np.isneginf(lse) == np.isneginf(want)).all():
            return float("inf"), 0.0
        finite = np.isfinite(want)
        if not finite.any():
            return 0.0, 0.0
        with np.errstate(invalid="ignore"):  # -inf - -inf on rows without keys, dropped next
            diff = np.abs(lse - want)[finite]
        allowed = ARITHMETIC_FACTOR * err[finite]
        worst = int(np.argmax(diff - allowed))
        return float(diff[worst]), float(allowed[worst])

    def check_lse(self, lse) -> None:
        """Same -inf pattern (rows that see no key); finite rows within the element-wise bound."""
        err, bound = self.lse_excess(lse)
        assert err <= bound, f"lse error {err:.3g} > bound {bound:.3g} ({self.dtype})"


def check_forward(out, lse, q, k, v, **mask) -> float:
    """Assert out/lse match the float64 reference within the table; return out's error divided
    by its bound (the margin: at most 1)."""
    ref = Reference(q, k, v, **mask)
    err, bound = _norm_err(out, ref.out), ref.bound("out")
    assert err <= bound, f"out error {err:.3g} > bound {bound:.3g} ({ref.dtype})"
    if lse is not None:
        ref.check_lse(lse)
    return err / bound if bound else 0.0


def check_backward(grads, dout, q, k, v, **mask) -> None:
    """Assert (dq, dk, dv) match the float64 reference within the table."""
    ref = Reference(q, k, v, dout, **mask)
    for i, name in enumerate(("dq", "dk", "dv")):
        err, bound = _norm_err(grads[i], ref.grads[i]), ref.bound(name, i)
        assert err <= bound, f"{name} error {err:.3g} > bound {bound:.3g} ({ref.dtype})"


def check_kernel_forward(out, lse, q, k, v, **mask) -> float:
    """The GPU forward (kernels for float16/bfloat16, cuBLAS for float32) against the float64
    reference; returns the output error over its bound."""
    ref = Reference(q, k, v, **mask)
    err, bound = _norm_err(out, ref.out), ref.kernel_out_bound()
    assert err <= bound, f"{ref.dtype} out error {err:.3g} > bound {bound:.3g}"
    if lse is not None:
        ref.check_lse(lse)
    return err / bound if bound else 0.0


def ring_vs_solo_limit(
    solo_err: float, ref: Reference, select=None, quantity: str = "out"
) -> float:
    """Largest ‖ring − ref‖ allowed when the same kernels on one device err by ``solo_err``:
    ``RING_VS_SOLO`` times that, plus the float32 arithmetic bound (merge order differs).

    ``quantity``: ``"out"``, or ``"lse"`` (then over the rows that see a key; ``select`` maps a
    full array to the part being checked)."""
    arithmetic = ref.out_err if quantity == "out" else ref.lse_err
    if select is not None:
        arithmetic = select(arithmetic)
    if quantity == "lse":
        seen = np.isfinite(ref.lse if select is None else select(ref.lse))
        arithmetic = arithmetic[seen]
    return RING_VS_SOLO * solo_err + ARITHMETIC_FACTOR * float(np.linalg.norm(arithmetic))


# ---- non-finite inputs (tests/test_nonfinite.py on the CPU, tests/test_gpu_nonfinite.py on GPUs)


def same_pattern(got, want, what: str) -> None:
    """Assert ``got`` has NaN, +inf and -inf exactly where the reference ``want`` has them."""
    got, want = to_f64(got), np.asarray(want)
    for test in (np.isnan, np.isposinf, np.isneginf):
        where = np.argwhere(test(got) != test(want))
        assert where.size == 0, f"{what}: {test.__name__} differs at {where[:5].tolist()}"


def nonfinite_reach(seen, q, k, v, dout=None) -> tuple[np.ndarray, np.ndarray]:
    """The rows a non-finite input can reach in dense attention; every other row must still meet
    the usual bounds, on the inputs with the non-finite values replaced by anything finite.

    Args:
        seen: bool [Sq, Sk], the pairs the mask shows (``cuparing.reference.visible_pairs``).
        q, k, v: the inputs; dout: the output gradient, when gradients are checked.

    Returns:
        ``(queries, keys)``: bool [B, Sq, H], the query rows whose output and LSE (and, given
        ``dout``, dq) can depend on a non-finite value: its own q (or dout) row holds one, or a
        key it sees does in k or v; and bool [B, Sk, Hkv], the key rows whose dk and dv can:
        their own k or v row, or a reached query of their group sees them.
    """

    def bad(x):
        return ~np.isfinite(to_f64(x)).all(-1)

    b, sk, hkv = k.shape[:3]
    group = q.shape[2] // hkv
    seen = np.asarray(seen, dtype=np.float64)
    bad_kv = bad(k) | bad(v)  # [B, Sk, Hkv]
    bad_keys = np.repeat(bad_kv, group, axis=2).astype(np.float64)  # one per query head
    queries = bad(q) | (np.einsum("qk,bkh->bqh", seen, bad_keys) > 0)
    if dout is not None:
        queries |= bad(dout)
    from_queries = np.einsum("qk,bqh->bkh", seen, queries.astype(np.float64)) > 0
    keys = bad_kv | from_queries.reshape(b, sk, hkv, group).any(axis=-1)
    return queries, keys
