"""Dense softmax attention in float64 on the whole sequence: the reference all tests check against.

Written independently of the blockwise code, the ring and :mod:`cuparing.masks`: one full
``Sq x Sk`` score matrix, the visibility rule written out again from its definition, one softmax,
and the textbook gradient. For testing and small problems only.

Semantics are those of dense attention in IEEE float64 arithmetic, over the keys a query sees:

- a key the query does not see never affects it, whatever it holds (NaN and inf included);
- a NaN among the visible logits, or among the visible values, makes the row's output NaN (and its
  LSE NaN for a logit), as ``softmax(QK^T) V`` would; ``+inf`` logits give NaN rows, as the
  max-subtracted softmax of every framework does; a visible value of ``±inf`` gives ``±inf``
  (``0 * inf`` = NaN where its probability is exactly 0);
- a ``-inf`` logit hides its key as the mask does (a mask is made of ``-inf``): the pair adds
  nothing, also not ``0 * NaN``; a row that sees no key (or whose visible logits are all
  ``-inf``) gets output 0 and LSE ``-inf``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

# an unbounded window side: further than any position difference
_UNBOUNDED = float("inf")


def _positions(sq: int, sk: int):
    # queries are aligned to the end of the keys (query i sits at position i + sk - sq)
    return np.arange(sq) + (sk - sq), np.arange(sk)


def visible_pairs(q_positions: Any, k_positions: Any, causal: bool = False,
                  window: tuple | None = None, cu_seqlens: Any = None) -> np.ndarray:  # fmt: skip
    """Which keys each query sees, straight from the definition in README.

    Key ``j`` is visible to query ``i`` iff ``i - left <= j <= i + right`` and, when causal,
    ``j <= i`` (``window=(left, right)``; ``None`` on a side means unbounded), and, with
    ``cu_seqlens`` (document boundaries ``[0, ..., S]``), both lie in one document.

    Args:
        q_positions: [Sq] global positions of the queries; k_positions: [Sk] of the keys.

    Returns:
        bool [Sq, Sk].
    """
    i = np.asarray(q_positions, dtype=np.float64)[:, None]
    j = np.asarray(k_positions, dtype=np.float64)[None, :]
    left, right = (None, None) if window is None else window
    left = _UNBOUNDED if left is None else float(left)
    right = _UNBOUNDED if right is None else float(right)
    seen = (i - left <= j) & (j <= i + right)
    if cu_seqlens is not None:
        bounds = np.asarray(cu_seqlens)
        doc_i = np.searchsorted(bounds, np.asarray(q_positions), side="right")[:, None]
        doc_j = np.searchsorted(bounds, np.asarray(k_positions), side="right")[None, :]
        seen &= doc_i == doc_j
    return seen & (j <= i) if causal else seen


def reference_probabilities(
    q: Any, k: Any, causal: bool = False, scale: float | None = None,
    window: tuple | None = None, q_positions: Any = None, k_positions: Any = None,
    cu_seqlens: Any = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:  # fmt: skip
    """Dense attention probabilities in float64.

    Args:
        q: [B, Sq, H, D]; k: [B, Sk, Hkv, D] with ``H % Hkv == 0``; any real dtype.
        causal, scale, window, q_positions, k_positions, cu_seqlens: as in
            :func:`reference_attention`.

    Returns:
        ``(probs, lse, seen, scale)``: probs [B, H, Sq, Sk] float64 (0 for keys not seen), lse
        [B, H, Sq] float64, seen [B, H, Sq, Sk] bool (the visible pairs whose logit is not
        -inf; none in a row that sees no key), and the scale used.
    """
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    _, sq, h, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    default_q, default_k = _positions(sq, sk)
    q_pos = default_q if q_positions is None else np.asarray(q_positions)
    k_pos = default_k if k_positions is None else np.asarray(k_positions)
    visible = visible_pairs(q_pos, k_pos, causal, window, cu_seqlens)
    k_full = np.repeat(k, h // hkv, axis=2)  # [B, Sk, H, D]
    with np.errstate(invalid="ignore", over="ignore"):
        scores = np.einsum("bqhd,bkhd->bhqk", q, k_full) * scale
        scores = np.where(visible, scores, -np.inf)  # hidden keys drop out, whatever they held
        row_max = scores.max(axis=-1, keepdims=True)  # NaN if any visible logit is NaN
        empty = np.isneginf(row_max)
        shifted = scores - np.where(empty, 0.0, row_max)
        weights = np.where(visible, np.exp(shifted), 0.0)
        total = weights.sum(axis=-1, keepdims=True)
        # a -inf logit hides its key exactly as the mask does (what a mask is made of)
        seen = visible & ~empty & ~np.isneginf(scores)
        probs = np.where(seen, weights / np.where(empty, 1.0, total), 0.0)  # a NaN total too
        with np.errstate(divide="ignore"):
            lse = np.where(empty, -np.inf, row_max + np.log(total))[..., 0]
    return probs, lse, seen, scale


def _finite_part(x: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(x), x, 0.0)


def probs_times(probs: np.ndarray, x: np.ndarray, seen: np.ndarray) -> np.ndarray:
    """``sum_j probs[b,h,i,j] * x[b,j,h,:]`` over the pairs ``seen`` only, in IEEE float64.

    Args:
        probs: [B, H, Sq, Sk]; x: [B, Sk, H, D] (keys' side); seen: bool, [B, H, Sq, Sk] or
            broadcastable to it.

    Returns:
        [B, Sq, H, D]. A non-finite ``x[b, j]`` reaches only the queries that see key ``j``
        (``0 * inf`` is NaN there, as in a dense product).
    """
    out = np.einsum("bhqk,bkhd->bqhd", probs, _finite_part(x))
    bad = ~np.isfinite(x).all(axis=-1)  # [B, Sk, H]
    seen = np.broadcast_to(seen, probs.shape)
    with np.errstate(invalid="ignore"):
        for b, kj, hi in zip(*np.nonzero(bad), strict=True):
            rows = seen[b, hi, :, kj]
            tail = np.where(np.isfinite(x[b, kj, hi]), 0.0, x[b, kj, hi])
            out[b, rows, hi] += probs[b, hi, rows, kj][:, None] * tail[None, :]
    return out


def reference_attention(
    q: Any, k: Any, v: Any, causal: bool = False, scale: float | None = None,
    window: tuple | None = None, return_lse: bool = False,
    q_positions: Any = None, k_positions: Any = None, cu_seqlens: Any = None,
) -> Any:  # fmt: skip
    """Dense attention in float64 (NumPy arrays or anything ``np.asarray`` accepts).

    Same contract as :func:`cuparing.attention`, without its input checks (for testing and small
    problems: it builds the whole ``[B, H, Sq, Sk]`` score matrix). Non-finite inputs follow the
    module's semantics.

    Args:
        q: [B, Sq, H, D]; k, v: [B, Sk, Hkv, D] with ``H % Hkv == 0``; any real dtype.
        causal, scale, window, return_lse: as in :func:`cuparing.attention`.
        q_positions, k_positions: global positions ([Sq] and [Sk] ints) overriding the default
            (queries aligned to the end of the keys).
        cu_seqlens: document boundaries ``[0, ..., S]`` of a packed sequence (positions are
            token indices into it): pairs of different documents are hidden.

    Returns:
        out [B, Sq, H, D] float64, and lse [B, H, Sq] float64 if ``return_lse``. A query that sees
        no key gets output 0 and lse -inf.
    """
    probs, lse, seen, _ = reference_probabilities(
        q, k, causal, scale, window, q_positions, k_positions, cu_seqlens
    )
    v = np.asarray(v, dtype=np.float64)
    out = probs_times(probs, np.repeat(v, probs.shape[1] // v.shape[2], axis=2), seen)
    return (out, lse) if return_lse else out


def reference_attention_backward(
    dout: Any, q: Any, k: Any, v: Any, causal: bool = False, scale: float | None = None,
    window: tuple | None = None, q_positions: Any = None, k_positions: Any = None,
    cu_seqlens: Any = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """Gradients of dense attention in float64 (the oracle for the backward ring).

    Args:
        dout: [B, Sq, H, D] gradient of the loss with respect to the output.
        q, k, v, causal, scale, window, q_positions, k_positions, cu_seqlens: as in
            :func:`reference_attention`.

    Returns:
        ``(dq, dk, dv)`` float64 NumPy arrays with the shapes of q, k, v (dk and dv summed over
        the query heads that share each key/value head). Only visible pairs contribute, with
        the module's semantics for non-finite values.
    """
    probs, _, seen, scale = reference_probabilities(
        q, k, causal, scale, window, q_positions, k_positions, cu_seqlens
    )
    q, k, v, dout = (np.asarray(x, dtype=np.float64) for x in (q, k, v, dout))
    h, hkv = q.shape[2], k.shape[2]
    group = h // hkv
    k_full = np.repeat(k, group, axis=2)
    v_full = np.repeat(v, group, axis=2)
    probs_t, seen_t = probs.swapaxes(-1, -2), seen.swapaxes(-1, -2)
    with np.errstate(invalid="ignore", over="ignore"):
        dv_full = probs_times(probs_t, dout, seen_t)
        dprobs = np.einsum("bqhd,bkhd->bhqk", dout, v_full)
        dprobs = np.where(seen, dprobs, 0.0)  # a hidden key's value never reaches a query
        delta = (dprobs * probs).sum(axis=-1, keepdims=True)
        dscores = np.where(seen, probs * (dprobs - delta), 0.0)
        dq = probs_times(dscores, k_full, seen) * scale
        dk_full = probs_times(dscores.swapaxes(-1, -2), q, seen_t) * scale

    def fold(x):  # sum the query heads of each group back onto their key head
        b, s, _, d = x.shape
        return x.reshape(b, s, hkv, group, d).sum(axis=3)

    return dq, fold(dk_full), fold(dv_full)
