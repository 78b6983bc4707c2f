"""Checks on user input, made once at the API boundary before any work or communication.

``ValueError`` for shapes, lengths, layouts and windows; ``TypeError`` for dtypes and array
types; messages name the argument, what was expected and what arrived.
"""

from __future__ import annotations

import math
from numbers import Integral
from typing import Any

from .interop import Origin, origin_of
from .layouts import check_layout, split_factor
from .masks import MaskSpec

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
GPU_DTYPES = ("float16", "bfloat16", "float32")


def dtype_name(x: Any) -> str:
    """The dtype's short name ('bfloat16', 'float32', ...) for any supported array type."""
    return str(x.dtype).rsplit(".", 1)[-1]


def _check_4d(name: str, x: Any) -> None:
    if len(x.shape) != 4:
        raise ValueError(
            f"{name} must be [B, S, H, D] (4 dims: batch, seqlen, heads, headdim), "
            f"got shape {tuple(x.shape)}"
        )


def _check_last_axis_contiguous(name: str, x: Any) -> None:
    strides = _element_strides(x)
    if strides is not None and x.shape[-1] > 1 and strides[-1] != 1:
        raise ValueError(
            f"{name} must have a contiguous last axis (headdim stride 1), got element strides "
            f"{strides} for shape {tuple(x.shape)}; pass a view whose last axis is headdim"
        )


def _element_strides(x: Any):
    if hasattr(x, "stride") and callable(x.stride):  # torch
        return tuple(x.stride())
    strides = getattr(x, "strides", None)
    itemsize = getattr(getattr(x, "dtype", None), "itemsize", None)
    if strides is None or not itemsize:
        return None
    return tuple(s // itemsize for s in strides)


def check_arrays(names: tuple[str, ...], arrays: tuple[Any, ...]) -> Origin:
    """All arrays of one framework and device, one supported float dtype, 4-D with a contiguous
    last axis. Returns their common :class:`Origin`."""
    origins = [origin_of(x) for x in arrays]
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
        _check_last_axis_contiguous(name, x)
    return first


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
    if sq < 1 or sk < 1:
        raise ValueError(f"sequence length must be >= 1, got q S={sq}, k and v S={sk}")
    if d < 1 or h < 1 or hkv < 1:
        raise ValueError(
            f"heads and head dim must be >= 1, got q {tuple(q.shape)} k {tuple(k.shape)}"
        )
    if h % hkv:
        raise ValueError(
            f"query heads H={h} must be a multiple of key/value heads Hkv={hkv} (GQA/MQA)"
        )
    if same_length and sq != sk:
        raise ValueError(
            f"q and k must hold the same tokens on each rank: q has S={sq}, k and v have S={sk}"
        )


def check_scale(scale: float | None, headdim: int) -> float:
    """The softmax scale: ``1/sqrt(D)`` by default; must be finite and > 0."""
    if scale is None:
        return 1.0 / math.sqrt(headdim)
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"scale must be finite and > 0, got {scale=}")
    return value


def check_mask(causal: bool, window: Any) -> MaskSpec:
    """A :class:`MaskSpec` from ``causal`` and ``window=(left, right)``; rejects windows that
    hide every key from every query."""
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if window is None:
        return MaskSpec(causal)
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise ValueError(f"window must be None or a pair (left, right), got {window!r}")
    left, right = window
    for side, value in (("left", left), ("right", right)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, Integral)):
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


def check_ring_length(local_len: int, layout: str, world_size: int) -> None:
    """The global length ``local_len * world_size`` must split evenly for ``layout``."""
    check_layout(layout)
    factor = split_factor(layout, world_size)
    global_len = local_len * world_size
    if global_len % factor:
        raise ValueError(
            f"this rank holds {local_len} tokens, so the global length is {global_len}, which "
            f"layout={layout!r} with world_size={world_size} cannot split: it must be a multiple "
            f"of {factor} (local length a multiple of {factor // world_size})"
        )


def check_ring(ring: Any) -> None:
    """``ring`` must look like a :class:`cuparing.Ring` with a sane rank and size."""
    size = getattr(ring, "size", None)
    rank = getattr(ring, "rank", None)
    if not callable(getattr(ring, "exchange", None)) or size is None or rank is None:
        raise TypeError(f"ring must be a cuparing.Ring, got {type(ring).__name__}")
    if size < 1:
        raise ValueError(f"ring world size must be >= 1, got {size}")
    if not 0 <= rank < size:
        raise ValueError(f"ring rank must be in [0, {size}), got {rank}")


def check_backward(dout: Any, out: Any, lse: Any, q: Any) -> None:
    """dout and out have q's shape; lse is [B, H, Sq] float32 (float64 for float64 inputs)."""
    for name, x in (("dout", dout), ("out", out)):
        if tuple(x.shape) != tuple(q.shape):
            raise ValueError(f"{name} must have q's shape {tuple(q.shape)}, got {tuple(x.shape)}")
    b, s, h, _ = q.shape
    if tuple(lse.shape) != (b, h, s):
        raise ValueError(f"lse must be [B, H, S] = {(b, h, s)}, got {tuple(lse.shape)}")
    want = "float64" if dtype_name(q) == "float64" else "float32"
    if dtype_name(lse) != want:
        raise TypeError(f"lse must be {want} for {dtype_name(q)} inputs, got {dtype_name(lse)}")
    lse_origin, q_origin = origin_of(lse), origin_of(q)
    if lse_origin != q_origin:
        raise TypeError(
            f"lse must live in the same framework and device as q: lse is {lse_origin.describe()},"
            f" q is {q_origin.describe()}"
        )
