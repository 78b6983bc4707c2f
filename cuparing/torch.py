"""PyTorch operators: cuparing's attention as ``torch.library`` custom ops.

    import cuparing.torch as crt
    out = crt.attention(q, k, v, causal=True)                          # one device
    out = crt.ring_attention(q_l, k_l, v_l, ring, causal=True, layout="zigzag")

Both are differentiable (``register_autograd``: the backward runs cuparing's backward) and
traceable: each has a fake (meta) implementation, so ``torch.compile(fullgraph=True)`` captures a
model that calls them without a graph break, and ``torch.library.opcheck`` passes. CPU tensors run
the NumPy backend, CUDA tensors our kernels, on the caller's current stream.

The ops underneath, ``torch.ops.cuparing.attention_forward``, ``ring_attention_forward`` and
``attention_backward``, take plain values only: the options, and a ring as an integer handle
(:func:`ring_handle`; -1 for one device). The forward ops carry ``deterministic`` for their
backward (autograd's context sees only an op's arguments), as an int: :data:`NONDETERMINISTIC`,
:data:`DETERMINISTIC`, or :data:`DETERMINISTIC_BY_TORCH` (torch's deterministic mode).
The ring forward and the backward are tagged ``cudagraph_unsafe`` where this PyTorch has the
tag: a ring step is watched from the host, and the backward allocates its float32 accumulators
outside torch, so CUDA-graph trees leave them outside captured graphs. The single-device
forward allocates through torch only and may be captured.

This module imports PyTorch; ``import cuparing`` does not import it.
"""

from __future__ import annotations

import itertools
import threading
import warnings
import weakref
from typing import Any

import torch

from . import api, validation
from .comm.base import Ring

Window = tuple[int | None, int | None] | None

# ---- rings as integer handles (custom ops take plain values only); weak references, so a ring
# that its owner drops (every simulate() call makes new ones) is not kept alive here
_RINGS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_RINGS_LOCK = threading.Lock()
_NEXT_HANDLE = itertools.count()
ONE_DEVICE = -1  # the handle of "no ring": cuparing.attention

# the ops' ``deterministic``: the backward's order of adds
NONDETERMINISTIC = 0  # whatever order is fastest
DETERMINISTIC = 1  # a fixed order; NotImplementedError where the kernels have none
# ``torch.use_deterministic_algorithms(True)`` asked for it: a fixed order; where the kernels
# have none, torch's warn-only setting decides when the backward runs: NotImplementedError, or a
# warning and the fastest order (what warn-only asks of an operator)
DETERMINISTIC_BY_TORCH = 2


def ring_handle(ring: Ring) -> int:
    """The integer that stands for ``ring`` in the ops' arguments (registered on first use, for
    as long as the ring lives). Under ``torch.compile`` only a registered ring's handle can be
    read (an attribute of the ring); call this once outside the compiled function, e.g. where the
    model is built.

    Raises:
        TypeError: ``ring`` is not a :class:`cuparing.Ring`.
        RuntimeError: called while compiling, for a ring not registered yet.
    """
    handle = getattr(ring, "torch_handle", None)
    if handle is not None and _compiling():
        return handle  # registered before compiling: a plain attribute read, which traces
    if handle is None and _compiling():
        raise RuntimeError(
            "cuparing.torch: this ring has no handle yet, and one cannot be registered while "
            "torch.compile traces; call cuparing.torch.ring_handle(ring) once before compiling "
            "(where the model is built)"
        )
    validation.check_ring(ring)
    with _RINGS_LOCK:
        # a copy of a registered ring carries the original's attribute: it gets its own handle
        if ring.torch_handle is None or _RINGS.get(ring.torch_handle) is not ring:
            handle = next(_NEXT_HANDLE)
            _RINGS[handle] = ring
            ring.torch_handle = handle
        return ring.torch_handle


def _compiling() -> bool:
    """Whether TorchDynamo is tracing this code. ``is_dynamo_compiling`` is False when run and
    True when traced, so it answers for this thread; ``is_compiling`` reads a process-wide flag,
    which is also True while another thread compiles (ranks simulated in threads build their
    models while a neighbour compiles), so it is only the fallback for torch without the former."""
    compiler = getattr(torch, "compiler", None)
    check = getattr(compiler, "is_dynamo_compiling", None) or getattr(
        compiler, "is_compiling", None
    )
    return bool(check and check())


def _ring_of(handle: int) -> Ring:
    try:
        return _RINGS[handle]
    except KeyError:
        raise ValueError(
            f"no live ring has handle {handle}; get one from ring_handle(ring)"
        ) from None


def _window(left: int | None, right: int | None, bounded: bool) -> Window:
    return (left, right) if bounded else None


_UNSAFE_FOR_GRAPHS = tuple(
    tag for tag in (getattr(torch.Tag, "cudagraph_unsafe", None),) if tag is not None
)


# ---- the ops
#
# Options travel as plain values: the mask as (causal, window_left, window_right, windowed), where
# ``windowed`` says whether the pair is a window at all (``window=None`` otherwise); packed
# documents as a list of boundaries (or None); then ``deterministic`` (for the backward); a ring
# as its handle.


@torch.library.custom_op("cuparing::attention_forward", mutates_args=())
def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    scale: float,
    window_left: int | None,
    window_right: int | None,
    windowed: bool,
    cu_seqlens: list[int] | None,
    deterministic: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of :func:`cuparing.attention` (one device; allocates through torch only, so it
    may be captured in a CUDA graph); ``deterministic`` is for the backward."""
    window = _window(window_left, window_right, windowed)
    return api.attention(
        q, k, v, causal=causal, scale=scale, window=window, return_lse=True, cu_seqlens=cu_seqlens
    )


@torch.library.custom_op(
    "cuparing::ring_attention_forward", mutates_args=(), tags=_UNSAFE_FOR_GRAPHS
)
def ring_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    scale: float,
    window_left: int | None,
    window_right: int | None,
    windowed: bool,
    cu_seqlens: list[int] | None,
    deterministic: int,
    ring: int,
    layout: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of :func:`cuparing.ring_attention` on the ring with handle ``ring``;
    ``deterministic`` is for the backward."""
    window = _window(window_left, window_right, windowed)
    return api.ring_attention(
        q, k, v, _ring_of(ring), causal=causal, scale=scale, window=window, layout=layout,
        return_lse=True, cu_seqlens=cu_seqlens,
    )  # fmt: skip


def _forward_fake(q, k, v, *options):
    """Shapes and dtypes of (out, lse): out like q (contiguous), lse [B, H, Sq] float32 (float64
    for float64 inputs)."""
    b, s, h, _ = q.shape
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty(q.shape), q.new_empty((b, h, s), dtype=lse_dtype)


attention_forward.register_fake(_forward_fake)
ring_attention_forward.register_fake(_forward_fake)


@torch.library.custom_op("cuparing::attention_backward", mutates_args=(), tags=_UNSAFE_FOR_GRAPHS)
def attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dlse: torch.Tensor | None,
    causal: bool,
    scale: float,
    window_left: int | None,
    window_right: int | None,
    windowed: bool,
    cu_seqlens: list[int] | None,
    deterministic: int,
    ring: int,
    layout: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of :func:`cuparing.attention_backward` (``ring == ONE_DEVICE``) or of
    :func:`cuparing.ring_attention_backward` on the ring with handle ``ring``; ``dlse`` the
    gradient with respect to lse, or None."""
    window = _window(window_left, window_right, windowed)
    options = {"causal": causal, "scale": scale, "window": window, "cu_seqlens": cu_seqlens}

    def run(ordered: bool):
        if ring == ONE_DEVICE:
            return api.attention_backward(
                dout, q, k, v, out, lse, dlse=dlse, deterministic=ordered, **options
            )
        return api.ring_attention_backward(
            dout, q, k, v, out, lse, _ring_of(ring), layout=layout, dlse=dlse,
            deterministic=ordered, **options,
        )  # fmt: skip

    if deterministic != DETERMINISTIC_BY_TORCH:
        return run(deterministic == DETERMINISTIC)
    try:
        return run(True)
    except NotImplementedError as exc:  # raised before any work or transfer, on every rank
        if not torch.is_deterministic_algorithms_warn_only_enabled():
            raise
        warnings.warn(
            f"{exc}. torch.use_deterministic_algorithms(True, warn_only=True) is on: the "
            f"backward runs without a fixed order of adds",
            stacklevel=2,
        )
        return run(False)


@attention_backward.register_fake
def _attention_backward_fake(dout, q, k, v, out, lse, dlse, *options):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _autograd_for(ring_of_options):
    """setup_context and backward of a forward op; ``ring_of_options(options)`` gives (ring
    handle, layout) from the op's non-tensor arguments after q, k, v."""

    def setup_context(ctx, inputs, output):
        q, k, v, *options = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.options = tuple(options)
        ctx.set_materialize_grads(False)

    def backward(ctx, dout, dlse):
        nones = (None,) * len(ctx.options)
        if dout is None and dlse is None:
            return None, None, None, *nones
        q, k, v, out, lse = ctx.saved_tensors
        dout = torch.zeros_like(out) if dout is None else dout.contiguous()
        dlse = None if dlse is None else dlse.contiguous()
        # causal, scale, window_left, window_right, windowed, cu_seqlens, deterministic
        mask = ctx.options[:7]
        grads = attention_backward(
            dout, q, k, v, out, lse, dlse, *mask, *ring_of_options(ctx.options)
        )
        return (*grads, *nones)

    return backward, setup_context


_one_backward, _one_setup = _autograd_for(lambda options: (ONE_DEVICE, "contiguous"))
attention_forward.register_autograd(_one_backward, setup_context=_one_setup)
_ring_backward, _ring_setup = _autograd_for(lambda options: (options[7], options[8]))
ring_attention_forward.register_autograd(_ring_backward, setup_context=_ring_setup)


# ---- the Python API


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    scale: float | None = None,
    window: Window = None,
    cu_seqlens: Any = None,
    deterministic: bool | None = None,
) -> torch.Tensor:
    """Differentiable, compilable :func:`cuparing.attention` for torch tensors.

    Args and raises: as :func:`cuparing.attention` (the options are checked here, at trace
    time; the tensors when the op runs), and
        deterministic: bit-identical gradients on every run
            (:func:`cuparing.attention_backward`'s ``deterministic``); where the backward
            kernels have no deterministic mode, ``.backward()`` raises NotImplementedError.
            None (default): what ``torch.use_deterministic_algorithms`` asks for; in its
            warn-only mode, a warning instead of the error.

    Returns:
        out [B, Sq, H, D] in q's dtype; gradients flow to q, k and v.
    """
    options = _mask_options(q, causal, scale, window, cu_seqlens)
    out, _ = attention_forward(q, k, v, *options, _deterministic(deterministic))
    return out


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ring: Ring,
    causal: bool = False,
    scale: float | None = None,
    window: Window = None,
    layout: str = "contiguous",
    cu_seqlens: Any = None,
    deterministic: bool | None = None,
) -> torch.Tensor:
    """Differentiable, compilable :func:`cuparing.ring_attention` for torch tensors.

    Args and raises: as :func:`cuparing.ring_attention`; ``deterministic`` as in
    :func:`attention` (the backward ring's gradients repeat bit for bit on the same inputs and
    world size).

    Returns:
        out [B, S/C, H, D] for this rank's queries; the backward runs the backward ring, so the
        gradients of k and v are for this rank's shard, summed over every rank's queries.

    Note:
        One process per GPU: PyTorch runs a device's backward on one engine thread, so simulated
        ranks (:func:`cuparing.simulate`) sharing a GPU would block each other in the backward
        ring; on the CPU any ring size works.
    """
    options = _mask_options(q, causal, scale, window, cu_seqlens)
    handle = ring_handle(ring)
    determinism = _deterministic(deterministic)
    layout = validation.check_layout(layout)
    out, _ = ring_attention_forward(q, k, v, *options, determinism, handle, layout)
    return out


def _deterministic(flag: bool | None) -> int:
    """The ops' ``deterministic`` for the API's ``flag`` (checked as a bool); None: from torch's
    deterministic-algorithms setting (read at trace time when compiled: a guard of the compiled
    graph; its warn-only part is read when the backward runs)."""
    if flag is None:
        flag, ordered = torch.are_deterministic_algorithms_enabled(), DETERMINISTIC_BY_TORCH
    else:
        flag, ordered = validation.check_flag("deterministic", flag), DETERMINISTIC
    return ordered if flag else NONDETERMINISTIC


def _mask_options(q, causal, scale, window, cu_seqlens) -> tuple:
    """(causal, scale, window_left, window_right, windowed, cu_seqlens) as the ops take them,
    checked (``cu_seqlens`` a list of ints or None)."""
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise TypeError(
            f"q must be a 4-D torch.Tensor [B, S, H, D], got {type(q).__name__} "
            f"{tuple(getattr(q, 'shape', ()))}"
        )
    mask = validation.check_mask(causal, window)
    scale = validation.check_scale(scale, q.shape[-1])
    windowed = window is not None
    left, right = (mask.left, mask.right) if windowed else (None, None)
    if cu_seqlens is None:
        cu = None
    elif isinstance(cu_seqlens, torch.Tensor):  # read on the host: a graph break when compiled
        cu = list(validation.check_boundaries(cu_seqlens.tolist()))
    else:  # a list or tuple: plain Python checks, which torch.compile traces
        cu = list(validation.check_boundaries(cu_seqlens))
    return mask.causal, scale, left, right, windowed, cu
