"""JAX: :func:`attention` and :func:`ring_attention` inside ``jax.jit``, differentiable with
``jax.grad``.

Each op is a ``jax.custom_vjp`` whose forward and backward run cuparing through
``jax.experimental.buffer_callback``: the callback receives XLA's own buffers (inputs, and the
outputs to fill) and, on GPUs, XLA's CUDA stream. cuparing reads the inputs as NumPy (CPU) or
CuPy (GPU) views of those buffers and writes its results straight into the output buffers
(``out=``, ``lse=``, ``dq=`` ...): no copy, no host round trip, no synchronisation. Options are
static (part of the traced function), so a jitted step retraces only when they change.

The ring (:func:`ring_attention`) is static too: call it with each process's own ring, on its
shard, e.g. inside ``shard_map`` over the sequence axis with one process per GPU
(:func:`ring_mesh` starts JAX's multi-process runtime on the ring's processes and gives the mesh
whose position r is rank r's device). JAX
preallocates most of GPU memory and cuparing's CuPy work needs some of its own: set
``XLA_PYTHON_CLIENT_MEM_FRACTION`` (or ``XLA_PYTHON_CLIENT_PREALLOCATE=false``).

Arguments are checked at trace time with cuparing's own checks (the same errors as the eager
functions); what only the data can tell (e.g. an ``out`` layout) is checked again in the callback.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.experimental.buffer_callback import buffer_callback

from . import api
from .interop import cupy_view, dtype_name, external_cupy_stream
from .validation import (
    FLOAT_DTYPES,
    check_cu_seqlens,
    check_flag,
    check_layout,
    check_mask,
    check_qkv,
    check_ring,
    check_scale,
    lse_dtype,
)


def ring_mesh(ring, axis_name: str = "ring", gpu: int | None = -1):
    """A one-axis ``jax.sharding.Mesh`` of the ring's processes, position r holding rank r's
    device: ``shard_map`` over ``axis_name`` then hands rank r the r-th block of a sequence-sharded
    array, i.e. the shard :func:`cuparing.shard` gives rank r (the global JAX array holds the
    sequence in the ring's layout order).

    Starts JAX's multi-process runtime (``jax.distributed.initialize``) over the ring's processes
    with one device each, unless it is already running (a job that started it itself, e.g. from
    srun's or mpirun's variables): the coordinator runs in rank 0's process, on a port rank 0
    picks and sends to the others through ``ring.allgather_bytes``, at ``MASTER_ADDR`` when the
    launcher set it (torchrun, ``cuparing.launch``), else at rank 0's host name. Call it before
    anything else touches JAX's devices (``jax.distributed.initialize``'s rule). Collective: every
    rank calls it.

    Args:
        ring: this process's :class:`cuparing.Ring` (any transport).
        axis_name: the mesh axis's name.
        gpu: this process's GPU; -1 (default): the ring's own GPU (``ring.device``: a CuPy
            device or an index, as cuparing's NCCL and IPC rings and a ring on a torch NCCL
            group have) where it has one, else the CPU; None: the CPU (JAX is then limited to
            its CPU platform, its cross-process collectives run on gloo).

    Returns:
        ``jax.sharding.Mesh`` of ``ring.size`` devices in rank order.

    Raises:
        RuntimeError: JAX's runtime was already started with other than one device per process,
            or with a process count other than ``ring.size``.
    """
    if gpu == -1:
        device = getattr(ring, "device", None)
        gpu = None if device is None else int(getattr(device, "id", device))
    if not jax.distributed.is_initialized() and ring.size > 1:
        if gpu is None:  # JAX on its CPU client alone, collectives across processes on gloo
            jax.config.update("jax_platforms", "cpu")
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        address = None
        if ring.rank == 0:
            host = os.environ.get("MASTER_ADDR") or socket.gethostname()
            with socket.socket() as probe:  # a free port (the window until JAX binds it is tiny)
                probe.bind(("", 0))
                address = f"{host}:{probe.getsockname()[1]}"
        address = ring.allgather_bytes((address or "").encode())[0].decode()
        jax.distributed.initialize(
            coordinator_address=address, num_processes=ring.size, process_id=ring.rank,
            local_device_ids=None if gpu is None else [gpu],
            initialization_timeout=int(min(max(getattr(ring, "timeout", 300.0), 1.0), 86400.0)),
        )  # fmt: skip
    if ring.size == 1 and not jax.distributed.is_initialized():  # no runtime: pick the device
        devices = [jax.devices("cpu")[0] if gpu is None else jax.devices("gpu")[gpu]]
    else:
        devices = jax.devices()
    if jax.process_count() != ring.size or len(devices) != ring.size:
        raise RuntimeError(
            f"ring_mesh needs one JAX process per ring rank with one device each: the ring has "
            f"{ring.size} ranks, JAX {jax.process_count()} processes and {len(devices)} devices"
        )
    # rank r's process index, from every rank (JAX's process ids need not be the ring's ranks)
    processes = [int(b) for b in ring.allgather_bytes(str(jax.process_index()).encode())]
    by_process = {d.process_index: d for d in devices}
    return jax.sharding.Mesh(np.array([by_process[p] for p in processes]), (axis_name,))


class _Options(NamedTuple):
    """Static options of one op (hashable: part of the jitted function's identity)."""

    causal: bool
    scale: float | None
    window: tuple | None
    cu_seqlens: tuple | None
    ring: Any  # None: one device
    layout: str
    deterministic: bool  # (the backward's)


def attention(q, k, v, causal: bool = False, scale: float | None = None, window=None,
              cu_seqlens=None, deterministic: bool = False):  # fmt: skip
    """:func:`cuparing.attention` on JAX arrays, usable inside ``jax.jit`` and ``jax.grad``.

    Args:
        q: [B, Sq, H, D]; k, v: [B, Sk, Hkv, D] (H a multiple of Hkv); float16, bfloat16,
            float32 (float64 on the CPU), one dtype.
        causal, scale, window: as :func:`cuparing.attention` (static).
        cu_seqlens: packed documents, static: a list, tuple or host array ``[0, ..., Sq]``.
        deterministic: bit-identical gradients on every run (static;
            :func:`cuparing.attention_backward`'s ``deterministic``).

    Returns:
        out [B, Sq, H, D] in q's dtype; gradients flow to q, k and v.

    Raises:
        ValueError, TypeError: at trace time, as :func:`cuparing.attention` would.

    When the gradient runs with ``deterministic`` where the GPU's backward kernels have no such
    mode, cuparing's NotImplementedError is raised inside XLA's execution and reaches the caller
    as JAX's runtime error carrying its message.
    """
    options = _options(q, k, v, causal, scale, window, cu_seqlens, None, "contiguous",
                       deterministic)  # fmt: skip
    return _op(q, k, v, options)


def ring_attention(q, k, v, ring, causal: bool = False, scale: float | None = None, window=None,
                   layout: str = "contiguous", cu_seqlens=None,
                   deterministic: bool = False):  # fmt: skip
    """:func:`cuparing.ring_attention` on this process's shard (JAX arrays), usable inside
    ``jax.jit`` and ``jax.grad``.

    Args:
        q, k, v: this rank's ``layout`` shards, [B, S/C, H, D] and [B, S/C, Hkv, D].
        ring: this process's :class:`cuparing.Ring` (static; every rank calls with its own).
        causal, scale, window, layout: as :func:`cuparing.ring_attention` (static).
        cu_seqlens: the global document boundaries, static (see :func:`cuparing.shard`).
        deterministic: bit-identical gradients on every run with the same inputs and world
            size (static; :func:`cuparing.ring_attention_backward`'s ``deterministic``).

    Returns:
        out, this rank's shard [B, S/C, H, D]; gradients flow to the local q, k and v (dK and dV
        summed over every rank's queries, as :func:`cuparing.ring_attention_backward` gives).

    Raises:
        ValueError, TypeError: at trace time, for arguments the eager function would refuse.

    ``deterministic`` without deterministic kernels: as in :func:`attention`.
    """
    options = _options(q, k, v, causal, scale, window, cu_seqlens, ring, layout, deterministic)
    return _op(q, k, v, options)


def _options(q, k, v, causal, scale, window, cu_seqlens, ring, layout,
             deterministic) -> _Options:  # fmt: skip
    """The static options, checked at trace time with cuparing's own checks (shapes, dtype,
    mask, scale, documents, ring, layout, flags): a bad call fails before XLA compiles
    anything."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if len(x.shape) != 4 or dtype_name(x) not in FLOAT_DTYPES:
            raise ValueError(
                f"{name} must be a 4-D [B, S, H, D] array of a dtype in {FLOAT_DTYPES}, got "
                f"shape {tuple(x.shape)} and dtype {dtype_name(x)}"
            )
    check_qkv(q, k, v, same_length=ring is not None)
    check_mask(causal, window)
    check_scale(scale, q.shape[-1])
    if ring is not None:
        check_ring(ring)
        check_layout(layout)
    if cu_seqlens is not None:  # one device: the boundaries span the whole (local) sequence
        cu_seqlens = check_cu_seqlens(cu_seqlens, q.shape[1] if ring is None else None)
    window = None if window is None else tuple(window)
    deterministic = check_flag("deterministic", deterministic)
    return _Options(causal, scale, window, cu_seqlens, ring, layout, deterministic)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _op(q, k, v, options: _Options):
    return _forward(q, k, v, options)[0]


def _op_forward(q, k, v, options: _Options):
    out, lse = _forward(q, k, v, options)
    return out, (q, k, v, out, lse)


def _op_backward(options: _Options, saved, dout):
    q, k, v, out, lse = saved
    return _backward(dout, q, k, v, out, lse, options)


_op.defvjp(_op_forward, _op_backward)


def _forward(q, k, v, options: _Options):
    b, s, h, _ = q.shape
    shapes = (
        jax.ShapeDtypeStruct(q.shape, q.dtype),
        jax.ShapeDtypeStruct((b, h, s), lse_dtype(q)),
    )
    def run(ctx, results, q, k, v):
        out, lse = results
        with _BufferViews(ctx, q, k, v, out, lse) as (q, k, v, out, lse):
            mask = {"causal": options.causal, "scale": options.scale, "window": options.window,
                    "cu_seqlens": options.cu_seqlens}  # fmt: skip
            if options.ring is None:
                api.attention(q, k, v, out=out, lse=lse, **mask)
            else:
                api.ring_attention(q, k, v, options.ring, layout=options.layout, out=out,
                                   lse=lse, **mask)  # fmt: skip

    return _varying_like(buffer_callback(run, shapes)(q, k, v), _varying_axes(q, k, v))


def _backward(dout, q, k, v, out, lse, options: _Options):
    shapes = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v))
    def run(ctx, results, dout, q, k, v, out, lse):
        views = _BufferViews(ctx, dout, q, k, v, out, lse, *results)
        with views as (dout, q, k, v, out, lse, dq, dk, dv):
            mask = {"causal": options.causal, "scale": options.scale, "window": options.window,
                    "cu_seqlens": options.cu_seqlens, "dq": dq, "dk": dk, "dv": dv,
                    "deterministic": options.deterministic}  # fmt: skip
            if options.ring is None:
                api.attention_backward(dout, q, k, v, out, lse, **mask)
            else:
                api.ring_attention_backward(dout, q, k, v, out, lse, options.ring,
                                            layout=options.layout, **mask)  # fmt: skip

    every = _varying_axes(dout, q, k, v)
    grads = _varying_like(buffer_callback(run, shapes)(dout, q, k, v, out, lse), every)
    # inside shard_map an input that varies over fewer mesh axes than the others (k, v
    # replicated next to sharded queries) was broadcast to the shards: its gradient is the sum of
    # every shard's part (what JAX's own transpose of that broadcast does)
    summed = []
    for grad, x in zip(grads, (q, k, v), strict=True):
        extra = tuple(sorted(every - _varying_axes(x)))
        summed.append(jax.lax.psum(grad, extra) if extra else grad)
    return tuple(summed)


def _varying_axes(*arrays) -> frozenset:
    """The manual mesh axes (inside ``shard_map``) any of ``arrays`` varies over; empty outside."""
    axes = set()
    for x in arrays:
        aval = jax.typeof(x)
        manual = getattr(aval, "manual_axis_type", None)  # JAX >= 0.10; earlier: ``vma``
        axes |= set(manual.varying if manual is not None else getattr(aval, "vma", ()))
    return frozenset(axes)


def _varying_like(results, axes: frozenset) -> tuple:
    """``results`` typed as varying over the mesh ``axes`` (those the callback's inputs vary
    over, :func:`_varying_axes`).

    Inside ``shard_map`` JAX types each value by the manual mesh axes it varies over, and a
    callback's results carry none: a custom VJP whose cotangents lack the primal inputs' axes is
    rejected. The callback computed per-shard values, so they vary wherever the inputs do."""
    axes = tuple(sorted(axes))
    if not axes:
        return tuple(results)
    pcast = getattr(jax.lax, "pcast", None)
    if pcast is not None:
        return tuple(pcast(x, axes, to="varying") for x in results)
    return tuple(jax.lax.pvary(x, axes) for x in results)


class _BufferViews:
    """Context manager: NumPy views of XLA's CPU buffers, or CuPy views of its GPU buffers with
    their device current and XLA's stream as CuPy's current stream (so cuparing's kernels run in
    XLA's order). Where the buffers live comes from the buffers themselves (DLPack device)."""

    _CPU = 1  # DLPack's kDLCPU

    def __init__(self, ctx, *buffers):
        self._ctx, self._buffers = ctx, buffers
        self._contexts = contextlib.ExitStack()

    def __enter__(self):
        kind, index = self._buffers[0].__dlpack_device__()
        if kind == self._CPU:
            return [np.asarray(x) for x in self._buffers]
        import cupy

        self._contexts.enter_context(cupy.cuda.Device(index))
        self._contexts.enter_context(external_cupy_stream(self._ctx.stream, index))
        return [_cupy_view_of_buffer(x, index) for x in self._buffers]

    def __exit__(self, *exc):
        return self._contexts.__exit__(*exc)


def _cupy_view_of_buffer(buffer, device: int):
    """A CuPy array over an XLA GPU buffer (its ``__cuda_array_interface__``), in the buffer's
    dtype (bfloat16 included, which the interface itself cannot name)."""
    interface = buffer.__cuda_array_interface__
    shape = tuple(interface["shape"])
    strides = interface.get("strides")
    if strides is None:  # C-contiguous
        strides = [int(np.prod(shape[i + 1 :])) for i in range(len(shape))]
    else:
        strides = [st // np.dtype(buffer.dtype).itemsize for st in strides]
    return cupy_view(interface["data"][0], shape, strides, buffer.dtype, buffer, device)
