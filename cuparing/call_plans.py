"""Repeat calls on PyTorch CUDA tensors: checks and plans decided once per signature.

A training step calls attention (directly or through ``cuparing.torch``) with the same shapes,
strides, dtypes, device, options and ring layer after layer, step after step. The first call of
such a signature goes through every check and plan; what they decided is kept, and a later call
with the same signature skips them:

- :class:`CheckedCall` (any call of the public functions: one device or a ring, forward or
  backward): the checked origin, the ring plan, the scale and the fields the ranks agreed on.
  A repeat runs the schedule with them (the ranks still agree per call, which costs nothing
  while the call does not change).
- :class:`CallPlan` (a one-device forward that came to one kernel launch): the launch itself.
  A repeat allocates the outputs through torch (or takes the caller's ``out``/``lse``), patches
  the addresses into the launch's packed parameters and launches on torch's current stream:
  nothing else runs, so it costs what a framework's own attention call costs.
- :class:`RingForwardPlan` / :class:`RingBackwardPlan` (a ring call, forward or backward without
  ``dlse``, on our kernels; also the one-device backward, a ring of one): the launches of every
  ring step (``cuparing.backends.planned_ring``). A repeat agrees with the other ranks and runs
  the same exchanges and launches at pointer level (``schedule.run_planned_forward`` /
  ``_backward``); on rings that can be captured (NCCL, the copy-engine ring's device flags) as
  replayed CUDA graphs (:class:`GraphSlot`).

The signature holds everything the checks and plans depend on besides the addresses: each
array's type, shape, strides, dtype and device (caller-owned destinations included), the options
exactly as passed, the ring, and the kernel switches of the environment. What depends on the
addresses is checked per call (:class:`Guard`): tensors autograd tracks and destinations that
share memory with an input (by byte range, then exactly where ranges meet), which go to the full
path to be refused there, and for a kept launch, 16-byte aligned inputs. A call the per-call
checks send to the full path keeps the plan already kept. Packed documents are part of the
signature by their boundaries' values (:func:`documents_key`) where those are on the host; on a
GPU, and for arrays of other frameworks, tensor subclasses and options that cannot be hashed,
every call takes the full path.
"""

from __future__ import annotations

import functools
import warnings
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import schedule
from .backends import ring_graphs
from .backends.launch_plans import PlanCache
from .comm.base import CaptureDeferred, RingError
from .interop import (
    may_overlap,
    memory_span,
    to_backend,
    torch_current_stream,
)
from .kernels import loader

_PLANS = PlanCache()  # by signature, bounded
# the most an lse a one-device plan keeps for calls that drop theirs may take (B * H * Sq * 4
# bytes: 128k queries of 32 heads), so that plans kept for many signatures hold little memory
KEPT_LSE_MAX_BYTES = 16 << 20


def _is_cuda_tensor(x: Any) -> bool:
    # on every call, so no interop.framework_of (a module-name split); exactly torch.Tensor:
    # subclasses (nn.Parameter, tensor subclasses with their own dispatch) take the full path
    kind = type(x)
    return kind.__name__ == "Tensor" and kind.__module__ == "torch" and x.is_cuda


def signature(
    entry: str, arrays: Sequence[Any], options: tuple, dests: Sequence[Any] = (), ring: Any = None,
    documents: tuple = (),
) -> tuple | None:  # fmt: skip
    """The hashable signature of a call on plain torch CUDA tensors, or None for any other call.

    Args:
        entry: the public function called.
        arrays: the call's array arguments (None for an optional one left out).
        options: the call's remaining arguments as passed (causal, scale, window, ...), keyed
            with their types (``causal=1`` is not ``causal=True``: the checks tell them apart).
        dests: caller-owned destinations (None where not given).
        ring: the ring of a ring call (by identity).
        documents: :func:`documents_key` of the call's ``cu_seqlens``, held as it is (it is
            typed already: walking its values again would cost O(documents) per call).

    Returns:
        The key, or None when an array is not a plain torch CUDA tensor or an option cannot be
        hashed.
    """
    described = []
    for x in (*arrays, *dests):
        if x is None:
            described.append(None)
            continue
        if not _is_cuda_tensor(x):
            return None
        try:
            described.append((x.shape, x.stride(), x.dtype, x.device))
        except RuntimeError:  # no strides (a sparse or nested tensor): the full path refuses it
            return None
    if arrays[0] is None:
        return None
    # (a ring call's options hold the gather switch, read once per call: see api)
    key = (entry, tuple(described), _typed(options), documents, id(ring),
           loader.kernel_switches())  # fmt: skip
    try:
        hash(key)
    except TypeError:
        return None
    return key


def documents_key(cu_seqlens: Any) -> tuple | None:
    """What a signature holds of a call's ``cu_seqlens``: ``()`` when there is none; for
    boundaries on the host (a list or tuple, a NumPy array, a CPU torch tensor) their type,
    dtype, shape and values, read in O(documents) (arrays as their bytes, in one copy; a list's
    elements' types in one pass); None for boundaries on a GPU (reading them waits for the
    device: such calls take the full path, which reads them once) or of any other kind. Values
    are typed (``[0, 4.0]`` is not ``[0, 4]``: the checks tell them apart).
    """
    if cu_seqlens is None:
        return ()
    kind = type(cu_seqlens)
    if kind is list or kind is tuple:
        values = tuple(cu_seqlens)
        if set(map(type, values)) <= {int}:  # (the common case: no per-element types)
            # (kept a tuple: packing it as bytes, ~16 us per 1000 documents, costs what the
            # tuple's hashes and comparisons of a repeat's lookups do)
            return kind, values
        return kind, _typed(values)
    if kind is np.ndarray:  # (exactly: a subclass, e.g. a masked array, reads otherwise)
        if cu_seqlens.dtype.hasobject:
            return None
        return kind, cu_seqlens.dtype.str, cu_seqlens.shape, cu_seqlens.tobytes()
    if kind.__name__ == "Tensor" and kind.__module__ == "torch" and cu_seqlens.device.type == "cpu":
        try:
            values = cu_seqlens.detach().reshape(-1).numpy().tobytes()
        except (RuntimeError, TypeError):  # (sparse, nested, quantized, a dtype NumPy lacks:
            return None  # the full path says why)
        return kind, str(cu_seqlens.dtype), tuple(cu_seqlens.shape), values
    return None


def plannable(x: Any) -> bool:
    """Whether a call whose first array is ``x`` can have a signature (a plain torch CUDA
    tensor): callers skip building the parts of a key (:func:`documents_key`) otherwise."""
    return _is_cuda_tensor(x)


def _typed(option: Any) -> Any:
    """``option`` with the type of every value beside it (tuples, named ones included, element by
    element)."""
    if isinstance(option, tuple):
        return type(option), tuple(_typed(x) for x in option)
    return type(option), option


class Guard:
    """The checks of a call that depend on addresses or autograd, for repeats of one signature.

    Args:
        inputs: the first call's input tensors (None for one left out), in signature order.
        dests: its caller-owned destinations (None where not given), in the order they are
            written: each must miss every input and every destination before it.
        untracked: whether the inputs must not be tracked by autograd (the forward's rule; a
            tracked destination is refused everywhere).
    """

    def __init__(self, inputs: Sequence[Any], dests: Sequence[Any], untracked: bool):
        import torch

        self._torch = torch
        self._untracked = untracked
        # byte offsets [low, high) of each tensor's elements from its data pointer: fixed by the
        # shape, strides and dtype, which the signature fixes
        self._inputs = tuple(_offsets(x) for x in inputs)
        self._dests = tuple(_offsets(x) for x in dests)

    def passes(self, inputs: Sequence[Any], dests: Sequence[Any]) -> bool:
        """Whether a repeat with these tensors may skip the checks."""
        grad_mode = self._torch.is_grad_enabled()
        if grad_mode and any(x is not None and x.requires_grad for x in dests):
            return False
        if self._untracked and grad_mode and any(x is not None and x.requires_grad for x in inputs):
            return False
        if not any(x is not None for x in dests):
            return True
        taken = [
            (x, _span(x, offsets))
            for x, offsets in zip(inputs, self._inputs, strict=True)
            if x is not None
        ]
        for x, offsets in zip(dests, self._dests, strict=True):
            if x is None:
                continue
            start, end = span = _span(x, offsets)
            for other, (other_start, other_end) in taken:
                # byte ranges first (cheap); where they meet, the exact test (slices of one
                # packed buffer meet by range and share no element)
                if start < other_end and other_start < end and may_overlap(x, other):
                    return False
            taken.append((x, span))
        return True


def _offsets(x: Any) -> tuple[int, int] | None:
    if x is None:
        return None
    start, end = memory_span(x)
    base = x.data_ptr()
    return start - base, end - base


def _span(x: Any, offsets: tuple[int, int]) -> tuple[int, int]:
    base = x.data_ptr()
    return base + offsets[0], base + offsets[1]


class CheckedCall:
    """What the checks and the plan of one signature's first call decided.

    Attributes:
        decided: a tuple the caller defines (origin, plan, scale, ...), reused by repeats.
    """

    def __init__(self, decided: tuple, guard: Guard, ring: Any = None):
        self.decided = decided
        self._guard = guard
        self._ring = None if ring is None else weakref.ref(ring)

    def ready(self, ring: Any, inputs: Sequence[Any], dests: Sequence[Any]) -> bool:
        """Whether a repeat on ``ring`` (the same object as the first call's; its id is in the
        signature, and ids are reused) with these tensors may use :attr:`decided`."""
        return self.holds(ring) and self._guard.passes(inputs, dests)

    def holds(self, ring: Any) -> bool:
        """Whether this is ``ring``'s plan (not that of a ring gone since, whose id ``ring``
        reuses)."""
        return self._ring is None or self._ring() is ring


class CallPlan:
    """One signature's launch: ``out`` [B, Sq, H, D] (q's dtype) and ``lse`` [B, H, Sq] float32,
    the caller's or fresh from torch's allocator, written by one kernel launch on torch's current
    stream."""

    def __init__(self, launch, q_pos, k_pos, out_shape, lse_shape, dtype, device, guard: Guard):
        import torch

        self._torch = torch
        self._launch = launch
        self._guard = guard
        self._positions = q_pos, k_pos  # device arrays the launch reads: kept alive here
        self._q_pos, self._k_pos = q_pos.data.ptr, k_pos.data.ptr
        self._out_shape, self._lse_shape = tuple(out_shape), tuple(lse_shape)
        self._dtype, self._device = dtype, device
        self._runtime = _cupy_runtime()
        self._discarded_lse: tuple[int, Any] | None = None  # (stream, lse nobody reads)

    def run(self, q: Any, k: Any, v: Any, out: Any = None, lse: Any = None,
            want_lse: bool = True) -> tuple | None:  # fmt: skip
        """(out, lse), or None (nothing launched) when the :class:`Guard` or an address (q, k, v
        16-byte aligned, ``out`` 4-byte aligned) says the full path must decide. With
        ``want_lse`` False and no ``lse`` given, the lse returned may be one the plan keeps for
        calls that drop it (written again by every such call on the stream it was made on):
        only ``out`` is the caller's to read."""
        pointers = _kernel_addresses((q, k, v), (out,))
        if pointers is None or not self._guard.passes((q, k, v), (out, lse)):
            return None
        # one launch that allocates nothing through CuPy: the device and torch's stream are all
        # it needs (no CuPy stream object or allocator entered: ~6 us of a call, PERF.md); where
        # the device is current already, nothing is entered (a thread without a bound context,
        # such as torch's autograd thread, is bound by the launch's retry: CupyDriver)
        device = self._device.index
        if self._runtime.getDevice() == device:
            return self._launch_into(pointers, out, lse, want_lse)
        with ring_graphs.on_device(device):
            return self._launch_into(pointers, out, lse, want_lse)

    def _launch_into(self, pointers: tuple, out: Any, lse: Any, want_lse: bool) -> tuple:
        """The launch on torch's current stream of the plan's device (the current device), into
        ``out`` / ``lse`` or fresh ones; (out, lse)."""
        torch = self._torch
        stream = torch_current_stream(self._device.index)
        if out is None:
            out = torch.empty(self._out_shape, dtype=self._dtype, device=self._device)
        if lse is None:
            lse = self._dropped_lse(stream) if not want_lse else torch.empty(
                self._lse_shape, dtype=torch.float32, device=self._device)  # fmt: skip
        # (no accumulator: one block)
        self._launch.launch(out.data_ptr(), lse.data_ptr(), *pointers, self._q_pos, self._k_pos,
                            0, stream=stream)  # fmt: skip
        return out, lse

    def _dropped_lse(self, stream: int) -> Any:
        """An lse for a call that drops it, on ``stream`` (torch's current stream of the current
        device, the plan's): the plan's own where it was made on that stream and no graph is
        being captured there (a captured launch would keep writing it after the plan let it
        go), else a fresh one; kept only up to ``KEPT_LSE_MAX_BYTES`` (it lives as long as the
        plan, out of reach of ``torch.cuda.empty_cache``). Calls on one stream write it in turn;
        once the plan lets it go, the allocator hands its memory on in that stream's order."""
        torch = self._torch
        kept = self._discarded_lse
        capturing = torch.cuda.is_current_stream_capturing()
        if kept is not None and kept[0] == stream and not capturing:
            return kept[1]
        lse = torch.empty(self._lse_shape, dtype=torch.float32, device=self._device)
        if kept is None and not capturing and lse.numel() * 4 <= KEPT_LSE_MAX_BYTES:
            self._discarded_lse = (stream, lse)
        return lse


class RingForwardPlan(CheckedCall):
    """A ring forward signature's launches, step by step (a
    :class:`~cuparing.backends.planned_ring.PlannedForward`), besides what its checks decided.

    A repeat agrees with the other ranks as every call does, allocates ``out``/``lse`` (unless
    the caller's) and the float32 accumulator (or a gathered forward's K/V:
    :class:`~cuparing.backends.planned_ring.PlannedGather`) through torch, and runs the
    schedule's steps at pointer level (:func:`cuparing.schedule.run_planned_forward`,
    :func:`cuparing.schedule.run_planned_gathered_forward`) on torch's current stream:
    the same exchanges and launches as the full path, without its per-call checks, views and
    lookups.

    Args:
        decided: (origin, plan, scale, fields) as a :class:`CheckedCall` of ``ring_attention``.
        guard, ring: as :class:`CheckedCall`.
        planned: the forward's launches (a ``PlannedForward`` or ``PlannedGather``).
        out_shape, lse_shape, dtype, device: of the results (torch); K/V have q's dtype.
    """

    def __init__(self, decided: tuple, guard: Guard, ring: Any, planned, out_shape, lse_shape,
                 dtype, device):  # fmt: skip
        import torch

        super().__init__(decided, guard, ring)
        self._torch = torch
        self._planned = planned
        self._graph = GraphSlot()
        self._out_shape, self._lse_shape = tuple(out_shape), tuple(lse_shape)
        self._dtype, self._device = dtype, device

    def run(self, ring: Any, q: Any, k: Any, v: Any, out: Any = None, lse: Any = None):
        """(out, lse) of this rank, or None (nothing done, no rank told) when an address (q, k,
        v 16-byte aligned, ``out`` 4-byte aligned) says the full path must decide. The caller
        has checked :meth:`ready`."""
        torch = self._torch
        pointers = _kernel_addresses((q, k, v), (out,))
        if pointers is None:
            return None
        origin, _, _, fields = self.decided
        ring.agree(fields)
        if out is None:
            out = torch.empty(self._out_shape, dtype=self._dtype, device=self._device)
        if lse is None:
            lse = torch.empty(self._lse_shape, dtype=torch.float32, device=self._device)
        planned = self._planned
        addresses = (pointers[0], out.data_ptr(), lse.data_ptr())

        def run(kv):  # the call at pointer level, as a replay's graph captures it
            if planned.gathers:  # the other ranks' K/V at once, in position order
                gathered = [] if planned.identity else [
                    torch.empty(planned.gathered_shape, dtype=self._dtype, device=self._device)
                    for _ in range(2)
                ]  # fmt: skip
                acc = torch.empty(self._out_shape, dtype=torch.float32, device=self._device) if (
                    planned.blocks.accumulates) else None  # fmt: skip
                schedule.run_planned_gathered_forward(
                    ring, planned, addresses[0], kv, addresses[1], addresses[2],
                    tuple(x.data_ptr() for x in gathered) or (0, 0),
                    0 if acc is None else acc.data_ptr(),
                )
                return gathered, acc
            scratch = None
            if planned.accumulates:
                scratch = torch.empty(self._out_shape, dtype=torch.float32, device=self._device)
            schedule.run_planned_forward(ring, planned, addresses[0], kv, addresses[1],
                                         addresses[2], 0 if scratch is None else
                                         scratch.data_ptr())  # fmt: skip
            return scratch

        self._graph.call(ring, run, origin, (k, v), addresses)
        return out, lse


class RingBackwardPlan(CheckedCall):
    """A ring backward signature's launches, step by step (a
    :class:`~cuparing.backends.planned_ring.PlannedBackward`, or a ``PlannedGatherBackward``
    for a gathered plan), besides what its checks decided;
    as :class:`RingForwardPlan` for ``ring_attention_backward`` (without ``dlse``), and for
    ``attention_backward`` on its ring of one.

    Args:
        decided, guard, ring: as :class:`RingForwardPlan` (``fields`` None on a ring of one,
            which has nobody to agree with).
        planned: the backward's launches.
        shapes, dtypes: of (dq, dk, dv) (torch); device: theirs.
    """

    def __init__(self, decided: tuple, guard: Guard, ring: Any, planned, shapes, dtypes, device):
        import torch

        super().__init__(decided, guard, ring)
        self._torch = torch
        self._planned = planned
        self._graph = GraphSlot()
        self._shapes, self._dtypes, self._device = tuple(map(tuple, shapes)), dtypes, device

    def run(self, ring: Any, arrays: Sequence[Any], dests: Sequence[Any]):
        """(dq, dk, dv) of this rank for ``arrays`` = (dout, q, k, v, out, lse) into ``dests``
        (each given or None), or None (nothing done, no rank told) when an address (the inputs
        16-byte aligned, the gradients 4-byte aligned) says the full path must decide. The
        caller has checked :meth:`ready`."""
        torch = self._torch
        dout, q, k, v, out, lse = arrays
        pointers = _kernel_addresses((dout, q, k, v, out), dests)
        if pointers is None:
            return None
        dout_ptr, q_ptr, _, _, out_ptr = pointers
        origin, _, _, fields = self.decided
        ring.agree(fields)
        grads = tuple(
            g if g is not None else torch.empty(shape, dtype=dtype, device=self._device)
            for g, shape, dtype in zip(dests, self._shapes, self._dtypes, strict=True)
        )
        planned = self._planned
        inputs = (dout_ptr, q_ptr, out_ptr, lse.data_ptr())
        outputs = tuple(g.data_ptr() for g in grads)

        def run(kv):  # the call at pointer level, as a replay's graph captures it
            if planned.gathers:
                return schedule.run_planned_gathered_backward(ring, planned, inputs, kv, outputs)
            return schedule.run_planned_backward(ring, planned, inputs, kv, outputs)

        self._graph.call(ring, run, origin, (k, v), inputs + outputs)
        return grads


class GraphSlot:
    """Where a ring plan keeps its call captured as CUDA graphs
    (:mod:`cuparing.backends.ring_graphs`), on rings whose exchanges can be captured: a repeat
    that no kept graph can replay runs eagerly inside a capture (and replays it at once), later
    repeats only replay. One graph serves every repeat on NCCL; the copy-engine ring's graphs
    are bound to its channels' slot parity, so a call that makes an odd number of exchanges on
    a channel keeps two (at most :attr:`VARIANTS`; a repeat none of them matches then runs
    eagerly). Graphs the ring released (``release_buffers``) are captured again by the next
    repeats. A capture or replay the driver refuses is warned about once, releases every graph
    of the plan and leaves it eager for good (nothing of the refused graph ran, so the ranks
    still issue the same exchanges). Each graph holds its own K/V copies and scratch.
    ``CUPARING_RING_GRAPHS`` is read when a plan would capture: graphs captured
    before it was set to 0 go on replaying."""

    VARIANTS = 4

    def __init__(self):
        self._captured: list = []
        self._refused = False

    def call(self, ring: Any, run: Any, origin: Any, kv: tuple, addresses: tuple[int, ...]):
        """One repeat of a torch caller (``origin``: its device) on torch's current stream: a
        captured graph replayed with the caller's ``addresses`` and K/V tensors ``kv``
        (:meth:`replay`; only the device and the stream are entered: a replay allocates
        nothing), else ``run`` on CuPy views of ``kv`` inside the caller's call context
        (:meth:`run`: captured first where it can be)."""
        if self._captured:
            device = origin.device_index
            stream = torch_current_stream(device)
            with ring_graphs.on_device(device):
                if self.replay(ring, addresses, kv, stream):
                    return
        with origin.stream():
            self.run(ring, run, [to_backend(x, origin) for x in kv], addresses,
                     _current_stream())  # fmt: skip

    def replay(self, ring: Any, addresses: tuple[int, ...], kv: tuple, stream: int) -> bool:
        """Replay a captured call that matches the ring's state with the caller's ``addresses``
        and K/V tensors ``kv`` on ``stream`` (a raw handle on the current device), arming the
        ring's watchdog on it; False (nothing done) when no graph matches, the ring cannot be
        captured now (it is tracing), ``kv`` are not C-contiguous and 16-byte aligned (the graph
        copies them as flat 16-byte words), or the driver refused the replay.

        Raises:
            RingTimeoutError, RingError: the ring has failed (before anything is queued: a
                replay would run an aborted communicator's operations).
        """
        if not self._captured:
            return False
        ring.check()
        if not all(c.live for c in self._captured):
            # the ring released them (its receive buffers dropped, or closed): capture again
            self._captured = []
            return False
        if not ring.capturable:  # (tracing: a traced call shows its exchanges)
            return False
        if not (kv[0].is_contiguous() and kv[1].is_contiguous()) or (
            kv[0].data_ptr() | kv[1].data_ptr()
        ) & 15:  # fmt: skip
            return False
        for captured in self._captured:
            if captured.matches:
                pointers = (kv[0].data_ptr(), kv[1].data_ptr())
                return self._replayed(captured, ring, addresses, pointers, stream)
        return False

    def run(self, ring: Any, run: Any, kv: list, addresses: tuple[int, ...], stream: int) -> None:
        """``run(kv)`` (the call at pointer level, queueing on CuPy's current stream, whose
        handle is ``stream``): captured and replayed when graphs are enabled on ``ring``, none
        was refused here, there is room for another, ``kv`` are C-contiguous and 16-byte
        aligned (the graph copies them) and ``addresses`` are non-zero and distinct (a replay
        finds them by value), else run as it is."""
        if self._refused or len(self._captured) >= self.VARIANTS or not ring_graphs.enabled(
            ring
        ) or not all(a.flags.c_contiguous and a.data.ptr % 16 == 0 for a in kv) or (
            0 in addresses
        ) or len(set(addresses)) != len(addresses):  # fmt: skip
            run(kv)
            return
        ring.check()
        try:
            captured = ring_graphs.capture(ring, run, kv, addresses)
        except RingError:
            raise
        except CaptureDeferred:  # (a transport sets up what the capture needs: a later repeat)
            run(kv)
            return
        except (RuntimeError, TypeError, ValueError) as exc:  # the driver binding refused
            self._drop_all()
            _warn_eager(f"could not be captured as a CUDA graph ({exc})")
            run(kv)
            return
        self._captured.append(captured)
        if not self._replayed(captured, ring, addresses, tuple(a.data.ptr for a in kv), stream):
            run(kv)

    def _drop_all(self) -> None:
        """After the driver refused a capture or a replay: release every graph of the plan (the
        others would be refused too) and run eagerly for good."""
        for kept in self._captured:
            kept.release()
        self._captured = []
        self._refused = True

    def _replayed(self, captured: Any, ring: Any, addresses: tuple[int, ...],
                  kv: tuple[int, int], stream: int) -> bool:  # fmt: skip
        """Replay ``captured`` and watch; on a refusal of the driver release every graph of
        the plan, warn (once: the plan runs eagerly from then on), False."""
        try:
            captured.replay(addresses, kv, stream)
        except (RuntimeError, TypeError, ValueError) as exc:  # the driver binding refused
            self._drop_all()
            _warn_eager(f"could not be replayed as a CUDA graph ({exc})")
            return False
        ring.watch("ring call (CUDA graph)", stream)
        return True


def _warn_eager(why: str) -> None:
    warnings.warn(f"cuparing: a ring call {why}; it runs without one", RuntimeWarning,
                  stacklevel=2)  # fmt: skip


@functools.lru_cache(maxsize=1)
def _cupy_runtime():
    """CuPy's runtime module (imported on first use: plans exist only where CuPy does)."""
    import cupy

    return cupy.cuda.runtime


def _current_stream() -> int:
    """The handle of CuPy's current stream (inside ``torch_call_context``: torch's)."""
    import cupy

    return cupy.cuda.get_current_stream().ptr



def _kernel_addresses(inputs: Sequence[Any], dests: Sequence[Any]) -> tuple | None:
    """The data pointers of ``inputs``, or None when one is not 16-byte aligned or a given
    destination not 4-byte aligned (what the kernels' loads and paired stores need; the full
    path copies or converts instead)."""
    pointers = tuple(x.data_ptr() for x in inputs)
    if any(p & 15 for p in pointers) or any(d is not None and d.data_ptr() & 3 for d in dests):
        return None
    return pointers


def find(key: tuple | None) -> CallPlan | CheckedCall | None:
    """The plan kept for ``key`` (from :func:`signature`), if any."""
    return None if key is None else _PLANS.get(key)


def wanted(key: tuple | None, ring: Any = None) -> bool:
    """Whether a call with signature ``key`` on ``ring`` that passed the full path should keep
    a plan: not when ``key`` has one for this ring already (the per-call checks sent a repeat
    through the full path, which decided nothing new: the kept plan, a one-launch CallPlan say,
    stays), nor for a ring that cannot be referred to weakly."""
    if key is None:
        return False
    if ring is not None:
        try:
            weakref.ref(ring)
        except TypeError:
            return False
    known = _PLANS.get(key)
    return known is None or (isinstance(known, CheckedCall) and not known.holds(ring))


def keep(key: tuple, plan: CallPlan | CheckedCall) -> None:
    """Keep ``plan`` for ``key`` (a bounded cache: PlanCache)."""
    _PLANS.put(key, plan)


def recall(
    key: tuple | None, ring: Any, inputs: Sequence[Any], dests: Sequence[Any]
) -> tuple | None:
    """What a checked call with signature ``key`` decided (its :attr:`CheckedCall.decided`),
    if a repeat on ``ring`` with these tensors may reuse it; else None (the full path runs)."""
    known = find(key)
    if isinstance(known, CheckedCall) and known.ready(ring, inputs, dests):
        return known.decided
    return None


def remember(
    key: tuple | None, decided: tuple, inputs: Sequence[Any], dests: Sequence[Any],
    untracked: bool, ring: Any = None,
) -> None:  # fmt: skip
    """After a call that passed the full path: keep what it ``decided`` for repeats of ``key``
    on ``ring`` (when :func:`wanted`), guarded as :class:`Guard` says for these arguments."""
    if wanted(key, ring):
        keep(key, CheckedCall(decided, Guard(inputs, dests, untracked), ring))


def clear() -> None:
    """Forget every plan (tests; a changed device)."""
    _PLANS.clear()
