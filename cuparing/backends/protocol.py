"""The backend contract: what the ring schedule asks of whoever computes blocks of attention.

A backend owns every array operation of a call; the schedule (``cuparing.schedule``) only decides
which blocks run and hands them over. Shapes (flash-attn convention): q, out, dout
``[B, Sq, H, D]``; k, v ``[B, Sk, Hkv, D]``; lse, delta ``[B, H, Sq]``. Positions are the global
token positions of a shard (int64, ascending).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..masks import BlockKind, MaskSpec


@runtime_checkable
class Backend(Protocol):
    """Block attention for one kind of array (``ArrayBackend``: NumPy; ``CupyBackend``: our
    kernels). Accumulators are float32, float64 for float64 inputs."""

    #: ``"numpy"`` or ``"cupy"``
    name: str

    def positions(self, host_positions: np.ndarray) -> Any:
        """Global positions (NumPy int64) in the form this backend's block functions take."""

    def forward_state(self, q: Any, blocks: int, out: Any = None, lse: Any = None) -> Any:
        """An empty running result for queries ``q``; exactly ``blocks`` non-empty blocks follow
        (0: the result is output 0, lse -inf). ``out`` / ``lse``: caller-owned arrays of this
        backend (checked: q's shape and dtype with a contiguous last axis / [B, H, Sq] in the
        accumulator dtype, C-contiguous) that the result is written into; the backend may also
        compute in them directly."""

    def forward_block(
        self, state: Any, q: Any, k: Any, v: Any, q_pos: Any, k_pos: Any, kind: BlockKind,
        mask: MaskSpec, scale: float,
    ) -> None:  # fmt: skip
        """Compute one block (``kind`` PARTIAL or FULL) and merge it into ``state`` in the
        accumulator dtype."""

    def gathered(self, parts: list, keys: Any) -> tuple[Any, Any]:
        """(K, V) [B, L, Hkv, D] in the parts' dtype, L = ``len(keys.positions)``: ``parts[t]``
        = (k_t, v_t) of this backend [B, n_t, Hkv, D] (any strides), their rows put at
        ``keys.rows[t]`` (``keys``: the plan's ``schedule.GatheredKeys``; ``keys.sources`` is
        the inverse map)."""

    def rows_of_steps(self, dk: Any, dv: Any, keys: Any) -> list[tuple[Any, Any]]:
        """The inverse of :meth:`gathered` for gradients: per step t, (dk, dv) rows at
        ``keys.rows[t]`` of the accumulators ``dk`` / ``dv`` [B, L, Hkv, D] (``kv_accum``'s),
        as new C-contiguous arrays of their dtype (what ``ring.exchange`` sends)."""

    def forward_finish(self, state: Any) -> tuple[Any, Any]:
        """(out [B, Sq, H, D] in q's dtype, lse [B, H, Sq] float32, float64 for float64): the
        caller-owned arrays given to ``forward_state``, where given."""

    def plan_forward(
        self, plan: Any, q: Any, k: Any, v: Any, out: Any, lse: Any, scale: float
    ) -> Any:  # fmt: skip
        """The launches of ``plan``'s whole forward decided once for operands and destinations
        of these shapes, strides and dtypes (a
        :class:`~cuparing.backends.planned_ring.PlannedForward` that
        :func:`cuparing.schedule.run_planned_forward` runs with new addresses), or None where
        this backend has no such plan (every call then runs the schedule's forward)."""

    def plan_backward(
        self, plan: Any, dout: Any, q: Any, k: Any, v: Any, out: Any, lse: Any, grads: tuple,
        scale: float, deterministic: bool = False,
    ) -> Any:  # fmt: skip
        """The launches of ``plan``'s whole backward decided once for operands and gradients
        ``grads`` = (dq, dk, dv) of these shapes, strides and dtypes (a
        :class:`~cuparing.backends.planned_ring.PlannedBackward` that
        :func:`cuparing.schedule.run_planned_backward` runs with new addresses), or None where
        this backend has no such plan."""

    def backward_delta(self, dout: Any, out: Any) -> Any:
        """``delta = rowsum(dout * out)``, [B, H, Sq] in the accumulator dtype."""

    def zeros_accum(self, shape: tuple, dtype: Any) -> Any:
        """A zeroed gradient accumulator of ``shape`` for inputs of ``dtype``."""

    def kv_accum(self, q: Any, k: Any, whole: bool = False, into: Any = None) -> Any:
        """An accumulator for the gradient of keys (or values) ``k`` of queries ``q``: zeroed,
        in the accumulator dtype, of k's shape. ``whole``: one ``backward_block`` will make the
        whole gradient (one block, nothing travels); a backend may then hand back one its kernels
        write straight in k's dtype (into ``into``, the caller's destination, where it can).
        Read back only through :meth:`kv_from_accum`."""

    def add_into(self, acc: Any, x: Any) -> None:
        """``acc += x`` in place: float32 (float64) dK / dV accumulators (:meth:`kv_accum`'s,
        not ``whole``) of one shape, either of which may be a ring receive buffer that arrived
        (the ring backward adds a step's into those; a gathered backward adds those into its
        own)."""

    def kv_homeward(self, acc: Any, part: Any, dtype: Any) -> Any:
        """A shard's whole dK or dV as it travels home after the ring backward's last step:
        ``acc`` (:meth:`kv_accum`'s, not ``whole``; may be a ring receive buffer, which this
        may update) plus ``part`` (one of the same, or None) in ``dtype`` (k's), rounded once
        as :meth:`kv_from_accum` would round their sum; ``acc`` itself where nothing changes."""

    def kv_from_accum(self, acc: Any, dtype: Any, out: Any = None) -> Any:
        """The gradient in ``dtype`` from the accumulator of :meth:`kv_accum`; written into
        ``out`` (an array of this backend, k's shape, any strides) and returned, if given."""

    def dq_accum(self, q: Any) -> Any:
        """A zeroed accumulator for the gradient of queries ``q``, in whatever layout this
        backend's ``backward_block`` adds dq into (q's shape for the array backends; the Hopper
        kernels add into a tiled layout). Read back only through :meth:`dq_from_accum`."""

    def dq_from_accum(self, acc: Any, dtype: Any, out: Any = None) -> Any:
        """dq [B, Sq, H, D] in ``dtype`` from the accumulator of :meth:`dq_accum`; written into
        ``out`` (an array of this backend, q's shape, any strides) and returned, if given."""

    def backward_block(
        self, dq: Any, dk: Any, dv: Any, dout: Any, q: Any, k: Any, v: Any, lse: Any,
        delta: Any, q_pos: Any, k_pos: Any, kind: BlockKind, mask: MaskSpec, scale: float,
        deterministic: bool = False,
    ) -> None:  # fmt: skip
        """Add one block's gradients into the accumulators ``dq`` (from :meth:`dq_accum`),
        ``dk``, ``dv`` (from :meth:`kv_accum`) in place;
        ``deterministic``: in an order that does not change between runs, so the same inputs give
        bit-identical accumulators.

        Raises:
            NotImplementedError: ``deterministic`` where this backend's kernels have no such mode.
        """

    def cast(self, x: Any, dtype: Any, out: Any = None) -> Any:
        """``x`` as ``dtype`` (the accumulators' way back to the caller's dtype); written into
        ``out`` (an array of this backend with ``x``'s shape, any strides) and returned, if
        given."""

    def copy(self, x: Any) -> Any:
        """A new array of this backend holding ``x`` (any dtype its arrays take, 16-bit floats
        included): what a caller keeps of a ring receive buffer, which the ring reuses."""
