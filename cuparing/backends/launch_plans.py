"""Kernel launches decided once per signature; a call only patches device pointers in.

A ring step or a training step calls the same kernels on arrays of the same shapes, strides and
dtypes again and again; only the addresses change (a ring's K/V rotate between two buffers, an
allocator hands out new blocks). Choosing the kernel, its grid and shared memory, and packing
its parameter struct field by field cost ~100 µs of Python per launch; a :class:`PackedLaunch`
keeps the packed struct as bytes and rewrites just the pointer fields, and passes it to CuPy as
one unstructured blob (a structured NumPy argument makes CuPy walk its dtype on every launch).

:class:`PlanCache` holds plans by signature, bounded in size (these launches, and
``cuparing.call_plans``' whole calls). Whoever builds the key puts in it everything the plan
depends on except the pointers.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable, Hashable
from typing import Any

import numpy as np

_POINTER = struct.Struct("<Q")


class PackedLaunch:
    """One or more kernels launched back to back with one parameter struct, everything but the
    device pointers fixed.

    Args:
        kernels: CuPy kernel functions, launched in order.
        grid, block: launch geometry; smem: dynamic shared memory bytes.
        params: the parameter struct as packed for one call (a one-element structured array or
            bytes); its pointer fields are overwritten per call.
        pointer_offsets: byte offset of each pointer field, in the order :meth:`launch` takes
            the pointers.
        extra: a callable giving any further arguments from the pointers (the sm90 tensor
            maps), or None.
    """

    def __init__(
        self,
        kernels: tuple,
        grid: tuple,
        block: tuple,
        smem: int,
        params: Any,
        pointer_offsets: tuple[int, ...],
        extra: Callable[[tuple], tuple] | None = None,
    ):
        self.kernels, self.grid, self.block, self.smem = kernels, grid, block, smem
        self._template = params.tobytes() if hasattr(params, "tobytes") else bytes(params)
        self._blob = np.dtype((np.void, len(self._template)))
        self._offsets = pointer_offsets
        self._extra = extra

    def launch(self, *pointers: int) -> None:
        """Launch on CuPy's current stream with ``pointers`` patched in (``pointer_offsets``
        order)."""
        if len(pointers) != len(self._offsets):
            raise TypeError(f"expected {len(self._offsets)} pointers, got {len(pointers)}")
        buf = bytearray(self._template)  # a copy per call: ranks in threads share the plan
        for offset, ptr in zip(self._offsets, pointers, strict=True):
            _POINTER.pack_into(buf, offset, ptr)
        params = np.frombuffer(buf, dtype=self._blob)
        args = (params,) if self._extra is None else (params, *self._extra(pointers))
        for kernel in self.kernels:
            kernel(self.grid, self.block, args, shared_mem=self.smem)


def blob(data: bytes) -> np.ndarray:
    """``data`` as a one-element unstructured NumPy array: a by-value kernel argument CuPy passes
    without walking a dtype."""
    return np.frombuffer(data, dtype=np.dtype((np.void, len(data))))


class PlanCache:
    """Plans by signature, at most ``limit`` of them (all dropped when full: signatures
    are few in any real run, and rebuilding one costs a single slow launch).

    ``get`` and ``put`` are safe from several threads (simulated ranks share one process)."""

    def __init__(self, limit: int = 256):
        self._plans: dict[Hashable, Any] = {}
        self._limit = limit
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Any:
        return self._plans.get(key)

    def put(self, key: Hashable, plan: Any) -> Any:
        with self._lock:
            if len(self._plans) >= self._limit:
                self._plans.clear()
            self._plans[key] = plan
        return plan

    def __len__(self) -> int:
        return len(self._plans)

    def clear(self) -> None:
        with self._lock:
            self._plans.clear()
