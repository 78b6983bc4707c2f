"""Arrays across framework borders: any supported array in, the caller's framework out.

NumPy and CuPy arrays are used as they are. PyTorch tensors and JAX arrays on a GPU cross through
DLPack into CuPy (zero-copy) and come back the same way; on the CPU they become NumPy arrays
(bfloat16 through a 16-bit integer view, since NumPy's DLPack has no bfloat16). Frameworks are
imported only when the caller's array comes from them.
"""

from __future__ import annotations

import contextlib
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
        """Context manager making the caller's current CUDA stream CuPy's current stream."""
        if self.framework == "torch" and self.gpu:
            import cupy
            import torch

            current = torch.cuda.current_stream(self.device_index)
            if hasattr(cupy.cuda.Stream, "from_external"):  # CuPy >= 14: the stream protocol
                external = cupy.cuda.Stream.from_external(current)
            else:
                external = cupy.cuda.ExternalStream(current.cuda_stream, self.device_index)
            return _stacked(cupy.cuda.Device(self.device_index), external)
        if self.gpu:
            import cupy

            return cupy.cuda.Device(self.device_index)
        return contextlib.nullcontext()

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


@contextlib.contextmanager
def _stacked(*contexts):
    with contextlib.ExitStack() as stack:
        for ctx in contexts:
            stack.enter_context(ctx)
        yield


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
        x = x.detach()
        if origin.gpu:
            import cupy

            return cupy.from_dlpack(x)
        import torch

        if x.dtype == torch.bfloat16:
            import ml_dtypes

            return x.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return x.numpy()
    if origin.gpu:
        import cupy

        return cupy.from_dlpack(x)
    return np.asarray(x)
