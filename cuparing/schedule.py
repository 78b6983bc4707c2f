"""The ring loop, shared by every backend and communicator.

At step ``t`` rank ``r`` holds the K/V shard of rank ``(r - t) mod C``. A :class:`RingPlan` decides,
from the layout's global positions and the mask, which of those blocks are empty (skipped: no
compute), partial (masked) or full (mask-free), and how many steps the ring needs at all: a
sliding window can make the last steps empty on every rank, and then they are neither computed
nor transferred. One device (:func:`cuparing.attention`) is the same loop with a one-step plan
(:func:`plan_single`), which also allows ``Sq != Sk``.

Forward: K/V travel one hop per step; each rank folds every block's (out, lse) into a running
float32 result. Backward: dK/dV accumulators travel with K/V, collect every rank's contribution,
and are sent home after the last step; dQ accumulates locally.

This module never touches q, k, v or the results itself: the ``backend`` does all array work, the
``ring`` all communication (NumPy is used only for the host-side plan).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np

from . import documents
from .layouts import global_positions
from .masks import BlockKind, MaskSpec


@dataclass(frozen=True)
class RingPlan:
    """Which block runs at which step, for one rank of one ring.

    Attributes:
        rank, world_size: this rank and the ring size ``C``.
        layout: how the global sequence is sharded.
        mask: the causal / window spec.
        positions: global positions of each rank's K/V shard (NumPy int64, ascending), indexed
            by rank.
        kinds: ``kinds[t]`` classifies this rank's block at step ``t``.
        last_step: the last step at which any rank has a non-empty block; the ring stops there.
        q_positions: global positions of this rank's queries; in a ring the same tokens as its
            K/V shard, ``positions[rank]``.
    """

    rank: int
    world_size: int
    layout: str
    mask: MaskSpec
    positions: tuple
    kinds: tuple
    last_step: int
    q_positions: np.ndarray

    def source(self, step: int) -> int:
        """The rank whose K/V shard this rank holds at ``step``."""
        return (self.rank - step) % self.world_size

    @property
    def blocks(self) -> int:
        """How many non-empty blocks this rank computes."""
        return sum(kind != BlockKind.EMPTY for kind in self.kinds[: self.last_step + 1])

    def idle(self) -> RingPlan:
        """The same plan with nothing to compute or transfer: every block empty, one step.

        For an empty batch (``B == 0``, on every rank): the results are empty arrays of the right
        shapes and dtypes, and no K/V moves (the call's agreement check still runs).
        """
        kinds = (BlockKind.EMPTY,) * len(self.kinds)
        return replace(self, kinds=kinds, last_step=0)


def _frozen(positions: np.ndarray) -> np.ndarray:
    """``positions`` made read-only: plans are cached and shared, and a backend may key its
    device copies on the array's identity (``CupyBackend.positions``)."""
    positions.flags.writeable = False
    return positions


@lru_cache(maxsize=256)
def _kind_table(layout: str, world_size: int, local_len: int, mask: MaskSpec):
    positions = tuple(
        _frozen(global_positions(layout, r, world_size, local_len)) for r in range(world_size)
    )
    table = np.empty((world_size, world_size), dtype=np.int8)  # [rank, step]
    for rank in range(world_size):
        q = positions[rank]
        for step in range(world_size):
            k = positions[(rank - step) % world_size]
            table[rank, step] = mask.classify(int(q[0]), int(q[-1]), int(k[0]), int(k[-1]))
    busy = np.nonzero((table != BlockKind.EMPTY).any(axis=0))[0]
    last_step = int(busy[-1]) if len(busy) else 0
    return positions, table, last_step


def plan_ring(layout: str, rank: int, world_size: int, local_len: int, mask: MaskSpec) -> RingPlan:
    """The (cached) plan for ``rank`` of a ``world_size`` ring holding ``local_len`` tokens each."""
    positions, table, last_step = _kind_table(layout, world_size, local_len, mask)
    kinds = tuple(BlockKind(int(x)) for x in table[rank])
    return RingPlan(rank, world_size, layout, mask, positions, kinds, last_step, positions[rank])


@lru_cache(maxsize=64)
def plan_documents(
    layout: str, rank: int, world_size: int, cu_seqlens: tuple, mask: MaskSpec
) -> RingPlan:
    """The (cached) plan for ``rank`` of a ring over a packed sequence of documents
    ``cu_seqlens`` (``world_size == 1``: one device): spread positions, the clamped window and
    padded shards of ``cuparing.documents``, so every backend and kernel runs it unchanged. A
    block is classified on its real tokens only (padding sees nothing and is seen by nothing);
    one holding padding is never FULL, so padding rows are always masked."""
    cu = np.asarray(cu_seqlens, dtype=np.int64)
    spec = documents.clamped_mask(mask, cu)
    queries, keys = documents.ring_positions(layout, world_size, cu)
    queries, keys = tuple(map(_frozen, queries)), tuple(map(_frozen, keys))
    length = len(queries[0])
    real = [len(documents.held_tokens(layout, r, world_size, cu)) for r in range(world_size)]
    table = np.empty((world_size, world_size), dtype=np.int8)  # [rank, step]
    for r in range(world_size):
        for step in range(world_size):
            source = (r - step) % world_size
            nq, nk = real[r], real[source]
            if nq == 0 or nk == 0:
                table[r, step] = BlockKind.EMPTY
                continue
            q, k = queries[r], keys[source]
            kind = spec.classify(int(q[0]), int(q[nq - 1]), int(k[0]), int(k[nk - 1]))
            if kind == BlockKind.FULL and (nq < length or nk < length):
                kind = BlockKind.PARTIAL
            table[r, step] = kind
    busy = np.nonzero((table != BlockKind.EMPTY).any(axis=0))[0]
    last_step = int(busy[-1]) if len(busy) else 0
    kinds = tuple(BlockKind(int(x)) for x in table[rank])
    return RingPlan(rank, world_size, layout, spec, keys, kinds, last_step, queries[rank])


@lru_cache(maxsize=256)
def plan_single(seqlen_q: int, seqlen_k: int, mask: MaskSpec) -> RingPlan:
    """A one-step plan for one device: ``seqlen_q`` queries against ``seqlen_k`` keys, queries
    aligned to the end of the keys (query ``i`` sits at position ``i + seqlen_k - seqlen_q``, as
    in flash-attention). Both lengths are >= 1."""
    q_pos = _frozen(np.arange(seqlen_q, dtype=np.int64) + (seqlen_k - seqlen_q))
    k_pos = _frozen(np.arange(seqlen_k, dtype=np.int64))
    kind = mask.classify(int(q_pos[0]), int(q_pos[-1]), 0, seqlen_k - 1)
    return RingPlan(0, 1, "contiguous", mask, (k_pos,), (kind,), 0, q_pos)


def ring_forward(backend, ring, q, k, v, plan: RingPlan, scale: float, out=None, lse=None):
    """Run the forward ring for this rank.

    Args:
        backend: array backend (see ``cuparing.backends``).
        ring: the communicator (also for ``plan.world_size == 1``: its ``trace_compute`` and
            ``check`` are called; a :class:`~cuparing.comm.local.SoloRing` will do).
        q: [B, Sq, H, D] this rank's queries; k, v: [B, Sk, Hkv, D] this rank's keys/values.
        out, lse: caller-owned backend arrays to write the result into (checked by the caller),
            or None.

    Returns:
        (out, lse): out [B, Sq, H, D] in q's dtype, lse [B, H, Sq] float32 (float64 for float64);
        the given ``out`` / ``lse`` where given.

    With ``CUPARING_KV_GATHER=1`` a plan of 2..``GATHER_MAX_STEPS`` steps runs
    :func:`gathered_forward`.
    """
    if gathers(plan):
        return gathered_forward(backend, ring, q, k, v, plan, scale, out=out, lse=lse)
    positions = [backend.positions(p) for p in plan.positions]
    q_pos = backend.positions(plan.q_positions)
    state = backend.forward_state(q, plan.blocks, out=out, lse=lse)

    def block(step, kv):
        k_pos = positions[plan.source(step)]
        kind = plan.kinds[step]
        backend.forward_block(state, q, kv[0], kv[1], q_pos, k_pos, kind, plan.mask, scale)

    forward_rotation(ring, [k, v], busy_steps(plan), block)
    result = backend.forward_finish(state)
    ring.check()
    return result


# CUPARING_KV_GATHER=1: ring forwards gather every rank's K/V first and run one block over all
# of them (experimental; gathered_forward says when that pays)
GATHER_ENV = "CUPARING_KV_GATHER"
GATHER_MAX_STEPS = 8  # shards one gathered forward holds (the GPU kernel's GatherRowsParams)


def gather_requested() -> bool:
    """Whether ``CUPARING_KV_GATHER=1`` asks ring forwards to gather K/V first
    (:func:`gathered_forward`)."""
    return os.environ.get(GATHER_ENV, "").strip() == "1"


def gathers(plan: RingPlan) -> bool:
    """Whether this rank's forward of ``plan`` gathers K/V (:func:`gathered_forward`): asked
    for, and 2..``GATHER_MAX_STEPS`` steps (one step has nothing to gather)."""
    return 0 < plan.last_step < GATHER_MAX_STEPS and gather_requested()


@dataclass(frozen=True)
class GatheredKeys:
    """Every rank's keys of one plan in one ascending order (:func:`gathered_keys`).

    Attributes:
        positions: the global positions of the key rows this rank's steps ``0 .. last_step``
            hold (rank ``plan.source(t)``'s at step t), ascending (padding keys last).
        rows: ``rows[t]``: where step ``t``'s key rows go in that order (int64, read-only).
        sources: the inverse map, int32 [len(positions), 2] (read-only): (step, row of that
            step's shard) of every gathered row.
        step_sources: per step t, ``rows[t]`` as a map of the same form, int32 [n_t, 2]
            (read-only): (0, its row in the gathered order) for each of step t's rows, which
            takes them back out of one gathered array (the backward's dK / dV).
        kind: the block of this rank's queries against all of them: EMPTY where every step's
            block is, FULL where every one is FULL, else PARTIAL.
    """

    positions: np.ndarray
    rows: tuple
    sources: np.ndarray
    step_sources: tuple
    kind: BlockKind


_GATHERED: dict = {}  # id(plan) -> (plan, GatheredKeys): plans are cached and live long
_GATHERED_LOCK = threading.Lock()


def gathered_keys(plan: RingPlan) -> GatheredKeys:
    """The (cached) :class:`GatheredKeys` of ``plan``."""
    hit = _GATHERED.get(id(plan))
    if hit is not None and hit[0] is plan:
        return hit[1]
    held = [plan.positions[plan.source(t)] for t in range(plan.last_step + 1)]
    joined = np.concatenate(held)
    order = np.argsort(joined, kind="stable")
    where = np.empty_like(order)
    where[order] = np.arange(len(order))
    bounds = np.cumsum([0] + [len(p) for p in held])
    rows = tuple(_frozen(where[a:b].copy()) for a, b in zip(bounds[:-1], bounds[1:], strict=True))
    sources = np.empty((len(order), 2), dtype=np.int32)
    for t, at in enumerate(rows):
        sources[at, 0] = t
        sources[at, 1] = np.arange(len(at))
    kinds = set(plan.kinds[: plan.last_step + 1])
    if kinds == {BlockKind.EMPTY}:
        kind = BlockKind.EMPTY
    elif kinds == {BlockKind.FULL}:
        kind = BlockKind.FULL
    else:
        kind = BlockKind.PARTIAL
    step_sources = tuple(
        _frozen(np.stack([np.zeros(len(at), dtype=np.int32), at.astype(np.int32)], axis=1))
        for at in rows
    )
    made = GatheredKeys(_frozen(joined[order]), rows, _frozen(sources), step_sources, kind)
    with _GATHERED_LOCK:
        if len(_GATHERED) >= 256:
            _GATHERED.clear()
        _GATHERED[id(plan)] = (plan, made)
    return made


def gathered_forward(backend, ring, q, k, v, plan: RingPlan, scale: float, out=None, lse=None):
    """:func:`ring_forward`'s result another way: the K/V of every step's rank first
    (``plan.last_step`` exchanges at once, shifts 1 .. last_step), put in one ascending order
    of positions (:func:`gathered_keys`), then one block of this rank's queries against all of
    them: no per-step launches and no float32 partials to merge, at the price of (last_step +
    1) times the K/V memory and a transfer that no compute hides. It pays where ring steps are
    mostly fixed costs: shards cut into many pieces (packed documents) on several GPUs (PERF.md,
    "Packed documents on 4x H200"). Same arguments and returns; the caller has checked that
    the plan has more than one step."""
    keys = gathered_keys(plan)
    parts = gathered_shards(ring, [k, v], plan.last_step)
    state = backend.forward_state(q, 0 if keys.kind == BlockKind.EMPTY else 1, out=out, lse=lse)
    if keys.kind != BlockKind.EMPTY:
        k_all, v_all = backend.gathered(parts, keys)
        q_pos, k_pos = backend.positions(plan.q_positions), backend.positions(keys.positions)
        with ring.trace_compute("fwd gathered"):
            backend.forward_block(state, q, k_all, v_all, q_pos, k_pos, keys.kind, plan.mask,
                                  scale)  # fmt: skip
    result = backend.forward_finish(state)
    ring.check()
    return result


def gathered_backward(backend, ring, dout, q, k, v, out, lse, plan: RingPlan, scale: float,
                      grads_into=None, dlse=None, deterministic: bool = False):  # fmt: skip
    """:func:`ring_backward`'s result another way, as :func:`gathered_forward` computes the
    forward: every step's K/V at once in position order, one backward block of this rank's
    queries against all of them (dQ whole at once; float32 dK / dV partials of every gathered
    key), then each step's rows of those partials sent back to the rank that owns them (shift
    ``C - t`` for step ``t``'s shard, all issued at once) and the owner adds what it receives
    to its own rows in step order (a fixed order: ``deterministic`` holds). It moves (last_step)
    shards of float32 dK / dV where the ring moves them once per step, and no step waits for
    another. Same arguments and returns; the caller has checked :func:`gathers`."""
    keys = gathered_keys(plan)
    parts = gathered_shards(ring, [k, v], plan.last_step)
    delta = backend.backward_delta(dout, out)
    if dlse is not None:
        delta = delta - dlse.astype(delta.dtype)
    dq = backend.dq_accum(q)
    dq_into, dk_into, dv_into = grads_into or (None, None, None)
    k_all, v_all = backend.gathered(parts, keys)
    dk_all, dv_all = backend.kv_accum(q, k_all), backend.kv_accum(q, v_all)
    if keys.kind != BlockKind.EMPTY:
        q_pos, k_pos = backend.positions(plan.q_positions), backend.positions(keys.positions)
        with ring.trace_compute("bwd gathered"):
            backend.backward_block(dq, dk_all, dv_all, dout, q, k_all, v_all, lse, delta, q_pos,
                                   k_pos, keys.kind, plan.mask, scale,
                                   deterministic=deterministic)  # fmt: skip
    pieces = backend.rows_of_steps(dk_all, dv_all, keys)
    pending = [
        ring.exchange(list(pieces[t]), ring.size - t, f"dkv_gather_{t}")
        for t in range(1, plan.last_step + 1)
    ]
    dq_result = backend.dq_from_accum(dq, q.dtype, out=dq_into)
    dk_own, dv_own = pieces[0]
    for exchange in pending:  # (in step order: the sum repeats bit for bit)
        dk_part, dv_part = exchange.wait()
        backend.add_into(dk_own, dk_part)
        backend.add_into(dv_own, dv_part)
    grads = (
        dq_result,
        _owned(backend, dk_own, k.dtype, False, dk_into),
        _owned(backend, dv_own, v.dtype, False, dv_into),
    )
    ring.check()
    return grads


def gathered_shards(ring, kv: list, last_step: int) -> list:
    """Every step's K/V shard at once: ``[kv] +`` what ``last_step`` exchanges of shifts 1 ..
    ``last_step`` deliver (each on its own channel, all issued before the first wait), as (k, v)
    per step. The GPU rings queue exchanges on one communication stream, so the transfers run
    one after another (an all-gather in one NCCL group would run them at once)."""
    pending = [ring.exchange(kv, shift, f"kv_gather_{shift}") for shift in range(1, last_step + 1)]
    return [tuple(kv)] + [tuple(exchange.wait()) for exchange in pending]


def run_planned_gathered_forward(ring, planned, q: int, kv: list, out: int, lse: int,
                                 gathered: tuple[int, int]) -> None:  # fmt: skip
    """:func:`gathered_forward` at pointer level, for a repeat of a signature whose launches the
    backend decided once (``planned``: a
    :class:`~cuparing.backends.planned_ring.PlannedGather`): the same exchanges, then the
    rows put in order and the one forward block.

    Args:
        ring: the communicator; kv: [k, v] this rank's shard as backend arrays.
        q, out, lse: addresses of the queries and of the results (written here).
        gathered: addresses of the gathered K and V, contiguous [B, L, Hkv, D] of k's dtype
            (``planned.gathered_shape``).
    """
    parts = gathered_shards(ring, kv, planned.last_step)
    with ring.trace_compute("fwd gathered"):
        planned.launch([(k.data.ptr, v.data.ptr) for k, v in parts], *gathered, q, out, lse)
    ring.check()


def run_planned_gathered_backward(ring, planned, pointers: tuple, kv: list,
                                  grads: tuple) -> tuple:  # fmt: skip
    """:func:`gathered_backward` at pointer level, for a repeat of a signature whose launches
    the backend decided once (``planned``: a
    :class:`~cuparing.backends.planned_ring.PlannedGatherBackward`): the same exchanges in the
    same order.

    Args:
        ring: the communicator; kv: [k, v] this rank's shard as backend arrays.
        pointers: addresses of (dout, q, out, lse); grads: of (dq, dk, dv), written here.

    Returns:
        The call's scratch arrays (``planned.scratch()``), which its queued launches read.
    """
    dout, q, out, lse = pointers
    scratch = planned.scratch()
    (delta_array, dq_array, dkv_all, flag_array), gathered, pieces = scratch
    delta, dq_acc = delta_array.data.ptr, dq_array.data.ptr
    dk_all, dv_all = (x.data.ptr for x in dkv_all)
    k_all, v_all = (x.data.ptr for x in gathered)
    flags = 0 if flag_array is None else flag_array.data.ptr
    block = planned.block
    parts = gathered_shards(ring, kv, planned.last_step)
    block.launch_delta(dout, out, delta)
    planned.launch_gather([(k.data.ptr, v.data.ptr) for k, v in parts], k_all, v_all)
    if block.busy[0]:  # (as the full path: no block where no query sees a gathered key)
        with ring.trace_compute("bwd gathered"):
            block.launch_step(0, dout, lse, delta, dq_acc, dk_all, dv_all, q, k_all, v_all,
                              flags)  # fmt: skip
    for step, (dk, dv) in enumerate(pieces):
        planned.launch_return(step, dk_all, dv_all, dk.data.ptr, dv.data.ptr)
    pending = [
        ring.exchange(list(pieces[t]), ring.size - t, f"dkv_gather_{t}")
        for t in range(1, planned.last_step + 1)
    ]
    block.finish_queries(dq_acc, grads[0])
    dk_own, dv_own = (x.data.ptr for x in pieces[0])
    for exchange in pending:  # (in step order, as the full path adds)
        dk_part, dv_part = exchange.wait()
        planned.add(dk_part.data.ptr, dk_own)
        planned.add(dv_part.data.ptr, dv_own)
    block.finish_keys(dk_own, dv_own, grads[1], grads[2])
    ring.check()
    return scratch


def busy_steps(plan: RingPlan) -> tuple[bool, ...]:
    """Per step ``0..plan.last_step``, whether this rank's block is not EMPTY."""
    return tuple(kind != BlockKind.EMPTY for kind in plan.kinds[: plan.last_step + 1])


def forward_rotation(ring, kv: list, busy, compute) -> None:
    """The forward's order of exchanges and compute, whatever computes: at each step ``t`` of
    ``busy`` (one flag per step, whether it computes) the exchange that brings step ``t + 1``'s
    K/V is started (none after the last), ``compute(t, kv)`` runs on the K/V held at ``t`` where
    ``busy[t]``, then the exchange is waited for. ``kv``: this rank's [k, v] as the ring sends
    them."""
    last = len(busy) - 1
    for step, computes in enumerate(busy):
        pending = ring.exchange(kv, 1, "kv") if step < last else None
        if computes:
            with ring.trace_compute(f"fwd step {step}"):
                compute(step, kv)
        if pending is not None:
            kv = pending.wait()


def run_planned_forward(ring, planned, q: int, kv: list, out: int, lse: int, accumulator: int):
    """:func:`ring_forward` at pointer level, for a repeat of a signature whose launches the
    backend decided once (``planned``: a
    :class:`~cuparing.backends.planned_ring.PlannedForward`): the same steps, exchanges and
    order, with no per-block checks or lookups.

    Args:
        ring: the communicator, as in :func:`ring_forward`.
        planned: the launches of this rank's plan.
        q: address of this rank's queries; kv: [k, v] this rank's shard as backend arrays (what
            ``ring.exchange`` sends).
        out, lse: addresses of the results (out in q's dtype, lse float32, both written here).
        accumulator: address of a float32 [B, Sq, H, D] contiguous scratch array when
            ``planned.accumulates`` (else ignored).
    """

    def block(step, kv):
        planned.launch_step(step, out, accumulator, lse, q, kv[0].data.ptr, kv[1].data.ptr)

    forward_rotation(ring, kv, planned.busy, block)
    ring.check()


def ring_backward(
    backend, ring, dout, q, k, v, out, lse, plan: RingPlan, scale: float, grads_into=None,
    dlse=None, deterministic: bool = False,
):  # fmt: skip
    """Run the backward ring for this rank.

    Args:
        dout, out: [B, Sq, H, D] gradient of and output of this rank's queries.
        lse: [B, H, Sq] the final (merged) log-sum-exp from the forward ring.
        q, k, v: as in :func:`ring_forward`.
        grads_into: (dq, dk, dv) caller-owned backend arrays (each may be None) to write the
            gradients into, or None.
        dlse: [B, H, Sq] gradient of the loss with respect to ``lse``, or None. Since
            d lse_i / d s_ij = P_ij, it enters as dS = P * (dP - (delta - dlse)).
        deterministic: every block's adds in a fixed order (the backend's ``backward_block``);
            the ring's own order of steps is fixed, so the gradients repeat bit for bit.

    Returns:
        (dq, dk, dv) in the dtypes of q, k, v; dk and dv are gradients of *this rank's* K/V
        shard, summed over every rank's queries; the given arrays where given.

    With ``CUPARING_KV_GATHER=1`` a plan of 2..``GATHER_MAX_STEPS`` steps runs
    :func:`gathered_backward`.
    """
    if gathers(plan):
        return gathered_backward(backend, ring, dout, q, k, v, out, lse, plan, scale,
                                 grads_into, dlse, deterministic)  # fmt: skip
    positions = [backend.positions(p) for p in plan.positions]
    q_pos = backend.positions(plan.q_positions)
    delta = backend.backward_delta(dout, out)
    if dlse is not None:
        delta = delta - dlse.astype(delta.dtype)
    dq = backend.dq_accum(q)
    dq_into, dk_into, dv_into = grads_into or (None, None, None)
    home_shift = home_shift_of(plan)
    # one block makes dK / dV whole (nothing travels): the backend may write them straight
    whole = kv_grads_whole(plan)
    dkv = [backend.kv_accum(q, k, whole, dk_into), backend.kv_accum(q, v, whole, dv_into)]

    def block(step, kv, dkv):
        k_pos = positions[plan.source(step)]
        backend.backward_block(
            dq, dkv[0], dkv[1], dout, q, kv[0], kv[1], lse, delta, q_pos, k_pos,
            plan.kinds[step], plan.mask, scale, deterministic=deterministic,
        )  # fmt: skip

    dq_result = None

    def queries_done():
        nonlocal dq_result
        dq_result = backend.dq_from_accum(dq, q.dtype, out=dq_into)

    dkv = backward_rotation(ring, [k, v], dkv, busy_steps(plan), home_shift, block, queries_done)
    from_ring = plan.last_step > 0 or home_shift > 0
    grads = (
        dq_result,
        _owned(backend, dkv[0], k.dtype, from_ring, dk_into),
        _owned(backend, dkv[1], v.dtype, from_ring, dv_into),
    )
    ring.check()
    return grads


def run_planned_backward(
    ring, planned, pointers: tuple, kv: list, grads: tuple
):  # fmt: skip
    """:func:`ring_backward` at pointer level, for a repeat of a signature whose launches the
    backend decided once (``planned``: a
    :class:`~cuparing.backends.planned_ring.PlannedBackward`): the same steps, exchanges and
    order, with no per-block checks or lookups.

    Args:
        ring: the communicator, as in :func:`ring_backward`.
        planned: the launches of this rank's plan.
        pointers: addresses of (dout, q, out, lse), as in :func:`ring_backward`.
        kv: [k, v] this rank's shard as CuPy arrays (what ``ring.exchange`` sends).
        grads: addresses of (dq, dk, dv), written here in the dtypes of q, k, v.

    Returns:
        The call's scratch arrays (``planned.scratch()``), which its queued launches read: a
        captured call keeps them as long as its graph.
    """
    dout, q, out, lse = pointers
    scratch = planned.scratch()
    delta_array, dq_array, dkv, flag_array = scratch
    delta, dq_acc = delta_array.data.ptr, dq_array.data.ptr
    flags = 0 if flag_array is None else flag_array.data.ptr
    planned.launch_delta(dout, out, delta)

    def block(step, kv, dkv):
        planned.launch_step(
            step, dout, lse, delta, dq_acc, dkv[0].data.ptr, dkv[1].data.ptr, q, kv[0].data.ptr,
            kv[1].data.ptr, flags, grads[1], grads[2],
        )  # fmt: skip

    def queries_done():
        planned.finish_queries(dq_acc, grads[0])

    dkv = backward_rotation(ring, kv, dkv, planned.busy, planned.home_shift, block, queries_done)
    planned.finish_keys(dkv[0].data.ptr, dkv[1].data.ptr, grads[1], grads[2])
    ring.check()
    return scratch


def home_shift_of(plan: RingPlan) -> int:
    """How far the travelling dK/dV go home after the backward's last step: what this rank
    holds then belongs to rank ``rank - last_step``."""
    return (-plan.last_step) % plan.world_size


def kv_grads_whole(plan: RingPlan) -> bool:
    """Whether this rank's one backward block makes its dK / dV whole: one step, not EMPTY,
    and nothing to send home (a backend may then write them straight, ``kv_accum``)."""
    return plan.last_step == 0 and home_shift_of(plan) == 0 and busy_steps(plan)[0]


def backward_rotation(
    ring, kv: list, dkv: list, busy, home_shift: int, compute, queries_done=None
) -> list:  # fmt: skip
    """The backward's order of exchanges and compute, whatever computes: at each step ``t`` of
    ``busy`` the exchange bringing step ``t + 1``'s K/V is started (none after the last),
    ``compute(t, kv, dkv)`` adds into the dK/dV accumulators held at ``t`` where ``busy[t]``,
    then those accumulators travel on, and both exchanges are waited for; after the last step
    the accumulators go ``home_shift`` ranks on, and ``queries_done()`` (if given: work that
    needs every step's dQ but no dK / dV, e.g. dQ's conversion) runs before that trip is waited
    for, so a GPU does it while the accumulators are on their way. Returns the dK/dV
    accumulators of this rank's own shard."""
    last = len(busy) - 1
    for step, computes in enumerate(busy):
        more = step < last
        pending_kv = ring.exchange(kv, 1, "kv") if more else None
        if computes:
            with ring.trace_compute(f"bwd step {step}"):
                compute(step, kv, dkv)
        if more:
            pending_dkv = ring.exchange(dkv, 1, "dkv")
            kv = pending_kv.wait()
            dkv = pending_dkv.wait()
    pending_home = ring.exchange(dkv, home_shift, "dkv_home") if home_shift else None
    if queries_done is not None:
        queries_done()
    return dkv if pending_home is None else pending_home.wait()


def _owned(backend, x, dtype, from_ring: bool, into=None):
    """The dK / dV accumulator ``x`` (``backend.kv_accum``) as ``dtype`` in an array the caller
    owns (``into`` if given): ring receive buffers get reused."""
    if into is not None:
        return backend.kv_from_accum(x, dtype, out=into)
    y = backend.kv_from_accum(x, dtype)
    return y.copy() if from_ring and y is x else y
