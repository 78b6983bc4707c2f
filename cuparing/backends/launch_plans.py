"""Kernel launches decided once per signature; a call only patches device pointers in.

A ring step or a training step calls the same kernels on arrays of the same shapes, strides and
dtypes again and again; only the addresses change (a ring's K/V rotate between two buffers, an
allocator hands out new blocks). Choosing the kernel, its grid and shared memory, and packing
its parameter struct field by field cost ~100 µs of Python per launch; a :class:`PackedLaunch`
keeps the packed arguments as bytes, rewrites just the pointer fields, and hands them to
``cuLaunchKernel`` (CuPy's driver binding) as they are: CuPy's kernel call would convert every
argument again (~10 µs a launch, more for a structured NumPy argument, whose dtype it walks).

:class:`PlanCache` holds plans by signature, bounded in size (these launches, and
``cuparing.call_plans``' whole calls). Whoever builds the key puts in it everything the plan
depends on except the pointers.
"""

from __future__ import annotations

import contextlib
import struct
import threading
from collections.abc import Callable, Hashable
from typing import Any

import numpy as np

_POINTER = struct.Struct("<Q")
_EXTRA_SLOTS = 4  # room for extra arguments after the packed ones (the sm90 maps take one)


class PackedLaunch:
    """One or more kernels launched back to back with the same arguments, everything but the
    device pointers fixed.

    Args:
        kernels: CuPy kernels (``RawModule.get_function``), launched in order on the device
            current when the plan is made.
        grid, block: launch geometry; smem: dynamic shared memory bytes.
        params: the kernel's arguments packed back to back as for one call (bytes, or a
            one-element structured array: one struct argument); the pointer fields are
            overwritten per call.
        pointer_offsets: byte offset of each pointer field, in the order :meth:`launch` takes
            the pointers.
        extra: a callable giving further arguments (one-element NumPy arrays, kept alive by the
            callable's owner) from the pointers (the sm90 tensor maps), or None.
        arg_offsets: byte offset in ``params`` where each kernel argument starts (default: one
            argument, the whole struct).
        driver: what launches (default :class:`CupyDriver`).
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
        arg_offsets: tuple[int, ...] = (0,),
        driver: Any = None,
    ):
        # the CUfunction of each RawKernel on the current device (the plan's device)
        self._functions = tuple(kernel.kernel.ptr for kernel in kernels)
        self._geometry = (*_dim3(grid), *_dim3(block), int(smem))
        template = params.tobytes() if hasattr(params, "tobytes") else bytes(params)
        self._offsets = pointer_offsets
        self._extra = extra
        # The arguments live in one buffer reused by every launch: cuLaunchKernel copies them
        # before it returns. The lock keeps ranks in threads (which share plans) apart.
        self._lock = threading.Lock()
        self._params = np.frombuffer(bytearray(template), dtype=np.uint8)
        self._buffer = memoryview(self._params)
        base = self._params.ctypes.data
        slots = len(arg_offsets) + (_EXTRA_SLOTS if extra is not None else 0)
        self._arg_pointers = np.zeros(slots, dtype=np.uint64)  # cuLaunchKernel's void* array
        self._arg_pointers[: len(arg_offsets)] = [base + offset for offset in arg_offsets]
        self._first_extra = len(arg_offsets)
        self._arg_pointers_address = self._arg_pointers.ctypes.data
        self._extra_addresses: dict[int, tuple[Any, int]] = {}
        self._driver = driver if driver is not None else cupy_driver()

    def launch(self, *pointers: int, stream: int | None = None) -> None:
        """Launch with ``pointers`` patched in (``pointer_offsets`` order) on ``stream`` (a raw
        handle on the current device; default CuPy's current stream). While a :func:`observe`
        context is active in this thread, its observer hears of each kernel launched (after the
        launch)."""
        with self._lock:
            arguments = self._pack(pointers)
            for index, function in enumerate(self._functions):
                self._driver.launch(function, self._geometry, arguments, stream)
                if _observing.observer is not None:
                    _observing.observer(self, pointers, index)

    def update(self, pointers: tuple, index: int, set_node: Callable) -> None:
        """Instead of launching kernel ``index`` with ``pointers``, hand what a launch would get
        to ``set_node(function, geometry, arguments)`` (a captured graph's kernel node updated
        to these pointers; ``arguments``: the address of the ``void*`` array, read before
        ``set_node`` returns)."""
        with self._lock:
            set_node(self._functions[index], self._geometry, self._pack(pointers))

    def _pack(self, pointers: tuple) -> int:
        """Write ``pointers`` (and the extra arguments made from them) into the argument buffer;
        the address of the ``void*`` array. The caller holds the lock."""
        if len(pointers) != len(self._offsets):
            raise TypeError(f"expected {len(self._offsets)} pointers, got {len(pointers)}")
        buffer = self._buffer
        for offset, ptr in zip(self._offsets, pointers, strict=True):
            _POINTER.pack_into(buffer, offset, ptr)
        if self._extra is not None:
            extras = self._extra(pointers)
            if len(extras) > _EXTRA_SLOTS:
                raise ValueError(f"at most {_EXTRA_SLOTS} extra arguments, got {len(extras)}")
            for i, arg in enumerate(extras, start=self._first_extra):
                self._arg_pointers[i] = self._address_of(arg)
        return self._arg_pointers_address

    def _address_of(self, arg: np.ndarray) -> int:
        # the extra arguments are the same few cached arrays call after call
        known = self._extra_addresses.get(id(arg))
        if known is None or known[0] is not arg:
            if len(self._extra_addresses) >= 64:
                self._extra_addresses.clear()
            known = self._extra_addresses[id(arg)] = (arg, arg.ctypes.data)
        return known[1]


class _Observing(threading.local):
    observer: Callable[[PackedLaunch, tuple, int], None] | None = None


_observing = _Observing()


@contextlib.contextmanager
def observe(observer: Callable[[PackedLaunch, tuple, int], None]):
    """Within the block, every :meth:`PackedLaunch.launch` of this thread calls
    ``observer(launch, pointers, index)`` after launching its kernel ``index`` (how a stream
    capture learns which graph node each launch became). Not reentrant."""
    if _observing.observer is not None:
        raise RuntimeError("launches are already being observed in this thread")
    _observing.observer = observer
    try:
        yield
    finally:
        _observing.observer = None


class LaunchSequence:
    """Packed launches of different kernels and geometries that take the same pointers, run in
    order (the sm90 backward and the sm80 kernel's redo pass after it)."""

    def __init__(self, launches: tuple[PackedLaunch, ...]):
        self._launches = launches

    def launch(self, *pointers: int) -> None:
        """Launch each on CuPy's current stream with ``pointers`` patched in."""
        for packed in self._launches:
            packed.launch(*pointers)


class CupyDriver:
    """``cuLaunchKernel`` through CuPy's driver binding, on a given stream or CuPy's current
    one."""

    _INVALID_CONTEXT = 201  # CUDA_ERROR_INVALID_CONTEXT

    def __init__(self):
        import cupy

        self._launch_kernel = cupy.cuda.driver.launchKernel
        self._driver_error = cupy.cuda.driver.CUDADriverError
        self._runtime = cupy.cuda.runtime
        self._current_stream = cupy.cuda.get_current_stream

    def launch(self, function: int, geometry: tuple, arguments: int,
               stream: int | None = None) -> None:  # fmt: skip
        """Launch ``function`` (a ``CUfunction``) with ``geometry`` = (grid x, y, z, block x, y,
        z, dynamic shared memory) and ``arguments`` the address of its ``void*`` array, on
        ``stream`` (a raw handle; default CuPy's current stream)."""
        if stream is None:
            stream = self._current_stream().ptr
        try:
            self._launch_kernel(function, *geometry, stream, arguments, 0)
        except self._driver_error as error:
            if getattr(error, "status", None) != self._INVALID_CONTEXT:
                raise
            # A thread that has made no CUDA runtime call yet (torch's autograd thread) has no
            # current context, which the driver API needs: setDevice binds the device's
            # primary context (the one CuPy loaded the kernels into), then launch again.
            self._runtime.setDevice(self._runtime.getDevice())
            self._launch_kernel(function, *geometry, stream, arguments, 0)


_CUPY_DRIVER: CupyDriver | None = None


def cupy_driver() -> CupyDriver:
    """The process's :class:`CupyDriver` (imports CuPy on first use)."""
    global _CUPY_DRIVER
    if _CUPY_DRIVER is None:
        _CUPY_DRIVER = CupyDriver()
    return _CUPY_DRIVER


def _dim3(dims: tuple) -> tuple[int, int, int]:
    """A grid or block as three ints (missing ones are 1)."""
    padded = (*dims, 1, 1, 1)[:3]
    return int(padded[0]), int(padded[1]), int(padded[2])


def blob(data: bytes) -> np.ndarray:
    """``data`` as a one-element unstructured NumPy array: a by-value kernel argument (an extra
    argument of :class:`PackedLaunch`, whose address the launch hands to the driver)."""
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
