"""The GPU backend: our attention kernels for fp16/bf16, CuPy/cuBLAS for the rest.

Forward, float16 / bfloat16: one kernel launch per block, from the family ``loader.forward_family``
picks: ``cuparing_fwd_sm90<D, bf16, tma>`` (wgmma) on Hopper for the head dims it has tiles for,
with Q/K/V tensor maps for its TMA loads when ``tensor_maps`` can make them (else its cp.async
producer), ``cuparing_fwd<D, bf16>`` (mma.sync) everywhere else.
With a single block (``cuparing.attention``) the kernel writes the output in the input dtype and
the float32 LSE directly. In a ring, the first block writes a float32 accumulator
(``out [B, Sq, H, D]``, ``lse [B, H, Sq]``) and every later block merges itself into it inside the
kernel's epilogue (``lse = max + log(exp(a - max) + exp(b - max))``, float32), so no bf16 partial
is ever rounded and the error does not grow with the ring size; ``forward_finish`` casts once.

Forward, float32: the generic blockwise code (``array_ops``) on CuPy arrays, i.e. cuBLAS fp32 GEMMs
on CUDA cores (tensor cores are only used for 16-bit inputs). Head dims that the kernel cannot
take (not a multiple of 8, or > 256) also take this path, through float32.

Backward, float16 / bfloat16: ``cuparing_bwd_delta<bf16>`` computes ``delta = rowsum(dO * O)``
once per backward call, then every ring block is one launch of ``cuparing_bwd<D, bf16, 0>`` (two,
dV then dK + dQ, for head dims above 128) that ADDS its dq, dk, dv into the float32 accumulators
with atomics; ``cast`` turns them into the input dtype at the end.

Backward, float32 (and head dims the kernel cannot take): ``array_ops`` on CuPy (cuBLAS), after
upcasting to float32 with our own cast kernels (bf16 travels as uint16 bits; CuPy's astype is not
relied on for ``ml_dtypes.bfloat16``); gradients accumulate in float32 and are cast back the same
way.

Everything runs on CuPy's current stream; ``cuparing.api`` makes the caller's stream current.
"""

from __future__ import annotations

import math
import struct
import threading
import weakref
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from ..interop import dtype_name, element_strides
from ..kernels import launch_order, loader, tensor_maps
from ..masks import UNBOUNDED, BlockKind, MaskSpec
from ..schedule import gathered_keys, gathers, home_shift_of, kv_grads_whole
from . import array_ops, kv_gather, launch_plans
from .array_backend import ArrayBackend
from .direct_grads import DirectGrad
from .dq_tiles import DqTiles
from .dq_tiles import floats as dq_tile_floats
from .planned_ring import PlannedBackward, PlannedForward, PlannedGather, PlannedGatherBackward

_KERNEL_DTYPES = ("float16", "bfloat16")
_LOG2E = 1.4426950408889634

# Launches by signature (launch_plans): per call only these pointers change, in this order
_PLANS = launch_plans.PlanCache()
_FWD_POINTERS = ("out", "lse", "q", "k", "v", "q_pos", "k_pos", "acc")
_FWD_QKV = slice(2, 5)
class _BackwardPlan(NamedTuple):
    """A backward signature's launches; how many CTAs may hand work to a redo pass (0: none, no
    flags needed); the deterministic mode's turn counters (params.cuh BwdParams: dq_turns,
    dkv_turns; 0 and 0 outside that mode)."""

    launch: Any
    redo_slots: int
    dq_turns: int = 0
    dkv_turns: int = 0


_BWD_POINTERS = (
    "dout", "lse", "delta", "dq", "dk", "dv", "q", "k", "v", "q_pos", "k_pos", "redo",
    "dq_turns", "dkv_turns", "dk_out", "dv_out",
)  # fmt: skip
# separate-argument kernels, packed as PackedLaunch passes them: each argument at its offset
_ELEMENTWISE_ARGS = struct.Struct("<QQq")  # (src, dst, n): the casts
_ADD_CAST_ARGS = struct.Struct("<QQQq")  # (x, acc, y, n)
_DELTA_ARGS = struct.Struct("<QQQ6q4i")  # (dout, out, delta, strides, batch, seqlen, H, D)
_DELTA_OFFSETS = (0, 8, 16, *range(24, 72, 8), *range(72, 88, 4))
_DQ_TILES_ARGS = struct.Struct("<QQ4i")  # (tiles, dq, batch, seqlen, H, D)


# Device copies of position arrays, keyed by (device, length, hash of the values). A host-to-device
# copy from pageable memory synchronises the stream first, so copying positions on every call
# would stall the GPU behind Python (measured on an H200: 4k-token attention ran at 209 instead
# of 339 TFLOP/s); the layouts hand out the same few arrays again and again.
_DEVICE_POSITIONS: dict[tuple, Any] = {}
_DEVICE_POSITIONS_LOCK = threading.Lock()
_DEVICE_POSITIONS_MAX = 256
_ROWS_BY_ARRAY: dict = {}  # (id(host), device) -> (weakref(host), device row indices)
# DevicePositions of read-only host arrays, by (id(array), device) with a weak reference that
# proves the id still names that array (CupyBackend.positions)
_POSITIONS_BY_ARRAY: dict[tuple[int, int], tuple[weakref.ref, Any]] = {}


@dataclass
class DevicePositions:
    """Global positions of one shard: the NumPy host array and a cached device int32 copy.

    Attributes:
        host: NumPy int64 [S], ascending (what the schedule and the float32 path use).
    """

    host: np.ndarray
    _device: Any = None

    @property
    def device(self):
        """CuPy int32 [S] on the current device (copied once per distinct array and device)."""
        if self._device is None:
            import cupy

            values = self.host.astype(np.int32)
            key = (cupy.cuda.Device().id, len(values), hash(values.tobytes()))
            with _DEVICE_POSITIONS_LOCK:
                cached = _DEVICE_POSITIONS.get(key)
                if cached is None:
                    if len(_DEVICE_POSITIONS) >= _DEVICE_POSITIONS_MAX:
                        _DEVICE_POSITIONS.clear()
                    # a fresh stream-ordered copy; later readers on any stream come after it
                    cached = cupy.asarray(values)
                    cupy.cuda.get_current_stream().synchronize()
                    _DEVICE_POSITIONS[key] = cached
            self._device = cached
        return self._device

    def __len__(self) -> int:
        return len(self.host)


@dataclass
class CupyForwardState:
    """Running forward result of one rank on the GPU.

    Attributes:
        out: DIRECT mode: [B, Sq, H, D] in the input dtype; else float32 [B, Sq, H, D] contiguous.
        lse: float32 [B, H, Sq] contiguous.
        shape: [B, Sq, H, D] of the queries.
        dtype: the caller's dtype. blocks: blocks announced; done: blocks computed so far.
        direct: DIRECT mode (``blocks == 1``): the kernel writes the final out and lse itself.
        generic: the float32 fallback state (``ForwardState`` of the array_ops path) or None.
        dest_out, dest_lse: caller-owned arrays the result goes into (None: fresh arrays).
        final_out: several blocks: the output the last block writes in place (``dest_out`` or a
            fresh array), or None when a cast writes it (a ``dest_out`` the kernel cannot).
    """

    out: Any
    lse: Any
    shape: tuple
    dtype: Any
    blocks: int
    done: int = 0
    direct: bool = False
    generic: Any = None
    dest_out: Any = None
    dest_lse: Any = None
    final_out: Any = None


class CupyBackend:
    """Block attention on CuPy arrays; the protocol of ``cuparing.backends`` (see ArrayBackend)."""

    name = "cupy"

    def __init__(self):
        import cupy

        self.xp = cupy
        self._generic = ArrayBackend(xp=cupy)

    # ---- positions
    def positions(self, host_positions: np.ndarray) -> DevicePositions:
        """Wrap NumPy positions; the device copy is made lazily and kept with the object.

        A read-only array (the plans' own) gets the same object back on every call on this
        device, so a call does no O(S) host work on positions: no range check, int32 conversion
        or hashing after the first. The entry keeps the array and its device copy alive until
        the cache fills (``_DEVICE_POSITIONS_MAX`` entries) and is cleared."""
        host = host_positions
        if isinstance(host, np.ndarray) and not host.flags.writeable:
            return self._kept_per_array(_POSITIONS_BY_ARRAY, host, self._checked_positions)
        return self._checked_positions(np.asarray(host))

    def _kept_per_array(self, cache: dict, host: np.ndarray, make):
        """``make(host)`` for a read-only host array, made once per array and device: ``cache``
        maps (id(host), device) to a weak reference that proves the id still names that array
        and what was made; cleared when it holds ``_DEVICE_POSITIONS_MAX`` entries."""
        key = (id(host), self.xp.cuda.runtime.getDevice())
        hit = cache.get(key)
        if hit is not None and hit[0]() is host:
            return hit[1]
        made = make(host)
        with _DEVICE_POSITIONS_LOCK:
            if len(cache) >= _DEVICE_POSITIONS_MAX:
                cache.clear()
            cache[key] = (weakref.ref(host), made)
        return made

    @staticmethod
    def _checked_positions(host: np.ndarray) -> DevicePositions:
        # window sides are clamped to +-UNBOUNDED (int32 in the kernels): positions stay inside
        if len(host) and (host.min() < -UNBOUNDED or host.max() >= UNBOUNDED):
            raise ValueError(
                f"global positions must lie in [-2^30, 2^30) for the CUDA kernel, got "
                f"[{host.min()}, {host.max()}]"
            )
        return DevicePositions(host)

    # ---- forward
    def _kernel_ok(self, q) -> bool:
        return _kernels_take(q.shape[-1], dtype_name(q.dtype))

    def forward_state(self, q, blocks: int, out=None, lse=None) -> CupyForwardState:
        """Accumulators for queries q [B, Sq, H, D] that ``blocks`` non-empty blocks will fill.

        Caller-owned ``out`` / ``lse`` are written by the kernel itself where it can: a single
        block writes both directly (``out`` with its own strides, if 4-byte aligned for the
        kernel's paired stores); a ring merges into a float32 accumulator and ``lse`` in place,
        and its last block writes ``out`` the same way (else a cast does).
        """
        cp = self.xp
        b, s, h, d = q.shape
        dests = {"dest_out": out, "dest_lse": lse}
        if not self._kernel_ok(q):
            # float32 (or a head dim the kernel cannot take): generic path in float32
            state = self._generic.forward_state(_ShapeOnly(tuple(q.shape)), blocks, lse=lse)
            return CupyForwardState(None, None, q.shape, q.dtype, blocks, generic=state, **dests)
        running_lse = lse if lse is not None else cp.empty((b, h, s), dtype=cp.float32)
        if blocks == 1:
            direct_out = out if out is not None and _pair_aligned(out) else None
            if direct_out is None:
                direct_out = _empty(cp, (b, s, h, d), q.dtype)
            return CupyForwardState(
                direct_out, running_lse, q.shape, q.dtype, blocks, direct=True, **dests
            )
        if blocks == 0:
            return CupyForwardState(None, lse, q.shape, q.dtype, blocks, **dests)
        acc = cp.empty((b, s, h, d), dtype=cp.float32)
        final_out = _empty(cp, (b, s, h, d), q.dtype) if out is None else out
        return CupyForwardState(
            acc, running_lse, q.shape, q.dtype, blocks,
            final_out=final_out if _pair_aligned(final_out) else None, **dests,
        )  # fmt: skip

    def forward_block(self, state: CupyForwardState, q, k, v, q_pos, k_pos, kind, mask, scale):
        """Compute one block and fold it into ``state`` (one kernel launch for fp16/bf16)."""
        if state.generic is not None:
            q32, k32, v32 = (self._to_f32(x) for x in (q, k, v))
            out, lse = array_ops.block_forward(
                self.xp, q32, k32, v32, _host(q_pos), _host(k_pos), kind, mask, scale
            )
            array_ops.merge_into(self.xp, state.generic.out, state.generic.lse, out, lse)
            state.done += 1
            return
        if state.done >= state.blocks:
            raise RuntimeError(
                f"forward_block called {state.done + 1} times but forward_state announced "
                f"{state.blocks} block(s)"
            )
        mode = _forward_mode(state.blocks, state.done, state.final_out is not None)
        if mode == loader.OUT_ACC_FINAL:
            self._launch_forward(state.final_out, state.lse, q, k, v, q_pos, k_pos, kind, mask,
                                 scale, mode, acc=state.out)  # fmt: skip
        else:
            self._launch_forward(state.out, state.lse, q, k, v, q_pos, k_pos, kind, mask, scale,
                                 mode)  # fmt: skip
        state.done += 1

    def gathered(self, parts, keys):
        """(K, V) with ``parts[t]``'s rows at ``keys.rows[t]`` (the protocol's contract): one
        ``cuparing_gather_rows`` launch where it moves such rows (parts it cannot read in place
        copied first), else the generic row copies (16-bit floats through their bits)."""
        cp = self.xp
        k0, v0 = parts[0]
        if not kv_gather.launchable(k0):
            bits = [tuple(_as_bits(cp, x) for x in pair) for pair in parts]
            k_all, v_all = self._generic.gathered(bits, keys)
            return k_all.view(k0.dtype), v_all.view(v0.dtype)
        parts = [tuple(_kernel_operand(cp, x) for x in pair) for pair in parts]
        shape = (k0.shape[0], len(keys.positions), *k0.shape[2:])
        k_all, v_all = _empty(cp, shape, k0.dtype), _empty(cp, shape, v0.dtype)
        sources = self._device_rows(keys.sources)
        kv_gather.gather_launch(k_all, v_all, parts, sources).launch(
            k_all.data.ptr, v_all.data.ptr, *(k.data.ptr for k, _ in parts),
            *(v.data.ptr for _, v in parts), sources.data.ptr,
        )  # fmt: skip
        return k_all, v_all

    def rows_of_steps(self, dk, dv, keys):
        """Per step t, the float32 (dk, dv) rows at ``keys.rows[t]`` (the protocol's
        contract): one ``cuparing_gather_rows`` launch per step where it moves such rows,
        CuPy's index copies otherwise."""
        if not (kv_gather.launchable(dk) and dk.flags.c_contiguous and dv.flags.c_contiguous):
            return self._generic.rows_of_steps(dk, dv, keys)
        pieces = []
        for at in keys.step_sources:
            sources = self._device_rows(at)
            piece = [self.xp.empty((dk.shape[0], len(at), *dk.shape[2:]), dtype=dk.dtype)
                     for _ in range(2)]  # fmt: skip
            kv_gather.gather_launch(*piece, [(dk, dv)], sources).launch(
                piece[0].data.ptr, piece[1].data.ptr, dk.data.ptr, dv.data.ptr, sources.data.ptr
            )
            pieces.append(tuple(piece))
        return pieces

    def add_into(self, acc, x):
        """``acc += x`` on the current stream (the protocol's contract): float32 by
        ``cuparing_add_f32``, other dtypes by CuPy."""
        if acc.dtype == np.float32 and x.dtype == np.float32 and acc.flags.c_contiguous and (
            x.flags.c_contiguous
        ):  # fmt: skip
            if acc.size:
                _elementwise_launch(loader.get_add_f32_kernel(), acc.size).launch(
                    x.data.ptr, acc.data.ptr
                )
            return
        acc += x

    def _device_rows(self, host: np.ndarray):
        """The device copy of a read-only host array (a gather's sources), kept like
        positions' (one copy per array and device)."""
        return self._kept_per_array(_ROWS_BY_ARRAY, host, self._uploaded)

    def _uploaded(self, host: np.ndarray):
        made = self.xp.asarray(host)
        # (as positions': readers on any stream, or in a graph replayed later, come after it)
        self.xp.cuda.get_current_stream().synchronize()
        return made

    def forward_finish(self, state: CupyForwardState):
        """(out [B, Sq, H, D] in the caller's dtype, lse float32 [B, H, Sq]): the caller-owned
        arrays of ``forward_state`` where given."""
        cp = self.xp
        if state.generic is not None:
            out = self.cast(state.generic.out, state.dtype, out=state.dest_out)
            return out, state.generic.lse
        if state.direct and state.done == 1:
            out = state.out
            if state.dest_out is not None and out is not state.dest_out:
                out = self.cast(out, state.dtype, out=state.dest_out)  # an unaligned out
            return out, state.lse
        if state.done == 0:  # nothing visible anywhere: out 0, lse -inf
            b, s, h, _ = state.shape
            out = state.dest_out
            if out is None:
                out = _empty(cp, state.shape, state.dtype)
            _as_bits(cp, out)[...] = 0
            if state.dest_lse is None:
                return out, cp.full((b, h, s), -cp.inf, dtype=cp.float32)
            state.dest_lse.fill(-cp.inf)
            return out, state.dest_lse
        if state.done != state.blocks:
            raise RuntimeError(
                f"forward_finish after {state.done} of {state.blocks} announced block(s)"
            )
        if state.final_out is not None:  # the last block wrote it
            return state.final_out, state.lse
        return self.cast(state.out, state.dtype, out=state.dest_out), state.lse

    def _block_fields(self, q, k, q_pos, k_pos, kind, mask: MaskSpec, scale) -> dict:
        """The params fields forward and backward share: operands' pointers, shapes, positions,
        mask bounds and the exp2 scale."""
        batch, seqlen_q, nheads, headdim = q.shape
        return {
            "q_pos": q_pos.data.ptr, "k_pos": k_pos.data.ptr,
            "batch": batch, "seqlen_q": seqlen_q, "seqlen_k": k.shape[1], "nheads": nheads,
            "nheads_kv": k.shape[2], "headdim": headdim,
            "lo": -mask.left_bound, "hi": mask.right_bound,
            "block_full": int(kind == BlockKind.FULL), "scale_log2": np.float32(scale * _LOG2E),
        }  # fmt: skip

    def _device_positions(self, positions):
        """The int32 device copy of a block's positions (DevicePositions or NumPy)."""
        if not isinstance(positions, DevicePositions):
            positions = self.positions(positions)
        return positions.device

    def _launch_forward(
        self, out, lse, q, k, v, q_pos, k_pos, kind, mask: MaskSpec, scale, mode, acc=None
    ):  # fmt: skip
        cp = self.xp
        q, k, v = (_kernel_operand(cp, x) for x in (q, k, v))
        q_pos, k_pos = self._device_positions(q_pos), self._device_positions(k_pos)
        plan = self._forward_launch(out, lse, q, k, v, q_pos, k_pos, kind, mask, scale, mode)
        plan.launch(out.data.ptr, lse.data.ptr, q.data.ptr, k.data.ptr, v.data.ptr,
                    q_pos.data.ptr, k_pos.data.ptr, 0 if acc is None else acc.data.ptr)  # fmt: skip

    def _forward_launch(self, out, lse, q, k, v, q_pos, k_pos, kind, mask, scale, mode):
        """The (cached) launch of this signature; operands kernel-ready, positions on device."""
        # everything the launch depends on but the pointers (out's strides only when the kernel
        # writes it in place; accumulators are contiguous float32 of q's shape)
        key = (
            "fwd", self.xp.cuda.runtime.getDevice(), q.shape, q.strides, q.dtype, k.shape,
            k.strides, v.strides, out.strides if _writes_output(mode) else None, kind, mask,
            scale, mode, loader.kernel_switches(),
        )  # fmt: skip
        plan = _PLANS.get(key)
        if plan is None:
            plan = self._forward_plan(out, lse, q, k, v, q_pos, k_pos, kind, mask, scale, mode)
            _PLANS.put(key, plan)
        return plan

    def single_launch(self, out, lse, q, k, v, q_pos, k_pos, kind, mask: MaskSpec, scale):
        """The whole of a one-block forward (``forward_state`` with ``blocks == 1``, one
        ``forward_block``, ``forward_finish``) as a single launch writing ``out`` and ``lse`` in
        place, when that is all it does: kernel dtype and head dim, operands the kernel reads in
        place, an ``out`` it can write, a block that is not EMPTY. Otherwise None.

        Returns:
            (launch, q_pos, k_pos): the positions as int32 device arrays (keep them alive as long
            as the launch); ``launch.launch(out, lse, q, k, v, q_pos, k_pos)`` with pointers of
            arrays of these shapes and strides (16-byte aligned q, k, v; a 4-byte aligned out)
            on the current device and stream computes the block.
        """
        if kind == BlockKind.EMPTY or not self._kernel_ok(q) or not _pair_aligned(out):
            return None
        if not all(_kernel_readable(x) for x in (q, k, v)):
            return None
        q_pos, k_pos = self._device_positions(q_pos), self._device_positions(k_pos)
        plan = self._forward_launch(out, lse, q, k, v, q_pos, k_pos, kind, mask, scale,
                                    loader.OUT_DIRECT)  # fmt: skip
        return plan, q_pos, k_pos

    def plan_forward(self, plan, q, k, v, out, lse, scale) -> PlannedForward | None:
        """The launches of ``plan``'s ring forward on operands like these, decided once
        (:class:`~cuparing.backends.planned_ring.PlannedForward`), when the schedule's forward
        comes to our kernels' launches and nothing else: kernel dtype and head dim, q, k, v the
        kernels read in place, at least one non-EMPTY block, and an output the last block can
        write in place (``_pair_aligned``). Otherwise None.

        Args:
            plan: this rank's ``RingPlan``; q [B, Sq, H, D], k, v [B, Sk, Hkv, D]: the caller's
                operands (K/V received from the ring at later steps are contiguous arrays of
                k's shape); out, lse: the destinations (their strides are the plan's, their
                pointers are not); scale: the softmax scale.

        Returns:
            The plan: ``launch_step`` with pointers of arrays of these shapes and strides (q, k,
            v 16-byte aligned, out 4-byte aligned) computes what ``forward_state``,
            ``forward_block`` per step and ``forward_finish`` compute.
        """
        if plan.blocks == 0 or not self._kernel_ok(q):
            return None
        if not all(_kernel_readable(x) for x in (q, k, v)) or not _pair_aligned(out):
            return None
        if gathers(plan):  # (the schedule's gathered forward runs)
            return self._plan_gathered(plan, q, k, v, out, lse, scale)
        q_pos, blocks = self._planned_blocks(plan, k, v)
        return self._planned_forward(plan.last_step, plan.blocks, q_pos, blocks, q, out, lse,
                                     plan.mask, scale)  # fmt: skip

    def _planned_forward(self, last_step, block_count, q_pos, blocks, q, out, lse, mask,
                         scale) -> PlannedForward:  # fmt: skip
        """:class:`PlannedForward` of ``blocks`` (``_planned_blocks``' form, one per step;
        ``block_count`` of them not None): the last writes the output, the others the float32
        accumulator."""
        steps, keep, done = [], [q_pos], 0
        for block in blocks:
            if block is None:
                steps.append(None)
                continue
            kind, k_pos, kv = block
            mode = _forward_mode(block_count, done, True)
            done += 1
            launch = self._forward_launch(out, lse, q, *kv, q_pos, k_pos, kind, mask, scale,
                                          mode)  # fmt: skip
            steps.append((launch, k_pos.data.ptr, _writes_output(mode)))
            keep.append(k_pos)
        return PlannedForward(last_step, steps, q_pos.data.ptr, block_count > 1, tuple(keep))

    def _plan_gathered(self, plan, q, k, v, out, lse, scale) -> PlannedGather:
        """:meth:`plan_forward` for a plan the schedule gathers (``schedule.gathers``); None
        where the gather kernel cannot move its rows (the full path's generic copies do)."""
        if not kv_gather.launchable(k):
            return None
        keys = gathered_keys(plan)
        q_pos, own_pos, k_pos, sources, shape = self._gathered_operands(plan, keys, k)
        gather, gathered_kv = self._gather_template(plan, keys, k, v, sources, shape)
        blocks = self._gathered_blocks(keys, own_pos, k_pos, (k, v), gathered_kv)
        forward = self._planned_forward(1, keys.blocks, q_pos, blocks, q, out, lse, plan.mask,
                                        scale)  # fmt: skip
        return PlannedGather(plan.last_step, gather, forward, sources.data.ptr,
                             None if keys.identity else shape,
                             (own_pos, k_pos, sources))  # fmt: skip

    def _gather_template(self, plan, keys, k, v, sources, shape) -> tuple:
        """(the gather's launch, or None where the one received shard is already in order,
        ``keys.identity``; the gathered (K, V) templates: real memory, which the tensor maps
        are encoded from, or the receive buffers' layout)."""
        received = self._received_layout(k, v)
        if keys.identity:
            return None, received
        cp = self.xp
        gathered_kv = (_empty(cp, shape, k.dtype), _empty(cp, shape, v.dtype))
        return kv_gather.gather_launch(*gathered_kv, [received] * plan.last_step,
                                       sources), gathered_kv  # fmt: skip

    def _gathered_operands(self, plan, keys, k) -> tuple:
        """(device positions of the queries, of this rank's keys and of the gathered keys, the
        gather's device map, the gathered K/V shape) of a gathered plan."""
        q_pos = self._device_positions(self.positions(plan.q_positions))
        own_pos = self._device_positions(self.positions(plan.positions[plan.source(0)]))
        k_pos = self._device_positions(self.positions(keys.positions))
        shape = (k.shape[0], len(keys.positions), *k.shape[2:])
        return q_pos, own_pos, k_pos, self._device_rows(keys.sources), shape

    @staticmethod
    def _gathered_blocks(keys, own_pos, k_pos, own_kv, gathered_kv) -> list:
        """A gathered plan's two blocks in ``_planned_blocks``' form: (kind, device positions,
        (k, v)) of this rank's shard and of the gathered K/V, None where EMPTY."""
        return [
            None if kind == BlockKind.EMPTY else (kind, positions, kv)
            for kind, positions, kv in ((keys.own_kind, own_pos, own_kv),
                                        (keys.kind, k_pos, gathered_kv))
        ]  # fmt: skip

    def _received_layout(self, k, v) -> tuple:
        """Arrays laid out as the ring's receive buffers of K/V like ``k``, ``v`` (contiguous),
        over any memory: templates of launches only."""
        cp = self.xp
        return tuple(
            cp.ndarray(x.shape, dtype=cp.uint16, memptr=_as_bits(cp, x).data).view(x.dtype)
            for x in (k, v)
        )

    def _planned_blocks(self, plan, k, v) -> tuple:
        """What a planned ring call needs of ``plan``: (the queries' device positions, per step
        None for an EMPTY block, else (kind, the K/V shard's device positions, (k, v) operands:
        the caller's at step 0, arrays laid out as the ring's receive buffers after))."""
        received = self._received_layout(k, v)
        blocks = []
        for step in range(plan.last_step + 1):
            kind = plan.kinds[step]
            if kind == BlockKind.EMPTY:
                blocks.append(None)
                continue
            k_pos = self._device_positions(self.positions(plan.positions[plan.source(step)]))
            blocks.append((kind, k_pos, (k, v) if step == 0 else received))
        return self._device_positions(self.positions(plan.q_positions)), blocks

    def _forward_plan(self, out, lse, q, k, v, q_pos, k_pos, kind, mask, scale, mode):
        """The forward launch for this signature (operands already kernel-ready)."""
        batch, seqlen_q, nheads, headdim = q.shape
        dtype = dtype_name(q.dtype)
        arch = loader.device_arch()
        padded = loader.forward_head_dim(headdim, arch)
        sm90 = loader.forward_family(padded, arch) == "sm90"
        # the sm90 kernel copies with TMA when all three operands have tensor maps
        maps = None
        if sm90:
            maps = _TensorMaps(q, k, v, dtype, loader.SM90_FWD_CONFIGS[padded])
            maps = maps if maps.available else None
        kernel, cfg, smem = loader.get_fwd_kernel(padded, dtype, tma=maps is not None)
        out_strides = _element_strides(out) if _writes_output(mode) else (0, 0, 0)
        params = loader.pack_params(
            out=out.data.ptr, lse=lse.data.ptr, acc=0,
            **_stride_fields(q=q, k=k, v=v), **_strides("o", out_strides),
            **self._block_fields(q, k, q_pos, k_pos, kind, mask, scale), out_mode=mode,
        )  # fmt: skip
        tiles = math.ceil(seqlen_q / cfg.block_m)
        grid = (nheads, batch, tiles)
        if sm90:  # (batch, head) pairs in sections sharing K / V in L2 (kernels/launch_order.py)
            group = nheads // k.shape[2]
            section = launch_order.section_pairs(
                batch * nheads, group, k.shape[1] * padded * 4 // group, loader.device_l2_bytes()
            )
            grid = launch_order.sectioned_grid(batch, nheads, tiles, section)
        extra = None
        if sm90:  # the sm90 kernel takes the maps too (zeros for its cp.async producer)
            if maps is not None:
                extra = maps.for_pointers
            else:
                zeros = (launch_plans.blob(tensor_maps.pack_maps().tobytes()),)
                extra = lambda pointers: zeros  # noqa: E731
        offsets = loader.pointer_offsets("fwd", _FWD_POINTERS)
        return launch_plans.PackedLaunch(
            (kernel,), grid, (cfg.threads,), smem, params, offsets, extra
        )

    # ---- backward: our kernel for fp16/bf16, cuBLAS through array_ops (float32) otherwise
    def backward_delta(self, dout, out):
        """D = rowsum(dO * O), float32 [B, H, Sq]."""
        cp = self.xp
        if not (self._kernel_ok(dout) and dtype_name(out.dtype) == dtype_name(dout.dtype)):
            return array_ops.backward_delta(self.xp, self._to_f32(dout), self._to_f32(out))
        batch, seqlen, nheads, headdim = dout.shape
        delta = cp.empty((batch, nheads, seqlen), dtype=cp.float32)
        rows = batch * seqlen * nheads
        if rows == 0:
            return delta
        dout, out = (_kernel_operand(cp, x) for x in (dout, out))
        self._delta_launch(dout, out).launch(dout.data.ptr, out.data.ptr, delta.data.ptr)
        return delta

    def _delta_launch(self, dout, out):
        """The (cached) launch (dout, out, delta pointers) of the delta kernel for kernel-ready
        ``dout`` and ``out`` of these shapes and strides (at least one row)."""
        cp = self.xp
        key = ("delta", cp.cuda.runtime.getDevice(), dout.shape, dout.strides, out.strides,
               dtype_name(dout.dtype))  # fmt: skip
        plan = _PLANS.get(key)
        if plan is None:
            batch, seqlen, nheads, headdim = dout.shape
            kernel = loader.get_bwd_delta_kernel(dtype_name(dout.dtype))
            threads = 256  # 8 warps, one row each
            blocks = min(math.ceil(batch * seqlen * nheads / (threads // 32)), 65536)
            # (dout, out, delta, 6 strides, batch, seqlen, nheads, headdim), naturally aligned
            args = _DELTA_ARGS.pack(0, 0, 0, *_element_strides(dout), *_element_strides(out),
                                    batch, seqlen, nheads, headdim)  # fmt: skip
            plan = _PLANS.put(key, launch_plans.PackedLaunch(
                (kernel,), (blocks,), (threads,), 0, args, (0, 8, 16), arg_offsets=_DELTA_OFFSETS
            ))  # fmt: skip
        return plan

    def zeros_accum(self, shape, dtype):
        """A zeroed float32 gradient accumulator (zeroed by a memset on the current stream:
        ``zeros`` would launch an elementwise kernel through CuPy's slower path)."""
        return _zeroed(self.xp, shape, self.xp.float32)

    def kv_accum(self, q, k, whole=False, into=None):
        """A zeroed float32 dK / dV accumulator of k's shape; where ``whole`` (one block makes
        the whole gradient), the sm90 kernels run q's backward and each query head has its own
        K / V head, a :class:`DirectGrad` instead: the kernels write the gradient straight in
        k's dtype, into ``into`` when it is C-contiguous, k's dtype and 4-byte aligned."""
        if not (whole and self._writes_kv_grads(q, k)):
            return self.zeros_accum(k.shape, k.dtype)
        cp = self.xp
        usable = (into is not None and into.flags.c_contiguous and into.data.ptr % 4 == 0
                  and dtype_name(into.dtype) == dtype_name(k.dtype))  # fmt: skip
        out = into if usable else _empty(cp, k.shape, k.dtype)
        return DirectGrad(out, cp.empty(k.shape, dtype=cp.float32))

    def _writes_kv_grads(self, q, k) -> bool:
        """Whether the backward kernels can write the dK / dV of queries ``q`` and keys ``k``
        straight (:class:`DirectGrad`), given one block makes them whole: the sm90 kernels,
        one query head per K / V head, one dtype."""
        return (self._sm90_backward(q) and k.shape[2] == q.shape[2]
                and dtype_name(k.dtype) == dtype_name(q.dtype))  # fmt: skip

    def kv_homeward(self, acc, part, dtype):
        """``acc`` + ``part`` (float32, C-contiguous; ``part`` may be None) as ``dtype``: one
        pass of ``cuparing_add_cast_f32`` for fp16 / bf16 (into a new array), else ``acc``
        updated in place and cast."""
        cp = self.xp
        name = dtype_name(dtype)
        fused = part is not None and name in _KERNEL_DTYPES and all(
            x.dtype == np.float32 and x.flags.c_contiguous for x in (acc, part)
        )  # fmt: skip
        if not fused:
            if part is not None:
                self.add_into(acc, part)
            return self.cast(acc, dtype)
        y = _empty(cp, acc.shape, dtype)
        if y.size:
            _add_cast_launch(name, acc.size).launch(part.data.ptr, acc.data.ptr, y.data.ptr)
        return y

    def kv_from_accum(self, acc, dtype, out=None):
        """dK / dV in ``dtype`` (k's) from :meth:`kv_accum`'s accumulator (into ``out`` if
        given: k's shape, any strides): a :class:`DirectGrad` already holds it."""
        if not isinstance(acc, DirectGrad):
            return self.cast(acc, dtype, out=out)
        if out is None or out is acc.out:
            return acc.out
        _as_bits(self.xp, out)[...] = _as_bits(self.xp, acc.out)
        return out

    def dq_accum(self, q):
        """A zeroed float32 dq accumulator for queries ``q`` in the layout the backward kernels
        add into: :class:`DqTiles` where the sm90 kernels run q's backward, else q's shape."""
        if self._sm90_backward(q):
            return DqTiles(_zeroed(self.xp, (dq_tile_floats(q.shape),), self.xp.float32), q.shape)
        return self.zeros_accum(q.shape, q.dtype)

    def dq_from_accum(self, acc, dtype, out=None):
        """dq in ``dtype`` from :meth:`dq_accum`'s accumulator (into ``out`` if given: q's
        shape, any strides)."""
        if not isinstance(acc, DqTiles):
            return self.cast(acc, dtype, out=out)
        cp = self.xp
        name = dtype_name(dtype)
        if out is not None and (out.shape != acc.shape or dtype_name(out.dtype) != name):
            raise ValueError(
                f"dq must be an array of shape {acc.shape} and dtype {name}, got "
                f"{out.shape} {dtype_name(out.dtype)}"
            )
        # the kernel writes pairs as 4-byte words into a contiguous dq
        direct = out is not None and out.flags.c_contiguous and out.data.ptr % 4 == 0
        dq = out if direct else _empty(cp, acc.shape, dtype)
        if dq.size:
            self._dq_tiles_launch(acc.shape, name).launch(acc.array.data.ptr, dq.data.ptr)
        if out is not None and not direct:
            _as_bits(cp, out)[...] = _as_bits(cp, dq)
            return out
        return dq

    def plan_backward(
        self, plan, dout, q, k, v, out, lse, grads, scale, deterministic=False
    ) -> PlannedBackward | PlannedGatherBackward | None:  # fmt: skip
        """The launches of ``plan``'s ring backward on operands like these, decided once
        (:class:`~cuparing.backends.planned_ring.PlannedBackward`, or for a plan the schedule
        gathers, ``schedule.gathers``, a
        :class:`~cuparing.backends.planned_ring.PlannedGatherBackward`), when the schedule's
        backward comes to our kernels' launches and nothing else: kernel dtype and head dim, no
        empty extent, dout, q, k, v, out the kernels read in place, lse contiguous float32, and
        gradients ``grads`` = (dq, dk, dv) contiguous and 4-byte aligned (written straight by
        the last kernels). Otherwise None.

        Args:
            plan: this rank's ``RingPlan``; the arrays as ``ring_backward`` takes them (K/V
                received from the ring at later steps are contiguous arrays of k's shape);
                scale: the softmax scale; deterministic: the ordered kernels.
        """
        if not self._kernel_ok(q) or 0 in q.shape or 0 in k.shape:
            return None
        if dtype_name(out.dtype) != dtype_name(dout.dtype):
            return None
        if not all(_kernel_readable(x) for x in (dout, q, k, v, out)):
            return None
        if lse.dtype != np.float32 or not lse.flags.c_contiguous:
            return None
        if not all(g.flags.c_contiguous and g.data.ptr % 4 == 0 for g in grads):
            return None
        if gathers(plan):
            return self._plan_gathered_backward(plan, dout, q, k, v, out, lse, grads, scale,
                                                deterministic)  # fmt: skip
        q_pos, blocks = self._planned_blocks(plan, k, v)
        # one block makes dK / dV whole: the kernels write them straight (DirectGrad), the
        # float32 pair is the redo pass's scratch, uninitialised
        direct = kv_grads_whole(plan) and self._writes_kv_grads(q, k)
        return self._planned_backward(
            plan.last_step, home_shift_of(plan), q_pos, blocks, tuple(k.shape), dout, q, k, out,
            lse, grads, plan.mask, scale, deterministic, direct,
        )  # fmt: skip

    def _planned_backward(
        self, last_step, home_shift, q_pos, blocks, kv_shape, dout, q, k, out, lse, grads, mask,
        scale, deterministic, direct,
    ) -> PlannedBackward:  # fmt: skip
        """:class:`PlannedBackward` of ``blocks`` (``_planned_blocks``' form, one per step),
        whose dK / dV accumulators are float32 ``kv_shape`` (the K/V the blocks read) and whose
        cast turns accumulators of k's shape into dK / dV."""
        cp = self.xp
        name = dtype_name(q.dtype)
        tiles = self._sm90_backward(q)
        batch, seqlen, nheads, _ = q.shape
        # (shapes only in the closure: the arrays would keep the first call's tensors alive)
        delta_shape = (batch, nheads, seqlen)
        dq_shape = (dq_tile_floats(q.shape),) if tiles else tuple(q.shape)
        flag_count = 0

        def scratch():
            delta = cp.empty(delta_shape, dtype=cp.float32)
            dq_acc = _zeroed(cp, dq_shape, cp.float32)
            dkv = [cp.empty(kv_shape, dtype=cp.float32) if direct
                   else _zeroed(cp, kv_shape, cp.float32) for _ in range(2)]  # fmt: skip
            flags = _zeroed(cp, (flag_count,), cp.int32) if flag_count else None
            return delta, dq_acc, dkv, flags

        def fresh():  # the pair later steps compute into (schedule.backward_rotation)
            return [_zeroed(cp, kv_shape, cp.float32) for _ in range(2)]

        def clear(pair):
            stream = cp.cuda.get_current_stream().ptr
            for x in pair:
                cp.cuda.runtime.memsetAsync(x.data.ptr, 0, x.nbytes, stream)

        steps, keep = [], [q_pos]
        for block in blocks:
            if block is None:
                steps.append(None)
                continue
            kind, k_pos, kv = block
            # the accumulators' and delta's fields are addresses only, patched per call: any
            # array stands in for them in the template (the caller's dq, dk, dv, lse)
            launch = self._backward_launch(
                grads[0], grads[1], grads[2], dout, q, *kv, lse, lse, q_pos, k_pos, kind,
                mask, scale, deterministic, tiles, direct,
            )  # fmt: skip
            offsets = tuple(
                None if at is None else at + 4 * flag_count for at in _flag_offsets(launch)
            )
            flag_count += _flag_count(launch)
            steps.append((launch.launch, k_pos.data.ptr, offsets))
            keep.append(k_pos)
        to_half, _ = loader.get_cast_kernels(name)
        if tiles:
            dq_out = self._dq_tiles_launch(q.shape, name)
        else:
            dq_out = _elementwise_launch(to_half, q.size)
        homeward = None
        if home_shift:  # (the whole dK / dV travel home in their dtype, k's shape)
            grad_shape, grad_dtype = tuple(k.shape), k.dtype

            def travel():
                return [_empty(cp, grad_shape, grad_dtype) for _ in range(2)]

            homeward = (_add_cast_launch(name, k.size), travel,
                        _elementwise_launch(loader.get_copy_u16_kernel(), k.size))  # fmt: skip
        return PlannedBackward(
            last_step, home_shift, self._delta_launch(dout, out), steps, q_pos.data.ptr, dq_out,
            None if direct else _elementwise_launch(to_half, k.size), scratch, tuple(keep),
            direct=direct, fresh=fresh, clear=clear,
            add=_elementwise_launch(loader.get_add_f32_kernel(), math.prod(kv_shape)),
            homeward=homeward,
        )  # fmt: skip

    def _plan_gathered_backward(self, plan, dout, q, k, v, out, lse, grads, scale,
                                deterministic) -> PlannedGatherBackward:  # fmt: skip
        """:meth:`plan_backward` for a plan the schedule gathers (``schedule.gathers``): this
        rank's block into its float32 dK / dV, one block over the gathered K/V into float32
        dK / dV of every gathered key, each step's rows of those copied out (to go back to
        their owner), the received ones added in step order, then cast."""
        if not kv_gather.launchable(k):
            return None
        cp = self.xp
        keys = gathered_keys(plan)
        q_pos, own_pos, k_pos, sources, shape = self._gathered_operands(plan, keys, k)
        gather, gathered_kv = self._gather_template(plan, keys, k, v, sources, shape)
        blocks = self._planned_backward(
            1, 0, q_pos, self._gathered_blocks(keys, own_pos, k_pos, (k, v), gathered_kv),
            tuple(k.shape), dout, q, k, out, lse, grads, plan.mask, scale, deterministic, False,
        )  # fmt: skip
        dk_all, dv_all = (cp.empty(shape, dtype=cp.float32) for _ in range(2))
        step_sources = [self._device_rows(at) for at in keys.step_sources]
        piece_shapes = [] if keys.identity else [(k.shape[0], len(at), *k.shape[2:])
                                                 for at in keys.rows]  # fmt: skip
        returns = tuple(
            kv_gather.gather_launch(*(cp.empty(piece, dtype=cp.float32) for _ in range(2)),
                                    [(dk_all, dv_all)], at)  # fmt: skip
            for piece, at in zip(piece_shapes, step_sources, strict=False)
        )
        kv_dtype = k.dtype  # (no arrays in the closure: they would outlive the first call)

        def scratch():
            gathered = () if gather is None else tuple(_empty(cp, shape, kv_dtype)
                                                       for _ in range(2))  # fmt: skip
            dkv_all = tuple(_zeroed(cp, shape, cp.float32) for _ in range(2))
            pieces = [tuple(cp.empty(piece, dtype=cp.float32) for _ in range(2))
                      for piece in piece_shapes]  # fmt: skip
            return blocks.scratch(), gathered, dkv_all, pieces

        return PlannedGatherBackward(
            plan.last_step, gather, blocks, returns, sources.data.ptr,
            tuple(at.data.ptr for at in step_sources), scratch,
            (own_pos, k_pos, sources, *step_sources),
        )  # fmt: skip

    def _dq_tiles_launch(self, shape: tuple, dtype: str):
        """The (cached) launch (tiles, dq pointers) that converts a :class:`DqTiles` accumulator
        for queries of ``shape`` (not empty) into a contiguous dq of ``dtype``."""
        key = ("dq_tiles", self.xp.cuda.runtime.getDevice(), shape, dtype)
        # (one float pair of the accumulator per work item)
        return _PLANS.get(key) or _PLANS.put(key, _grid_stride_launch(
            loader.get_dq_from_tiles_kernel(dtype), dq_tile_floats(shape) // 2,
            _DQ_TILES_ARGS.pack(0, 0, *shape), (0, 8, 16, 20, 24, 28),
        ))  # fmt: skip

    def _sm90_backward(self, q) -> bool:
        """Whether the sm90 (wgmma) kernels run the backward of queries ``q`` here."""
        return self._kernel_ok(q) and _backward_kernels(q.shape[-1])[0] == "sm90"

    def check_deterministic(self, headdim: int, dtype: str) -> None:
        """Raise unless a backward of actual head dim ``headdim`` and ``dtype`` ('bfloat16', ...)
        on the current device has a deterministic mode: the Hopper kernels (sm90 family) have
        one; the mma.sync kernels do not yet. Float32 / float64 (array arithmetic) always do.

        Raises:
            NotImplementedError: that backward runs the mma.sync kernels.
        """
        if not _kernels_take(headdim, dtype):
            return
        if _backward_kernels(headdim)[0] != "sm90":
            raise NotImplementedError(
                f"deterministic=True needs the Hopper backward kernels (sm_90, head dims 40 to "
                f"{max(loader.SM90_BWD_HEAD_DIMS)}, CUPARING_BWD not 'sm80'); head dim {headdim} "
                f"on {loader.device_arch()} runs the mma.sync kernels, which have no "
                f"deterministic mode yet"
            )

    def backward_block(
        self, dq, dk, dv, dout, q, k, v, lse, delta, q_pos, k_pos, kind, mask, scale,
        deterministic=False,
    ):  # fmt: skip
        """Add one block's gradients into the float32 dq, dk, dv (in place); ``deterministic``:
        the ordered kernels (:meth:`check_deterministic` says where they exist)."""
        if self._kernel_ok(q):
            self._launch_backward(
                dq, dk, dv, dout, q, k, v, lse, delta, q_pos, k_pos, kind, mask, scale,
                deterministic,
            )  # fmt: skip
            return
        array_ops.block_backward(
            self.xp, dq, dk, dv, self._to_f32(dout), self._to_f32(q), self._to_f32(k),
            self._to_f32(v), lse, delta, _host(q_pos), _host(k_pos), kind, mask, scale,
        )  # fmt: skip

    def _launch_backward(
        self, dq, dk, dv, dout, q, k, v, lse, delta, q_pos, k_pos, kind, mask: MaskSpec, scale,
        deterministic,
    ):  # fmt: skip
        cp = self.xp
        batch, seqlen_q, nheads, _ = q.shape
        seqlen_k = k.shape[1]
        if batch == 0 or seqlen_q == 0 or seqlen_k == 0 or nheads == 0:
            return
        tiles = isinstance(dq, DqTiles)
        if tiles:  # (that the sm90 kernels run it: checked once, where the plan is made)
            if dq.shape != q.shape:
                raise ValueError(f"dq must be a dq tiles accumulator for {q.shape}")
            dq = dq.array
        # direct gradients (kv_accum): the kernels write dk_out / dv_out, dk / dv are scratch
        direct = isinstance(dk, DirectGrad)
        dk_out = dv_out = 0
        if direct:
            if not (tiles and isinstance(dv, DirectGrad) and dk.shape == dv.shape == k.shape):
                raise ValueError(f"direct dk and dv need dq tiles and k's shape {k.shape}")
            dk_out, dv_out = dk.out.data.ptr, dv.out.data.ptr
            dk, dv = dk.scratch, dv.scratch
        for name, acc, shape in ((None if tiles else "dq", dq, q.shape), ("dk", dk, k.shape),
                                 ("dv", dv, k.shape)):  # fmt: skip
            if name and (acc.dtype != cp.float32 or not acc.flags.c_contiguous
                         or acc.shape != shape):  # fmt: skip
                raise ValueError(f"{name} must be a contiguous float32 accumulator of {shape}")
        q, k, v, dout = (_kernel_operand(cp, x) for x in (q, k, v, dout))
        lse = cp.ascontiguousarray(lse, dtype=cp.float32)
        delta = cp.ascontiguousarray(delta, dtype=cp.float32)
        q_pos, k_pos = self._device_positions(q_pos), self._device_positions(k_pos)
        plan = self._backward_launch(dq, dk, dv, dout, q, k, v, lse, delta, q_pos, k_pos, kind,
                                     mask, scale, deterministic, tiles, direct)  # fmt: skip
        # the sm90 kernel's hand-over to the redo pass and the turn counters, zeroed per launch
        # by one memset (kept until after the launch)
        redo = dq_turns = dkv_turns = 0
        offsets = _flag_offsets(plan)
        if any(at is not None for at in offsets):
            flags = _zeroed(cp, (_flag_count(plan),), cp.int32)
            redo, dq_turns, dkv_turns = (
                0 if at is None else flags.data.ptr + at for at in offsets
            )
        plan.launch.launch(dout.data.ptr, lse.data.ptr, delta.data.ptr, dq.data.ptr, dk.data.ptr,
                           dv.data.ptr, q.data.ptr, k.data.ptr, v.data.ptr, q_pos.data.ptr,
                           k_pos.data.ptr, redo, dq_turns, dkv_turns, dk_out, dv_out)  # fmt: skip

    def _backward_launch(self, dq, dk, dv, dout, q, k, v, lse, delta, q_pos, k_pos, kind, mask,
                         scale, deterministic, tiles, direct=False) -> _BackwardPlan:  # fmt: skip
        """The (cached) launches of this backward signature; operands kernel-ready, positions
        on device, ``dq`` the raw accumulator array (``tiles``: a DqTiles one); ``direct``: the
        kernels write dK / dV straight (:class:`DirectGrad`)."""
        key = (
            "bwd", self.xp.cuda.runtime.getDevice(), q.shape, q.strides, q.dtype, k.shape,
            k.strides, v.strides, dout.strides, kind, mask, scale, loader.kernel_switches(),
            deterministic, tiles, direct,
        )  # fmt: skip
        plan = _PLANS.get(key)
        if plan is None:
            plan = self._backward_plan(
                dq, dk, dv, dout, q, k, v, lse, delta, q_pos, k_pos, kind, mask, scale,
                deterministic, tiles, direct,
            )  # fmt: skip
            _PLANS.put(key, plan)
        return plan

    def _backward_plan(self, dq, dk, dv, dout, q, k, v, lse, delta, q_pos, k_pos, kind, mask,
                       scale, deterministic, tiles, direct=False):  # fmt: skip
        """The backward launch(es) for this signature (operands already kernel-ready; ``dq``
        the accumulator's array, ``tiles``: in the dq tiles layout; ``direct``: dK / dV written
        straight, the redo pass's rows converted by a launch after it)."""
        batch, seqlen_q, nheads, headdim = q.shape
        family, padded = _backward_kernels(headdim)
        name = dtype_name(q.dtype)
        sm90 = family == "sm90"
        if tiles != sm90:  # (CUPARING_BWD / CUPARING_KERNELS changed since dq_accum, say)
            raise ValueError(
                f"dq must come from dq_accum under the same kernel switches: the "
                f"{'sm90' if sm90 else 'sm80'} backward kernels add into "
                f"{'dq tiles' if sm90 else 'an array of the queries shape'}, got "
                f"{'dq tiles' if tiles else 'an array'} (CUPARING_BWD / CUPARING_KERNELS "
                f"changed between them?)"
            )
        if deterministic:
            self.check_deterministic(headdim, name)
        kernels, cfg, smem = loader.get_bwd_kernels(padded, name, ordered=deterministic)
        params = loader.pack_bwd_params(
            dout=dout.data.ptr, lse=lse.data.ptr, delta=delta.data.ptr,
            dq=dq.data.ptr, dk=dk.data.ptr, dv=dv.data.ptr,
            **_stride_fields(q=q, k=k, v=v), **_strides("do", _element_strides(dout)),
            **self._block_fields(q, k, q_pos, k_pos, kind, mask, scale), scale=np.float32(scale),
            redo=0, dq_turns=0, dkv_turns=0, dk_out=0, dv_out=0,
        )  # fmt: skip
        key_tiles = math.ceil(k.shape[1] / cfg.block_n)
        plain = (nheads, batch, key_tiles)  # the sm80 kernels' grid, the redo pass's too
        grid = plain
        if sm90:  # pairs in sections sharing Q, dO and dq tiles in L2; ordered: one section
            pairs = batch * nheads
            section = pairs if deterministic else launch_order.section_pairs(
                pairs, nheads // k.shape[2], seqlen_q * padded * 8, loader.device_l2_bytes()
            )  # fmt: skip
            grid = launch_order.sectioned_grid(batch, nheads, key_tiles, section)
        offsets = loader.pointer_offsets("bwd", _BWD_POINTERS)
        # one launch (all of dq, dk, dv) or two (dv, then dk + dq)
        launch = launch_plans.PackedLaunch(
            tuple(kernel for kernel, _ in kernels), grid, (cfg.threads,), smem, params, offsets
        )
        turns = (0, 0)
        if deterministic:  # a counter per (batch, head, query tile) and per (batch, kv head, CTA)
            kv_heads = k.shape[2]
            turns = (batch * nheads * math.ceil(seqlen_q / cfg.block_m),
                     batch * kv_heads * key_tiles if kv_heads != nheads else 0)  # fmt: skip
        if not sm90 or kind == BlockKind.FULL:  # (a FULL block has no mask edge)
            return _BackwardPlan(launch, 0, *turns)
        # the sm90 kernel leaves tiles with NaN / inf next to a mask edge to the sm80 kernel's
        # exact path: its redo pass runs the CTAs so marked (the others exit at once)
        redo_kernel, redo_cfg, redo_smem = loader.get_bwd_redo_kernel(padded, name)
        redo_launch = launch_plans.PackedLaunch(
            (redo_kernel,), plain, (redo_cfg.threads,), redo_smem, params, offsets
        )
        slots = batch * nheads * key_tiles
        launches = (launch, redo_launch)
        if direct:  # the rows of the CTAs the redo pass finished, into dK / dV (plain grid)
            rows_launch = launch_plans.PackedLaunch(
                (loader.get_direct_rows_kernel(name),), plain, (256,), 0, params, offsets
            )
            launches += (rows_launch,)
        return _BackwardPlan(launch_plans.LaunchSequence(launches), slots, *turns)

    # ---- dtype conversion
    def copy(self, x):
        """``x`` in a new array: 16-bit floats through their bits (CuPy's own copy has no
        ``ml_dtypes.bfloat16`` loop before CuPy 14)."""
        return _as_bits(self.xp, x).copy().view(x.dtype)

    def cast(self, x, dtype, out=None):
        """``x`` (float32) as ``dtype``; fp16/bf16 through our cast kernel (contiguous result).
        With ``out`` (x's shape, ``dtype``, any strides): written there (straight from the cast
        kernel when ``out`` is contiguous) and returned."""
        cp = self.xp
        name = dtype_name(dtype)
        if out is not None:
            if out is x:
                return out
            converts = name != dtype_name(x.dtype)  # (else: an unaligned direct result, copied)
            if converts and name in _KERNEL_DTYPES and out.flags.c_contiguous:
                to_half, _ = loader.get_cast_kernels(name)
                _elementwise(
                    to_half, cp.ascontiguousarray(x, dtype=cp.float32), out.view(cp.uint16)
                )
                return out
            _as_bits(cp, out)[...] = _as_bits(cp, self.cast(x, dtype))
            return out
        if name == dtype_name(x.dtype):
            return x
        if name in _KERNEL_DTYPES:
            x = cp.ascontiguousarray(x, dtype=cp.float32)
            bits = cp.empty(x.shape, dtype=cp.uint16)
            to_half, _ = loader.get_cast_kernels(name)
            _elementwise(to_half, x, bits)
            return bits.view(dtype)
        return x.astype(dtype)

    def _to_f32(self, x):
        """fp16/bf16 (any strides, last axis contiguous) -> contiguous float32 copy."""
        cp = self.xp
        name = dtype_name(x.dtype)
        if name not in _KERNEL_DTYPES:
            return x.astype(cp.float32, copy=False)
        bits = cp.ascontiguousarray(x.view(cp.uint16))
        out = cp.empty(x.shape, dtype=cp.float32)
        _, to_f32 = loader.get_cast_kernels(name)
        _elementwise(to_f32, bits, out)
        return out


def _forward_mode(blocks: int, done: int, writes_output: bool) -> int:
    """How forward block ``done`` (0-based) of ``blocks`` non-EMPTY ones writes its result: one
    block straight into the output; else into the float32 accumulator (the first), merged into
    it, and the last merged and written as the output where ``writes_output`` (an output the
    kernel can write in place)."""
    if blocks == 1:
        return loader.OUT_DIRECT
    if done == 0:
        return loader.OUT_ACC_WRITE
    if done == blocks - 1 and writes_output:
        return loader.OUT_ACC_FINAL
    return loader.OUT_ACC_MERGE


def _writes_output(mode: int) -> bool:
    """Whether a forward launch in ``mode`` writes the output (in the input dtype, strided)."""
    return mode in (loader.OUT_DIRECT, loader.OUT_ACC_FINAL)


def _kernels_take(headdim: int, dtype: str) -> bool:
    """Whether our CUDA kernels run operands of actual head dim ``headdim`` and ``dtype`` (else
    the array arithmetic in float32 does)."""
    return dtype in _KERNEL_DTYPES and headdim % 8 == 0 and headdim <= loader.MAX_HEAD_DIM


def _backward_kernels(headdim: int) -> tuple[str, int]:
    """(family, instantiation head dim) of the backward kernels for actual head dim ``headdim``
    on the current device (CUPARING_BWD / CUPARING_KERNELS as set now)."""
    arch = loader.device_arch()
    padded = loader.backward_head_dim(headdim, arch)
    return loader.backward_family(padded, arch), padded


def _flag_offsets(plan: _BackwardPlan) -> tuple:
    """Byte offsets of a backward launch's redo flags, dq turns and dK/dV turns in one zeroed
    int32 array (None for those it has none of)."""
    slots = (plan.redo_slots, plan.dq_turns, plan.dkv_turns)
    starts = (0, slots[0], slots[0] + slots[1])
    return tuple(4 * start if n else None for start, n in zip(starts, slots, strict=True))


def _flag_count(plan: _BackwardPlan) -> int:
    """How many int32 flags a backward launch needs (:func:`_flag_offsets`)."""
    return plan.redo_slots + plan.dq_turns + plan.dkv_turns


def _grid_stride_launch(kernel, items: int, args: bytes, arg_offsets: tuple,
                        pointer_offsets: tuple = (0, 8)):  # fmt: skip
    """The launch of a grid-stride kernel over ``items`` work items (256 threads a block, at
    most 65536 blocks) whose pointer arguments sit at ``pointer_offsets`` (default: the first
    two, (source, destination))."""
    threads = 256
    blocks = min(math.ceil(items / threads), 65536)
    return launch_plans.PackedLaunch(
        (kernel,), (blocks,), (threads,), 0, args, pointer_offsets, arg_offsets=arg_offsets
    )


def _elementwise(kernel, src, dst) -> None:
    """One of the cast kernels over ``src.size`` contiguous elements (a launch kept per kernel
    and size)."""
    if src.size:
        _elementwise_launch(kernel, src.size).launch(src.data.ptr, dst.data.ptr)


def _add_cast_launch(dtype: str, n: int):
    """The launch (x, acc, y pointers) of ``cuparing_add_cast_f32`` for ``dtype`` over ``n`` >= 1
    contiguous elements, kept per dtype, device and size."""
    kernel = loader.get_add_cast_kernel(dtype)
    key = ("add_cast", kernel.kernel.ptr, n)
    return _PLANS.get(key) or _PLANS.put(key, _grid_stride_launch(
        kernel, n, _ADD_CAST_ARGS.pack(0, 0, 0, n), (0, 8, 16, 24), pointer_offsets=(0, 8, 16)
    ))  # fmt: skip


def _elementwise_launch(kernel, n: int):
    """The launch (source, destination pointers) of a cast kernel over ``n`` >= 1 contiguous
    elements, kept per kernel and size."""
    key = ("elementwise", kernel.kernel.ptr, n)  # (a function handle belongs to one device)
    return _PLANS.get(key) or _PLANS.put(
        key, _grid_stride_launch(kernel, n, _ELEMENTWISE_ARGS.pack(0, 0, n), (0, 8, 16))
    )


def _host(positions) -> np.ndarray:
    return positions.host if isinstance(positions, DevicePositions) else np.asarray(positions)


def _strides(name: str, strides) -> dict:
    """``{name}_batch_stride`` / ``_row_stride`` / ``_head_stride`` params fields."""
    return dict(zip((f"{name}_batch_stride", f"{name}_row_stride", f"{name}_head_stride"),
                    strides, strict=True))  # fmt: skip


def _stride_fields(**arrays) -> dict:
    """Pointer and stride fields of each named [B, S, H, D] operand."""
    fields = {}
    for name, x in arrays.items():
        fields[name] = x.data.ptr
        fields.update(_strides(name, _element_strides(x)))
    return fields


def _element_strides(x) -> tuple[int, int, int]:
    """(batch, seq, head) strides in elements of a 4-D array with a contiguous last axis."""
    return element_strides(x)[:3]


class _TensorMaps:
    """The packed Q, K, V tensor maps of one sm90 forward signature (boxes of the config's query
    rows and keys per tile), one packed argument per (q, k, v) address triple: a ring's
    K/V rotate between a few buffers, so the triples repeat and each is encoded once.

    Attributes:
        available: whether maps can be made here (cuda-bindings present, ``CUPARING_TMA`` not
            0, operands the copy engine can address).
    """

    _LIMIT = 64  # address triples kept (all dropped when full)

    def __init__(self, q, k, v, dtype: str, cfg: loader.Sm90FwdConfig):
        keys = cfg.keys(tma=True)
        self._specs = tuple(
            (x.shape, _element_strides(x), rows)
            for x, rows in ((q, cfg.block_m), (k, keys), (v, keys))
        )
        self._dtype = dtype
        self._packed: dict[tuple, tuple] = {}
        self.available = self._pack((q.data.ptr, k.data.ptr, v.data.ptr)) is not None

    def _pack(self, pointers: tuple):
        blobs = []
        for ptr, (shape, strides, rows) in zip(pointers, self._specs, strict=True):
            map_bytes = tensor_maps.encode(ptr, shape, strides, self._dtype, rows)
            if map_bytes is None:
                return None
            blobs.append(map_bytes)
        return (launch_plans.blob(tensor_maps.pack_maps(*blobs).tobytes()),)

    def for_pointers(self, pointers: tuple) -> tuple:
        """The maps argument for a launch with these ``_FWD_POINTERS``."""
        triple = pointers[_FWD_QKV]
        packed = self._packed.get(triple)
        if packed is None:
            packed = self._pack(triple)
            if packed is None:  # the plan was made for addressable operands of this layout
                raise RuntimeError(f"no tensor maps for operands at {triple}")
            if len(self._packed) >= self._LIMIT:
                self._packed.clear()
            self._packed[triple] = packed
        return packed


def _pair_aligned(out) -> bool:
    """Whether the forward kernel can write ``out`` in place: it stores pairs of 16-bit values
    as one 4-byte word, so the base and every stride must keep pairs 4-byte aligned."""
    return out.data.ptr % 4 == 0 and all(
        s % 2 == 0 or n == 1 for s, n in zip(_element_strides(out), out.shape[:3], strict=True)
    )


def _kernel_readable(x) -> bool:
    """Whether the kernels can read ``x`` in place: 16-byte aligned base, strides multiples of 16
    bytes (cp.async copies 16 bytes; 8 elements of 2 bytes), a contiguous last axis. On every
    launch, so it reads the byte strides directly."""
    shape, strides = x.shape, x.strides
    return (
        x.data.ptr % 16 == 0
        and all(s % 16 == 0 or n == 1 for s, n in zip(strides[:3], shape[:3], strict=True))
        and (shape[-1] <= 1 or strides[-1] == x.dtype.itemsize)
    )


def _zeroed(cp, shape, dtype):
    """A zeroed array, zeroed by a memset on the current stream (``zeros`` would launch an
    elementwise kernel through CuPy's slower path)."""
    array = cp.empty(shape, dtype=dtype)
    if array.nbytes:
        cp.cuda.runtime.memsetAsync(
            array.data.ptr, 0, array.nbytes, cp.cuda.get_current_stream().ptr
        )
    return array


def _kernel_operand(cp, x):
    """``x`` if the kernels can read it in place (``_kernel_readable``), otherwise a contiguous
    copy in new (aligned) memory, through uint16 bits."""
    if _kernel_readable(x):
        return x
    # a fresh allocation (aligned), even for a contiguous x: ascontiguousarray would return a
    # contiguous x as it is, misaligned base included
    return x.view(cp.uint16).copy(order="C").view(x.dtype)


def _empty(cp, shape, dtype):
    """Uninitialised array of a 16-bit float dtype (bf16 via uint16 storage if needed)."""
    try:
        return cp.empty(shape, dtype=dtype)
    except (TypeError, ValueError):
        return cp.empty(shape, dtype=cp.uint16).view(dtype)


def _as_bits(cp, x):
    """``x`` itself, or for a 16-bit float dtype its uint16 view: copies and fills of bf16
    (ml_dtypes) arrays go through the bits, which CuPy's elementwise kernels handle."""
    return x.view(cp.uint16) if x.dtype.itemsize == 2 else x


class _ShapeOnly:
    """Stand-in carrying shape and float32 dtype for the generic forward state."""

    def __init__(self, shape):
        self.shape = shape
        self.dtype = np.dtype(np.float32)


_BACKEND: CupyBackend | None = None
_BACKEND_LOCK = threading.Lock()


def get_cupy_backend() -> CupyBackend:
    """The process-wide :class:`CupyBackend` (created on first use; imports CuPy)."""
    global _BACKEND
    with _BACKEND_LOCK:
        if _BACKEND is None:
            _BACKEND = CupyBackend()
        return _BACKEND
