"""dK / dV the Hopper backward kernels write straight in the inputs' dtype, host side.

A ring backward adds every block's dK / dV into float32 accumulators (zeroed first) that travel
with K / V and are cast at the end. When one block makes the whole gradient (a single-device
call, or a rank whose keys no other rank's queries see) and each query head has its own K / V
head, each CTA of the sm90 backward is the only writer of its key rows, so it writes them in the
gradients' dtype (``kernels/common/direct_grads.cuh``): no clearing, no float32 atomics, no cast.
A :class:`DirectGrad` stands where the accumulator would: the gradient itself, and float32
scratch of its shape that only the rare redo pass (non-finite values next to a mask edge) writes
and reads.
"""

from __future__ import annotations

from typing import Any


class DirectGrad:
    """A dK or dV the backward kernels write straight.

    Args:
        out: the gradient, [B, Sk, Hkv, D] C-contiguous in the inputs' fp16 / bf16 dtype, at a
            4-byte aligned address (the kernels store element pairs).
        scratch: uninitialised float32 of the same shape (the redo pass's).
    """

    def __init__(self, out: Any, scratch: Any):
        if tuple(scratch.shape) != tuple(out.shape):
            raise ValueError(f"scratch {scratch.shape} must have the gradient's shape {out.shape}")
        self.out = out
        self.scratch = scratch
        self.shape = tuple(out.shape)
