"""Public entry points: validate once, pick the backend, run the schedule, return the caller's type.

:func:`attention` (one device), :func:`ring_attention` and :func:`ring_attention_backward` (this
rank of a ring) run the one schedule of ``cuparing.schedule``; :func:`shard`, :func:`unshard` and
:func:`global_positions` split and join sequences by the layouts of ``cuparing.layouts``.

Shapes: q, out, dout ``[B, S, H, D]``; k, v ``[B, S, Hkv, D]`` with ``H % Hkv == 0``; lse
``[B, H, S]`` (natural log, float32; float64 for float64 inputs). Any strides are accepted as long
as the last axis (D) is contiguous.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import call_plans, documents, layouts, validation
from .backends import backend_for
from .comm.base import Ring
from .comm.local import SoloRing
from .interop import Origin, concatenate, dtype_name, itemsize, take, to_backend, zeros_along
from .schedule import (
    RingPlan,
    gather_decided,
    gather_requested,
    gather_switch,
    plan_documents,
    plan_ring,
    plan_single,
    ring_backward,
    ring_forward,
)

Window = tuple[int | None, int | None] | None

# One device is a ring of one: the schedule's one-step plan never exchanges anything.
_ONE_DEVICE = SoloRing()


def attention(
    q: Any,
    k: Any,
    v: Any,
    causal: bool = False,
    scale: float | None = None,
    window: Window = None,
    return_lse: bool = False,
    out: Any = None,
    lse: Any = None,
    cu_seqlens: Any = None,
) -> Any:
    """Exact softmax attention on one device (GPU for GPU arrays, else CPU).

    Args:
        q: [B, Sq, H, D] queries (NumPy, CuPy, PyTorch or JAX; float16, bfloat16, float32, and
            float64 on the CPU).
        k, v: [B, Sk, Hkv, D] keys and values, same framework, device and dtype as q.
        causal: hide keys after the query. With ``Sq != Sk`` queries are aligned to the end of
            the keys: query ``i`` sits at position ``i + Sk - Sq``.
        scale: softmax scale, default ``1/sqrt(D)``.
        window: ``(left, right)``: key ``j`` is visible to query ``i`` iff
            ``i - left <= j <= i + right``; ``None`` on a side means unbounded.
        return_lse: also return the log-sum-exp.
        out, lse: caller-owned arrays to write the results into (NumPy, CuPy or PyTorch, the
            inputs' framework and device): out [B, Sq, H, D] in q's dtype with a contiguous last
            axis, lse [B, H, Sq] float32 (float64 for float64), C-contiguous. On a GPU a single
            call then allocates nothing, which is what CUDA-graph capture needs.
        cu_seqlens: document boundaries ``[0, e_1, ..., S]`` of a packed sequence (1-D integers,
            any framework, or a list; the same for every batch row): key j is visible to query i
            only inside one document (and where the causal/window rule allows). Needs Sq == Sk.

    Returns:
        out [B, Sq, H, D] in q's dtype and framework, and lse [B, H, Sq] float32 (float64 for
        float64 inputs) if ``return_lse``; the given ``out`` / ``lse`` objects where passed. A
        query that sees no key gets output 0 and lse -inf. An empty batch (B = 0) returns empty
        results of these shapes and dtypes.

    Raises:
        ValueError: shapes, heads, window or scale are inconsistent, S, H or D is 0, or ``out``
            / ``lse`` has the wrong shape or layout or shares memory with an input.
        TypeError: arrays of different frameworks/devices/dtypes, an unsupported dtype, options
            of the wrong type, or PyTorch tensors that autograd tracks (this function is not
            differentiable; see :func:`cuparing.ring_attention_torch`).

    Example:
        >>> import numpy as np, cuparing as cr
        >>> q = k = v = np.random.default_rng(0).standard_normal((1, 16, 2, 8))
        >>> cr.attention(q, k, v, causal=True).shape
        (1, 16, 2, 8)
    """
    key = None
    boundaries = call_plans.documents_key(cu_seqlens) if call_plans.plannable(q) else None
    if boundaries is not None:
        options = (causal, scale, window)
        key = call_plans.signature("attention", (q, k, v), options, (out, lse),
                                   documents=boundaries)  # fmt: skip
        results = _repeat_attention(key, q, k, v, out, lse, return_lse)
        if results is not None:  # a repeat of a checked call (call_plans)
            return results if return_lse else results[0]
    origin = validation.check_arrays(("q", "k", "v"), (q, k, v))
    validation.check_qkv(q, k, v, same_length=False)
    validation.check_untracked("attention", ("q", "k", "v"), (q, k, v))
    validation.check_forward_destinations(origin, q, k, v, out, lse)
    mask = validation.check_mask(causal, window)
    checked_scale = validation.check_scale(scale, q.shape[-1])
    plan = _unless_empty(_one_device_plan(q, k, mask, cu_seqlens), q)
    results = _forward(origin, _ONE_DEVICE, plan, checked_scale, (q, k, v), True, (out, lse))
    if call_plans.wanted(key):
        _keep_attention_plan(key, origin, plan, checked_scale, (q, k, v), (out, lse), results)
    return results if return_lse else results[0]


def _repeat_attention(key: tuple | None, q: Any, k: Any, v: Any, out: Any, lse: Any,
                      want_lse: bool):  # fmt: skip
    """(out, lse) of a repeat of a checked one-device call by its kept plan, or None when there
    is none or it does not apply to these tensors (the full path decides). Without
    ``want_lse`` the lse returned may be one the plan reuses (not the caller's to keep)."""
    known = call_plans.find(key)
    if isinstance(known, call_plans.CallPlan):
        return known.run(q, k, v, out, lse, want_lse=want_lse)
    decided = call_plans.recall(key, None, (q, k, v), (out, lse))
    if decided is None:
        return None
    origin, plan, scale = decided
    return _forward(origin, _ONE_DEVICE, plan, scale, (q, k, v), True, (out, lse))


def _keep_attention_plan(
    key: tuple, origin: Origin, plan: RingPlan, scale: float, qkv: tuple, dests: tuple, results
):  # fmt: skip
    """After a checked one-device call on torch CUDA tensors: keep its launch for repeats of
    ``key`` when the call was that one launch (call_plans.CallPlan), else what its checks and
    plan decided (call_plans.CheckedCall)."""
    backend = backend_for(origin.backend)
    found = None
    if plan.blocks == 1:
        with origin.stream():
            q, k, v, out, lse = (to_backend(x, origin) for x in (*qkv, *results))
            k_pos = plan.positions[plan.source(0)]
            found = backend.single_launch(
                out, lse, q, k, v, plan.q_positions, k_pos, plan.kinds[0], plan.mask, scale
            )
    if found is None:
        call_plans.remember(key, (origin, plan, scale), qkv, dests, untracked=True)
        return
    out, lse = results
    guard = call_plans.Guard(qkv, dests, untracked=True)
    call_plans.keep(
        key, call_plans.CallPlan(*found, out.shape, lse.shape, out.dtype, out.device, guard)
    )


def ring_attention(
    q: Any,
    k: Any,
    v: Any,
    ring: Ring,
    causal: bool = False,
    scale: float | None = None,
    window: Window = None,
    layout: str = "contiguous",
    return_lse: bool = False,
    out: Any = None,
    lse: Any = None,
    cu_seqlens: Any = None,
) -> Any:
    """Exact attention over a sequence sharded across the ranks of ``ring``.

    Every rank calls this with its own shard; K/V travel around the ring so each rank ends with
    the exact attention output for its queries over the whole sequence.

    Args:
        q: [B, S/C, H, D] this rank's ``layout`` shard of the queries (see :func:`shard`).
        k, v: [B, S/C, Hkv, D] this rank's shard of keys and values (same tokens as q).
        ring: this rank's :class:`Ring` (``Ring.from_env()``, or one from :func:`simulate`).
        causal, scale, window: as in :func:`attention`, by *global* token position.
        layout: ``"contiguous"``, ``"zigzag"``, ``"striped"`` or ``"packed"``: how the sequence
            was sharded.
        return_lse: also return this rank's lse.
        out, lse: caller-owned arrays for this rank's results, as in :func:`attention`.
        cu_seqlens: the *global* document boundaries of a packed sequence (as in
            :func:`attention`); the shards are then :func:`shard`'s with the same
            ``cu_seqlens``: any length, padded to one length per rank.

    Returns:
        out [B, S/C, H, D] (this rank's queries) in q's dtype, and lse [B, H, S/C] float32
        (float64 for float64) if ``return_lse``; the given ``out`` / ``lse`` where passed.

    Raises:
        ValueError: bad shapes, layout, window, or a length the layout cannot split; or the
            ranks disagree on the call (shapes, dtype, layout, causal, window, scale, world size,
            global length): raised on every rank, naming the field, before any transfer.
        TypeError: mismatched frameworks/devices/dtypes, a non-Ring ``ring``, or PyTorch tensors
            that autograd tracks (use :func:`cuparing.ring_attention_torch` for gradients).
        cuparing.RingError: a peer failed or timed out (after the ring's timeout, never a hang).

    Example:
        >>> import numpy as np, cuparing as cr
        >>> x = np.random.default_rng(0).standard_normal((1, 32, 2, 8))
        >>> def rank_fn(ring):
        ...     xl = cr.shard(x, ring.rank, ring.size, layout="zigzag")
        ...     return cr.ring_attention(xl, xl, xl, ring, causal=True, layout="zigzag")
        >>> out = cr.unshard(cr.simulate(4, rank_fn), layout="zigzag")
        >>> bool(np.allclose(out, cr.attention(x, x, x, causal=True)))
        True
    """
    key = None
    switch = gather_switch()  # (read once: the key, the agreement and the plan)
    boundaries = call_plans.documents_key(cu_seqlens) if call_plans.plannable(q) else None
    if boundaries is not None:
        options = (causal, scale, window, layout, switch)
        key = call_plans.signature("ring_attention", (q, k, v), options, (out, lse), ring,
                                   boundaries)  # fmt: skip
        decided = call_plans.recall(key, ring, (q, k, v), (out, lse))
        if decided is not None:  # a repeat of a checked call
            known = call_plans.find(key)
            if isinstance(known, call_plans.RingForwardPlan):
                results = known.run(ring, q, k, v, out, lse)
                if results is not None:
                    return results if return_lse else results[0]
            origin, plan, scale, fields = decided
            ring.agree(fields)
            return _forward(origin, ring, plan, scale, (q, k, v), return_lse, (out, lse))
    with _refused_everywhere(ring, "ring_attention"):
        origin, mask, scale, cu = validation.check_ring_call(
            q, k, v, ring, causal, scale, window, layout, cu_seqlens
        )
        validation.check_untracked("ring_attention", ("q", "k", "v"), (q, k, v))
        validation.check_forward_destinations(origin, q, k, v, out, lse)
        requested = gather_requested(switch)
    gather = _gather(requested, ring, cu, k, backward=False)
    fields = validation.ring_call_fields("ring_attention", q, k, ring, mask, scale, layout, cu,
                                         gather)  # fmt: skip
    ring.agree(fields)
    plan = _unless_empty(_ring_plan(layout, ring, q, mask, cu, gather), q)
    results = _forward(origin, ring, plan, scale, (q, k, v), True, (out, lse))
    decided = (origin, plan, scale, fields)
    if call_plans.wanted(key, ring):
        _keep_ring_plan(key, ring, decided, (q, k, v), (out, lse), results)
    return results if return_lse else results[0]


def _keep_ring_plan(key: tuple, ring: Ring, decided: tuple, qkv: tuple, dests: tuple, results):
    """After a checked ring forward on torch CUDA tensors: keep its launches step by step for
    repeats of ``key`` on ``ring`` when the backend can plan them (call_plans.RingForwardPlan),
    else what its checks and plan decided (call_plans.CheckedCall)."""
    origin, plan, scale, _ = decided
    backend = backend_for(origin.backend)
    with origin.stream():
        q, k, v, out, lse = (to_backend(x, origin) for x in (*qkv, *results))
        planned = backend.plan_forward(plan, q, k, v, out, lse, scale)
    if planned is None:
        call_plans.remember(key, decided, qkv, dests, untracked=True, ring=ring)
        return
    out, lse = results
    guard = call_plans.Guard(qkv, dests, untracked=True)
    call_plans.keep(
        key,
        call_plans.RingForwardPlan(
            decided, guard, ring, planned, out.shape, lse.shape, out.dtype, out.device
        ),
    )


def ring_attention_backward(
    dout: Any,
    q: Any,
    k: Any,
    v: Any,
    out: Any,
    lse: Any,
    ring: Ring,
    causal: bool = False,
    scale: float | None = None,
    window: Window = None,
    layout: str = "contiguous",
    dq: Any = None,
    dk: Any = None,
    dv: Any = None,
    dlse: Any = None,
    cu_seqlens: Any = None,
    deterministic: bool = False,
) -> tuple[Any, Any, Any]:
    """Gradients of :func:`ring_attention` for this rank's shard.

    Args:
        dout: [B, S/C, H, D] gradient of the loss with respect to this rank's output.
        q, k, v: this rank's shards, as passed to :func:`ring_attention`.
        out, lse: this rank's output and lse from :func:`ring_attention` (``return_lse=True``).
        ring, causal, scale, window, layout, cu_seqlens: exactly as in the forward call.
        dq, dk, dv: caller-owned arrays for the gradients (each optional; the shape and dtype of
            q, k, v, a contiguous last axis, the inputs' framework and device).
        dlse: [B, H, S/C] gradient of the loss with respect to ``lse`` (float32, float64 for
            float64), when the loss uses the lse too; None means zero.
        deterministic: bit-identical gradients on every run with the same inputs and world
            size: the GPU kernels add partial gradients in a fixed order (README, "Deterministic
            backward", states the cost and where the mode runs).

    Returns:
        (dq, dk, dv) with the shapes and dtypes of q, k, v: dq for this rank's queries, dk and dv
        for this rank's keys/values summed over every rank's queries. Accumulated in float32.
        The given arrays where passed.

    Raises:
        ValueError, TypeError, cuparing.RingError: as in :func:`ring_attention`.
        NotImplementedError: ``deterministic`` where the backward runs GPU kernels without that
            mode (raised before any work or transfer).
    """
    entry = "ring_attention_backward"
    arrays, dests = (dout, q, k, v, out, lse), (dq, dk, dv)
    key = None
    switch = gather_switch()  # (read once, as the forward's)
    boundaries = call_plans.documents_key(cu_seqlens) if call_plans.plannable(q) else None
    if boundaries is not None:
        options = (causal, scale, window, layout, deterministic, switch)
        key = call_plans.signature(entry, (*arrays, dlse), options, dests, ring, boundaries)
        decided = call_plans.recall(key, ring, arrays, dests)
        if decided is not None:  # a repeat of a checked call
            known = call_plans.find(key)
            if isinstance(known, call_plans.RingBackwardPlan):
                grads = known.run(ring, arrays, dests)
                if grads is not None:
                    return grads
            origin, plan, scale, fields = decided
            ring.agree(fields)
            return _backward(origin, ring, plan, scale, arrays, dests, dlse, bool(deterministic))
    with _refused_everywhere(ring, entry):
        origin, mask, scale, cu = validation.check_ring_call(
            q, k, v, ring, causal, scale, window, layout, cu_seqlens
        )
        validation.check_arrays(("q", "dout", "out"), (q, dout, out))
        validation.check_backward(dout, out, lse, q)
        validation.check_backward_extras(origin, arrays, dests, dlse)
        deterministic = validation.check_flag("deterministic", deterministic)
        _check_deterministic_runs(origin, q, deterministic)
        requested = gather_requested(switch)
    gather = _gather(requested, ring, cu, k, backward=True)
    fields = validation.ring_call_fields(entry, q, k, ring, mask, scale, layout, cu, gather)
    ring.agree(fields)
    plan = _unless_empty(_ring_plan(layout, ring, q, mask, cu, gather), q)
    grads = _backward(origin, ring, plan, scale, arrays, dests, dlse, deterministic)
    decided = (origin, plan, scale, fields)
    if call_plans.wanted(key, ring):
        _keep_ring_backward_plan(key, ring, decided, arrays, dests, grads, dlse, deterministic)
    return grads


def _keep_ring_backward_plan(
    key: tuple, ring: Ring, decided: tuple, arrays: tuple, dests: tuple, grads: tuple, dlse: Any,
    deterministic: bool,
):  # fmt: skip
    """After a checked ring backward (or one-device backward: ``ring`` the ring of one) on torch
    CUDA tensors: keep its launches step by step for repeats of ``key`` on ``ring`` when the
    backend can plan them and the call has no ``dlse``
    (call_plans.RingBackwardPlan), else what its checks and plan decided
    (call_plans.CheckedCall)."""
    origin, plan, scale, _ = decided
    planned = None
    if dlse is None:
        backend = backend_for(origin.backend)
        with origin.stream():
            views = [to_backend(x, origin) for x in (*arrays, *grads)]
            planned = backend.plan_backward(
                plan, *views[:6], tuple(views[6:]), scale, deterministic=deterministic
            )
    if planned is None:
        call_plans.remember(key, decided, arrays, dests, untracked=False, ring=ring)
        return
    guard = call_plans.Guard(arrays, dests, untracked=False)
    shapes, dtypes = [g.shape for g in grads], [g.dtype for g in grads]
    call_plans.keep(
        key,
        call_plans.RingBackwardPlan(decided, guard, ring, planned, shapes, dtypes, grads[0].device),
    )


def attention_backward(
    dout: Any,
    q: Any,
    k: Any,
    v: Any,
    out: Any,
    lse: Any,
    causal: bool = False,
    scale: float | None = None,
    window: Window = None,
    dq: Any = None,
    dk: Any = None,
    dv: Any = None,
    dlse: Any = None,
    cu_seqlens: Any = None,
    deterministic: bool = False,
) -> tuple[Any, Any, Any]:
    """Gradients of :func:`attention` on one device.

    Args:
        dout: [B, Sq, H, D] gradient of the loss with respect to ``out``.
        q, k, v, causal, scale, window, cu_seqlens: exactly as passed to :func:`attention`.
        out, lse: its results (``return_lse=True``).
        dq, dk, dv: caller-owned arrays for the gradients, as in :func:`ring_attention_backward`.
        dlse: gradient of the loss with respect to ``lse``, as in :func:`ring_attention_backward`.
        deterministic: bit-identical gradients on every run, as in
            :func:`ring_attention_backward`.

    Returns:
        (dq, dk, dv) with the shapes and dtypes of q, k, v, accumulated in float32 (float64 for
        float64); the given arrays where passed.

    Raises:
        ValueError, TypeError, NotImplementedError: as in :func:`attention` and
            :func:`ring_attention_backward`.
    """
    arrays, dests = (dout, q, k, v, out, lse), (dq, dk, dv)
    key = None
    boundaries = call_plans.documents_key(cu_seqlens) if call_plans.plannable(q) else None
    if boundaries is not None:
        options = (causal, scale, window, deterministic)
        key = call_plans.signature("attention_backward", (*arrays, dlse), options, dests,
                                   documents=boundaries)  # fmt: skip
        decided = call_plans.recall(key, _ONE_DEVICE, arrays, dests)
        if decided is not None:  # a repeat of a checked call
            known = call_plans.find(key)
            if isinstance(known, call_plans.RingBackwardPlan):  # its launches, at pointer level
                grads = known.run(_ONE_DEVICE, arrays, dests)
                if grads is not None:
                    return grads
            origin, plan, scale, _ = decided
            deterministic = bool(deterministic)
            return _backward(origin, _ONE_DEVICE, plan, scale, arrays, dests, dlse, deterministic)
    origin = validation.check_arrays(("q", "k", "v", "dout", "out"), (q, k, v, dout, out))
    validation.check_qkv(q, k, v, same_length=False)
    validation.check_backward(dout, out, lse, q)
    validation.check_backward_extras(origin, arrays, dests, dlse)
    mask = validation.check_mask(causal, window)
    scale = validation.check_scale(scale, q.shape[-1])
    deterministic = validation.check_flag("deterministic", deterministic)
    _check_deterministic_runs(origin, q, deterministic)
    plan = _unless_empty(_one_device_plan(q, k, mask, cu_seqlens), q)
    grads = _backward(origin, _ONE_DEVICE, plan, scale, arrays, dests, dlse, deterministic)
    if call_plans.wanted(key, _ONE_DEVICE):  # (a ring of one: no fields to agree on)
        decided = (origin, plan, scale, None)
        _keep_ring_backward_plan(key, _ONE_DEVICE, decided, arrays, dests, grads, dlse,
                                 deterministic)  # fmt: skip
    return grads


def shard(
    x: Any,
    rank: int,
    world_size: int,
    layout: str = "contiguous",
    axis: int = 1,
    cu_seqlens: Any = None,
) -> Any:
    """Take ``rank``'s share of a global array along ``axis`` (the sequence axis).

    Args:
        x: any array (NumPy, CuPy, torch, JAX) with the full sequence on ``axis``.
        rank: which rank's share, ``0 <= rank < world_size`` (int or NumPy integer).
        world_size: number of ranks ``C`` (int or NumPy integer).
        layout: ``"contiguous"``, ``"zigzag"``, ``"striped"`` or ``"packed"`` (for packed
            documents: short ones whole, long ones as zigzag; a plain sequence as zigzag).
        axis: the sequence axis (1 for ``[B, S, H, D]``, 2 for an LSE ``[B, H, S]``; negative
            counts from the end).
        cu_seqlens: document boundaries ``[0, ..., S]`` of a packed sequence: zigzag then splits
            every document into ``2C`` pieces (lengths differing by at most one), rank ``r``
            taking pieces ``r`` and ``2C-1-r`` of each; packed keeps documents of at most
            ``S / (4C)`` tokens whole, dealt as contiguous runs of equal causal work, and splits
            the longer ones as zigzag does (``cuparing.documents``); with any layout the length
            needs no
            divisibility, and shards that come out shorter are padded with zero rows at their end
            (:func:`token_positions` says which rows are padding). ``[0, S]`` pads a plain
            sequence.

    Returns:
        The shard, in the caller's array type and device: ``S / C`` long on ``axis``, or with
        ``cu_seqlens`` the common padded length.

    Raises:
        ValueError: unknown layout, rank or axis out of range, world size below 1, bad
            ``cu_seqlens``, or (without ``cu_seqlens``) a length the layout cannot split (it
            must be a multiple of ``C``, of ``2C`` for zigzag).
        TypeError: ``x`` is not an array, or rank, world size or axis is not an integer.

    Example:
        >>> import numpy as np, cuparing as cr
        >>> cr.shard(np.arange(8)[None], 0, 2, layout="zigzag").tolist()
        [[0, 1, 6, 7]]
        >>> cr.shard(np.arange(1, 8)[None], 0, 2, layout="zigzag", cu_seqlens=[0, 3, 7]).tolist()
        [[1, 4, 7, 0]]
    """
    rank, world_size, layout, axis = validation.check_shard_request(
        x, rank, world_size, layout, axis, documents=cu_seqlens is not None
    )
    if cu_seqlens is None:
        local_len = x.shape[axis] // world_size
        return take(x, layouts.global_positions(layout, rank, world_size, local_len), axis)
    cu = np.asarray(validation.check_cu_seqlens(cu_seqlens, x.shape[axis]))
    rows = documents.token_positions(layout, rank, world_size, cu)
    real = take(x, rows[rows != documents.PAD], axis)
    padding = int((rows == documents.PAD).sum())
    return concatenate([real, zeros_along(x, axis, padding)], axis) if padding else real


def unshard(
    shards: Sequence[Any], layout: str = "contiguous", axis: int = 1, cu_seqlens: Any = None
) -> Any:
    """Reassemble the global array from every rank's shard (inverse of :func:`shard`).

    Args:
        shards: ``C`` arrays (a list or tuple), shard ``r`` from rank ``r``, all of one shape and
            framework.
        layout: the layout they were sharded with.
        axis: the sequence axis (negative counts from the end).
        cu_seqlens: the documents they were sharded with, if any: padding rows are dropped.

    Returns:
        The global array in the type of the first shard: ``C`` times longer on ``axis``, or with
        ``cu_seqlens`` exactly ``S`` long.

    Raises:
        ValueError: no shards, unknown layout, shards of different shapes, ``axis`` out of
            range, or shards whose length does not match ``cu_seqlens``.
        TypeError: ``shards`` is not a sequence of arrays of one framework, or ``axis`` is not an
            integer.

    Example:
        >>> import numpy as np, cuparing as cr
        >>> cr.unshard([np.array([[0, 1, 6, 7]]), np.array([[2, 3, 4, 5]])], layout="zigzag")
        array([[0, 1, 2, 3, 4, 5, 6, 7]])
    """
    shards, layout, axis = validation.check_unshard_request(
        shards, layout, axis, documents=cu_seqlens is not None
    )
    if cu_seqlens is None:
        order = layouts.unshard_order(layout, len(shards), shards[0].shape[axis])
        return take(concatenate(shards, axis), order, axis)
    cu = np.asarray(validation.check_cu_seqlens(cu_seqlens))
    world_size = len(shards)
    want = documents.shard_length(layout, world_size, cu)
    if shards[0].shape[axis] != want:
        raise ValueError(
            f"with these cu_seqlens (S={cu[-1]}) a {layout} shard of {world_size} holds {want} "
            f"rows on axis {axis}, got {shards[0].shape[axis]}"
        )
    rows = np.concatenate(
        [documents.token_positions(layout, r, world_size, cu) for r in range(world_size)]
    )
    real = np.flatnonzero(rows != documents.PAD)
    order = real[np.argsort(rows[real], kind="stable")]
    return take(concatenate(shards, axis), order, axis)


def token_positions(
    seqlen: int, rank: int, world_size: int, layout: str = "contiguous", cu_seqlens: Any = None
) -> np.ndarray:
    """The global token index of every row of ``rank``'s shard (int64; -1 for padding rows):
    for RoPE, labels and loss masks. Without ``cu_seqlens`` the same as
    :func:`global_positions` for ``seqlen // world_size`` rows.

    Raises:
        ValueError, TypeError: as :func:`shard` for the same arguments.

    Example:
        >>> import cuparing as cr
        >>> cr.token_positions(7, 0, 2, layout="zigzag", cu_seqlens=[0, 3, 7]).tolist()
        [0, 3, 6, -1]
    """
    seqlen = validation.check_int("seqlen", seqlen)
    layout, rank, world_size, _ = validation.check_positions_request(layout, rank, world_size, 0)
    if cu_seqlens is None:
        validation.check_global_length(seqlen, layout, world_size)
        return layouts.global_positions(layout, rank, world_size, seqlen // world_size)
    cu = np.asarray(validation.check_cu_seqlens(cu_seqlens, seqlen))
    return documents.token_positions(layout, rank, world_size, cu)


def global_positions(layout: str, rank: int, world_size: int, local_len: int) -> np.ndarray:
    """The global token positions that ``rank`` holds under ``layout``.

    Args:
        layout: ``"contiguous"``, ``"zigzag"``, ``"striped"`` or ``"packed"`` (as zigzag here).
        rank: ``0 <= rank < world_size``.
        world_size: number of ranks ``C >= 1``.
        local_len: tokens per rank, ``S / C`` (even for zigzag).

    Returns:
        NumPy int64 ``[local_len]``, ascending: which tokens of the global sequence this rank's
        shard holds (so a rank can load only its own tokens).

    Raises:
        ValueError: unknown layout, rank out of range, world size below 1, a negative length or
            an odd one for zigzag.
        TypeError: rank, world size or length is not an integer.

    Example:
        >>> import cuparing as cr
        >>> cr.global_positions("zigzag", 1, 2, 4).tolist()
        [2, 3, 4, 5]
    """
    layout, rank, world_size, local_len = validation.check_positions_request(
        layout, rank, world_size, local_len
    )
    return layouts.global_positions(layout, rank, world_size, local_len)


def _forward(
    origin: Origin,
    ring: Ring,
    plan: RingPlan,
    scale: float,
    qkv: tuple,
    return_lse: bool,
    dests: tuple = (None, None),
) -> Any:
    """The schedule's forward on the caller's (checked) q, k, v: on their backend and stream,
    results in their framework, or in the caller-owned (checked) ``dests`` = (out, lse) where
    given; (out, lse) if ``return_lse``, else out."""
    backend = backend_for(origin.backend)
    q = qkv[0]
    b, s, h, _ = q.shape
    dests = (
        dests[0] if dests[0] is not None else origin.empty(tuple(q.shape), dtype_name(q)),
        dests[1] if dests[1] is not None else origin.empty((b, h, s), validation.lse_dtype(q)),
    )
    with origin.stream():
        qb, kb, vb = (to_backend(x, origin) for x in qkv)
        out_b, lse_b = (None if d is None else to_backend(d, origin) for d in dests)
        results = ring_forward(backend, ring, qb, kb, vb, plan, scale, out=out_b, lse=lse_b)
        out, lse = (
            mine if mine is not None else origin.export(r)
            for mine, r in zip(dests, results, strict=True)
        )
        return (out, lse) if return_lse else out


def _backward(
    origin: Origin,
    ring: Ring,
    plan: RingPlan,
    scale: float,
    arrays: tuple,
    dests: tuple,
    dlse: Any = None,
    deterministic: bool = False,
) -> tuple[Any, Any, Any]:
    """The schedule's backward on the caller's (checked) (dout, q, k, v, out, lse) and optional
    ``dlse``: gradients in the caller-owned (checked) ``dests`` where given, else in the caller's
    framework; ``deterministic``: in a fixed order of adds (ring_backward)."""
    backend = backend_for(origin.backend)
    q, k, v = arrays[1:4]
    # torch CUDA gradients come from torch's allocator (Origin.empty), others from the backend
    given = tuple(
        d if d is not None else origin.empty(tuple(x.shape), dtype_name(x))
        for d, x in zip(dests, (q, k, v), strict=True)
    )
    with origin.stream():
        arrays = [to_backend(x, origin) for x in arrays]
        into = tuple(None if d is None else to_backend(d, origin) for d in given)
        dlse_b = None if dlse is None else to_backend(dlse, origin)
        grads = ring_backward(
            backend, ring, *arrays, plan, scale, grads_into=into, dlse=dlse_b,
            deterministic=deterministic,
        )  # fmt: skip
        return tuple(
            mine if mine is not None else origin.export(g)
            for mine, g in zip(given, grads, strict=True)
        )


def _check_deterministic_runs(origin: Origin, q: Any, deterministic: bool) -> None:
    """Refuse ``deterministic`` where the backward would run GPU kernels that have no ordered
    mode (before any work or transfer)."""
    if deterministic and origin.backend == "cupy":
        backend_for("cupy").check_deterministic(q.shape[-1], dtype_name(q))


@contextlib.contextmanager
def _refused_everywhere(ring: Any, entry: str):
    """Run a call's local checks; if they fail, tell the other ranks (which are about to check
    the call with :meth:`Ring.agree`) before raising, so that every rank fails at once instead of
    waiting for this one until the ring's timeout."""
    try:
        yield
    except (TypeError, ValueError, NotImplementedError) as error:
        if isinstance(ring, Ring):
            ring.refuse(entry, error)
        raise


def _one_device_plan(q: Any, k: Any, mask: Any, cu_seqlens: Any) -> RingPlan:
    """The one-step plan of a single-device call; with documents, over their spread positions
    (then Sq == Sk == the documents' end is required)."""
    if cu_seqlens is None:
        return plan_single(q.shape[1], k.shape[1], mask)
    if q.shape[1] != k.shape[1]:
        raise ValueError(
            f"with cu_seqlens, queries and keys are one packed sequence: Sq == Sk is needed, got "
            f"Sq={q.shape[1]} and Sk={k.shape[1]}"
        )
    cu = validation.check_cu_seqlens(cu_seqlens, q.shape[1])
    return plan_documents("contiguous", 0, 1, cu, mask)


def _gather(requested: bool | None, ring: Ring, cu: tuple | None, k: Any, backward: bool) -> bool:
    """Whether a checked ring call asks to gather K/V (``schedule.gather_decided``: the
    switch's answer, else the default by direction, ring size, documents (more than one) and
    the gathered bytes)."""
    several = cu is not None and len(cu) > 2
    shard_bytes = 2 * math.prod(k.shape) * itemsize(k)  # (this rank's K and V)
    return gather_decided(requested, int(ring.size), several, shard_bytes, backward)


def _ring_plan(layout: str, ring: Ring, q: Any, mask: Any, cu: tuple | None,
               gather: bool) -> RingPlan:  # fmt: skip
    """This rank's plan: by layout, or over the (checked) documents ``cu``; ``gather``: the
    call asks to gather K/V (:func:`_gather`, from ``CUPARING_KV_GATHER`` read once)."""
    if cu is None:
        return plan_ring(layout, ring.rank, ring.size, q.shape[1], mask, gather)
    return plan_documents(layout, ring.rank, ring.size, cu, mask, gather)


def _unless_empty(plan: RingPlan, q: Any) -> RingPlan:
    """``plan``, or its idle form for an empty batch: B == 0 is a valid no-op that returns empty
    results of the right shapes and dtypes, with no compute and no transfer."""
    return plan.idle() if q.shape[0] == 0 else plan
