"""PyTorch autograd for ring attention: ``out = ring_attention_torch(q, k, v, ring, ...)``.

The forward pass runs :func:`cuparing.ring_attention` and keeps (out, lse); the backward pass runs
:func:`cuparing.ring_attention_backward`. Works for CPU tensors (NumPy backend) and CUDA tensors
(our kernels), inside any PyTorch training loop. PyTorch is imported only when this is called.
"""

from __future__ import annotations

import inspect
from typing import Any

from .api import ring_attention, ring_attention_backward

_FUNCTION = None


def _function():
    global _FUNCTION
    if _FUNCTION is None:
        import torch

        class RingAttention(torch.autograd.Function):
            @staticmethod
            def forward(ctx, q, k, v, ring, options):
                out, lse = ring_attention(q, k, v, ring, return_lse=True, **options)
                ctx.save_for_backward(q, k, v, out, lse)
                ctx.ring, ctx.options = ring, options
                return out

            @staticmethod
            def backward(ctx, dout):
                q, k, v, out, lse = ctx.saved_tensors
                dq, dk, dv = ring_attention_backward(
                    dout.contiguous(), q, k, v, out, lse, ctx.ring, **ctx.options
                )
                return dq, dk, dv, None, None

        _FUNCTION = RingAttention
    return _FUNCTION


def ring_attention_torch(*args: Any, **kwargs: Any) -> Any:
    """Differentiable :func:`cuparing.ring_attention` for PyTorch tensors.

    Takes :func:`cuparing.ring_attention`'s arguments, by position or keyword, except
    ``return_lse``: ``ring_attention_torch(q, k, v, ring, causal=False, scale=None, window=None,
    layout="contiguous")``.

    Args:
        q: [B, S/C, H, D] this rank's query shard (``requires_grad`` as needed).
        k, v: [B, S/C, Hkv, D] this rank's key/value shards.
        ring, causal, scale, window, layout: as in :func:`cuparing.ring_attention`.

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
    call = _SIGNATURE.bind(*args, **kwargs)
    call.apply_defaults()
    options = dict(call.arguments)
    q, k, v, ring = (options.pop(name) for name in ("q", "k", "v", "ring"))
    return _function().apply(q, k, v, ring, options)


# ring_attention's own signature less ``return_lse`` and the caller-owned outputs (autograd makes
# its own results): one definition of the ring options (names, order, defaults) for both entry
# points, so they cannot drift apart.
_SIGNATURE = inspect.signature(ring_attention)
_SIGNATURE = _SIGNATURE.replace(
    parameters=[
        p for p in _SIGNATURE.parameters.values() if p.name not in ("return_lse", "out", "lse")
    ]
)
ring_attention_torch.__signature__ = _SIGNATURE  # what help() and inspect show
