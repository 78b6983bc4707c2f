"""Public entry points: validate once, pick the backend, run the schedule, return the caller's type.

Shapes: q, out, dout ``[B, S, H, D]``; k, v ``[B, S, Hkv, D]`` with ``H % Hkv == 0``; lse
``[B, H, S]`` (natural log, float32; float64 for float64 inputs). Any strides are accepted as long
as the last axis (D) is contiguous.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import validation
from .backends import backend_for
from .comm.base import Ring
from .interop import to_backend
from .masks import BlockKind
from .schedule import plan_ring, ring_backward, ring_forward

Window = tuple[int | None, int | None] | None


def attention(
    q: Any,
    k: Any,
    v: Any,
    causal: bool = False,
    scale: float | None = None,
    window: Window = None,
    return_lse: bool = False,
) -> Any:
    """Exact softmax attention on one device (GPU for GPU arrays, else CPU).

    Args:
        q: [B, Sq, H, D] queries (NumPy, CuPy, PyTorch or JAX; float16, bfloat16, float32, and
            float64 on the CPU).
        k, v: [B, Sk, Hkv, D] keys and values, same framework, device and dtype as q.
        causal: hide keys after the query. With ``Sq != Sk`` queries are aligned to the end of
            the keys: query ``i`` sits at position ``i + Sk - Sq``.
        scale: softmax scale, default ``1/sqrt(D)``.
        window: ``(left, right)``: key ``j`` is visible to query ``i`` iff
            ``i - left <= j <= i + right``; ``None`` on a side means unbounded.
        return_lse: also return the log-sum-exp.

    Returns:
        out [B, Sq, H, D] in q's dtype and framework, and lse [B, H, Sq] float32 (float64 for
        float64 inputs) if ``return_lse``. A query that sees no key gets output 0 and lse -inf.

    Raises:
        ValueError: shapes, heads, window or scale are inconsistent.
        TypeError: arrays of different frameworks/devices/dtypes, or an unsupported dtype.

    Example:
        >>> import numpy as np, cuparing as cr
        >>> q = k = v = np.random.default_rng(0).standard_normal((1, 16, 2, 8))
        >>> cr.attention(q, k, v, causal=True).shape
        (1, 16, 2, 8)
    """
    origin = validation.check_arrays(("q", "k", "v"), (q, k, v))
    validation.check_qkv(q, k, v, same_length=False)
    mask = validation.check_mask(causal, window)
    scale = validation.check_scale(scale, q.shape[-1])
    backend = backend_for(origin.backend)
    with origin.stream():
        qb, kb, vb = (to_backend(x, origin) for x in (q, k, v))
        sq, sk = qb.shape[1], kb.shape[1]
        q_pos = np.arange(sq, dtype=np.int64) + (sk - sq)
        k_pos = np.arange(sk, dtype=np.int64)
        kind = (
            mask.classify(int(q_pos[0]), int(q_pos[-1]), 0, sk - 1)
            if sq and sk
            else BlockKind.EMPTY
        )
        state = backend.forward_state(qb, 0 if kind == BlockKind.EMPTY else 1)
        if kind != BlockKind.EMPTY:
            backend.forward_block(
                state, qb, kb, vb, backend.positions(q_pos), backend.positions(k_pos),
                kind, mask, scale,
            )  # fmt: skip
        out, lse = backend.forward_finish(state)
        return (origin.export(out), origin.export(lse)) if return_lse else origin.export(out)


def ring_attention(
    q: Any,
    k: Any,
    v: Any,
    ring: Ring,
    causal: bool = False,
    scale: float | None = None,
    window: Window = None,
    layout: str = "contiguous",
    return_lse: bool = False,
) -> Any:
    """Exact attention over a sequence sharded across the ranks of ``ring``.

    Every rank calls this with its own shard; K/V travel around the ring so each rank ends with
    the exact attention output for its queries over the whole sequence.

    Args:
        q: [B, S/C, H, D] this rank's ``layout`` shard of the queries (see :func:`shard`).
        k, v: [B, S/C, Hkv, D] this rank's shard of keys and values (same tokens as q).
        ring: this rank's :class:`Ring` (``Ring.from_env()``, or one from :func:`simulate`).
        causal, scale, window: as in :func:`attention`, by *global* token position.
        layout: ``"contiguous"``, ``"zigzag"`` or ``"striped"``: how the sequence was sharded.
        return_lse: also return this rank's lse.

    Returns:
        out [B, S/C, H, D] (this rank's queries) in q's dtype, and lse [B, H, S/C] float32
        (float64 for float64) if ``return_lse``.

    Raises:
        ValueError: bad shapes, layout, window, or a length the layout cannot split.
        TypeError: mismatched frameworks/devices/dtypes or a non-Ring ``ring``.
        cuparing.RingError: a peer failed or timed out (after the ring's timeout, never a hang).

    Example:
        >>> import numpy as np, cuparing as cr
        >>> x = np.random.default_rng(0).standard_normal((1, 32, 2, 8))
        >>> def rank_fn(ring):
        ...     xl = cr.shard(x, ring.rank, ring.size, layout="zigzag")
        ...     return cr.ring_attention(xl, xl, xl, ring, causal=True, layout="zigzag")
        >>> out = cr.unshard(cr.simulate(4, rank_fn), layout="zigzag")
        >>> bool(np.allclose(out, cr.attention(x, x, x, causal=True)))
        True
    """
    origin, mask, scale = _check_ring_call(q, k, v, ring, causal, scale, window, layout)
    backend = backend_for(origin.backend)
    plan = plan_ring(layout, ring.rank, ring.size, q.shape[1], mask)
    with origin.stream():
        qb, kb, vb = (to_backend(x, origin) for x in (q, k, v))
        out, lse = ring_forward(backend, ring, qb, kb, vb, plan, scale)
        return (origin.export(out), origin.export(lse)) if return_lse else origin.export(out)


def ring_attention_backward(
    dout: Any,
    q: Any,
    k: Any,
    v: Any,
    out: Any,
    lse: Any,
    ring: Ring,
    causal: bool = False,
    scale: float | None = None,
    window: Window = None,
    layout: str = "contiguous",
) -> tuple[Any, Any, Any]:
    """Gradients of :func:`ring_attention` for this rank's shard.

    Args:
        dout: [B, S/C, H, D] gradient of the loss with respect to this rank's output.
        q, k, v: this rank's shards, as passed to :func:`ring_attention`.
        out, lse: this rank's output and lse from :func:`ring_attention` (``return_lse=True``).
        ring, causal, scale, window, layout: exactly as in the forward call.

    Returns:
        (dq, dk, dv) with the shapes and dtypes of q, k, v: dq for this rank's queries, dk and dv
        for this rank's keys/values summed over every rank's queries. Accumulated in float32.

    Raises:
        ValueError, TypeError, cuparing.RingError: as in :func:`ring_attention`.
    """
    origin, mask, scale = _check_ring_call(q, k, v, ring, causal, scale, window, layout)
    validation.check_arrays(("q", "dout", "out"), (q, dout, out))
    validation.check_backward(dout, out, lse, q)
    backend = backend_for(origin.backend)
    plan = plan_ring(layout, ring.rank, ring.size, q.shape[1], mask)
    with origin.stream():
        arrays = [to_backend(x, origin) for x in (dout, q, k, v, out, lse)]
        grads = ring_backward(backend, ring, *arrays, plan, scale)
        return tuple(origin.export(g) for g in grads)


def _check_ring_call(q, k, v, ring, causal, scale, window, layout):
    origin = validation.check_arrays(("q", "k", "v"), (q, k, v))
    validation.check_qkv(q, k, v, same_length=True)
    validation.check_ring(ring)
    validation.check_ring_length(q.shape[1], layout, ring.size)
    mask = validation.check_mask(causal, window)
    return origin, mask, validation.check_scale(scale, q.shape[-1])
