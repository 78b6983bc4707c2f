"""The CPU backend: block attention and merges in NumPy, the oracle every other backend must match.

float64 inputs accumulate in float64; float32, float16 and bfloat16 (``ml_dtypes``) accumulate in
float32. This class is written over an array namespace ``xp`` so the GPU backend can reuse the
parts it does not replace with kernels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from . import array_ops


@dataclass
class ForwardState:
    """Running forward result of one rank: float32 (or float64) output and LSE."""

    out: Any  # [B, Sq, H, D]
    lse: Any  # [B, H, Sq]
    dtype: Any  # the caller's dtype, for the final cast
    dest_out: Any = None  # caller-owned arrays the result goes into
    dest_lse: Any = None


class ArrayBackend:
    """Block attention on NumPy arrays (or any NumPy-like namespace passed as ``xp``)."""

    name = "numpy"

    def __init__(self, xp=np):
        self.xp = xp

    def positions(self, host_positions: np.ndarray):
        """Global positions in the form this backend's block functions take."""
        return host_positions

    def forward_state(self, q, blocks: int, out=None, lse=None) -> ForwardState:
        """An empty running result for queries ``q`` (``blocks`` non-empty blocks will follow);
        a caller-owned ``lse`` is the running lse itself, ``out`` receives the final cast."""
        xp = self.xp
        acc_t = array_ops.accum_dtype(xp, q.dtype)
        b, s, h, d = q.shape
        if lse is None:
            running_lse = xp.full((b, h, s), -xp.inf, dtype=acc_t)
        else:
            running_lse = lse
            running_lse[...] = -xp.inf
        return ForwardState(
            out=xp.zeros((b, s, h, d), dtype=acc_t),
            lse=running_lse,
            dtype=q.dtype,
            dest_out=out,
            dest_lse=lse,
        )

    def forward_block(self, state, q, k, v, q_pos, k_pos, kind, mask, scale):
        """Compute one block and fold it into ``state`` in float32 (float64)."""
        out, lse = array_ops.block_forward(self.xp, q, k, v, q_pos, k_pos, kind, mask, scale)
        array_ops.merge_into(self.xp, state.out, state.lse, out, lse)

    def gathered(self, parts, keys):
        """(K, V) with ``parts[t]``'s rows at ``keys.rows[t]`` (the protocol's contract)."""
        rows = [self.xp.asarray(r) for r in keys.rows]
        return array_ops.gather_rows(self.xp, parts, rows, len(keys.positions))

    def rows_of_steps(self, dk, dv, keys):
        """Per step t, (dk, dv) rows at ``keys.rows[t]`` as new contiguous arrays (the
        protocol's contract)."""
        rows = [self.xp.asarray(r) for r in keys.rows]
        return [(dk[:, at], dv[:, at]) for at in rows]

    def forward_finish(self, state):
        """(out in the caller's dtype, lse in float32 or float64), in the caller-owned arrays
        where ``forward_state`` had them."""
        return self.cast(state.out, state.dtype, out=state.dest_out), state.lse

    def plan_forward(self, plan, q, k, v, out, lse, scale):
        """None: array arithmetic has no launches to keep (every call runs the schedule)."""
        return None

    def plan_backward(self, plan, dout, q, k, v, out, lse, grads, scale, deterministic=False):
        """None, as :meth:`plan_forward`."""
        return None

    def backward_delta(self, dout, out):
        return array_ops.backward_delta(self.xp, dout, out)

    def zeros_accum(self, shape, dtype):
        """A zeroed gradient accumulator (float32, float64 for float64)."""
        return self.xp.zeros(shape, dtype=array_ops.accum_dtype(self.xp, dtype))

    def kv_accum(self, q, k, whole=False, into=None):
        """A zeroed dK / dV accumulator: k's shape, float32 (float64); the same when ``whole``."""
        return self.zeros_accum(k.shape, k.dtype)

    def add_into(self, acc, x):
        """``acc += x`` (accumulators of the same shape and dtype)."""
        acc += x

    def kv_homeward(self, acc, part, dtype):
        """``acc`` (+= ``part`` where given) as ``dtype``."""
        if part is not None:
            acc += part
        return self.cast(acc, dtype)

    def kv_from_accum(self, acc, dtype, out=None):
        """dK / dV from its accumulator: ``acc`` as ``dtype`` (into ``out`` if given)."""
        return self.cast(acc, dtype, out=out)

    def dq_accum(self, q):
        """A zeroed dq accumulator for queries ``q``: q's shape, float32 (float64)."""
        return self.zeros_accum(q.shape, q.dtype)

    def dq_from_accum(self, acc, dtype, out=None):
        """dq from its accumulator: ``acc`` as ``dtype`` (into ``out`` if given)."""
        return self.cast(acc, dtype, out=out)

    def backward_block(
        self, dq, dk, dv, dout, q, k, v, lse, delta, q_pos, k_pos, kind, mask, scale,
        deterministic=False,
    ):  # fmt: skip
        """Array arithmetic in a fixed order: deterministic either way."""
        array_ops.block_backward(
            self.xp, dq, dk, dv, dout, q, k, v, lse, delta, q_pos, k_pos, kind, mask, scale
        )

    def cast(self, x, dtype, out=None):
        if out is None:
            return x.astype(dtype, copy=False)
        out[...] = x  # an assignment rounds to out's dtype
        return out

    def copy(self, x):
        return x.copy()
