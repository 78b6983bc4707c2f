"""``ring_attention_torch``: the differentiable ring for PyTorch, under its original name.

A thin alias of :func:`cuparing.torch.ring_attention` (the ``torch.library`` custom op, which
``torch.compile`` traces); PyTorch is imported only when this is called.
"""

from __future__ import annotations

import inspect
from typing import Any

from .api import ring_attention


def ring_attention_torch(*args: Any, **kwargs: Any) -> Any:
    """Differentiable :func:`cuparing.ring_attention` for PyTorch tensors (an alias of
    :func:`cuparing.torch.ring_attention`).

    Takes :func:`cuparing.ring_attention`'s arguments, by position or keyword, except
    ``return_lse`` and the caller-owned outputs, plus ``deterministic``:
    ``ring_attention_torch(q, k, v, ring, causal=False, scale=None, window=None,
    layout="contiguous", cu_seqlens=None, deterministic=None)``.

    Args:
        q: [B, S/C, H, D] this rank's query shard (``requires_grad`` as needed).
        k, v: [B, S/C, Hkv, D] this rank's key/value shards.
        ring, causal, scale, window, layout, cu_seqlens: as in :func:`cuparing.ring_attention`.
        deterministic: as in :func:`cuparing.torch.ring_attention`.

    Returns:
        out [B, S/C, H, D], a tensor whose ``.backward()`` runs the backward ring; gradients of
        k and v are for this rank's shard, summed over every rank's queries.

    Raises:
        ValueError, TypeError, cuparing.RingError: as in :func:`cuparing.ring_attention`, in the
            forward call or in ``.backward()``.

    Note:
        Use one process per GPU. PyTorch runs a device's backward work on one engine thread, so
        several simulated ranks (:func:`cuparing.simulate`) sharing a GPU would block each other
        in the backward ring; on the CPU, or with one rank per GPU, any ring size works.
    """
    from .torch import ring_attention as differentiable_ring_attention

    call = _SIGNATURE.bind(*args, **kwargs)
    call.apply_defaults()
    return differentiable_ring_attention(**call.arguments)


# ring_attention's own signature less ``return_lse`` and the caller-owned outputs (autograd makes
# its own results), plus the backward's ``deterministic``: one definition of the ring options
# (names, order, defaults) for both entry points, so they cannot drift apart.
_SIGNATURE = inspect.signature(ring_attention)
_SIGNATURE = _SIGNATURE.replace(
    parameters=[
        *(p for p in _SIGNATURE.parameters.values() if p.name not in ("return_lse", "out", "lse")),
        inspect.Parameter("deterministic", inspect.Parameter.KEYWORD_ONLY, default=None),
    ]
)
ring_attention_torch.__signature__ = _SIGNATURE  # what help() and inspect show
