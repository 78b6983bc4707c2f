"""Checks on user input, made once at the API boundary before any work or communication.

The checks of user input live here: arrays, shapes, dtypes, caller-owned outputs, mask options,
layouts, ranks and world sizes, sequence lengths, shard lists, and :func:`cuparing.simulate`'s
arguments. (Checks
that guard a module's own contract stay beside it: the comm layer's argument types, the CuPy
backend's position range.)
``ValueError`` for shapes, lengths, layouts and out-of-range values; ``TypeError`` for dtypes,
array types and arguments of the wrong kind. Messages name the argument, what was expected and
what arrived.

NumPy scalars are accepted wherever Python ones are: ``numpy.bool_`` for flags, ``numpy.integer``
for integers, NumPy floats for reals. ``bool`` is never taken for a number.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Mapping, Sequence
from numbers import Integral, Real
from typing import Any

import numpy as np

from . import documents
from .comm.agreement import CallFields
from .interop import (
    Origin,
    dtype_name,
    element_strides,
    framework_of,
    is_c_contiguous,
    may_overlap,
    origin_of,
    records_gradient,
    to_host,
)
from .layouts import LAYOUTS, plain_geometry, split_factor
from .masks import MaskSpec

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
GPU_DTYPES = ("float16", "bfloat16", "float32")


# ---- scalars


def check_flag(name: str, value: Any) -> bool:
    """``value`` as a Python bool: a ``bool`` or ``numpy.bool_``, nothing else (``1`` is refused:
    a flag passed as a number is more often a misplaced positional argument)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {value!r} ({type(value).__name__})")
    return bool(value)


def check_int(name: str, value: Any) -> int:
    """``value`` as a Python int: an ``int`` or ``numpy.integer``, not a bool."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    return int(value)


def check_positive_real(name: str, value: Any, expected: str = "a real number") -> float:
    """``value`` as a float: a real number (``int``, ``float`` or a NumPy scalar; not a bool or a
    string), finite and > 0. ``expected`` describes the accepted values in the TypeError."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, Real):
        raise TypeError(f"{name} must be {expected}, got {value!r} ({type(value).__name__})")
    number = float(value)
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {name}={value!r}")
    return number


def check_scale(scale: Any, headdim: int) -> float:
    """The softmax scale: ``1/sqrt(D)`` for ``None``, else a finite real number > 0."""
    if scale is None:
        return 1.0 / math.sqrt(headdim)
    return check_positive_real("scale", scale, "a float or None (a finite real number > 0)")


def check_mask(causal: Any, window: Any) -> MaskSpec:
    """A :class:`MaskSpec` from ``causal`` and ``window=(left, right)``; rejects windows that
    hide every key from every query."""
    causal = check_flag("causal", causal)
    if window is None:
        return MaskSpec(causal)
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise ValueError(f"window must be None or a pair (left, right), got {window!r}")
    left, right = window
    for side, value in (("left", left), ("right", right)):
        if value is not None and (
            isinstance(value, (bool, np.bool_)) or not isinstance(value, Integral)
        ):
            raise TypeError(
                f"window {side} must be an int or None, got {value!r} ({type(value).__name__})"
            )
    left, right = (None if x is None else int(x) for x in (left, right))
    spec = MaskSpec(causal, left, right)
    if -spec.left_bound > spec.right_bound:
        raise ValueError(
            f"window={tuple(window)} with causal={causal} hides every key from every query: "
            "need left + right >= 0 (and left >= 0 when causal)"
        )
    return spec


# ---- layouts, ranks, world sizes and lengths


def check_layout(layout: Any) -> str:
    """Return ``layout`` if it is one of :data:`cuparing.LAYOUTS`, else raise ``ValueError``."""
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not one of {LAYOUTS}")
    return layout


def check_world_size(world_size: Any, name: str = "world_size") -> int:
    """``world_size`` as an int >= 1."""
    if isinstance(world_size, (bool, np.bool_)) or not isinstance(world_size, Integral):
        raise TypeError(
            f"{name} must be an int >= 1, got {world_size!r} ({type(world_size).__name__})"
        )
    if world_size < 1:
        raise ValueError(f"{name} must be >= 1, got {world_size!r}")
    return int(world_size)


def check_rank(rank: Any, world_size: int, name: str = "rank") -> int:
    """``rank`` as an int in ``[0, world_size)``."""
    rank = check_int(name, rank)
    if not 0 <= rank < world_size:
        raise ValueError(f"{name} must be in [0, {world_size}), got {name}={rank}")
    return rank


def check_axis(axis: Any, ndim: int, name: str = "axis") -> int:
    """``axis`` of an ``ndim``-dimensional array as an int in ``[0, ndim)`` (negative counts from
    the end, as in NumPy)."""
    axis = check_int(name, axis)
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name}={axis} is out of range for an array of {ndim} dims")
    return axis % ndim


def _length_rule(layout: str, world_size: int) -> str:
    if plain_geometry(layout) == "zigzag":
        return f"{layout} cuts it into 2 * world_size = {2 * world_size} chunks"
    return f"{layout} gives each of the {world_size} ranks the same number of tokens"


def check_global_length(seqlen: int, layout: str, world_size: int) -> None:
    """``seqlen`` tokens must split evenly for ``layout`` on ``world_size`` ranks: a multiple of
    ``C``, ``2C`` for zigzag (and packed). ``layout`` and ``world_size`` are already checked."""
    factor = split_factor(layout, world_size)
    if seqlen % factor:
        lower = seqlen - seqlen % factor
        nearest = f"{lower} or {lower + factor}" if lower else f"{factor}"
        # no zero-padding advice: padded keys would enter every softmax; cu_seqlens=[0, S]
        # pads where no query or key sees it
        raise ValueError(
            f"sequence length {seqlen} must be a multiple of {factor} for layout={layout!r} with "
            f"world_size={world_size} ({_length_rule(layout, world_size)}); nearest valid "
            f"lengths: {nearest}. Zero-padding is not equivalent: padded keys would take part in "
            f"the attention. Any length works with cu_seqlens=[0, {seqlen}] given to shard, the "
            "ring calls and unshard"
        )


def check_ring_length(local_len: int, layout: str, world_size: int) -> None:
    """The global length ``local_len * world_size`` must split evenly for ``layout``."""
    factor = split_factor(layout, world_size)
    global_len = local_len * world_size
    if global_len % factor:
        raise ValueError(
            f"this rank holds {local_len} tokens, so the global length is {global_len}, which "
            f"layout={layout!r} with world_size={world_size} cannot split: it must be a multiple "
            f"of {factor} (local length a multiple of {factor // world_size}; "
            f"{_length_rule(layout, world_size)}); any global length works with cu_seqlens=[0, "
            "S] given to shard, the ring calls and unshard"
        )


def check_ring(ring: Any) -> None:
    """``ring`` must look like a :class:`cuparing.Ring` with a sane rank and size."""
    size = getattr(ring, "size", None)
    rank = getattr(ring, "rank", None)
    methods = (getattr(ring, name, None) for name in ("exchange", "agree"))
    if not all(callable(method) for method in methods) or size is None or rank is None:
        raise TypeError(f"ring must be a cuparing.Ring, got {type(ring).__name__}")
    size = check_world_size(size, "ring world size")
    check_rank(rank, size, "ring rank")


def check_positions_request(layout: Any, rank: Any, world_size: Any, local_len: Any):
    """Arguments of :func:`cuparing.global_positions`, returned as (layout, rank, world_size,
    local_len) with Python ints."""
    layout = check_layout(layout)
    world_size = check_world_size(world_size)
    rank = check_rank(rank, world_size)
    local_len = check_int("local_len", local_len)
    if local_len < 0:
        raise ValueError(f"local_len must be >= 0, got {local_len=}")
    if plain_geometry(layout) == "zigzag" and local_len % 2:
        raise ValueError(f"{layout} needs an even local length, got {local_len=}")
    return layout, rank, world_size, local_len


def check_shard_request(
    x: Any, rank: Any, world_size: Any, layout: Any, axis: Any, documents: bool = False
):
    """Arguments of :func:`cuparing.shard`, returned as (rank, world_size, layout, axis). With
    ``documents`` (cu_seqlens given) any length splits: shards are padded."""
    world_size = check_world_size(world_size)
    rank = check_rank(rank, world_size)
    layout = check_layout(layout)
    _check_array_type("x", x)
    axis = check_axis(axis, len(x.shape))
    if not documents:
        check_global_length(x.shape[axis], layout, world_size)
    return rank, world_size, layout, axis


def check_unshard_request(shards: Any, layout: Any, axis: Any, documents: bool = False):
    """Arguments of :func:`cuparing.unshard`, returned as (shards as a list, layout, axis). With
    ``documents`` (cu_seqlens given) the shard length is checked against them by the caller."""
    layout = check_layout(layout)
    try:
        shards = list(shards)
    except TypeError:
        raise TypeError(
            f"shards must be a list of arrays (shard r from rank r), got {type(shards).__name__}"
        ) from None
    if not shards:
        raise ValueError("unshard needs at least one shard, got an empty sequence")
    origins = [_check_array_type(f"shards[{r}]", s) for r, s in enumerate(shards)]
    for r, origin in enumerate(origins[1:], start=1):
        if origin.framework != origins[0].framework:
            raise TypeError(
                f"shards[{r}] is a {origin.framework} array but shards[0] a "
                f"{origins[0].framework} one; pass every shard from one framework"
            )
    shapes = {tuple(s.shape) for s in shards}
    if len(shapes) != 1:
        raise ValueError(f"all shards must have the same shape, got {sorted(shapes)}")
    axis = check_axis(axis, len(shards[0].shape))
    if plain_geometry(layout) == "zigzag" and not documents and shards[0].shape[axis] % 2:
        raise ValueError(
            f"{layout} shards hold two chunks each, so their length on axis {axis} must be even, "
            f"got {shards[0].shape[axis]}"
        )
    return shards, layout, axis


def check_simulate_args(world_size: Any, fn: Any, timeout: Any) -> tuple[int, float]:
    """Arguments of :func:`cuparing.simulate`, checked in the caller before any rank starts:
    ``world_size`` an int >= 1, ``fn`` callable, ``timeout`` a finite real number of seconds
    > 0. Returns (world_size, timeout) as an int and a float."""
    world_size = check_world_size(world_size)
    if not callable(fn):
        raise TypeError(f"fn must be callable as fn(ring), got {type(fn).__name__}")
    return world_size, check_positive_real("timeout", timeout)


# ---- arrays


def _check_array_type(name: str, x: Any) -> Origin:
    try:
        framework_of(x)
    except TypeError:
        raise TypeError(
            f"{name}: expected a NumPy, CuPy, PyTorch or JAX array, got "
            f"{type(x).__module__}.{type(x).__name__}"
        ) from None
    return origin_of(x)


def _check_4d(name: str, x: Any) -> None:
    if len(x.shape) != 4:
        raise ValueError(
            f"{name} must be [B, S, H, D] (4 dims: batch, seqlen, heads, headdim), "
            f"got shape {tuple(x.shape)}"
        )


def _check_no_empty_dims(name: str, x: Any) -> None:
    """S, H and D must be >= 1; an empty batch is a valid no-op."""
    heads = "Hkv" if name in ("k", "v") else "H"
    for letter, meaning, size in zip(
        ("S", heads, "D"), ("sequence length", "heads", "head dim"), x.shape[1:], strict=True
    ):
        if size < 1:
            raise ValueError(
                f"{name} has {letter}=0 ({meaning}) in shape {tuple(x.shape)} = [B, S, {heads}, D]"
                f": S, {heads} and D must be >= 1; only the batch B may be 0"
            )


def _check_last_axis_contiguous(name: str, x: Any) -> None:
    strides = element_strides(x)
    # an empty array has no memory to lay out (NumPy reports its strides as 0)
    if strides is not None and x.shape[-1] > 1 and strides[-1] != 1 and math.prod(x.shape):
        raise ValueError(
            f"{name} must have a contiguous last axis (headdim stride 1), got element strides "
            f"{strides} for shape {tuple(x.shape)}; pass a view whose last axis is headdim"
        )


def check_arrays(names: tuple[str, ...], arrays: tuple[Any, ...]) -> Origin:
    """All arrays of one framework and device, one supported float dtype, 4-D with no empty
    S/H/D and a contiguous last axis. Returns their common :class:`Origin`."""
    origins = [_check_array_type(name, x) for name, x in zip(names, arrays, strict=True)]
    first = origins[0]
    for name, origin in zip(names[1:], origins[1:], strict=True):
        if origin != first:
            raise TypeError(
                f"{name} lives on {origin.describe()} but {names[0]} on {first.describe()}; "
                "pass all arrays from one framework and device"
            )
    dtypes = [dtype_name(x) for x in arrays]
    allowed = GPU_DTYPES if first.gpu else FLOAT_DTYPES
    for name, dtype in zip(names, dtypes, strict=True):
        if dtype not in allowed:
            where = "on the GPU" if first.gpu else "on the CPU"
            raise TypeError(f"{name} must have a dtype in {allowed} {where}, got {dtype}")
    if len(set(dtypes)) != 1:
        listing = ", ".join(f"{n}={d}" for n, d in zip(names, dtypes, strict=True))
        raise TypeError(f"all inputs must share one dtype, got {listing}")
    for name, x in zip(names, arrays, strict=True):
        _check_4d(name, x)
        _check_no_empty_dims(name, x)
        _check_last_axis_contiguous(name, x)
    return first


def check_untracked(entry: str, names: tuple[str, ...], arrays: tuple[Any, ...]) -> None:
    """Refuse PyTorch tensors that autograd is tracking: ``entry`` computes outside torch, so its
    result would silently be cut from the graph. Fine under ``torch.no_grad()`` or detached."""
    for name, x in zip(names, arrays, strict=True):
        if records_gradient(x):
            raise TypeError(
                f"{name} requires grad, but cuparing.{entry} is not differentiable: its result "
                "would be cut from the autograd graph. For gradients use "
                "cuparing.ring_attention_torch (on one device, inside cuparing.simulate(1, fn)), "
                "or call under torch.no_grad() / pass detached tensors"
            )


def check_destination(
    name: str,
    dest: Any,
    origin: Origin,
    shape: tuple,
    dtype: str,
    inputs: Sequence[tuple[str, Any]],
    whole_contiguous: bool = False,
) -> None:
    """A caller-owned output ``dest`` (``out=``, ``lse=``, ``dq=`` ...), if given, can take the
    result: the inputs' framework and device, ``shape`` and ``dtype``, a contiguous last axis (or
    all of it C-contiguous if ``whole_contiguous``), not tracked by autograd, sharing no memory
    with any of ``inputs`` (name, array). Raised before any work or communication."""
    if dest is None:
        return
    where = _check_array_type(name, dest)
    if where.framework == "jax":
        raise TypeError(
            f"{name}: JAX arrays are immutable, so cuparing cannot write into one; leave {name} "
            "out and use the returned array"
        )
    if where != origin:
        raise TypeError(
            f"{name} lives on {where.describe()} but the inputs on {origin.describe()}; pass "
            f"{name} from the same framework and device"
        )
    if dtype_name(dest) != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {dtype_name(dest)}")
    if tuple(dest.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(dest.shape)}")
    if whole_contiguous and not is_c_contiguous(dest):
        raise ValueError(
            f"{name} must be C-contiguous, got element strides {element_strides(dest)} for "
            f"shape {tuple(dest.shape)}"
        )
    _check_last_axis_contiguous(name, dest)
    strides = element_strides(dest)
    overlapping = strides and any(
        s == 0 and n > 1 for s, n in zip(strides, dest.shape, strict=True)
    )
    if overlapping and math.prod(dest.shape):  # (an empty array has no elements to collide)
        raise ValueError(
            f"{name} has a stride of 0 (element strides {strides} for shape "
            f"{tuple(dest.shape)}): several results would land on one element; pass an array "
            "with memory of its own (not a broadcast or expanded view)"
        )
    if not getattr(getattr(dest, "flags", None), "writeable", True):
        raise ValueError(f"{name} is read-only; pass a writable array")
    if records_gradient(dest):
        raise TypeError(
            f"{name} requires grad: cuparing writes it in place, outside autograd; pass a tensor "
            "that does not require grad"
        )
    for other_name, other in inputs:
        if other is not None and may_overlap(dest, other):
            raise ValueError(
                f"{name} shares memory with {other_name}; the result must go to memory no input "
                "is read from"
            )


def lse_dtype(q: Any) -> str:
    """The dtype name of the lse for inputs like ``q``: float64 for float64, else float32."""
    return "float64" if dtype_name(q) == "float64" else "float32"


def check_forward_destinations(origin: Origin, q: Any, k: Any, v: Any, out: Any, lse: Any):
    """``out=`` (q's shape and dtype, contiguous last axis) and ``lse=`` ([B, H, Sq] float32,
    float64 for float64 inputs, C-contiguous) of a forward call, where given."""
    b, s, h, _ = q.shape
    dtype = dtype_name(q)
    inputs = (("q", q), ("k", k), ("v", v))
    check_destination("out", out, origin, q.shape, dtype, inputs)
    check_destination(
        "lse", lse, origin, (b, h, s), lse_dtype(q), (*inputs, ("out", out)), whole_contiguous=True
    )


def check_gradient_destinations(origin: Origin, inputs: Sequence[tuple[str, Any]], grads):
    """``dq=``, ``dk=``, ``dv=`` of a backward call, where given: each the shape and dtype of q,
    k, v, a contiguous last axis, and no memory shared with the inputs or with each other."""
    named = dict(inputs)
    written: list[tuple[str, Any]] = []
    for (name, dest), like in zip(grads, ("q", "k", "v"), strict=True):
        x = named[like]
        check_destination(name, dest, origin, x.shape, dtype_name(x), (*inputs, *written))
        written.append((name, dest))


def check_backward_extras(origin: Origin, arrays: tuple, dests: tuple, dlse: Any) -> None:
    """The optional arguments of a backward call: caller-owned gradients ``dests`` = (dq, dk,
    dv) and ``dlse``, for ``arrays`` = (dout, q, k, v, out, lse)."""
    inputs = tuple(zip(("dout", "q", "k", "v", "out", "lse"), arrays, strict=True))
    check_gradient_destinations(origin, inputs, tuple(zip(("dq", "dk", "dv"), dests, strict=True)))
    check_lse_gradient(origin, dlse, arrays[1])


def check_lse_gradient(origin: Origin, dlse: Any, q: Any) -> None:
    """``dlse=`` of a backward call, where given: [B, H, Sq] in the lse dtype (float32, float64
    for float64 inputs), the inputs' framework and device (any strides: it is only read)."""
    if dlse is None:
        return
    where = _check_array_type("dlse", dlse)
    if where != origin:
        raise TypeError(
            f"dlse lives on {where.describe()} but the inputs on {origin.describe()}; pass dlse "
            "from the same framework and device"
        )
    want = lse_dtype(q)
    if dtype_name(dlse) != want:
        raise TypeError(f"dlse must have dtype {want}, got {dtype_name(dlse)}")
    b, s, h, _ = q.shape
    if tuple(dlse.shape) != (b, h, s):
        raise ValueError(f"dlse must have shape {(b, h, s)} = [B, H, Sq], got {tuple(dlse.shape)}")


def check_qkv(q: Any, k: Any, v: Any, same_length: bool) -> None:
    """Shapes of q [B, Sq, H, D] and k, v [B, Sk, Hkv, D] agree (Sq == Sk if ``same_length``)."""
    bq, sq, h, d = q.shape
    if tuple(k.shape) != tuple(v.shape):
        raise ValueError(
            f"k and v must have the same shape, got k {tuple(k.shape)} v {tuple(v.shape)}"
        )
    bk, sk, hkv, dk = k.shape
    if bk != bq:
        raise ValueError(f"batch size differs: q has B={bq}, k and v have B={bk}")
    if dk != d:
        raise ValueError(f"head dim differs: q has D={d}, k and v have D={dk}")
    if h % hkv:
        raise ValueError(
            f"query heads H={h} must be a multiple of key/value heads Hkv={hkv} (GQA/MQA)"
        )
    if same_length and sq != sk:
        raise ValueError(
            f"q and k must hold the same tokens on each rank: q has S={sq}, k and v have S={sk}"
        )


def check_cu_seqlens(cu_seqlens: Any, seqlen: int | None = None) -> tuple[int, ...]:
    """Document boundaries ``[0, e_1, ..., S]`` of a packed sequence: a 1-D integer array of any
    framework or a list, starting at 0, non-decreasing, ending at ``seqlen`` when given.
    Returns them as a tuple of Python ints (hashable: plans are cached by it)."""
    if isinstance(cu_seqlens, (list, tuple)):
        return check_boundaries(cu_seqlens, seqlen)
    try:
        framework_of(cu_seqlens)
    except TypeError:
        raise TypeError(
            f"cu_seqlens must be a 1-D integer array or a list of ints, got "
            f"{type(cu_seqlens).__name__}"
        ) from None
    values = np.asarray(to_host(cu_seqlens))
    if values.ndim != 1:
        raise ValueError(f"cu_seqlens must be 1-D [0, ..., S], got shape {values.shape}")
    if values.dtype.kind not in "iu":
        raise TypeError(f"cu_seqlens must hold integers, got dtype {values.dtype}")
    return check_boundaries(values.tolist(), seqlen)


def check_boundaries(values: Sequence[Any], seqlen: int | None = None) -> tuple[int, ...]:
    """:func:`check_cu_seqlens` on a list or tuple of Python (or NumPy) integers, in plain Python
    (so ``torch.compile`` can trace it for a constant list)."""
    if len(values) < 2:
        raise ValueError(f"cu_seqlens needs at least 2 entries [0, ..., S], got {list(values)}")
    for value in values:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, Integral):
            raise TypeError(
                f"cu_seqlens must hold integers, got {value!r} ({type(value).__name__})"
            )
    bounds = tuple(int(x) for x in values)
    if bounds[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {bounds[0]}")
    for at in range(len(bounds) - 1):
        if bounds[at + 1] < bounds[at]:
            raise ValueError(
                f"cu_seqlens must be non-decreasing, got {bounds[at]} then {bounds[at + 1]} at "
                f"index {at}"
            )
    if seqlen is not None and bounds[-1] != seqlen:
        raise ValueError(f"cu_seqlens must end at the sequence length {seqlen}, got {bounds[-1]}")
    if bounds[-1] < 1:
        raise ValueError("cu_seqlens describes an empty sequence (it must end at S >= 1)")
    return bounds


def check_ring_call(
    q, k, v, ring, causal, scale, window, layout, cu_seqlens=None
) -> tuple[Origin, MaskSpec, float, tuple | None]:
    """Everything a ring call checks before its first transfer, in one place: the arrays, the
    ring, the layout (once) and the length it must split (or, with ``cu_seqlens``, the padded
    shard length the documents give), the mask and the scale.

    Returns (origin of the arrays, mask, scale as a float, checked cu_seqlens or None).
    """
    origin = check_arrays(("q", "k", "v"), (q, k, v))
    check_qkv(q, k, v, same_length=True)
    check_ring(ring)
    layout = check_layout(layout)
    cu = None
    if cu_seqlens is None:
        check_ring_length(q.shape[1], layout, int(ring.size))
    else:
        cu = check_cu_seqlens(cu_seqlens)
        want = documents.shard_length(layout, int(ring.size), np.asarray(cu))
        if q.shape[1] != want:
            raise ValueError(
                f"with these cu_seqlens (S={cu[-1]}) a {layout} shard on {ring.size} ranks holds "
                f"{want} rows (padding included; cuparing.shard(..., cu_seqlens=...) makes them), "
                f"got {q.shape[1]}"
            )
    mask = check_mask(causal, window)
    return origin, mask, check_scale(scale, q.shape[-1]), cu


def ring_call_fields(
    entry: str, q: Any, k: Any, ring: Any, mask: MaskSpec, scale: float, layout: str,
    cu_seqlens: tuple | None = None, gather: bool = False,
) -> Mapping[str, str]:  # fmt: skip
    """What every rank's ring call must have alike, for :meth:`cuparing.Ring.agree`.

    A rank that passes another layout, mask, scale, dtype or local shape than its peers would
    otherwise get a wrong answer silently (or a timeout): each of these is a field, so a mismatch
    is named on every rank before the first transfer. Arguments are the checked ones of
    :func:`check_ring_call`; ``entry`` names the public function (a forward on one rank against
    a backward on another is a mismatch too); ``gather``: the call asks to gather K/V
    (``schedule.gather_decided``, once per call by the caller, which plans with the same answer).
    Returns names to ``str`` values, frozen (a kept plan passes the same object on every repeat,
    which ``agree`` then need not read again).
    """
    return CallFields({
        "call": entry,
        "q_shape": str(tuple(q.shape)),
        "kv_shape": str(tuple(k.shape)),
        "heads_kv": str(k.shape[2]),
        "dtype": dtype_name(q),
        "layout": layout,
        "causal": str(mask.causal),
        "window": str((mask.left, mask.right)),
        "scale": repr(scale),
        "world_size": str(int(ring.size)),
        "global_seqlen": str(q.shape[1] * int(ring.size) if cu_seqlens is None else cu_seqlens[-1]),
        # the documents, as a digest: long boundary lists stay out of error messages
        "cu_seqlens": "none" if cu_seqlens is None else _boundaries_digest(cu_seqlens),
        # whether the call gathers K/V (decided once per call) decides its exchanges
        "kv_gather": str(bool(gather)),
    })


@functools.lru_cache(maxsize=32)
def _boundaries_digest(cu_seqlens: tuple) -> str:
    # cached: a training loop passes the same boundaries call after call, and they may be long
    return hashlib.sha1(np.asarray(cu_seqlens, dtype=np.int64).tobytes()).hexdigest()[:16]


def check_backward(dout: Any, out: Any, lse: Any, q: Any) -> None:
    """dout and out have q's shape; lse is [B, H, Sq] float32 (float64 for float64 inputs)."""
    for name, x in (("dout", dout), ("out", out)):
        if tuple(x.shape) != tuple(q.shape):
            raise ValueError(f"{name} must have q's shape {tuple(q.shape)}, got {tuple(x.shape)}")
    lse_origin, q_origin = _check_array_type("lse", lse), origin_of(q)
    b, s, h, _ = q.shape
    if tuple(lse.shape) != (b, h, s):
        raise ValueError(f"lse must be [B, H, S] = {(b, h, s)}, got {tuple(lse.shape)}")
    want = lse_dtype(q)
    if dtype_name(lse) != want:
        raise TypeError(f"lse must be {want} for {dtype_name(q)} inputs, got {dtype_name(lse)}")
    if lse_origin != q_origin:
        raise TypeError(
            f"lse must live in the same framework and device as q: lse is {lse_origin.describe()},"
            f" q is {q_origin.describe()}"
        )
