"""Repeat calls of one-device attention on PyTorch CUDA tensors, with no Python in between.

A training step calls :func:`cuparing.attention` (directly or through ``cuparing.torch``) with
the same shapes, strides, dtypes, device and options layer after layer, step after step. The
first call of such a signature goes through every check, the plan and the backend; when all it
came to was one kernel launch writing freshly allocated outputs, the signature and that launch
are kept. A later call with the same signature allocates the outputs through torch, patches the
addresses into the launch's packed parameters and launches on torch's current stream: nothing
else runs, so it costs what a framework's own attention call costs.

Everything else takes the full path every time: other frameworks, caller-owned ``out``/``lse``,
documents, tensors autograd is tracking (the full path raises), a misaligned address, more than
one launch (an EMPTY block, a head dim or dtype the kernels do not take).

The signature holds everything the checks and the launch depend on besides the addresses: each
tensor's type, shape, strides, dtype and device, the options exactly as passed, and the kernel
switches of the environment. Options of types that cannot be hashed never match.
"""

from __future__ import annotations

from typing import Any

from .backends.launch_plans import PlanCache
from .interop import external_cupy_stream
from .kernels import loader

_PLANS = PlanCache()  # by signature, bounded


def _is_cuda_tensor(x: Any) -> bool:
    # on every call, so no interop.framework_of (a module-name split); exactly torch.Tensor:
    # subclasses (nn.Parameter, tensor subclasses with their own dispatch) take the full path
    kind = type(x)
    return kind.__name__ == "Tensor" and kind.__module__ == "torch" and x.is_cuda


def signature(q: Any, k: Any, v: Any, options: tuple) -> tuple | None:
    """The hashable signature of a call on plain torch CUDA tensors, or None for any other call.

    ``options`` are the call's remaining arguments as passed (causal, scale, window, ...), keyed
    with their types (``causal=1`` is not ``causal=True``: the checks tell them apart); None if
    one of them cannot be hashed.
    """
    if not (_is_cuda_tensor(q) and _is_cuda_tensor(k) and _is_cuda_tensor(v)):
        return None
    key = (
        q.shape, q.stride(), q.dtype, q.device, k.shape, k.stride(), k.dtype, k.device,
        v.shape, v.stride(), v.dtype, v.device, _typed(options), loader.kernel_switches(),
    )  # fmt: skip
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _typed(option: Any) -> Any:
    """``option`` with the type of every value beside it (tuples, named ones included, element by
    element)."""
    if isinstance(option, tuple):
        return type(option), tuple(_typed(x) for x in option)
    return type(option), option


class CallPlan:
    """One signature's launch: fresh ``out`` [B, Sq, H, D] (q's dtype) and ``lse`` [B, H, Sq]
    float32 from torch's allocator, one kernel launch on torch's current stream."""

    def __init__(self, launch, q_pos, k_pos, out_shape, lse_shape, dtype, device):
        import cupy
        import torch

        self._torch = torch
        self._launch = launch
        self._positions = q_pos, k_pos  # device arrays the launch reads: kept alive here
        self._q_pos, self._k_pos = q_pos.data.ptr, k_pos.data.ptr
        self._out_shape, self._lse_shape = tuple(out_shape), tuple(lse_shape)
        self._dtype, self._device = dtype, device
        self._cupy_device = cupy.cuda.Device(device.index)
        self._streams: dict[int, Any] = {}  # torch stream handle -> CuPy's view of it

    def run(self, q: Any, k: Any, v: Any) -> tuple | None:
        """(out, lse), or None (nothing launched) when an address is not 16-byte aligned or
        autograd tracks an input: the full path handles (or refuses) those."""
        torch = self._torch
        if (q.requires_grad or k.requires_grad or v.requires_grad) and torch.is_grad_enabled():
            return None
        pointers = q.data_ptr(), k.data_ptr(), v.data_ptr()
        if (pointers[0] | pointers[1] | pointers[2]) & 15:
            return None
        out = torch.empty(self._out_shape, dtype=self._dtype, device=self._device)
        lse = torch.empty(self._lse_shape, dtype=torch.float32, device=self._device)
        handle = torch.cuda.current_stream(self._device).cuda_stream
        stream = self._streams.get(handle)
        if stream is None:
            if len(self._streams) >= 64:
                self._streams.clear()
            stream = self._streams[handle] = external_cupy_stream(handle, self._device.index)
        with self._cupy_device, stream:
            self._launch.launch(
                out.data_ptr(), lse.data_ptr(), *pointers, self._q_pos, self._k_pos
            )
        return out, lse


def find(key: tuple | None) -> CallPlan | None:
    """The plan kept for ``key`` (from :func:`signature`), if any."""
    return None if key is None else _PLANS.get(key)


def keep(key: tuple, plan: CallPlan) -> None:
    """Keep ``plan`` for ``key`` (a bounded cache: PlanCache)."""
    _PLANS.put(key, plan)


def clear() -> None:
    """Forget every plan (tests; a changed device)."""
    _PLANS.clear()
