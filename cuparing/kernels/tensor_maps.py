"""Tensor maps (the copy engine's TMA descriptors) for the sm90 kernels.

A tensor map describes one operand ``[B, S, H, D]`` (fp16/bf16, any element strides with a
contiguous last axis) to the Hopper tensor-memory accelerator: the kernel then loads a
``(rows, 64)`` box of one (batch, head) with a single instruction, 128-byte swizzled exactly as
its wgmma descriptors expect, rows past ``S`` and columns past ``D`` filled with zeros.

Maps are encoded on the host with ``cuTensorMapEncodeTiled`` from NVIDIA's ``cuda-bindings``
(installed with the ``cuda12``/``cuda13`` extras); without it, or for an operand the copy engine
cannot address (a base not 16-byte aligned, a stride that is not a multiple of 16 bytes), the
kernels fall back to copying with ``cp.async`` (``CUPARING_TMA=0`` forces that, for comparison).
Encoded maps are cached by everything that decides
them (pointer, shape, strides, dtype, box), so a ring's two rotating K/V buffers and a training
loop's recurring allocations encode once.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections import OrderedDict

import numpy as np

MAP_BYTES = 128  # sizeof(CUtensorMap)
BOX_COLUMNS = 64  # 128 bytes of fp16/bf16: the width of a 128-byte swizzle atom
_CACHE_MAX = 256

_cache: OrderedDict[tuple, bytes] = OrderedDict()
_lock = threading.Lock()
_driver = None


def _load_driver():
    """``cuda.bindings.driver``, or None when cuda-bindings is not installed."""
    global _driver
    if _driver is None:
        try:
            from cuda.bindings import driver
        except ImportError:
            _driver = False
        else:
            _driver = driver
    return _driver or None


def available() -> bool:
    """Whether tensor maps are used here: cuda-bindings importable and ``CUPARING_TMA`` not 0."""
    return os.environ.get("CUPARING_TMA", "1").strip() != "0" and _load_driver() is not None


def addressable(ptr: int, shape, strides) -> bool:
    """Whether the copy engine can address a ``[B, S, H, D]`` operand at ``ptr`` with element
    ``strides`` (batch, seq, head) of 2-byte elements: a 16-byte aligned base and strides that
    are multiples of 16 bytes (dims of extent 1 excepted)."""
    if ptr % 16:
        return False
    return all(n == 1 or (s * 2) % 16 == 0 for s, n in zip(strides, shape[:3], strict=True))


def encode(ptr: int, shape, strides, dtype: str, box_rows: int) -> bytes | None:
    """The 128-byte tensor map of a ``[B, S, H, D]`` operand, or None when it cannot be made.

    Args:
        ptr: device address of element [0, 0, 0, 0].
        shape: (B, S, H, D); strides: (batch, seq, head) element strides; the last axis is
            contiguous.
        dtype: 'float16' or 'bfloat16'.
        box_rows: rows (sequence positions) per load; the box is (box_rows, 64 columns).

    Returns:
        The map's bytes (dims innermost first: D, S, H, B), or None when not :func:`available`
        or for an operand :func:`addressable` rejects.

    Raises:
        RuntimeError: the driver refused a map for an addressable operand.
    """
    if not available() or not addressable(ptr, shape, strides):
        return None
    driver = _load_driver()
    b, s, h, d = (int(x) for x in shape)
    # a dim of extent 1 is never stepped along: any multiple of 16 bytes serves as its stride
    byte_strides = [int(st) * 2 if n > 1 else 16 for st, n in zip(strides, (b, s, h), strict=True)]
    key = (ptr, b, s, h, d, *byte_strides, dtype, box_rows)
    with _lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
            return hit
    kinds = driver.CUtensorMapDataType
    data_type = (
        kinds.CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
        if dtype == "bfloat16"
        else kinds.CU_TENSOR_MAP_DATA_TYPE_FLOAT16
    )
    u64, u32 = driver.cuuint64_t, driver.cuuint32_t
    seq_stride, head_stride, batch_stride = byte_strides[1], byte_strides[2], byte_strides[0]
    err, tmap = driver.cuTensorMapEncodeTiled(
        data_type,
        4,
        ptr,
        [u64(d), u64(s), u64(h), u64(b)],
        [u64(seq_stride), u64(head_stride), u64(batch_stride)],
        [u32(BOX_COLUMNS), u32(box_rows), u32(1), u32(1)],
        [u32(1)] * 4,
        driver.CUtensorMapInterleave.CU_TENSOR_MAP_INTERLEAVE_NONE,
        driver.CUtensorMapSwizzle.CU_TENSOR_MAP_SWIZZLE_128B,
        driver.CUtensorMapL2promotion.CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
        driver.CUtensorMapFloatOOBfill.CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,  # zeros
    )
    if int(err) != 0:
        raise RuntimeError(
            f"cuTensorMapEncodeTiled failed ({err}) for shape {tuple(shape)}, element strides "
            f"{tuple(strides)}, {dtype}, box ({box_rows}, {BOX_COLUMNS})"
        )
    blob = ctypes.string_at(int(tmap.getPtr()), MAP_BYTES)
    with _lock:
        _cache[key] = blob
        if len(_cache) > _CACHE_MAX:
            _cache.popitem(last=False)
    return blob


# The kernel's Sm90Maps argument: Q, K, V maps, each a 64-byte aligned 128-byte CUtensorMap.
MAPS_DTYPE = np.dtype(
    {"names": ["q", "k", "v"], "formats": [(np.uint8, MAP_BYTES)] * 3, "itemsize": 3 * MAP_BYTES}
)


def pack_maps(q: bytes | None = None, k: bytes | None = None, v: bytes | None = None):
    """A one-element ``MAPS_DTYPE`` array holding the three maps (zeros where None: the
    cp.async instantiation never reads them)."""
    maps = np.zeros(1, dtype=MAPS_DTYPE)
    for name, blob in (("q", q), ("k", k), ("v", v)):
        if blob is not None:
            maps[name][0] = np.frombuffer(blob, dtype=np.uint8)
    return maps
