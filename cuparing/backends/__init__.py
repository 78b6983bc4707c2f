"""Array backends: who computes blocks of attention.

The contract the ring schedule relies on is :class:`~cuparing.backends.protocol.Backend`.
``ArrayBackend`` implements it over any NumPy-like namespace and runs on the CPU as the oracle;
``CupyBackend`` runs our CUDA kernels (and ``ArrayBackend`` over CuPy where no kernel applies).
"""

from __future__ import annotations

from .array_backend import ArrayBackend
from .protocol import Backend

__all__ = ["ArrayBackend", "Backend", "backend_for"]

_NUMPY = ArrayBackend()


def backend_for(kind: str) -> Backend:
    """The backend for arrays of ``kind`` (``"numpy"`` or ``"cupy"``)."""
    if kind == "numpy":
        return _NUMPY
    if kind == "cupy":
        from .cupy_backend import get_cupy_backend

        return get_cupy_backend()
    raise ValueError(f"no backend for arrays of kind {kind!r}")
