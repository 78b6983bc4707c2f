"""Dense softmax attention in float64 on the whole sequence: the reference all tests check against.

Written independently of the blockwise code: one full ``S x S`` score matrix, one softmax, and the
textbook gradient. For testing and small problems only.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .masks import MaskSpec


def _positions(sq: int, sk: int):
    # queries are aligned to the end of the keys (query i sits at position i + sk - sq)
    return np.arange(sq) + (sk - sq), np.arange(sk)


def _dense_probs(q, k, causal, scale, window, q_positions, k_positions):
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    _, sq, h, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    default_q, default_k = _positions(sq, sk)
    q_pos = default_q if q_positions is None else np.asarray(q_positions)
    k_pos = default_k if k_positions is None else np.asarray(k_positions)
    left, right = (None, None) if window is None else window
    visible = MaskSpec(causal, left, right).visible(q_pos, k_pos)  # [Sq, Sk]
    k_full = np.repeat(k, h // hkv, axis=2)  # [B, Sk, H, D]
    scores = np.einsum("bqhd,bkhd->bhqk", q, k_full) * scale
    scores = np.where(visible, scores, -np.inf)
    row_max = scores.max(axis=-1, keepdims=True)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    weights = np.where(visible, np.exp(scores - row_max), 0.0)
    total = weights.sum(axis=-1, keepdims=True)
    probs = np.where(total > 0, weights / np.where(total > 0, total, 1.0), 0.0)
    with np.errstate(divide="ignore"):
        lse = np.where(total[..., 0] > 0, row_max[..., 0] + np.log(total[..., 0]), -np.inf)
    return probs, lse, scale


def reference_attention(
    q: Any, k: Any, v: Any, causal: bool = False, scale: float | None = None,
    window: tuple | None = None, return_lse: bool = False,
    q_positions: Any = None, k_positions: Any = None,
) -> Any:  # fmt: skip
    """Dense attention in float64 (NumPy arrays or anything ``np.asarray`` accepts).

    Same contract as :func:`cuparing.attention`, without its input checks (for testing and small
    problems: it builds the whole ``[B, H, Sq, Sk]`` score matrix).

    Args:
        q: [B, Sq, H, D]; k, v: [B, Sk, Hkv, D] with ``H % Hkv == 0``; any real dtype.
        causal, scale, window, return_lse: as in :func:`cuparing.attention`.
        q_positions, k_positions: global positions ([Sq] and [Sk] ints) overriding the default
            (queries aligned to the end of the keys).

    Returns:
        out [B, Sq, H, D] float64, and lse [B, H, Sq] float64 if ``return_lse``. A query that sees
        no key gets output 0 and lse -inf.
    """
    probs, lse, _ = _dense_probs(q, k, causal, scale, window, q_positions, k_positions)
    v = np.asarray(v, dtype=np.float64)
    v_full = np.repeat(v, probs.shape[1] // v.shape[2], axis=2)
    out = np.einsum("bhqk,bkhd->bqhd", probs, v_full)
    return (out, lse) if return_lse else out


def reference_attention_backward(
    dout: Any, q: Any, k: Any, v: Any, causal: bool = False, scale: float | None = None,
    window: tuple | None = None, q_positions: Any = None, k_positions: Any = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """Gradients of dense attention in float64 (the oracle for the backward ring).

    Args:
        dout: [B, Sq, H, D] gradient of the loss with respect to the output.
        q, k, v, causal, scale, window, q_positions, k_positions: as in
            :func:`reference_attention`.

    Returns:
        ``(dq, dk, dv)`` float64 NumPy arrays with the shapes of q, k, v (dk and dv summed over
        the query heads that share each key/value head).
    """
    probs, _, scale = _dense_probs(q, k, causal, scale, window, q_positions, k_positions)
    q, k, v, dout = (np.asarray(x, dtype=np.float64) for x in (q, k, v, dout))
    h, hkv = q.shape[2], k.shape[2]
    group = h // hkv
    k_full = np.repeat(k, group, axis=2)
    v_full = np.repeat(v, group, axis=2)
    dv_full = np.einsum("bhqk,bqhd->bkhd", probs, dout)
    dprobs = np.einsum("bqhd,bkhd->bhqk", dout, v_full)
    dscores = probs * (dprobs - (dprobs * probs).sum(axis=-1, keepdims=True))
    dq = np.einsum("bhqk,bkhd->bqhd", dscores, k_full) * scale
    dk_full = np.einsum("bhqk,bqhd->bkhd", dscores, q) * scale

    def fold(x):  # sum the query heads of each group back onto their key head
        b, s, _, d = x.shape
        return x.reshape(b, s, hkv, group, d).sum(axis=3)

    return dq, fold(dk_full), fold(dv_full)
