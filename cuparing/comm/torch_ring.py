"""A ring on an existing ``torch.distributed`` process group: ``Ring.from_torch(group)``.

A training job that already runs ``torch.distributed`` needs no second communicator (an NCCL
communicator costs ~0.6 GiB per GPU): every exchange is one ``batch_isend_irecv`` on the group,
and :meth:`allgather_bytes` is the group's ``all_gather_object``. Arrays travel as their bytes
(contiguous ``uint8`` views, zero-copy for contiguous arrays), so any dtype crosses any backend
(gloo on the CPU, NCCL on GPUs); every exchange receives into fresh arrays, which the caller then
owns (stricter than :class:`cuparing.comm.base.Ring`'s double-buffer rule).

GPU: the sends and receives are issued with CuPy's current stream made torch's current stream,
so they start after the work that produced the arrays, and ``wait()`` makes that stream wait for
the transfer without blocking the host (the next step's kernels overlap it). The group is
borrowed: it is never aborted or destroyed here. A peer that never sends is caught by the group's
own timeout and watchdog (the owner's settings decide); on the CPU, ``wait()`` also stops after
``timeout`` seconds with :class:`~cuparing.comm.base.RingTimeoutError`. Jobs that run other
collectives on the group from other threads should set ``NCCL_LAUNCH_ORDER_IMPLICIT=1``.

PyTorch is imported only when a ring is built.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..interop import cupy_stream_as_torch, framework_of
from .base import PendingExchange, ReadyExchange, Ring, RingTimeoutError


class _TorchPending(PendingExchange):
    def __init__(self, ring: TorchRing, works: list, received: list, sent: list, what: str):
        self._ring = ring
        self._works = works
        self._received = received
        # the send buffers (contiguous copies, maybe) must outlive the transfer: on a GPU the
        # backend reads them on its own stream after exchange() has returned
        self._sent = sent
        self._what = what

    def wait(self) -> list[Any]:
        ring = self._ring
        with ring._on_current_stream():
            if ring._gpu:
                for work in self._works:  # the current stream waits; the host goes on
                    work.wait()
            else:
                deadline = time.monotonic() + ring.timeout
                for work in self._works:
                    left = max(deadline - time.monotonic(), 1e-3)
                    try:  # gloo's transfers progress inside wait(), which takes the deadline
                        work.wait(timeout=datetime.timedelta(seconds=left))
                    except RuntimeError as error:
                        raise RingTimeoutError(
                            f"rank {ring.rank}: {self._what} did not complete within "
                            f"{ring.timeout:g} s (a peer is gone or slow): {error}"
                        ) from error
        self._sent = None  # the current stream now orders every later reuse after the transfer
        return self._received


class TorchRing(Ring):
    """This process's rank of a ring over a ``torch.distributed`` process group.

    Args:
        group: the process group (None: the default group); its ranks form the ring in group
            rank order. ``torch.distributed`` must be initialised.
        timeout: seconds a CPU exchange may take (default 300); GPU exchanges are bounded by the
            group's own timeout.
        device: ``"cpu"`` or ``"cuda"``: where the ring's arrays live (default: ``"cuda"`` for an
            NCCL group, else ``"cpu"``).

    Raises:
        RuntimeError: ``torch.distributed`` is not initialised.
    """

    def __init__(self, group: Any = None, timeout: float = 300.0, device: str | None = None):
        import torch
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "Ring.from_torch needs an initialised torch.distributed process group "
                "(torch.distributed.init_process_group(...) first)"
            )
        self._torch = torch
        self._dist = dist
        self._group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.timeout = float(timeout)
        backend = str(dist.get_backend(group)).lower()
        self._gpu = (device or ("cuda" if "nccl" in backend else "cpu")) == "cuda"
        self._sequence = 0

    @property
    def device(self) -> int | None:
        """The CUDA device index the ring's arrays live on (None on the CPU), like the GPU
        rings' ``device``: the group's bound device where it has one, else torch's current
        device when asked (what ``cuparing.jax.ring_mesh`` binds this process's JAX to)."""
        if not self._gpu:
            return None
        group = self._group if self._group is not None else self._dist.group.WORLD
        bound = getattr(group, "bound_device_id", None)
        return bound.index if bound is not None else self._torch.cuda.current_device()

    def _peer(self, group_rank: int) -> int:
        """The global rank torch's p2p calls address."""
        if self._group is None:
            return group_rank
        return self._dist.get_global_rank(self._group, group_rank)

    def _on_current_stream(self):
        """On GPUs: CuPy's current stream as torch's, so transfers order after the producing
        kernels and before the consuming ones. A no-op on the CPU."""
        import contextlib

        if not self._gpu:
            return contextlib.nullcontext()
        return self._torch.cuda.stream(cupy_stream_as_torch())

    def _as_bytes(self, x: Any):
        """A torch uint8 tensor over ``x``'s bytes (``x`` contiguous; NumPy or CuPy)."""
        flat = x.reshape(-1).view(np.uint8)
        if framework_of(x) == "cupy":
            return self._torch.from_dlpack(flat)
        return self._torch.from_numpy(flat)

    def exchange(self, arrays: Sequence[Any], shift: int = 1, tag: str = "kv") -> PendingExchange:
        dest = (self.rank + shift) % self.size
        source = (self.rank - shift) % self.size
        seq = self._sequence
        self._sequence += 1
        xp = _namespace(arrays)
        if dest == self.rank:  # a shift by whole turns: nothing travels
            return ReadyExchange([xp.array(a, copy=True) for a in arrays])
        sends = [xp.ascontiguousarray(a) for a in arrays]
        received = [xp.empty(a.shape, dtype=a.dtype) for a in sends]
        dist = self._dist
        ops = []
        with self._on_current_stream():
            for buf in sends:
                if buf.size:
                    ops.append(dist.P2POp(dist.isend, self._as_bytes(buf), self._peer(dest),
                                          self._group))  # fmt: skip
            for buf in received:
                if buf.size:
                    ops.append(dist.P2POp(dist.irecv, self._as_bytes(buf), self._peer(source),
                                          self._group))  # fmt: skip
            works = dist.batch_isend_irecv(ops) if ops else []
        what = f"exchange {tag!r} #{seq} (shift {shift}, from rank {source})"
        return _TorchPending(self, works, received, sends, what)

    def allgather_bytes(self, data: bytes) -> list[bytes]:
        """Every rank's ``data`` in rank order: the group's ``all_gather_object``."""
        if self.size == 1:
            return [bytes(data)]
        parts: list[Any] = [None] * self.size
        self._dist.all_gather_object(parts, bytes(data), group=self._group)
        return [bytes(p) for p in parts]

    def synchronize(self) -> None:
        """Block until this rank's queued work (transfers included) has finished."""
        if self._gpu:
            import cupy

            cupy.cuda.get_current_stream().synchronize()

    def close(self) -> None:
        """Nothing to release: the group is borrowed, and its owner destroys it."""


def _namespace(arrays: Sequence[Any]):
    """NumPy or CuPy, after the arrays of an exchange."""
    if arrays and framework_of(arrays[0]) == "cupy":
        import cupy

        return cupy
    return np
