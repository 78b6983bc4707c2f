"""A gathered ring call's rows moved by one kernel launch: K/V into position order, dK / dV back.

A gathered ring call (:func:`cuparing.schedule.gathered_forward`) holds the K/V shards the ring
delivered from every other rank at once and runs one block over all of them in ascending order
of global position (:class:`cuparing.schedule.GatheredKeys`). The order mixes rows of every
shard (zigzag and packed layouts cut each document into pieces on every rank), so the rows are
moved by ``cuparing_gather_rows`` (``kernels/common/gather_rows.cuh``): one launch for K and V
of every shard, reading each in place with its own strides, from a device map of (shard, row)
per gathered row. The gathered backward runs the same kernel the other way (one part: its
float32 dK / dV; one launch per shard, whose rows go back to the rank that owns it). The launch
is a :class:`PackedLaunch`, so a planned repeat patches only the addresses.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import Any

from ..kernels import loader
from . import launch_plans

_FIELDS = {name: (offset, count, code) for name, offset, count, code in loader.GATHER_ROWS_LAYOUT}


def launchable(x: Any) -> bool:
    """Whether ``cuparing_gather_rows`` moves arrays like ``x`` [B, n, Hkv, D]: elements of 2 or
    4 bytes, heads of whole 16-byte words, a batch within the grid's y extent."""
    return (
        x.dtype.itemsize in (2, 4)
        and (x.shape[-1] * x.dtype.itemsize) % 16 == 0
        and 1 <= x.shape[0] <= 65535
    )


def gather_launch(k_dst: Any, v_dst: Any, parts: Sequence[tuple[Any, Any]], sources: Any,
                  kernel: Any = None, driver: Any = None) -> launch_plans.PackedLaunch:  # fmt: skip
    """The launch putting ``parts``' rows into ``k_dst`` / ``v_dst`` by ``sources``.

    Args:
        k_dst, v_dst: CuPy arrays [B, L, Hkv, D] of a 16-bit or 32-bit dtype, C-contiguous,
            16-byte aligned: the destination (their addresses are the plan's; a launch takes
            any).
        parts: at most ``loader.GATHER_MAX_PARTS`` (k, v) pairs of CuPy arrays [B, n_t, Hkv,
            D] of the destination's dtype (the shards received at steps 1 .. last_step, or the
            gathered dK / dV), each readable in place by the kernel (the caller's check:
            16-byte aligned base and strides, contiguous last axis); a launch may take other
            addresses of arrays with these strides.
        sources: int32 CuPy array [L, 2] contiguous: (part, row within it) of every gathered row,
            every part row named once.
        kernel, driver: the kernel (default ``loader.get_gather_rows_kernel()``) and what
            launches it (default :class:`~cuparing.backends.launch_plans.PackedLaunch`'s).

    Returns:
        The launch; its pointers, in order: k_dst, v_dst, k of every part, v of every part,
        sources.

    Raises:
        ValueError: more parts than the kernel holds, shapes or dtypes that disagree, a batch
            past the grid's y extent, or a head dim whose rows are not whole 16-byte words.
    """
    parts = [tuple(pair) for pair in parts]
    n = len(parts)
    if not 1 <= n <= loader.GATHER_MAX_PARTS:
        raise ValueError(f"a gathered launch takes 1..{loader.GATHER_MAX_PARTS} shards, got {n}")
    batch, length, heads, headdim = k_dst.shape
    if v_dst.shape != k_dst.shape or tuple(sources.shape) != (length, 2) or (
        sources.dtype.name != "int32"
    ):  # fmt: skip
        raise ValueError(
            f"gathered K / V and their sources must be [B, L, Hkv, D], [B, L, Hkv, D] and int32 "
            f"[L, 2]; got {k_dst.shape}, {v_dst.shape}, {sources.dtype} {sources.shape}"
        )
    if (headdim * k_dst.dtype.itemsize) % 16 or k_dst.dtype.itemsize not in (2, 4):
        raise ValueError(f"heads of whole 16-byte words of a 16- or 32-bit dtype, got D={headdim}"
                         f" of {k_dst.dtype}")  # fmt: skip
    if not 1 <= batch <= 65535:  # (the grid's y extent)
        raise ValueError(f"a gathered launch takes 1..65535 batch rows, got {batch}")
    for x in (k_dst, v_dst):
        if not x.flags.c_contiguous or x.data.ptr % 16:
            raise ValueError("the gathered K / V must be C-contiguous and 16-byte aligned")
    for t, (k, v) in enumerate(parts):
        for name, x in (("k", k), ("v", v)):
            if x.shape[0] != batch or tuple(x.shape[2:]) != (heads, headdim) or (
                x.dtype != k_dst.dtype
            ):  # fmt: skip
                raise ValueError(
                    f"part {t}'s {name} must be [{batch}, n, {heads}, {headdim}] of "
                    f"{k_dst.dtype}, got {x.shape} of {x.dtype}"
                )
    params = bytearray(loader.GATHER_ROWS_SIZE)
    _put(params, "k_dst", [k_dst.data.ptr])
    _put(params, "v_dst", [v_dst.data.ptr])
    _put(params, "k_src", [k.data.ptr for k, _ in parts])
    _put(params, "v_src", [v.data.ptr for _, v in parts])
    _put(params, "sources", [sources.data.ptr])
    _put(params, "k_strides", [s for k, _ in parts for s in k.strides[:3]])
    _put(params, "v_strides", [s for _, v in parts for s in v.strides[:3]])
    _put(params, "ints", [batch, length, heads, headdim * k_dst.dtype.itemsize // 16])
    pointer = lambda name, i=0: _FIELDS[name][0] + 8 * i  # noqa: E731
    offsets = (
        pointer("k_dst"), pointer("v_dst"),
        *(pointer("k_src", t) for t in range(n)), *(pointer("v_src", t) for t in range(n)),
        pointer("sources"),
    )  # fmt: skip
    grid = (math.ceil(length / loader.GATHER_ROWS_PER_CTA), batch)
    kernel = kernel if kernel is not None else loader.get_gather_rows_kernel()
    return launch_plans.PackedLaunch(
        (kernel,), grid, (loader.GATHER_ROWS_THREADS,), 0, bytes(params), offsets, driver=driver
    )


def _put(params: bytearray, name: str, values: Sequence[int]) -> None:
    """Write ``values`` into field ``name`` (the rest of an array field stays zero)."""
    offset, count, code = _FIELDS[name]
    if len(values) > count:
        raise ValueError(f"{name} holds {count} values, got {len(values)}")
    struct.pack_into(f"<{len(values)}{code}", params, offset, *values)

