"""Compile and cache cuparing's CUDA kernels with CuPy's RawModule (NVRTC) at run time.

The sources in this folder are header-free CUDA C++ (inline PTX, fp16/bf16 as 16-bit patterns), so
NVRTC needs nothing but libnvrtc. :func:`kernel_source` inlines our own ``#include "x.cuh"`` lines
into one string, because CuPy's on-disk kernel cache hashes the source text: an edited header must
change the hash. The per-head-dim tile table :data:`FWD_CONFIGS` is the single source of truth for
both sides: it is emitted as the ``CUPARING_FWD_CONFIGS`` X-macro that ``traits.cuh`` expands, with
the shared-memory size computed here and re-checked there by ``static_assert``. The backward
kernel's table :data:`BWD_CONFIGS` works the same way (``CUPARING_BWD_CONFIGS``, bwd.cuh).

This module imports CuPy only inside the functions that launch or fetch kernels; the table, the
source builder and the params layout are pure Python (the compile check and CPU tests use them).
"""

from __future__ import annotations

import functools
import os
import re
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import wgmma

KERNEL_DIR = Path(__file__).resolve().parent
# Kernel families: shared pieces in common/, one entry file per family. sm80 (mma.sync, cp.async)
# runs on every GPU from sm_80 on; sm90 (wgmma) needs the sm_90a target, i.e. a Hopper GPU.
FAMILIES = ("sm80", "sm90")
ENTRY_FILES = {"sm80": "sm80/entry.cu", "sm90": "sm90/entry.cu"}

# Options for every compile. C++17 for `if constexpr`; nothing else is needed (no include paths).
BASE_OPTIONS = ("-std=c++17",)
# wgmma and setmaxnreg exist only for the architecture-specific target sm_90a.
SM90_OPTIONS = (*BASE_OPTIONS, "-arch=sm_90a")


@dataclass(frozen=True)
class FwdConfig:
    """Tile configuration of the forward kernel for one (padded) head dim.

    Attributes:
        block_m: query rows per CTA; block_n: keys per pipeline stage.
        warps: warps per CTA (they split the query rows, 16 * m-fragments each).
        stages: K/V tiles in flight (cp.async pipeline depth).
        q_in_regs: keep Q's A fragments in registers (else re-read from shared memory each tile).
        min_blocks: ``__launch_bounds__`` minimum CTAs per SM (caps registers at 64K/(threads*min)).
    """

    block_m: int
    block_n: int
    warps: int
    stages: int
    q_in_regs: bool
    min_blocks: int

    @property
    def threads(self) -> int:
        return 32 * self.warps


# Chosen so no instantiation spills (tools/compile_check.py proves it for sm_80 and sm_90a) and
# all fit the 163 KB per-CTA shared memory of sm_80 as well as sm_90's 227 KB.
# d <= 128: 4 warps x 32 rows (2 m16 fragments) so every K/V ldmatrix feeds 4 MMAs;
# d >= 160: 8 warps x 16 rows, since 2 fragments of a wide O accumulator would not fit registers.
FWD_CONFIGS: dict[int, FwdConfig] = {
    32: FwdConfig(block_m=128, block_n=128, warps=4, stages=2, q_in_regs=True, min_blocks=2),
    64: FwdConfig(block_m=128, block_n=64, warps=4, stages=3, q_in_regs=True, min_blocks=2),
    96: FwdConfig(block_m=128, block_n=64, warps=4, stages=2, q_in_regs=False, min_blocks=2),
    128: FwdConfig(block_m=128, block_n=32, warps=4, stages=3, q_in_regs=False, min_blocks=2),
    160: FwdConfig(block_m=128, block_n=64, warps=8, stages=2, q_in_regs=True, min_blocks=1),
    192: FwdConfig(block_m=128, block_n=64, warps=8, stages=2, q_in_regs=True, min_blocks=1),
    224: FwdConfig(block_m=128, block_n=32, warps=8, stages=2, q_in_regs=False, min_blocks=1),
    256: FwdConfig(block_m=128, block_n=32, warps=8, stages=2, q_in_regs=False, min_blocks=1),
}


def _tile_overrides(spec: str) -> dict[int, FwdConfig]:
    """Parse ``CUPARING_FWD_TILES`` ("128:128,64,4,2,0,1;64:...", fields as in FwdConfig), the
    tuning knob tools/tune_forward.py uses to time tile shapes without editing this table."""
    table = {}
    for item in filter(None, (part.strip() for part in spec.split(";"))):
        head_dim, fields = item.split(":")
        m, n, warps, stages, q_regs, min_blocks = (int(x) for x in fields.split(","))
        table[int(head_dim)] = FwdConfig(m, n, warps, stages, bool(q_regs), min_blocks)
    return table


# Hopper (sm_90) has 227 KB of shared memory per CTA, so the wider key tiles that sm_80's 163 KB
# rules out fit; on an H200, with the paired K fragments, 128x64 beat 128x32 by 12% (d=128,
# S=8k) and 128x32x3 stages (tools/tune_forward.py, PERF.md). Since the epilogue became a function
# shared with the sm90 family, 128x64 at d=128 spills 8 bytes on sm_90a (255 registers); 128x48
# does not. (On Hopper the sm90 family runs d=128 unless CUPARING_KERNELS=sm80.)
HOPPER_TILES: dict[int, FwdConfig] = {
    64: FwdConfig(block_m=128, block_n=64, warps=4, stages=2, q_in_regs=True, min_blocks=2),
    96: FwdConfig(block_m=128, block_n=64, warps=4, stages=2, q_in_regs=False, min_blocks=1),
    128: FwdConfig(block_m=128, block_n=48, warps=4, stages=2, q_in_regs=False, min_blocks=1),
    224: FwdConfig(block_m=128, block_n=64, warps=8, stages=2, q_in_regs=False, min_blocks=1),
    256: FwdConfig(block_m=128, block_n=64, warps=8, stages=2, q_in_regs=False, min_blocks=1),
}
_ENV_TILES = _tile_overrides(os.environ.get("CUPARING_FWD_TILES", ""))


def fwd_configs(arch: str = "sm_80") -> dict[int, FwdConfig]:
    """The tile table for ``arch`` ('sm_80', 'sm_90a', ...): the base table, Hopper's rows on
    sm_9x, then any ``CUPARING_FWD_TILES`` rows."""
    table = dict(FWD_CONFIGS)
    if arch.startswith("sm_9"):
        table.update(HOPPER_TILES)
    table.update(_ENV_TILES)
    return table


@dataclass(frozen=True)
class BwdConfig:
    """Tile configuration of the backward kernel for one (padded) head dim.

    Attributes:
        block_m: queries per inner tile; block_n: keys per CTA (sm80: 16 or 32 per warp).
        warps: warps per CTA (sm80: they split the keys, and the dQ tile over all of them;
            sm90, SM90_BWD_CONFIG: a producer and two consumer warpgroups, 12 warps).
        split: two launches, dV then dK + dQ (head dims whose dK + dV accumulators would not fit
            the registers of one thread together).
        min_blocks: ``__launch_bounds__`` minimum CTAs per SM.
    """

    block_m: int
    block_n: int
    warps: int
    split: bool
    min_blocks: int

    @property
    def threads(self) -> int:
        return 32 * self.warps


# Per warp 16 keys x (dK + dV) in fp32 registers: 2 * d / 2 per thread; S^T and dP^T add
# block_m / 2 each. Chosen so no instantiation spills on sm_80 / sm_90a (tools/compile_check.py)
# and all fit sm_80's 163 KB of shared memory: K, V once, Q and dO double-buffered, dS^T.
BWD_CONFIGS: dict[int, BwdConfig] = {
    32: BwdConfig(block_m=64, block_n=128, warps=8, split=False, min_blocks=1),
    64: BwdConfig(block_m=64, block_n=128, warps=8, split=False, min_blocks=1),
    96: BwdConfig(block_m=64, block_n=128, warps=8, split=False, min_blocks=1),
    128: BwdConfig(block_m=32, block_n=128, warps=8, split=False, min_blocks=1),
    160: BwdConfig(block_m=64, block_n=64, warps=4, split=True, min_blocks=1),
    192: BwdConfig(block_m=32, block_n=64, warps=4, split=True, min_blocks=1),
    224: BwdConfig(block_m=32, block_n=64, warps=4, split=True, min_blocks=1),
    256: BwdConfig(block_m=32, block_n=64, warps=4, split=True, min_blocks=1),
}

# Modes of the backward kernel (bwd.cuh BwdMode).
BWD_ALL = 0
BWD_DV = 1
BWD_DK_DQ = 2
BWD_REDO = 3  # the sm90 backward's redo pass (params.cuh BwdParams::redo)


def bwd_configs(arch: str = "sm_80") -> dict[int, BwdConfig]:
    """The backward tile table for ``arch``: one table for every arch (the backward has no
    Hopper-specific tiles yet; ``arch`` keeps the signature of :func:`fwd_configs`)."""
    return dict(BWD_CONFIGS)


def bwd_modes(head_dim: int, arch: str = "sm_80") -> tuple[int, ...]:
    """The launches (BwdMode values, in order) that compute one block's gradients."""
    return (BWD_DV, BWD_DK_DQ) if bwd_configs(arch)[head_dim].split else (BWD_ALL,)


def bwd_smem_bytes(head_dim: int, arch: str = "sm_80") -> int:
    """Dynamic shared memory of ``cuparing_bwd<head_dim, *, *>`` on ``arch`` (as BwdTraitsBase)."""
    cfg = bwd_configs(arch)[head_dim]
    chunks = head_dim // 8
    row_bytes = (chunks if chunks == 4 else -(-chunks // 8) * 8) * 16
    stages = 2
    return (
        2 * cfg.block_n * row_bytes  # K, V
        + stages * 2 * cfg.block_m * row_bytes  # Q, dO
        + cfg.block_n * cfg.block_m * 2  # dS^T
        + stages * 2 * cfg.block_m * 4  # lse, delta
    )


@dataclass(frozen=True)
class Sm90FwdConfig:
    """Tile configuration of the sm90 (wgmma) forward kernel for one head dim: a producer
    warpgroup and ``block_m / 64`` consumer warpgroups of 64 query rows each (two by default:
    block_m = 128, 384 threads; three: 192 rows, 512 threads, fewer registers per consumer),
    ``block_n`` keys per stage with the TMA producer (``cp_async_block_n`` with the cp.async one,
    whose consumers have fewer registers; default ``block_n``), ``stages`` K/V tiles in flight,
    ``softmax_chains`` independent max/sum chains per row in the softmax."""

    block_n: int
    stages: int
    cp_async_block_n: int | None = None
    softmax_chains: int = 1
    block_m: int = 128

    def __post_init__(self):
        if self.block_m not in (128, 192):
            raise ValueError(f"sm90 forward block_m must be 128 or 192 (two or three consumer "
                             f"warpgroups), got {self.block_m}")  # fmt: skip

    @property
    def consumers(self) -> int:
        """Consumer warpgroups (64 query rows each)."""
        return self.block_m // 64

    @property
    def threads(self) -> int:
        """Threads per CTA: the producer warpgroup and the consumers."""
        return 128 * (self.consumers + 1)

    def keys(self, tma: bool) -> int:
        """Keys per tile for the TMA (``tma``) or the cp.async producer."""
        return self.block_n if tma or self.cp_async_block_n is None else self.cp_async_block_n


# S (block_n / 2 floats) + O (d / 2) + P (block_n / 4) registers per consumer thread; shared
# memory Q + stages * (K + V) under 227 KB (sm90/traits.cuh asserts both). The widest key tiles
# that compile without spills under the TMA consumers' registers (240 for two consumers); the
# cp.async consumers (232) take 128 keys (d=256: 32; 64 and 48 spill). Measured on an H200
# (PERF.md, sm90 v3): d=128 x176 beat x128 by 6% full and lost 1% causal; d=64 x192 +2%, d=256
# x80 +3%. Two softmax chains per row (v4): +10% at d=128 full over one, the same causal; four
# chains were no better. Head dim 64 runs three consumers (block_m 192; 160 registers each with
# the TMA producer, 152 with cp.async; 112 keys, 128 spilled) with three stages: against two
# consumers x192 on an H100 (PERF.md v8) +5-7% at 16k full, +3% at 8k causal, the same at 16k
# causal; two stages lost 3% at 8k causal.
SM90_FWD_CONFIGS: dict[int, Sm90FwdConfig] = {
    64: Sm90FwdConfig(block_n=112, stages=3, cp_async_block_n=112, softmax_chains=2, block_m=192),
    128: Sm90FwdConfig(block_n=176, stages=2, cp_async_block_n=128, softmax_chains=2),
    256: Sm90FwdConfig(block_n=80, stages=2, cp_async_block_n=32, softmax_chains=2),
}
# head dims (as padded_head_dim pads them) the sm90 forward runs in a wider instantiation
SM90_FWD_WIDER = {96: 128}
# CUPARING_SM90_TILES="256:64,2,32;64:192,2,128,2" (head dim: block_n, stages[, cp.async
# block_n[, softmax chains[, block_m]]]) overrides rows, for tuning.
_SM90_ENV = os.environ.get("CUPARING_SM90_TILES", "")
for _item in filter(None, (x.strip() for x in _SM90_ENV.split(";"))):
    _d, _fields = _item.split(":")
    _values = [int(x) for x in _fields.split(",")]
    SM90_FWD_CONFIGS[int(_d)] = Sm90FwdConfig(*_values)


def sm90_smem_bytes(head_dim: int, tma: bool = True) -> int:
    """Dynamic shared memory of ``cuparing_fwd_sm90<head_dim, *, tma>`` (as Sm90FwdTraitsBase)."""
    cfg = SM90_FWD_CONFIGS[head_dim]
    box_row_bytes = 128 * -(-head_dim // 64)
    barriers = 256  # the pipeline's mbarriers and flags (Sm90FwdTraitsBase::kBarrierBytes)
    return box_row_bytes * (cfg.block_m + cfg.stages * 2 * cfg.keys(tma)) + barriers + 1024


# The sm90 (wgmma) backward: head dims it has tiles for, 128 keys per CTA (64 per consumer
# warpgroup), 64 queries per tile, 384 threads (sm90/bwd.cuh Sm90BwdTraits).
SM90_BWD_HEAD_DIMS = (64, 128)
# head dims (as padded_head_dim pads them) the sm90 backward runs in a wider instantiation
SM90_BWD_WIDER = {96: 128}
SM90_BWD_CONFIG = BwdConfig(block_m=64, block_n=128, warps=12, split=False, min_blocks=1)


def sm90_bwd_smem_bytes(head_dim: int) -> int:
    """Dynamic shared memory of ``cuparing_bwd_sm90<head_dim, *>`` (as Sm90BwdTraits)."""
    box_row_bytes = 128 * -(-head_dim // 64)
    cfg, stages, barriers = SM90_BWD_CONFIG, 2, 112
    kv = 2 * cfg.block_n * box_row_bytes
    # Q, dO; lse, delta, positions, the first key tile (deterministic mode) and padding
    stage = 2 * cfg.block_m * box_row_bytes + 3 * cfg.block_m * 4 + 16
    # (the kernel places each stage's row info after the tiles: the total is the same)
    ds = 2 * 2 * 64 * cfg.block_m * 2  # dS^T of each consumer, double-buffered
    dq_staging = 8 * 16 * (head_dim // 2) * 4  # 16 rows x d/2 float32 columns per consumer warp
    return kv + stages * stage + ds + dq_staging + barriers + 1024


_SWITCHES = ("CUPARING_KERNELS", "CUPARING_TMA", "CUPARING_BWD")


def kernel_switches() -> tuple:
    """The environment switches that change which kernel a launch runs (family, TMA, the
    backward's family) as set now, one value per switch (None where unset; compare them, do not
    parse them: they may be the environment's encoded bytes): part of every cache key of a
    decided launch, read on every call."""
    return _read_switches()


def _switch_reader():
    """How :func:`kernel_switches` reads the environment. ``os.environ.get`` of an unset name
    raises and catches a KeyError inside (~0.7 us each, three per call); CPython's ``os.environ``
    keeps its values in a plain dict under encoded keys, which holds the same values (every
    change through ``os.environ`` updates it) and reads in ~0.05 us. ``os.environ`` is looked up
    on every call (a test may replace it with a plain mapping, which is then read by ``get``)."""
    encode = getattr(os.environ, "encodekey", None)
    if not callable(encode):
        return lambda: tuple(os.environ.get(name) for name in _SWITCHES)
    kernels, tma, bwd = (encode(name) for name in _SWITCHES)

    def read() -> tuple:
        data = getattr(os.environ, "_data", None)
        if type(data) is not dict:
            return tuple(os.environ.get(name) for name in _SWITCHES)
        return data.get(kernels), data.get(tma), data.get(bwd)

    return read


_read_switches = _switch_reader()


def backward_family(head_dim: int, arch: str) -> str:
    """The kernel family that runs the backward of padded ``head_dim`` on ``arch``.

    Hopper (sm_9x) runs the wgmma family for its head dims (64, 128), the mma.sync family runs
    the rest; ``CUPARING_BWD=sm80`` (or ``CUPARING_KERNELS=sm80``, which forces the mma.sync
    family everywhere) picks mma.sync on Hopper too, for comparison and as a fallback.

    Raises:
        ValueError: ``CUPARING_BWD`` is neither unset/'auto' nor a family name.
    """
    choice = os.environ.get("CUPARING_BWD", "auto").strip().lower() or "auto"
    if choice not in ("auto", *FAMILIES):
        raise ValueError(f"CUPARING_BWD must be 'auto', 'sm80' or 'sm90', got {choice!r}")
    forced_sm80 = os.environ.get("CUPARING_KERNELS", "").strip().lower() == "sm80"
    if choice == "sm80" or forced_sm80 or not arch.startswith("sm_9"):
        return "sm80"
    return "sm90" if head_dim in SM90_BWD_HEAD_DIMS else "sm80"


def forward_family(head_dim: int, arch: str) -> str:
    """The kernel family that runs the forward of padded ``head_dim`` on ``arch`` ('sm_90', ...).

    ``CUPARING_KERNELS=sm80`` forces the mma.sync family everywhere (comparison and fallback);
    otherwise (unset, 'auto' or 'sm90') Hopper (sm_9x) runs the wgmma family for the head dims it
    has tiles for.

    Raises:
        ValueError: ``CUPARING_KERNELS`` is neither unset/'auto' nor a family name.
    """
    choice = os.environ.get("CUPARING_KERNELS", "auto").strip().lower() or "auto"
    if choice not in ("auto", *FAMILIES):
        raise ValueError(f"CUPARING_KERNELS must be 'auto', 'sm80' or 'sm90', got {choice!r}")
    hopper = arch.startswith("sm_9")
    if choice == "sm80" or not hopper or head_dim not in SM90_FWD_CONFIGS:
        return "sm80"
    return "sm90"


HEAD_DIMS = tuple(sorted(FWD_CONFIGS))
MAX_HEAD_DIM = HEAD_DIMS[-1]
DTYPES = ("float16", "bfloat16")

# Output modes of the forward kernel (params.cuh OutMode).
OUT_DIRECT = 0
OUT_ACC_WRITE = 1
OUT_ACC_MERGE = 2
OUT_ACC_FINAL = 3  # the ring's last block: merged into the accumulator, written as the output


def padded_head_dim(headdim: int) -> int:
    """The instantiation that runs an actual head dim ``headdim`` (a multiple of 8, <= 256)."""
    if headdim % 8 or not 8 <= headdim <= MAX_HEAD_DIM:
        raise ValueError(
            f"the CUDA kernel needs a head dim that is a multiple of 8 in [8, {MAX_HEAD_DIM}], "
            f"got D={headdim}"
        )
    return next(d for d in HEAD_DIMS if d >= headdim)


def _instantiation_head_dim(headdim: int, arch: str, wider: dict, family) -> int:
    """:func:`padded_head_dim`'s, or the wider sm90 instantiation ``wider`` names for it where
    ``family(wider head dim, arch)`` picks the sm90 family."""
    padded = padded_head_dim(headdim)
    wide = wider.get(padded)
    if wide is not None and family(wide, arch) == "sm90":
        return wide
    return padded


def forward_head_dim(headdim: int, arch: str) -> int:
    """The instantiation (a padded head dim) that runs the forward of actual head dim
    ``headdim`` on ``arch``: :func:`padded_head_dim`'s, except where that is 96 and the sm90
    family runs (:func:`forward_family`): it has no 96 instantiation, and runs those head dims
    in its 128 one, whose extra columns are zeros in shared memory (a quarter of its products
    wasted, which wgmma's rate pays for, as in the backward).

    Raises:
        ValueError: as :func:`padded_head_dim`, or a bad ``CUPARING_KERNELS``.
    """
    return _instantiation_head_dim(headdim, arch, SM90_FWD_WIDER, forward_family)


def backward_head_dim(headdim: int, arch: str) -> int:
    """The instantiation (a padded head dim) that runs the backward of actual head dim
    ``headdim`` on ``arch``: :func:`padded_head_dim`'s, except where that is 96 and the sm90
    family runs the backward (:func:`backward_family`): it has no 96 instantiation, and runs
    those head dims in its 128 one (their zero columns cost a quarter of its products, which
    wgmma's rate pays for: PERF.md "Hopper backward").

    Raises:
        ValueError: as :func:`padded_head_dim`, or a bad ``CUPARING_BWD``.
    """
    return _instantiation_head_dim(headdim, arch, SM90_BWD_WIDER, backward_family)


def smem_bytes(head_dim: int, arch: str = "sm_80") -> int:
    """Dynamic shared memory of ``cuparing_fwd<head_dim, *>`` on ``arch`` (as FwdTraitsBase)."""
    cfg = fwd_configs(arch)[head_dim]
    chunks = head_dim // 8
    smem_chunks = chunks if chunks == 4 else -(-chunks // 8) * 8
    row_bytes = smem_chunks * 16
    return cfg.block_m * row_bytes + cfg.stages * 2 * cfg.block_n * row_bytes


def fwd_name(head_dim: int, dtype: str, family: str = "sm80", tma: bool = False) -> str:
    """Name expression of the forward kernel of ``family`` for a padded head dim and
    'float16'/'bfloat16'; sm90 only: ``tma`` picks the tensor-map (TMA) producer over cp.async."""
    table = SM90_FWD_CONFIGS if family == "sm90" else FWD_CONFIGS
    if family not in FAMILIES or head_dim not in table or dtype not in DTYPES:
        raise ValueError(f"no {family} forward kernel for {head_dim=} {dtype=}")
    bf16 = "true" if dtype == "bfloat16" else "false"
    if family == "sm90":
        return f"cuparing_fwd_sm90<{head_dim}, {bf16}, {'true' if tma else 'false'}>"
    return f"cuparing_fwd<{head_dim}, {bf16}>"


def bwd_name(head_dim: int, dtype: str, mode: int) -> str:
    """Name expression of the backward kernel for a padded head dim, dtype and BwdMode."""
    if head_dim not in BWD_CONFIGS or dtype not in DTYPES or mode not in (0, 1, 2, 3):
        raise ValueError(f"no backward kernel for {head_dim=} {dtype=} {mode=}")
    return f"cuparing_bwd<{head_dim}, {'true' if dtype == 'bfloat16' else 'false'}, {mode}>"


def sm90_bwd_name(head_dim: int, dtype: str, ordered: bool = False) -> str:
    """Name expression of the sm90 backward for a padded head dim and 'float16'/'bfloat16';
    ``ordered``: the deterministic mode's instantiation (turn counters, sm90/bwd.cuh)."""
    if head_dim not in SM90_BWD_HEAD_DIMS or dtype not in DTYPES:
        raise ValueError(f"no sm90 backward kernel for {head_dim=} {dtype=}")
    bf16 = "true" if dtype == "bfloat16" else "false"
    return f"cuparing_bwd_sm90<{head_dim}, {bf16}, {'true' if ordered else 'false'}>"


def _per_dtype(kernel: str, dtype: str, what: str) -> str:
    """Name expression of ``kernel``'s instantiation for 'float16' / 'bfloat16' (its one
    template argument: whether bf16); other dtypes raise a ValueError naming ``what``."""
    if dtype not in DTYPES:
        raise ValueError(f"no {what} kernel for {dtype=}")
    return f"{kernel}<{'true' if dtype == 'bfloat16' else 'false'}>"


def bwd_delta_name(dtype: str) -> str:
    """Name expression of the delta = rowsum(dO * O) kernel for 'float16'/'bfloat16'."""
    return _per_dtype("cuparing_bwd_delta", dtype, "delta")


def all_bwd_names(arch: str = "sm_80") -> list[str]:
    """Every backward instantiation of the sm80 family for ``arch`` (split head dims have two
    modes; on sm_90, the head dims of the sm90 backward also its redo pass)."""
    names = [
        bwd_name(d, dt, mode) for d in HEAD_DIMS for dt in DTYPES for mode in bwd_modes(d, arch)
    ]
    if arch.startswith("sm_9"):
        names += [bwd_name(d, dt, BWD_REDO) for d in SM90_BWD_HEAD_DIMS for dt in DTYPES]
    return names


def dq_from_tiles_name(dtype: str) -> str:
    """Name expression of the kernel that turns the sm90 backward's dq accumulator (dq tiles,
    common/dq_tiles.cuh) into dq of 'float16'/'bfloat16'."""
    return _per_dtype("cuparing_dq_from_tiles", dtype, "dq tiles")


COPY_PAIR_NAME = "cuparing_copy_pair"
GATHER_ROWS_NAME = "cuparing_gather_rows"
ADD_F32_NAME = "cuparing_add_f32"
COPY_U16_NAME = "cuparing_copy_u16"
# common/gather_rows.cuh's GatherRowsParams: (field, byte offset, count, struct code); its size
GATHER_MAX_PARTS = 8
GATHER_ROWS_THREADS = 128  # one warp per gathered row, four rows a CTA
GATHER_ROWS_PER_CTA = 4
GATHER_ROWS_LAYOUT = (
    ("k_dst", 0, 1, "Q"), ("v_dst", 8, 1, "Q"), ("k_src", 16, 8, "Q"), ("v_src", 80, 8, "Q"),
    ("sources", 144, 1, "Q"), ("k_strides", 152, 24, "q"), ("v_strides", 344, 24, "q"),
    ("ints", 536, 4, "i"),
)
GATHER_ROWS_SIZE = 552


def direct_rows_name(dtype: str) -> str:
    """Name expression of the kernel that, after the sm90 backward's redo pass, converts the
    dK / dV rows of the CTAs it finished into direct gradients (common/direct_grads.cuh)."""
    return _per_dtype("cuparing_direct_rows", dtype, "direct rows")


def cast_names(dtype: str) -> tuple[str, str]:
    """Name expressions of (fp32 -> dtype, dtype -> fp32) for 'float16'/'bfloat16'."""
    flag = "true" if dtype == "bfloat16" else "false"
    return f"cuparing_cast_from_f32<{flag}>", f"cuparing_cast_to_f32<{flag}>"


def add_cast_name(dtype: str) -> str:
    """Name expression of the kernel writing ``acc + x`` (float32) as 'float16'/'bfloat16'."""
    return _per_dtype("cuparing_add_cast_f32", dtype, "add-and-cast")


def configs_macro(arch: str = "sm_80") -> str:
    """The ``CUPARING_FWD_CONFIGS`` / ``CUPARING_BWD_CONFIGS`` X-macros that traits.cuh and
    bwd.cuh expand into FwdTraits<D> / BwdTraits<D>."""
    rows = " ".join(
        f"X({d}, {c.block_m}, {c.block_n}, {c.warps}, {c.stages}, {int(c.q_in_regs)}, "
        f"{c.min_blocks}, {smem_bytes(d, arch)})"
        for d, c in sorted(fwd_configs(arch).items())
    )
    bwd_rows = " ".join(
        f"X({d}, {c.block_m}, {c.block_n}, {c.warps}, {int(c.split)}, {c.min_blocks}, "
        f"{bwd_smem_bytes(d, arch)})"
        for d, c in sorted(bwd_configs(arch).items())
    )
    sm90_rows = " ".join(
        f"X({d}, {str(tma).lower()}, {c.keys(tma)}, {c.stages}, {c.softmax_chains}, "
        f"{c.consumers}, {sm90_smem_bytes(d, tma)})"
        for d, c in sorted(SM90_FWD_CONFIGS.items())
        for tma in (False, True)
    )
    sm90_bwd_rows = " ".join(f"X({d}, {sm90_bwd_smem_bytes(d)})" for d in SM90_BWD_HEAD_DIMS)
    return (
        f"#define CUPARING_FWD_CONFIGS(X) {rows}\n#define CUPARING_BWD_CONFIGS(X) {bwd_rows}\n"
        f"#define CUPARING_SM90_FWD_CONFIGS(X) {sm90_rows}\n"
        f"#define CUPARING_SM90_BWD_SMEM(X) {sm90_bwd_rows}\n"
    )


_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$')


def _inline(path: Path, seen: set[Path]) -> list[str]:
    """Text of ``path`` with our quoted includes (relative to the including file) inlined once
    each (``#pragma once`` dropped)."""
    path = path.resolve()
    if path in seen:
        return []
    seen.add(path)
    out = [f"// ---- {path.relative_to(KERNEL_DIR)}"]
    for line in path.read_text().splitlines():
        match = _INCLUDE.match(line)
        if match:
            out.extend(_inline(path.parent / match.group(1), seen))
        elif line.strip() != "#pragma once":
            out.append(line)
    return out


def kernel_source(arch: str = "sm_80", family: str = "sm80") -> str:
    """The complete, self-contained translation unit of ``family`` for ``arch``: the table
    macros, (sm90) the generated wgmma wrappers, then the family's entry file."""
    if family not in FAMILIES:
        raise ValueError(f"unknown kernel family {family!r}; expected one of {FAMILIES}")
    prefix = configs_macro(arch)
    if family == "sm90":
        widths = set(SM90_FWD_CONFIGS)  # N of P V: the head dims; of Q K^T: keys per tile
        widths |= {c.keys(tma) for c in SM90_FWD_CONFIGS.values() for tma in (False, True)}
        widths |= {SM90_BWD_CONFIG.block_m, *SM90_BWD_HEAD_DIMS}  # S^T, dP^T; dV, dK
        widths |= {d // 2 for d in SM90_BWD_HEAD_DIMS}  # dQ: each consumer half the columns
        prefix += wgmma.wrappers_source(widths)
    return prefix + "\n".join(_inline(KERNEL_DIR / ENTRY_FILES[family], set())) + "\n"


# ---- launch parameters (params.cuh FwdParams / BwdParams), C layout via align=True


def _params_dtype(pointers, strided, ints, floats) -> np.dtype:
    """The NumPy twin of a params struct: device pointers (u64), then (batch, row, head) element
    strides (i64) of each strided tensor, then int32 and float32 scalars, in declaration order."""
    fields = (
        [(name, np.uint64) for name in pointers]
        + [(f"{t}_{s}_stride", np.int64) for t in strided for s in ("batch", "row", "head")]
        + [(name, np.int32) for name in ints]
        + [(name, np.float32) for name in floats]
    )
    return np.dtype(fields, align=True)


_SHAPE_INTS = ("batch", "seqlen_q", "seqlen_k", "nheads", "nheads_kv", "headdim", "lo", "hi")
PARAMS_DTYPE = _params_dtype(
    pointers=("q", "k", "v", "out", "lse", "q_pos", "k_pos", "acc"),
    strided=("q", "k", "v", "o"),
    ints=(*_SHAPE_INTS, "out_mode", "block_full"),
    floats=("scale_log2",),
)
# Offsets of the C struct, worked out by hand from params.cuh (tests/test_kernel_compile.py
# checks them against PARAMS_DTYPE; the kernel side asserts the size).
PARAMS_OFFSETS = {
    "q_pos": 40, "acc": 56, "q_batch_stride": 64, "o_head_stride": 152, "batch": 160, "lo": 184,
    "block_full": 196, "scale_log2": 200,
}  # fmt: skip
PARAMS_SIZE = 208
BWD_PARAMS_DTYPE = _params_dtype(
    pointers=("q", "k", "v", "dout", "lse", "delta", "dq", "dk", "dv", "q_pos", "k_pos", "redo",
              "dq_turns", "dkv_turns", "dk_out", "dv_out"),
    strided=("q", "k", "v", "do"),
    ints=(*_SHAPE_INTS, "block_full"),
    floats=("scale_log2", "scale"),
)
BWD_PARAMS_SIZE = 272  # static_assert(sizeof(BwdParams) == 272) in params.cuh


_STRUCT_CODES = {np.dtype(np.uint64): "Q", np.dtype(np.int64): "q", np.dtype(np.int32): "i",
                 np.dtype(np.float32): "f"}  # fmt: skip


@functools.cache
def _packer(dtype: np.dtype) -> struct.Struct:
    """A ``struct.Struct`` writing the fields of ``dtype`` (in declaration order) at their C
    offsets, padding included: packing this way costs a few microseconds per launch, where
    setting a structured array field by field cost tens."""
    fmt, at = "<", 0
    for name in dtype.names:
        field, offset = dtype.fields[name][:2]
        fmt += "x" * (offset - at) + _STRUCT_CODES[field]
        at = offset + field.itemsize
    return struct.Struct(fmt + "x" * (dtype.itemsize - at))


def _pack(dtype: np.dtype, name: str, values: dict) -> np.ndarray:
    """A one-element structured array holding struct ``name`` (CuPy passes it by value)."""
    if len(values) != len(dtype.names) or not all(n in values for n in dtype.names):
        missing = set(dtype.names) - set(values)
        extra = set(values) - set(dtype.names)
        raise TypeError(f"{name} fields: missing {sorted(missing)}, unknown {sorted(extra)}")
    params = np.empty(1, dtype=dtype)
    _packer(dtype).pack_into(params.view(np.uint8), 0, *(values[n] for n in dtype.names))
    return params


def pack_params(**values) -> np.ndarray:
    """``FwdParams`` for one forward launch; every field by name."""
    return _pack(PARAMS_DTYPE, "FwdParams", values)


def pack_bwd_params(**values) -> np.ndarray:
    """``BwdParams`` for one backward launch; every field by name."""
    return _pack(BWD_PARAMS_DTYPE, "BwdParams", values)


def pointer_offsets(struct_name: str, names) -> tuple[int, ...]:
    """Byte offsets of the named pointer fields of ``FwdParams`` (``"fwd"``) or ``BwdParams``
    (``"bwd"``): where a launch plan patches each call's addresses into a packed struct.

    Raises:
        KeyError: a name that is not a pointer field of that struct.
    """
    dtype = {"fwd": PARAMS_DTYPE, "bwd": BWD_PARAMS_DTYPE}[struct_name]
    offsets = []
    for name in names:
        field, offset = dtype.fields[name][:2]
        if field != np.dtype(np.uint64):
            raise KeyError(f"{name} is not a pointer field of the {struct_name} params")
        offsets.append(offset)
    return tuple(offsets)


# ---- CuPy modules, compiled lazily and cached
_LOCK = threading.Lock()
_MODULES: dict[tuple, object] = {}
# (kernel(s), config, shared memory) per launch signature: get_fwd_kernel, get_bwd_kernels
_LAUNCHES: dict[tuple, tuple] = {}


def _allow_smem(kernel, name: str, smem: int, device: int, arch: str) -> None:
    """Let ``kernel`` take ``smem`` bytes of dynamic shared memory (once per kernel and device,
    the caller caches)."""
    import cupy

    try:
        kernel.max_dynamic_shared_size_bytes = smem
    except cupy.cuda.driver.CUDADriverError as exc:
        raise RuntimeError(
            f"{name} needs {smem} bytes of shared memory per block, more than device "
            f"{device} ({arch}) allows: {exc}"
        ) from exc


_L2_BYTES: dict[int, int] = {}


def device_l2_bytes() -> int:
    """L2 cache bytes of CuPy's current device (cached per device)."""
    import cupy

    device = cupy.cuda.Device()
    if device.id not in _L2_BYTES:
        _L2_BYTES[device.id] = int(device.attributes["L2CacheSize"])
    return _L2_BYTES[device.id]


def device_arch() -> str:
    """Compute capability of CuPy's current device as 'sm_XY'."""
    import cupy

    return f"sm_{cupy.cuda.Device().compute_capability}"


def get_module(names: tuple[str, ...], family: str = "sm80"):
    """The RawModule holding ``names`` of ``family`` for the current device, cached per (arch,
    family, names).

    One module per group of instantiations keeps the first call cheap: NVRTC compiles only the
    kernels asked for (CuPy also caches the binary on disk across processes).
    """
    import cupy

    options = SM90_OPTIONS if family == "sm90" else BASE_OPTIONS
    key = (device_arch(), family, tuple(names))
    with _LOCK:
        module = _MODULES.get(key)
        if module is None:
            module = cupy.RawModule(
                code=kernel_source(key[0], family), options=options, name_expressions=list(names)
            )
            _MODULES[key] = module
    return module


def get_fwd_kernel(head_dim: int, dtype: str, tma: bool = False):
    """(kernel, config, shared memory bytes) of the forward for padded ``head_dim`` and
    'float16'/'bfloat16' on the current device, from the family :func:`forward_family` picks
    (sm90: the TMA producer when ``tma``, else cp.async; the kernel then also takes the
    ``tensor_maps.MAPS_DTYPE`` argument). The config has ``block_m`` (query rows per CTA),
    ``threads`` and ``block_n``.

    Raises:
        RuntimeError: the device cannot give a CTA that much shared memory.
    """
    import cupy

    device = cupy.cuda.Device().id
    # the choice depends on the device, the arguments and CUPARING_KERNELS: a call after the first
    # with the same ones is a dictionary lookup
    key = ("fwd", device, head_dim, dtype, tma, os.environ.get("CUPARING_KERNELS"))
    hit = _LAUNCHES.get(key)
    if hit is not None:
        return hit
    arch = device_arch()
    family = forward_family(head_dim, arch)
    name = fwd_name(head_dim, dtype, family, tma)
    kernel = get_module((name,), family).get_function(name)
    if family == "sm90":
        base = SM90_FWD_CONFIGS[head_dim]
        cfg = Sm90FwdConfig(block_n=base.keys(tma), stages=base.stages, block_m=base.block_m)
        smem = sm90_smem_bytes(head_dim, tma)
    else:
        cfg, smem = fwd_configs(arch)[head_dim], smem_bytes(head_dim, arch)
    _allow_smem(kernel, name, smem, device, arch)
    _LAUNCHES[key] = kernel, cfg, smem
    return kernel, cfg, smem


def get_cast_kernels(dtype: str):
    """(fp32 -> dtype kernel, dtype -> fp32 kernel) for 'float16'/'bfloat16'."""
    names = cast_names(dtype)
    module = get_module(names)
    return module.get_function(names[0]), module.get_function(names[1])


def get_bwd_kernels(head_dim: int, dtype: str, ordered: bool = False):
    """([(kernel, mode), ...] in launch order, config, shared memory bytes) of the backward for
    padded ``head_dim`` and 'float16'/'bfloat16' on the current device, from the family
    :func:`backward_family` picks (``CUPARING_BWD``); ``ordered``: the deterministic mode's
    instantiation (sm90 family only).

    Raises:
        RuntimeError: the device cannot give a CTA that much shared memory.
        ValueError: ``ordered`` where the family is the mma.sync one (no such mode yet).
    """
    import cupy

    device = cupy.cuda.Device().id
    key = ("bwd", device, head_dim, dtype, kernel_switches(), ordered)
    hit = _LAUNCHES.get(key)
    if hit is not None:
        return hit
    arch = device_arch()
    if ordered and backward_family(head_dim, arch) != "sm90":
        raise ValueError(f"no deterministic mode in the sm80 backward ({head_dim=}, {arch})")
    if backward_family(head_dim, arch) == "sm90":
        name = sm90_bwd_name(head_dim, dtype, ordered)
        kernel = get_module((name,), "sm90").get_function(name)
        smem = sm90_bwd_smem_bytes(head_dim)
        _allow_smem(kernel, name, smem, device, arch)
        _LAUNCHES[key] = [(kernel, BWD_ALL)], SM90_BWD_CONFIG, smem
        return _LAUNCHES[key]
    modes = bwd_modes(head_dim, arch)
    names = tuple(bwd_name(head_dim, dtype, mode) for mode in modes)
    module = get_module(names)
    smem = bwd_smem_bytes(head_dim, arch)
    kernels = []
    for name, mode in zip(names, modes, strict=True):
        kernel = module.get_function(name)
        _allow_smem(kernel, name, smem, device, arch)
        kernels.append((kernel, mode))
    _LAUNCHES[key] = kernels, bwd_configs(arch)[head_dim], smem
    return _LAUNCHES[key]


def get_bwd_redo_kernel(head_dim: int, dtype: str):
    """(kernel, config, shared memory bytes) of the sm80 family's redo pass for the sm90
    backward of padded ``head_dim`` (BwdMode kBwdRedo, params.cuh ``BwdParams::redo``): it runs
    the CTAs the sm90 kernel marked, from the query row it stopped at, on the same grid.

    Raises:
        ValueError: no sm90 backward for ``head_dim``.
    """
    if head_dim not in SM90_BWD_HEAD_DIMS:
        raise ValueError(f"no sm90 backward (so no redo pass) for {head_dim=}")
    import cupy

    device = cupy.cuda.Device().id
    key = ("bwd_redo", device, head_dim, dtype)
    hit = _LAUNCHES.get(key)
    if hit is not None:
        return hit
    arch = device_arch()
    name = bwd_name(head_dim, dtype, BWD_REDO)
    kernel = get_module((name,)).get_function(name)
    smem = bwd_smem_bytes(head_dim, arch)
    _allow_smem(kernel, name, smem, device, arch)
    cfg = bwd_configs(arch)[head_dim]
    if cfg.block_n != SM90_BWD_CONFIG.block_n or cfg.split:
        raise AssertionError("the redo pass needs the sm90 backward's CTAs: 128 keys, one launch")
    _LAUNCHES[key] = kernel, cfg, smem
    return _LAUNCHES[key]


def get_dq_from_tiles_kernel(dtype: str):
    """The dq tiles -> dq kernel for 'float16'/'bfloat16' (any grid; a grid-stride loop)."""
    name = dq_from_tiles_name(dtype)
    return get_module((name,)).get_function(name)


def get_direct_rows_kernel(dtype: str):
    """The kernel of :func:`direct_rows_name` for 'float16'/'bfloat16' (BwdParams; grid: the
    plain (heads, batch, key tiles) of the sm90 backward's 128-key tiles, which the redo pass
    also runs on; 256 threads)."""
    if SM90_BWD_CONFIG.block_n != 128:
        raise AssertionError("cuparing_direct_rows assumes the sm90 backward's 128-key tiles")
    name = direct_rows_name(dtype)
    return get_module((name,)).get_function(name)


def get_copy_pair_kernel():
    """The kernel making two device-to-device copies in one launch (``cuparing_copy_pair``:
    grid (x, 2), 256 threads; arguments a_src, a_dst, a_bytes, b_src, b_dst, b_bytes, every
    pointer 16-byte aligned)."""
    return get_module((COPY_PAIR_NAME,)).get_function(COPY_PAIR_NAME)


def get_gather_rows_kernel():
    """The kernel copying rows of (K, V) pairs into one pair by a (part, row) map: a gathered ring
    call's K/V in position order, its dK / dV rows back in shard order
    (``cuparing_gather_rows``: one ``GATHER_ROWS_LAYOUT`` struct argument; grid (ceil(L /
    ``GATHER_ROWS_PER_CTA``), B), ``GATHER_ROWS_THREADS`` threads)."""
    return get_module((GATHER_ROWS_NAME,)).get_function(GATHER_ROWS_NAME)


def get_add_f32_kernel():
    """The kernel adding float32 arrays (``cuparing_add_f32``: arguments x, acc, n; acc += x
    over n elements, any grid: a grid-stride loop)."""
    return get_module((ADD_F32_NAME,)).get_function(ADD_F32_NAME)


def get_copy_u16_kernel():
    """The kernel copying 2-byte elements (``cuparing_copy_u16``: arguments x, y, n; y = x over
    n elements, any grid: a grid-stride loop)."""
    return get_module((COPY_U16_NAME,)).get_function(COPY_U16_NAME)


def get_add_cast_kernel(dtype: str):
    """The kernel writing float32 ``acc + x`` as 'float16'/'bfloat16' (``cuparing_add_cast_f32``:
    arguments x, acc, y, n over n elements, any grid: a grid-stride loop)."""
    name = add_cast_name(dtype)
    return get_module((name,)).get_function(name)


def get_bwd_delta_kernel(dtype: str):
    """The delta = rowsum(dO * O) kernel for 'float16'/'bfloat16' (256 threads, 8 rows/CTA)."""
    name = bwd_delta_name(dtype)
    return get_module((name,)).get_function(name)
