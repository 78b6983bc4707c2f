"""Arrays across framework borders: any supported array in, the caller's framework out.

The one module that knows frameworks: which one an array comes from, its dtype name and strides,
how to index, join and copy it to the host, and whether autograd is tracking it. Everything else
asks here instead of inspecting array types itself.

NumPy and CuPy arrays are used as they are. PyTorch tensors and JAX arrays on a GPU cross through
DLPack into CuPy (zero-copy) and come back the same way; on the CPU they become NumPy arrays
(bfloat16 through a 16-bit integer view, since NumPy's DLPack has no bfloat16). Frameworks are
imported only when the caller's array comes from them.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np


def framework_of(x: Any) -> str:
    """``"numpy"``, ``"cupy"``, ``"torch"`` or ``"jax"``; ``TypeError`` for anything else."""
    module = type(x).__module__.split(".")[0]
    if module in ("numpy", "cupy", "torch"):
        return module
    if module in ("jax", "jaxlib"):
        return "jax"
    raise TypeError(
        f"expected a NumPy, CuPy, PyTorch or JAX array, got {type(x).__module__}.{type(x).__name__}"
    )


def dtype_name(x: Any) -> str:
    """The short dtype name (``"bfloat16"``, ``"float32"``, ...) of an array of any supported
    framework, or of a dtype object itself (NumPy, ``ml_dtypes``, CuPy, ``torch.bfloat16``)."""
    dtype = x if isinstance(x, (type, np.dtype)) else getattr(x, "dtype", x)
    try:
        return _cached_name_of_dtype(dtype)
    except TypeError:  # unhashable: not a dtype object of any framework
        return _name_of_dtype(dtype)


def _name_of_dtype(dtype: Any) -> str:
    try:
        return np.dtype(dtype).name  # NumPy, ml_dtypes, CuPy and JAX dtypes, scalar types
    except TypeError:
        return str(dtype).rsplit(".", 1)[-1]  # torch.bfloat16 -> 'bfloat16'


# NumPy computes a dtype's name anew on every access, and a call asks several times (validation,
# kernel choice, results): dtype objects are few, so their names are kept
_cached_name_of_dtype = functools.lru_cache(maxsize=64)(_name_of_dtype)


def element_strides(x: Any) -> tuple[int, ...] | None:
    """Strides of ``x`` in elements (not bytes), or ``None`` if the array type hides them (JAX)."""
    if framework_of(x) == "torch":
        return tuple(x.stride())
    strides = getattr(x, "strides", None)
    itemsize = getattr(getattr(x, "dtype", None), "itemsize", None)
    if strides is None or not itemsize:
        return None
    return tuple(int(s) // itemsize for s in strides)


def memory_span(x: Any) -> tuple[int, int] | None:
    """The byte range ``[start, end)`` that ``x``'s elements occupy (NumPy, CuPy and PyTorch; an
    empty array spans nothing), or None where the framework hides its memory (JAX)."""
    framework = framework_of(x)
    if framework == "jax":
        return None
    if framework == "torch":
        start, itemsize = x.data_ptr(), x.element_size()
    elif framework == "cupy":
        start, itemsize = x.data.ptr, x.dtype.itemsize
    else:
        start, itemsize = x.__array_interface__["data"][0], x.dtype.itemsize
    if math.prod(x.shape) == 0:
        return (start, start)
    strides = element_strides(x)
    low = sum(s * (n - 1) for s, n in zip(strides, x.shape, strict=True) if s < 0)
    high = sum(s * (n - 1) for s, n in zip(strides, x.shape, strict=True) if s > 0)
    return (start + low * itemsize, start + (high + 1) * itemsize)


def may_overlap(a: Any, b: Any) -> bool:
    """Whether arrays ``a`` and ``b`` may share an element (NumPy, CuPy, PyTorch; False when the
    framework hides its memory). Exact when both are views with the same strides and shape
    whose strides nest (each at least the span of the dimensions inside it), as the slices of
    one packed buffer are (``qkv[:, :, 0]`` against ``qkv[:, :, 1]``); otherwise by byte range,
    which may report an overlap that is not there, never the reverse."""
    span_a, span_b = memory_span(a), memory_span(b)
    if not span_a or not span_b or span_a[0] >= span_b[1] or span_b[0] >= span_a[1]:
        return False
    size = itemsize(a)
    if itemsize(b) != size or tuple(a.shape) != tuple(b.shape):
        return True
    strides, shape = element_strides(a), tuple(a.shape)
    if element_strides(b) != strides or any(s < 0 for s in strides):
        return True
    delta, rest = divmod(span_b[0] - span_a[0], size)
    if rest:
        return True  # not element-aligned to each other: let the range decide
    # With nested strides (each larger than the reach of the dimensions inside it) an element
    # of one view meets one of the other iff delta = sum c_k * stride_k with |c_k| < extent_k;
    # at each dimension only floor(delta / stride) and ceil(...) can leave a remainder the inner
    # dimensions reach.
    dims = sorted(((s, n) for s, n in zip(strides, shape, strict=True) if n > 1), reverse=True)
    reaches = [sum((n - 1) * s for s, n in dims[i + 1 :]) for i in range(len(dims))]
    if any(stride <= reach for (stride, _), reach in zip(dims, reaches, strict=True)):
        return True  # strides do not nest: fall back to the byte ranges
    return _reachable(delta, dims, reaches)


def _reachable(delta: int, dims: list, reaches: list) -> bool:
    if not dims:
        return delta == 0
    (stride, size), reach = dims[0], reaches[0]
    for digit in {delta // stride, -(-delta // stride)}:
        rest = delta - digit * stride
        if abs(digit) < size and abs(rest) <= reach and _reachable(rest, dims[1:], reaches[1:]):
            return True
    return False


def itemsize(x: Any) -> int:
    """Bytes of one element of an array of any supported framework."""
    return x.element_size() if framework_of(x) == "torch" else x.dtype.itemsize


def is_c_contiguous(x: Any) -> bool:
    """Whether ``x``'s elements are laid out in C order without gaps (dims of extent 1 and empty
    arrays are contiguous whatever their strides)."""
    if math.prod(x.shape) == 0:
        return True
    strides = element_strides(x)
    if strides is None:
        return True  # JAX arrays are always dense
    expected = 1
    for size, stride in zip(reversed(tuple(x.shape)), reversed(strides), strict=True):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def records_gradient(x: Any) -> bool:
    """True for a PyTorch tensor that autograd is tracking right now (``requires_grad`` with grad
    mode on): results computed outside torch would silently leave its graph."""
    if framework_of(x) != "torch":
        return False
    import torch

    return bool(x.requires_grad) and torch.is_grad_enabled()


def take(x: Any, indices: np.ndarray, axis: int) -> Any:
    """``x`` indexed by the int64 NumPy ``indices`` along ``axis``, in ``x``'s own framework and
    device (the indices are moved to the array's device first)."""
    framework = framework_of(x)
    index: list[Any] = [slice(None)] * len(x.shape)
    if framework == "torch":
        import torch

        index[axis] = torch.as_tensor(indices, device=x.device)
    elif framework == "cupy":
        import cupy

        index[axis] = cupy.asarray(indices)
    else:
        index[axis] = indices
    return x[tuple(index)]


def zeros_along(x: Any, axis: int, count: int) -> Any:
    """Zeros shaped like ``x`` except ``count`` long on ``axis``, in ``x``'s framework, dtype and
    device."""
    shape = list(x.shape)
    shape[axis] = count
    framework = framework_of(x)
    if framework == "torch":
        return x.new_zeros(shape)
    if framework == "cupy":
        import cupy

        with cupy.cuda.Device(x.device.id):
            return cupy.zeros(shape, dtype=x.dtype)
    if framework == "jax":
        import jax
        import jax.numpy as jnp

        zeros = jnp.zeros(shape, dtype=x.dtype)
        return jax.device_put(zeros, next(iter(x.devices())))
    return np.zeros(shape, dtype=x.dtype)


def concatenate(arrays: list[Any], axis: int) -> Any:
    """Arrays of one framework joined along ``axis``, in that framework."""
    framework = framework_of(arrays[0])
    if framework == "torch":
        import torch

        return torch.cat(arrays, dim=axis)
    if framework == "cupy":
        import cupy

        return cupy.concatenate(arrays, axis=axis)
    if framework == "jax":
        import jax.numpy as jnp

        return jnp.concatenate(arrays, axis=axis)
    return np.concatenate(arrays, axis=axis)


def to_host(x: Any) -> np.ndarray:
    """``x`` as a NumPy array in host memory (a copy from a GPU; bfloat16 as ``ml_dtypes``).

    Anything that is not a supported framework's array goes through ``np.asarray``.
    """
    try:
        framework = framework_of(x)
    except TypeError:
        return np.asarray(x)
    if framework == "cupy":
        return x.get()
    if framework == "torch":
        return to_backend(x.detach().cpu(), Origin("torch", gpu=False))
    return np.asarray(x)


def _is_gpu(x: Any, framework: str) -> bool:
    if framework == "torch":
        return x.device.type == "cuda"
    if framework == "jax":
        return next(iter(x.devices())).platform == "gpu"
    return framework == "cupy"


@dataclass(frozen=True)
class Origin:
    """Where the caller's arrays came from, so results can be returned the same way."""

    framework: str
    gpu: bool
    device_index: int | None = None

    def describe(self) -> str:
        """'torch/gpu:1', 'numpy/cpu', ... for error messages."""
        device = "gpu" if self.gpu else "cpu"
        index = "" if self.device_index is None else f":{self.device_index}"
        return f"{self.framework}/{device}{index}"

    @property
    def backend(self) -> str:
        """The backend that computes for these arrays: ``"cupy"`` on a GPU, else ``"numpy"``."""
        return "cupy" if self.gpu else "numpy"

    def stream(self):
        """Context manager for a call's GPU work: the caller's device, its current CUDA stream
        as CuPy's current stream, and where CuPy's allocations (the call's workspaces) come
        from. torch callers' workspaces come from torch's caching allocator (so they live where
        the caller's memory lives, and a capture by ``torch.cuda.graph`` keeps them in the
        graph's pool for its replays); while CuPy's stream is being captured, from CUDA's
        stream-ordered allocator (allocation and free become nodes of the graph). Otherwise
        CuPy's memory pool."""
        if self.framework == "torch" and self.gpu:
            return torch_call_context(self.device_index)
        if self.gpu:
            import cupy

            device = cupy.cuda.Device(self.device_index)
            with device:
                capturing = cupy.cuda.get_current_stream().is_capturing()
            if capturing:
                allocator = cupy.cuda.using_allocator(_stream_ordered_pool().malloc)
                return _Entered(device, allocator)
            return device
        return contextlib.nullcontext()

    def empty(self, shape: tuple, dtype: str) -> Any:
        """An uninitialised result array in the caller's framework, or None where the backend
        should allocate (NumPy, CuPy and JAX callers get the backend's arrays back). torch CUDA
        results are allocated by torch itself, so they live in its caching allocator and need no
        DLPack export."""
        if not (self.framework == "torch" and self.gpu):
            return None
        import torch

        return torch.empty(shape, dtype=getattr(torch, dtype), device=f"cuda:{self.device_index}")

    def export(self, x: Any) -> Any:
        """A backend array as the caller's array type."""
        if x is None:
            return None
        if self.framework in ("numpy", "cupy"):
            return x
        if self.framework == "torch":
            import torch

            if self.gpu:
                return torch.from_dlpack(x)
            if x.dtype.name == "bfloat16":
                return torch.from_numpy(np.ascontiguousarray(x).view(np.int16)).view(torch.bfloat16)
            return torch.from_numpy(np.ascontiguousarray(x))
        import jax.numpy as jnp

        if self.gpu:
            import jax.dlpack

            return jax.dlpack.from_dlpack(x)
        return jnp.asarray(x)


class _StreamHandle:
    """A raw CUDA stream handle offered through the CUDA stream protocol."""

    def __init__(self, handle: int):
        self._handle = int(handle)

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self._handle)


def external_cupy_stream(handle: int, device_index: int):
    """A CuPy stream object over a stream someone else owns (torch's current stream, XLA's
    stream), by its raw ``cudaStream_t`` handle on device ``device_index``; usable as a context
    manager that makes it CuPy's current stream. CuPy >= 14 imports it through the CUDA stream
    protocol (``Stream.from_external``); older CuPy through ``ExternalStream``.

    The objects are kept by (handle, device) and reused call after call: making one costs more
    than the rest of entering it. CuPy keeps a stream's context per thread, so one object serves
    every thread, and a handle reused for another stream names the same CUDA stream."""
    key = (int(handle), device_index)
    stream = _external_streams.get(key)
    if stream is None:
        import cupy

        if hasattr(cupy.cuda.Stream, "from_external"):
            stream = cupy.cuda.Stream.from_external(_StreamHandle(handle))
        else:
            stream = cupy.cuda.ExternalStream(int(handle), device_index)
        if len(_external_streams) >= 256:
            _external_streams.clear()
        _external_streams[key] = stream
    return stream


_external_streams: dict[tuple[int, int], Any] = {}  # external_cupy_stream's, bounded


def cupy_stream_as_torch():
    """CuPy's current stream as a ``torch.cuda`` stream (the reverse of :meth:`Origin.stream`), for
    running torch work (e.g. NCCL transfers of a torch process group) in CuPy's stream order.

    CuPy's default stream has the null handle, which ``torch.cuda.ExternalStream`` does not take
    (given 0 it returns an unrelated stream from torch's pool): it maps to torch's default
    stream of the current device, which is the same legacy default stream.
    """
    import cupy
    import torch

    stream = cupy.cuda.get_current_stream()
    device = cupy.cuda.Device().id
    if stream.ptr == 0:
        return torch.cuda.default_stream(device)
    return torch.cuda.ExternalStream(stream.ptr, device=device)


class _Entered:
    """Enter context managers in order and leave them in reverse order (a class: stacking them
    with a contextlib generator or ExitStack costs several times more, on every call)."""

    def __init__(self, *contexts: Any):
        self._contexts = contexts

    def __enter__(self) -> None:
        entered = []
        try:
            for context in self._contexts:
                context.__enter__()
                entered.append(context)
        except BaseException:
            for context in reversed(entered):
                context.__exit__(None, None, None)
            raise

    def __exit__(self, *exc) -> None:
        self._leave(len(self._contexts), exc)

    def _leave(self, count: int, exc: tuple) -> None:
        # the last ``count`` entered, last first; each is left even if a later one raised
        try:
            self._contexts[count - 1].__exit__(*exc)
        finally:
            if count > 1:
                self._leave(count - 1, exc)


def torch_call_context(device_index: int):
    """The context of GPU work for a torch caller on device ``device_index`` (what
    :meth:`Origin.stream` gives torch CUDA callers): the device, torch's current stream there as
    CuPy's current stream, and CuPy's allocations from torch's caching allocator.

    Made per call, never kept: torch's current stream may differ from one call to the next,
    and CuPy's ``using_allocator`` is a one-shot context manager."""
    import cupy

    external = external_cupy_stream(torch_current_stream(device_index), device_index)
    # a fresh Device: its context keeps the previous device on the object itself
    allocator = cupy.cuda.using_allocator(_torch_allocator(device_index))
    return _Entered(cupy.cuda.Device(device_index), external, allocator)


def torch_current_stream(device_index: int) -> int:
    """The raw ``cudaStream_t`` handle of torch's current stream on device ``device_index``."""
    return _torch_raw_stream()(device_index)


@functools.lru_cache(maxsize=1)
def _torch_raw_stream():
    """What gives torch's current stream handle on a device: the raw query torch's own compiled
    code calls (``_cuda_getCurrentRawStream``: an int, ~0.1 us) where this torch has it, else
    the public ``current_stream`` (which builds a Stream object per call: ~2 us)."""
    import torch

    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is not None:
        return raw
    return lambda device_index: torch.cuda.current_stream(device_index).cuda_stream


@functools.lru_cache(maxsize=64)
def _torch_allocator(device_index: int):
    """A CuPy allocator handing out torch's caching-allocator memory on ``device_index`` (each
    block owned by a uint8 tensor that lives as long as CuPy's memory object): blocks belong to
    torch's current stream, which is the call's stream."""
    import cupy
    import torch

    device = torch.device("cuda", device_index)

    def allocate(nbytes: int):
        block = torch.empty(nbytes, dtype=torch.uint8, device=device)
        memory = cupy.cuda.UnownedMemory(block.data_ptr(), nbytes, block, device_index)
        return cupy.cuda.MemoryPointer(memory, 0)

    return allocate


@functools.lru_cache(maxsize=1)
def _stream_ordered_pool():
    """CuPy's pool over CUDA's stream-ordered allocator (``cudaMallocAsync``), for allocations
    inside a stream capture."""
    import cupy

    return cupy.cuda.MemoryAsyncPool()


def origin_of(x: Any) -> Origin:
    """Describe the framework and device of ``x``."""
    framework = framework_of(x)
    gpu = _is_gpu(x, framework)
    index = None
    if gpu:
        if framework == "torch":
            index = x.device.index
        elif framework == "cupy":
            index = x.device.id
        else:
            index = next(iter(x.devices())).id
    return Origin(framework, gpu, index)


def to_backend(x: Any, origin: Origin) -> Any:
    """``x`` as a NumPy (CPU) or CuPy (GPU) array, zero-copy where the framework allows."""
    if origin.framework in ("numpy", "cupy"):
        return x
    if origin.framework == "torch":
        if origin.gpu:  # (a view of the memory: autograd's hold on x does not matter)
            return _cupy_view_of_torch(x)
        import torch

        x = x.detach()

        if x.dtype == torch.bfloat16:
            import ml_dtypes

            return x.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return x.numpy()
    if origin.gpu:
        import cupy

        return cupy.from_dlpack(x)
    return np.asarray(x)


def _cupy_view_of_torch(x: Any) -> Any:
    """A CuPy array over a torch CUDA tensor's memory (same pointer, shape and strides; the
    tensor is kept alive as the memory's owner). DLPack would do the same at several times the
    host cost (torch's ``__dlpack__`` queries streams and devices per tensor); the caller's
    stream is already CuPy's current stream (:meth:`Origin.stream`), so no stream handshake is
    needed either."""
    return cupy_view(x.data_ptr(), x.shape, x.stride(), x.dtype, x, x.device.index)


def cupy_view(ptr: int, shape, strides, dtype: Any, owner: Any, device: int) -> Any:
    """A CuPy array over device memory that another framework owns.

    Args:
        ptr: device address of element [0, ...]; shape: the extents; strides: in elements.
        dtype: any dtype :func:`dtype_name` names (bfloat16 comes back as ``ml_dtypes``'s).
        owner: kept alive as long as the view (the tensor or buffer that owns the memory).
        device: the CUDA device the memory is on.
    """
    import cupy

    shape, byte_strides, nbytes, storage, dtype = _view_layout(
        tuple(shape), tuple(strides), dtype_name(dtype)
    )
    memory = cupy.cuda.UnownedMemory(ptr, nbytes, owner, device)
    view = cupy.ndarray(
        shape, dtype=storage, memptr=cupy.cuda.MemoryPointer(memory, 0), strides=byte_strides
    )
    return view if storage is dtype else view.view(dtype)


@functools.lru_cache(maxsize=256)
def _view_layout(shape: tuple, strides: tuple, name: str) -> tuple:
    """What :func:`cupy_view` needs besides the pointer, per shape, strides and dtype (the same
    few, call after call): (shape, byte strides, bytes spanned, the dtype CuPy allocates the view
    with, the dtype of the result). bfloat16 views are made as uint16 and reinterpreted."""
    dtype = _numpy_dtype(name)
    itemsize = dtype.itemsize
    shape, strides = tuple(int(n) for n in shape), tuple(int(st) for st in strides)
    extent = sum((n - 1) * st for n, st in zip(shape, strides, strict=True)) + 1
    nbytes = extent * itemsize if math.prod(shape) else 0
    storage = np.dtype(np.uint16) if name == "bfloat16" else dtype
    return shape, tuple(st * itemsize for st in strides), nbytes, storage, dtype


def _numpy_dtype(name: str) -> np.dtype:
    """The NumPy dtype of a dtype name (``ml_dtypes``'s for bfloat16)."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)
