"""Array backends: who computes blocks of attention.

A backend provides, for the ring schedule (``cuparing.schedule``):

- ``positions(host_positions)``: global positions in the form its block functions take;
- ``forward_state(q, blocks)``, ``forward_block(state, ...)``, ``forward_finish(state)``: a running
  float32 result that each block is merged into, and the final (out, lse);
- ``backward_delta(dout, out)``, ``zeros_accum(shape, dtype)``, ``backward_block(...)``,
  ``cast(x, dtype)``: the backward pass, accumulating in float32 in place.

``ArrayBackend`` runs on the CPU and is the oracle; ``CupyBackend`` runs our CUDA kernels.
"""

from __future__ import annotations

from .array_backend import ArrayBackend

__all__ = ["ArrayBackend", "backend_for"]

_NUMPY = ArrayBackend()


def backend_for(kind: str):
    """The backend for arrays of ``kind`` (``"numpy"`` or ``"cupy"``)."""
    if kind == "numpy":
        return _NUMPY
    if kind == "cupy":
        from .cupy_backend import get_cupy_backend

        return get_cupy_backend()
    raise ValueError(f"no backend for arrays of kind {kind!r}")
