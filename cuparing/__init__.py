"""cuparing: exact ring attention across GPUs, with a NumPy mirror of the same ring on the CPU.

Public API (shapes ``[B, S, H, D]``, LSE ``[B, H, S]``)::

    out = cuparing.attention(q, k, v, causal=False, scale=None, window=None)
    dq, dk, dv = cuparing.attention_backward(dout, q, k, v, out, lse, causal=False, ...)
    out, lse = cuparing.ring_attention(q_l, k_l, v_l, ring, causal=True, layout="zigzag",
                                       return_lse=True)
    dq, dk, dv = cuparing.ring_attention_backward(dout, q_l, k_l, v_l, out, lse, ring, ...)
    q_l = cuparing.shard(q, rank, world_size, layout="zigzag")
    full = cuparing.unshard(shards, layout="zigzag")
    results = cuparing.simulate(4, fn)      # fn(ring) on 4 in-process CPU ranks
    ring = cuparing.Ring.from_env()         # one process per GPU: NCCL, or the copy engines
    out = cuparing.ring_attention_torch(q_l, k_l, v_l, ring, ...)   # differentiable (PyTorch)
    out, lse = cuparing.reference_attention(q, k, v, return_lse=True)  # dense float64 oracle
"""

from .api import (
    attention,
    attention_backward,
    global_positions,
    ring_attention,
    ring_attention_backward,
    shard,
    token_positions,
    unshard,
)
from .comm.base import Ring, RingError, RingTimeoutError
from .comm.local import simulate
from .documents import from_position_ids as cu_seqlens_from_position_ids
from .documents import from_segment_ids as cu_seqlens_from_segment_ids
from .layouts import LAYOUTS
from .reference import reference_attention, reference_attention_backward
from .torch_autograd import ring_attention_torch

__version__ = "0.1.0"

__all__ = [
    "LAYOUTS",
    "Ring",
    "RingError",
    "RingTimeoutError",
    "attention",
    "attention_backward",
    "cu_seqlens_from_position_ids",
    "cu_seqlens_from_segment_ids",
    "global_positions",
    "reference_attention",
    "reference_attention_backward",
    "ring_attention",
    "ring_attention_backward",
    "ring_attention_torch",
    "shard",
    "simulate",
    "token_positions",
    "unshard",
    "__version__",
]
