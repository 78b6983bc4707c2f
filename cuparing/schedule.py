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
        gather: whether its ring calls gather K/V (:func:`gathers`): asked for when the plan
            was made (:func:`gather_decided`: ``CUPARING_KV_GATHER``, read once per call, or
            the default) and a ring of 1 .. ``GATHER_MAX_SHARDS`` steps after the first.
    """

    rank: int
    world_size: int
    layout: str
    mask: MaskSpec
    positions: tuple
    kinds: tuple
    last_step: int
    q_positions: np.ndarray
    gather: bool = False

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
        return replace(self, kinds=kinds, last_step=0, gather=False)


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


@lru_cache(maxsize=256)
def plan_ring(layout: str, rank: int, world_size: int, local_len: int, mask: MaskSpec,
              gather: bool = False) -> RingPlan:  # fmt: skip
    """The (cached) plan for ``rank`` of a ``world_size`` ring holding ``local_len`` tokens each:
    one object per arguments, which what is derived from a plan is kept by (``gathered_keys``,
    a backend's device copies of its arrays). ``gather``: the call asks to gather K/V
    (:func:`gather_decided`; the plan gathers where its steps allow, :func:`gathers`)."""
    positions, table, last_step = _kind_table(layout, world_size, local_len, mask)
    kinds = tuple(BlockKind(int(x)) for x in table[rank])
    return RingPlan(rank, world_size, layout, mask, positions, kinds, last_step, positions[rank],
                    _gathers_at(gather, last_step))  # fmt: skip


@lru_cache(maxsize=64)
def plan_documents(
    layout: str, rank: int, world_size: int, cu_seqlens: tuple, mask: MaskSpec,
    gather: bool = False,
) -> RingPlan:  # fmt: skip
    """The (cached) plan for ``rank`` of a ring over a packed sequence of documents
    ``cu_seqlens`` (``world_size == 1``: one device): spread positions, the clamped window and
    padded shards of ``cuparing.documents``, so every backend and kernel runs it unchanged. A
    block is classified on its real tokens only (padding sees nothing and is seen by nothing);
    one holding padding is never FULL, so padding rows are always masked. ``gather``: as
    :func:`plan_ring`'s."""
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
    return RingPlan(rank, world_size, layout, spec, keys, kinds, last_step, queries[rank],
                    _gathers_at(gather, last_step))  # fmt: skip


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

    A plan the schedule gathers (:func:`gathers`, :func:`gather_decided`) runs
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


# CUPARING_KV_GATHER: ring calls take every other rank's K/V at once and run two blocks, this
# rank's shard and all the others in one order ("1": always where the steps allow, "0": never,
# unset: forwards over packed documents on rings of GATHER_DEFAULT_MIN_RANKS or more,
# gather_decided)
GATHER_ENV = "CUPARING_KV_GATHER"
GATHER_MAX_SHARDS = 8  # other ranks' shards one gathered call holds (the GPU kernel's parts)
# the default's bounds: at C=2 gathering loses on packed documents (one received shard: the
# ring's two blocks in another order); at C=4 it takes 6-15% off the forward on both transports,
# while the ring backward, since its dK / dV travel behind the next step, beats the gathered one
# (whose float32 dK / dV go home at the end) by 8% over NCCL and ties it over the copy engines,
# so only forwards gather by default (PERF.md, "The gathered ring as the default"); the other
# shards' K/V it holds at once stay under a bound a training step can pay beside its
# activations, else one shard at a time
GATHER_DEFAULT_MIN_RANKS = 4
GATHER_DEFAULT_MAX_BYTES = 1 << 30


def gather_switch() -> str:
    """``CUPARING_KV_GATHER`` as set (stripped; ``""`` where unset), read once per ring call:
    part of a kept plan's key, parsed by :func:`gather_requested`."""
    return os.environ.get(GATHER_ENV, "").strip()


def gather_requested(switch: str | None = None) -> bool | None:
    """What ``switch`` (default: :func:`gather_switch`) asks of ring calls: ``"1"`` True
    (gather), ``"0"`` False (never), ``""`` None (:func:`gather_decided` chooses).

    Raises:
        ValueError: any other value (named with the variable).
    """
    value = gather_switch() if switch is None else switch.strip()
    if not value:
        return None
    if value in ("0", "1"):
        return value == "1"
    raise ValueError(f"{GATHER_ENV} must be '1', '0' or unset, got {GATHER_ENV}={value!r}")


def gather_decided(requested: bool | None, world_size: int, documents: bool, shard_bytes: int,
                   backward: bool = False) -> bool:  # fmt: skip
    """Whether a ring call asks its plan to gather K/V (:func:`gathers`; the plan still
    declines where its steps do not allow it). ``requested``: :func:`gather_requested`'s
    answer; where it is None, a forward (not ``backward``) over packed documents
    (``documents``) on a ring of at least ``GATHER_DEFAULT_MIN_RANKS`` gathers when the other
    ranks' K/V (``world_size - 1`` shards of ``shard_bytes``: one rank's K and V together) fit
    in ``GATHER_DEFAULT_MAX_BYTES``. Every input is one the ranks agree on (shapes, dtype, C,
    documents), so every rank decides alike."""
    if requested is not None:
        return requested
    if backward or not documents or world_size < GATHER_DEFAULT_MIN_RANKS:
        return False
    return (world_size - 1) * shard_bytes <= GATHER_DEFAULT_MAX_BYTES


def gathers(plan: RingPlan) -> bool:
    """Whether this rank's ring calls of ``plan`` gather K/V (:func:`gathered_forward`,
    :func:`gathered_backward`): decided when the plan was made (``RingPlan.gather``), so every
    part of one call (its agreement, its schedule, a backend's launches) reads one answer."""
    return plan.gather


def _gathers_at(requested: bool, last_step: int) -> bool:
    """A plan's ``gather``: asked for, and 1..``GATHER_MAX_SHARDS`` steps after the first (one
    step has nothing to gather)."""
    return bool(requested) and 0 < last_step <= GATHER_MAX_SHARDS


@dataclass(frozen=True)
class GatheredKeys:
    """The keys of a plan's steps 1 .. last_step (the other ranks' shards) in one ascending
    order (:func:`gathered_keys`); index ``t - 1`` below is step ``t``'s.

    Attributes:
        positions: their global positions, ascending.
        rows: ``rows[t - 1]``: where step ``t``'s key rows go in that order (int64, read-only).
        sources: the inverse map, int32 [len(positions), 2] (read-only): (t - 1, row of step
            ``t``'s shard) of every gathered row.
        step_sources: per step, ``rows[t - 1]`` as a map of the same form, int32 [n_t, 2]
            (read-only): (0, its row in the gathered order) for each of step t's rows, which
            takes them back out of one gathered array (the backward's dK / dV).
        own_kind: the block of this rank's queries against its own shard (step 0).
        kind: the block of its queries against the gathered keys: EMPTY where every step's
            block is, FULL where every one is FULL, else PARTIAL.
        identity: whether the order is the one received shard's own (one step after the
            first: a shard's positions ascend), so nothing needs moving.
    """

    positions: np.ndarray
    rows: tuple
    sources: np.ndarray
    step_sources: tuple
    own_kind: BlockKind
    kind: BlockKind
    identity: bool

    @property
    def blocks(self) -> int:
        """How many of the two blocks (own, gathered) are not EMPTY."""
        return (self.own_kind != BlockKind.EMPTY) + (self.kind != BlockKind.EMPTY)


_GATHERED: dict = {}  # id(plan) -> (plan, GatheredKeys): plans are cached and live long
_GATHERED_LOCK = threading.Lock()


def gathered_keys(plan: RingPlan) -> GatheredKeys:
    """The (cached) :class:`GatheredKeys` of ``plan`` (at least two steps)."""
    hit = _GATHERED.get(id(plan))
    if hit is not None and hit[0] is plan:
        return hit[1]
    held = [plan.positions[plan.source(t)] for t in range(1, plan.last_step + 1)]
    joined = np.concatenate(held)
    order = np.argsort(joined, kind="stable")
    where = np.empty_like(order)
    where[order] = np.arange(len(order))
    bounds = np.cumsum([0] + [len(p) for p in held])
    rows = tuple(_frozen(where[a:b].copy()) for a, b in zip(bounds[:-1], bounds[1:], strict=True))
    sources = np.empty((len(order), 2), dtype=np.int32)
    for part, at in enumerate(rows):
        sources[at, 0] = part
        sources[at, 1] = np.arange(len(at))
    kinds = set(plan.kinds[1 : plan.last_step + 1])
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
    identity = len(rows) == 1 and bool(np.array_equal(rows[0], np.arange(len(rows[0]))))
    made = GatheredKeys(_frozen(joined[order]), rows, _frozen(sources), step_sources,
                        plan.kinds[0], kind, identity)  # fmt: skip
    with _GATHERED_LOCK:
        if len(_GATHERED) >= 256:
            _GATHERED.clear()
        _GATHERED[id(plan)] = (plan, made)
    return made


def gathered_forward(backend, ring, q, k, v, plan: RingPlan, scale: float, out=None, lse=None):
    """:func:`ring_forward`'s result another way: the other ranks' K/V at once (``last_step``
    exchanges, shifts 1 .. last_step, issued first), this rank's own block computed while they
    travel, then one block against all of theirs in one ascending order of positions
    (:func:`gathered_keys`), which merges the first. Two launches and one float32 merge where
    the ring makes one of each per step, the transfers behind the own block, at the price of
    ``last_step + 1`` times the K/V memory. It pays where ring steps are mostly fixed costs:
    shards cut into many pieces (packed documents) on several GPUs (PERF.md, "Packed
    documents on 4x H200"). Same arguments and returns; the caller has checked
    :func:`gathers`."""
    keys, own = gathered_keys(plan), plan.positions[plan.source(0)]
    pending = gather_exchanges(ring, [k, v], plan.last_step)
    q_pos = backend.positions(plan.q_positions)
    state = backend.forward_state(q, keys.blocks, out=out, lse=lse)
    if keys.own_kind != BlockKind.EMPTY:
        with ring.trace_compute("fwd own"):
            backend.forward_block(state, q, k, v, q_pos, backend.positions(own), keys.own_kind,
                                  plan.mask, scale)  # fmt: skip
    parts = [tuple(exchange.wait()) for exchange in pending]
    if keys.kind != BlockKind.EMPTY:
        k_all, v_all = parts[0] if keys.identity else backend.gathered(parts, keys)
        with ring.trace_compute("fwd gathered"):
            backend.forward_block(state, q, k_all, v_all, q_pos,
                                  backend.positions(keys.positions), keys.kind, plan.mask,
                                  scale)  # fmt: skip
    result = backend.forward_finish(state)
    ring.check()
    return result


def gathered_backward(backend, ring, dout, q, k, v, out, lse, plan: RingPlan, scale: float,
                      grads_into=None, dlse=None, deterministic: bool = False):  # fmt: skip
    """:func:`ring_backward`'s result another way, as :func:`gathered_forward` computes the
    forward: the other ranks' K/V at once, this rank's own block (into its float32 dK / dV)
    while they travel, then one block against all of theirs in position order (into float32
    dK / dV of every gathered key), each step's rows of those sent back to the rank that owns
    them (shift ``C - t`` for step ``t``'s shard, all issued at once) and added by the owner
    into its own in step order (a fixed order: ``deterministic`` holds). It moves
    ``last_step`` shards of float32 dK / dV where the ring moves them once per step, and no
    step waits for another. Same arguments and returns; the caller has checked
    :func:`gathers`."""
    keys, own = gathered_keys(plan), plan.positions[plan.source(0)]
    pending = gather_exchanges(ring, [k, v], plan.last_step)
    q_pos, delta, dq = _backward_start(backend, plan, dout, q, out, dlse)
    dq_into, dk_into, dv_into = grads_into or (None, None, None)
    dk_own, dv_own = backend.kv_accum(q, k), backend.kv_accum(q, v)
    if keys.own_kind != BlockKind.EMPTY:
        with ring.trace_compute("bwd own"):
            backend.backward_block(dq, dk_own, dv_own, dout, q, k, v, lse, delta, q_pos,
                                   backend.positions(own), keys.own_kind, plan.mask, scale,
                                   deterministic=deterministic)  # fmt: skip
    parts = [tuple(exchange.wait()) for exchange in pending]
    if keys.kind != BlockKind.EMPTY:
        k_all, v_all = parts[0] if keys.identity else backend.gathered(parts, keys)
        dk_all, dv_all = backend.kv_accum(q, k_all), backend.kv_accum(q, v_all)
        with ring.trace_compute("bwd gathered"):
            backend.backward_block(dq, dk_all, dv_all, dout, q, k_all, v_all, lse, delta, q_pos,
                                   backend.positions(keys.positions), keys.kind, plan.mask,
                                   scale, deterministic=deterministic)  # fmt: skip
        pieces = [(dk_all, dv_all)] if keys.identity else backend.rows_of_steps(dk_all, dv_all,
                                                                                keys)  # fmt: skip
    else:  # (zeros: their owners still wait for them)
        pieces = [(backend.kv_accum(q, k_t), backend.kv_accum(q, v_t)) for k_t, v_t in parts]
    back = return_exchanges(ring, pieces)
    dq_result = backend.dq_from_accum(dq, q.dtype, out=dq_into)
    for exchange in back:  # (in step order: the sum repeats bit for bit)
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


def gather_exchanges(ring, kv: list, last_step: int) -> list:
    """The exchanges bringing the K/V shards of steps 1 .. ``last_step`` (shift t, channel
    ``kv_gather_t``), issued at once; wait for them in step order. The GPU rings queue them on
    one communication stream, so they run one after another (their bytes leave through the
    same links either way)."""
    return [ring.exchange(kv, shift, f"kv_gather_{shift}") for shift in range(1, last_step + 1)]


def return_exchanges(ring, pieces: list) -> list:
    """The exchanges taking ``pieces[t - 1]`` (step ``t``'s rows of the gathered dK / dV) back
    to the rank that owns that shard (shift ``C - t``, channel ``dkv_gather_t``) and bringing
    this rank's rows from the rank ``t`` on, issued at once; wait for them in step order."""
    return [
        ring.exchange(list(piece), ring.size - t, f"dkv_gather_{t}")
        for t, piece in enumerate(pieces, start=1)
    ]


def run_planned_gathered_forward(ring, planned, q: int, kv: list, out: int, lse: int,
                                 gathered: tuple[int, int], accumulator: int) -> None:  # fmt: skip
    """:func:`gathered_forward` at pointer level, for a repeat of a signature whose launches the
    backend decided once (``planned``: a
    :class:`~cuparing.backends.planned_ring.PlannedGather`): the same exchanges, the own
    block, the rows put in order and the gathered block.

    Args:
        ring: the communicator; kv: [k, v] this rank's shard as backend arrays.
        q, out, lse: addresses of the queries and of the results (written here).
        gathered: addresses of the gathered K and V, contiguous [B, L, Hkv, D] of k's dtype
            (``planned.gathered_shape``; ignored where ``planned.identity``).
        accumulator: address of a float32 [B, Sq, H, D] contiguous scratch array when
            ``planned.blocks.accumulates`` (else ignored).
    """
    blocks = planned.blocks
    pending = gather_exchanges(ring, kv, planned.last_step)
    if blocks.busy[0]:
        with ring.trace_compute("fwd own"):
            blocks.launch_step(0, out, accumulator, lse, q, kv[0].data.ptr, kv[1].data.ptr)
    # (the arrays stay referenced until the launches reading them are queued: a ring may hand
    # out arrays it does not keep, the in-process ring's copies, whose memory another thread
    # could otherwise take and write first)
    received = [exchange.wait() for exchange in pending]
    parts = [(k.data.ptr, v.data.ptr) for k, v in received]
    if blocks.busy[1]:
        if planned.identity:  # (the one received shard is in order already)
            gathered = parts[0]
        else:
            planned.launch_gather(parts, *gathered)
        with ring.trace_compute("fwd gathered"):
            blocks.launch_step(1, out, accumulator, lse, q, *gathered)
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
    pending = gather_exchanges(ring, kv, planned.last_step)
    # (after the exchanges: the sends wait for what the caller's stream holds, its memsets too)
    scratch = planned.scratch()
    (delta_array, dq_array, dkv_own, flag_array), gathered, dkv_all, pieces = scratch
    delta, dq_acc = delta_array.data.ptr, dq_array.data.ptr
    dk_own, dv_own = (x.data.ptr for x in dkv_own)
    dk_all, dv_all = (x.data.ptr for x in dkv_all)
    flags = 0 if flag_array is None else flag_array.data.ptr
    blocks = planned.blocks
    blocks.launch_delta(dout, out, delta)
    if blocks.busy[0]:
        with ring.trace_compute("bwd own"):
            blocks.launch_step(0, dout, lse, delta, dq_acc, dk_own, dv_own, q, kv[0].data.ptr,
                               kv[1].data.ptr, flags)  # fmt: skip
    received = [exchange.wait() for exchange in pending]  # (referenced: as the forward's)
    parts = [(k.data.ptr, v.data.ptr) for k, v in received]
    if blocks.busy[1]:
        if planned.identity:  # (the one received shard is in order already)
            k_all, v_all = parts[0]
        else:
            k_all, v_all = (x.data.ptr for x in gathered)
            planned.launch_gather(parts, k_all, v_all)
        with ring.trace_compute("bwd gathered"):
            blocks.launch_step(1, dout, lse, delta, dq_acc, dk_all, dv_all, q, k_all, v_all,
                               flags)  # fmt: skip
    if planned.identity:  # (the gathered dK / dV are the one received shard's rows in order)
        pieces = [dkv_all]
    for step, (dk, dv) in enumerate(() if planned.identity else pieces, start=1):
        planned.launch_return(step, dk_all, dv_all, dk.data.ptr, dv.data.ptr)
    back = return_exchanges(ring, pieces)
    blocks.finish_queries(dq_acc, grads[0])
    for exchange in back:  # (in step order, as the full path adds)
        dk_part, dv_part = exchange.wait()
        planned.add(dk_part.data.ptr, dk_own)
        planned.add(dv_part.data.ptr, dv_own)
    blocks.finish_keys(dk_own, dv_own, grads[1], grads[2])
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

    A plan the schedule gathers (:func:`gathers`, :func:`gather_decided`) runs
    :func:`gathered_backward`.
    """
    if gathers(plan):
        return gathered_backward(backend, ring, dout, q, k, v, out, lse, plan, scale,
                                 grads_into, dlse, deterministic)  # fmt: skip
    positions = [backend.positions(p) for p in plan.positions]
    q_pos, delta, dq = _backward_start(backend, plan, dout, q, out, dlse)
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

    def spare():  # (a new zeroed pair each time: freed once the step's add is queued)
        return [backend.kv_accum(q, k), backend.kv_accum(q, v)]

    def add(part, arrived):
        backend.add_into(arrived[0], part[0])
        backend.add_into(arrived[1], part[1])

    def homeward(part, held):
        return [backend.kv_homeward(acc, None if part is None else part[i], like.dtype)
                for i, (acc, like) in enumerate(zip(held, (k, v), strict=True))]  # fmt: skip

    dkv = backward_rotation(ring, [k, v], dkv, busy_steps(plan), home_shift, block, spare, add,
                            homeward, queries_done)  # fmt: skip
    from_ring = plan.last_step > 0 or home_shift > 0
    came_home = home_shift > 0
    grads = (
        dq_result,
        _owned(backend, dkv[0], k.dtype, from_ring, dk_into, came_home),
        _owned(backend, dkv[1], v.dtype, from_ring, dv_into, came_home),
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
        The call's scratch arrays (``planned.scratch()``, the later steps' dK / dV pair and the
        pair they travel home in), which its queued launches and exchanges read: a captured
        call keeps them as long as its graph.
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

    # (one pair for every later step, then the pair dK / dV travel home in: a captured call
    # keeps them with its graph)
    made = []

    def spare():
        if made:
            planned.clear(made[0])
        else:
            made.append(planned.fresh())
        return made[0]

    def add(part, arrived):
        planned.add(part[0].data.ptr, arrived[0].data.ptr)
        planned.add(part[1].data.ptr, arrived[1].data.ptr)

    def homeward(part, held):
        pair = planned.travel()
        made.append(pair)
        planned.leave(part, held, pair)
        return pair

    dkv = backward_rotation(ring, kv, dkv, planned.busy, planned.home_shift, block, spare, add,
                            homeward, queries_done)  # fmt: skip
    planned.finish_keys(dkv[0].data.ptr, dkv[1].data.ptr, grads[1], grads[2])
    ring.check()
    return scratch, made


def _backward_start(backend, plan: RingPlan, dout, q, out, dlse):
    """What every backward of a rank starts from (:func:`ring_backward`,
    :func:`gathered_backward`): (the queries' positions, ``delta`` = rowsum(dout * out), less
    ``dlse`` where given, and the zeroed dq accumulator)."""
    delta = backend.backward_delta(dout, out)
    if dlse is not None:
        delta = delta - dlse.astype(delta.dtype)
    return backend.positions(plan.q_positions), delta, backend.dq_accum(q)


def home_shift_of(plan: RingPlan) -> int:
    """How far the travelling dK/dV go home after the backward's last step: what this rank
    holds then belongs to rank ``rank - last_step``."""
    return (-plan.last_step) % plan.world_size


def kv_grads_whole(plan: RingPlan) -> bool:
    """Whether this rank's one backward block makes its dK / dV whole: one step, not EMPTY,
    and nothing to send home (a backend may then write them straight, ``kv_accum``)."""
    return plan.last_step == 0 and home_shift_of(plan) == 0 and busy_steps(plan)[0]


def backward_rotation(
    ring, kv: list, dkv: list, busy, home_shift: int, compute, spare, add, homeward,
    queries_done=None,
) -> list:  # fmt: skip
    """The backward's order of exchanges and compute, whatever computes.

    At each step ``t`` of ``busy`` the exchange bringing step ``t + 1``'s K/V is started (none
    after the last) and, where ``busy[t]``, ``compute(t, kv, dkv)`` adds into a pair of dK / dV
    accumulators: ``dkv`` (this rank's, zeroed) at step 0, and at later steps the zeroed pair
    ``spare()`` gives, while the accumulators of the shard held at ``t`` are still on their way
    from the rank before; those are waited for after the compute, the step's pair is added into
    them in place (``add(part, arrived)``: arrived += part, a ring receive buffer the rank may
    update), and they travel on (an EMPTY step passes them on as they arrived). So one step's
    dK / dV transfer runs during the next step's compute rather than between them.

    Where the accumulators must go ``home_shift`` ranks on after the last step, that step hands
    them to ``homeward(part, held)`` instead of ``add`` (``part``: its pair, None where it
    computed into ``held`` or nothing), which returns the whole gradients as they travel: in
    their own dtype, so the one transfer no compute hides moves half the bytes of float32.
    ``queries_done()`` (if given: work that needs every step's dQ but no dK / dV, e.g. dQ's
    conversion) runs before that trip is waited for, so a GPU does it while they are on their
    way.

    Returns:
        This rank's own shard's dK / dV: the accumulators themselves where nothing travels
        home (``home_shift`` 0), else what ``homeward`` made of them on the rank that held them
        last.
    """
    last = len(busy) - 1
    arriving = None  # the exchange bringing the accumulators of the shard held at this step
    for step, computes in enumerate(busy):
        more = step < last
        leaves = not more and home_shift != 0
        pending_kv = ring.exchange(kv, 1, "kv") if more else None
        part = None
        if arriving is None:  # (step 0: this rank's own accumulators, nothing on the way)
            mine = dkv
            if computes:
                with ring.trace_compute(f"bwd step {step}"):
                    compute(step, kv, mine)
        else:
            if computes:
                part = spare()
                with ring.trace_compute(f"bwd step {step}"):
                    compute(step, kv, part)
            mine = arriving.wait()
            if part is not None and not leaves:
                add(part, mine)
        if leaves:
            mine = homeward(part, mine)
        if more:
            arriving = ring.exchange(mine, 1, "dkv")
            kv = pending_kv.wait()
        dkv = mine
    pending_home = ring.exchange(dkv, home_shift, "dkv_home") if home_shift else None
    if queries_done is not None:
        queries_done()
    return dkv if pending_home is None else pending_home.wait()


def _owned(backend, x, dtype, from_ring: bool, into=None, came_home: bool = False):
    """The dK / dV accumulator ``x`` (``backend.kv_accum``) as ``dtype`` in an array the caller
    owns (``into`` if given): ring receive buffers get reused. ``came_home``: ``x`` is the
    gradient itself, in ``dtype`` (``backend.kv_homeward``'s, as it travelled home)."""
    convert = backend.cast if came_home else backend.kv_from_accum
    if into is not None:
        return convert(x, dtype, out=into)
    y = convert(x, dtype)
    return backend.copy(y) if from_ring and y is x else y
