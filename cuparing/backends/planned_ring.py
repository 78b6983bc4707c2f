"""Ring calls of one signature at pointer level: the launches of every step decided once.

The schedule (:func:`cuparing.schedule.ring_forward`, :func:`cuparing.schedule.ring_backward`)
asks the backend, block by block, to check the operands, find the device positions, look up the
launch of that signature and launch it; each costs tens of microseconds of Python per step. A
training loop calls the same ring with the same shapes, strides, dtypes and plan layer after
layer, so everything but the addresses is decided by the first call. :class:`PlannedForward` and
:class:`PlannedBackward` keep what it decided: per step the block's packed launch (or none for an
EMPTY block) and the device address of the K/V positions it reads, and the backward's launches
before and after the steps (the forward's last block writes the output itself). A repeat only
passes pointers (:func:`cuparing.schedule.run_planned_forward`,
:func:`cuparing.schedule.run_planned_backward` drive the steps and the exchanges).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class PlannedForward:
    """The launches of one rank's ring forward, by step.

    Args:
        last_step: the plan's last step (``RingPlan.last_step``).
        steps: per step ``0..last_step``, ``(launch, k_pos, writes_output)``: the block's
            :class:`~cuparing.backends.launch_plans.PackedLaunch` (taking the forward's eight
            pointers: destination, lse, q, k, v, q positions, k positions, accumulator), the
            device address of the K/V shard's positions, and whether the block writes the output
            (one block alone, or the last of several: it reads the accumulator) rather than the
            float32 accumulator; None for an EMPTY block.
        q_pos: device address of the queries' positions.
        accumulates: whether the blocks are several, merged in a float32 accumulator [B, Sq, H,
            D] (contiguous) before the last writes the output.
        keep: objects the launches read (device position arrays): kept alive with the plan.

    Attributes:
        busy: per step, whether its block is not EMPTY (``schedule.forward_rotation`` takes it).
        gathers: False (the steps rotate K/V; :class:`PlannedGather` gathers them).
    """

    gathers = False

    def __init__(
        self, last_step: int, steps: Sequence[tuple[Any, int, bool] | None], q_pos: int,
        accumulates: bool, keep: tuple = (),
    ):  # fmt: skip
        if len(steps) != last_step + 1:
            raise ValueError(f"expected {last_step + 1} steps, got {len(steps)}")
        self.last_step = last_step
        self._steps = tuple(steps)
        self._q_pos = q_pos
        self.accumulates = accumulates
        self.busy = tuple(planned is not None for planned in self._steps)
        self._keep = keep

    def launch_step(
        self, step: int, out: int, accumulator: int, lse: int, q: int, k: int, v: int
    ) -> None:  # fmt: skip
        """Launch ``step``'s block (nothing for an EMPTY one) on CuPy's current stream.

        Args:
            out: the output (q's dtype); accumulator: the float32 accumulator (when
                :attr:`accumulates`; else ignored).
            lse: the running (then final) lse, float32 [B, H, Sq] contiguous.
            q, k, v: addresses of the queries and of the K/V shard held at ``step`` (the
                caller's at step 0, the ring's receive buffers after).
        """
        planned = self._steps[step]
        if planned is None:
            return
        launch, k_pos, writes_output = planned
        if writes_output:
            launch.launch(out, lse, q, k, v, self._q_pos, k_pos, accumulator)
        else:
            launch.launch(accumulator, lse, q, k, v, self._q_pos, k_pos, 0)


class _GatheredLaunches:
    """What the gathered plans (:class:`PlannedGather`, :class:`PlannedGatherBackward`) share:
    the launch putting the received shards' K/V rows in position order (``_gather``, None where
    the one received shard is in order already), its device map (``_sources``) and
    ``last_step``, which their constructors set."""

    gathers = True
    last_step: int
    _gather: Any
    _sources: int

    def launch_gather(self, parts: Sequence[tuple[int, int]], k_all: int, v_all: int) -> None:
        """On CuPy's current stream: the rows of ``parts`` (the (k, v) addresses received at
        steps 1 .. last_step) into ``k_all`` / ``v_all`` in position order."""
        if len(parts) != self.last_step:
            raise ValueError(f"expected {self.last_step} shards, got {len(parts)}")
        self._gather.launch(k_all, v_all, *(k for k, _ in parts), *(v for _, v in parts),
                            self._sources)  # fmt: skip


class PlannedGather(_GatheredLaunches):
    """The launches of one rank's gathered ring forward (``schedule.gathered_forward``): its own
    block while the other ranks' K/V arrive, their rows put in position order, one block over
    all of them.

    Args:
        last_step: the plan's last step (``last_step`` exchanges deliver the other shards).
        gather: the launch putting their rows in order (``backends.kv_gather.gather_launch``:
            pointers k_all, v_all, every received k, every received v, sources), or None where
            the one received shard is in order already (``GatheredKeys.identity``).
        blocks: a two-step :class:`PlannedForward`: step 0 this rank's shard, step 1 the
            gathered K/V (each None where EMPTY; the second, or the only one, writes the
            output).
        sources: device address of the gather's (shard, row) map.
        gathered_shape: [B, L, Hkv, D] of the gathered K and V (contiguous, k's dtype; None
            without a gather).
        keep: objects the launches read (device arrays): kept alive with the plan.

    Attributes:
        gathers: True (``schedule.run_planned_gathered_forward`` runs it).
        identity: whether the gathered block reads the received shard itself (no gather).
    """

    def __init__(self, last_step: int, gather: Any, blocks: PlannedForward, sources: int,
                 gathered_shape: tuple, keep: tuple = ()):  # fmt: skip
        if last_step < 1 or blocks.last_step != 1:
            raise ValueError(
                f"a gathered forward needs at least two steps and two blocks (own, gathered), "
                f"got {last_step=} and {blocks.last_step + 1} blocks"
            )
        self.identity = gather is None
        if self.identity != (gathered_shape is None) or (self.identity and last_step != 1):
            raise ValueError("a gathered forward without a gather has one received shard and "
                             "no gathered K/V")  # fmt: skip
        self.last_step = last_step
        self._gather, self.blocks = gather, blocks
        self._sources = sources
        self.gathered_shape = None if gathered_shape is None else tuple(gathered_shape)
        self._keep = keep



class PlannedBackward:
    """The launches of one rank's ring backward, by step.

    Args:
        last_step: the plan's last step; home_shift: how far the dK/dV accumulators travel home
            after it (``schedule.home_shift_of``).
        delta: the launch (dout, out, delta pointers) of ``delta = rowsum(dout * out)``.
        steps: per step ``0..last_step``, ``(launch, k_pos, flag_offsets)``: the block's launch
            (taking the backward kernels' fourteen pointers), the device address of the K/V
            positions, and the byte offsets into the flags array of its redo flags and turn
            counters (None for those it has none of); None for an EMPTY block.
        q_pos: device address of the queries' positions.
        dq_out: the launch (accumulator, dq) that turns the dq accumulator into dq.
        dkv_out: the launch (accumulator, destination) that casts a float32 dK or dV
            accumulator into the gradient's dtype; None where ``direct``.
        direct: the step's kernels write dK / dV straight (``backends.direct_grads``: one
            step, no trip home), the float32 pair of ``scratch`` being their uninitialised
            scratch.
        scratch: a callable giving, on the current stream, ``(delta, dq_acc, [dk_acc, dv_acc],
            flags)``: float32 delta [B, H, Sq] (uninitialised), the zeroed dq accumulator, the
            zeroed float32 dK/dV accumulators (arrays the ring can send; uninitialised scratch
            where ``dkv_out`` is None) and the zeroed int32 flags of every step (or None when no
            step has any).
        keep: objects the launches read (device position arrays): kept alive with the plan.
        fresh: a callable giving, on the current stream, a zeroed float32 ``[dk_acc,
            dv_acc]`` pair that later steps compute into (``schedule.backward_rotation``);
            clear: a callable zeroing such a pair on the current stream; add: the launch (x,
            acc) of ``acc += x`` over one accumulator. Needed where the plan has more than one
            step.
        homeward: where the accumulators travel home (``home_shift``), ``(add_cast, travel,
            copy)``: the launch (x, acc, y) of y = (acc + x) in dK / dV's dtype, a callable
            giving on the current stream an uninitialised ``[dk, dv]`` pair in that dtype (what
            travels), and the launch (src, dst) copying one such gradient; the last step makes
            the whole gradients with ``add_cast`` (``dkv_out`` where it added nothing) and the
            owner copies them out of what arrived (:meth:`leave`, :meth:`finish_keys`).

    Attributes:
        busy: per step, whether its block is not EMPTY (``schedule.backward_rotation`` takes
            it).
        direct: whether the steps write dK / dV straight (``dkv_out`` None).
        gathers: False (:class:`PlannedGatherBackward` gathers K/V).
    """

    gathers = False

    def __init__(
        self, last_step: int, home_shift: int, delta: Any,
        steps: Sequence[tuple[Any, int, tuple] | None], q_pos: int, dq_out: Any, dkv_out: Any,
        scratch: Any, keep: tuple = (), direct: bool = False, fresh: Any = None,
        clear: Any = None, add: Any = None, homeward: tuple | None = None,
    ):  # fmt: skip
        if len(steps) != last_step + 1:
            raise ValueError(f"expected {last_step + 1} steps, got {len(steps)}")
        if direct and (last_step != 0 or home_shift != 0 or dkv_out is not None):
            raise ValueError(
                "direct dK / dV need one step, no trip home and no dK / dV cast, got "
                f"{last_step=}, {home_shift=}, a cast {'given' if dkv_out else 'missing'}"
            )
        if not direct and dkv_out is None:
            raise ValueError("a backward that adds into float32 dK / dV needs their cast")
        if last_step > 0 and (fresh is None or clear is None or add is None):
            raise ValueError("a backward of several steps needs a dK / dV pair for its later "
                             "steps, its clearing and its add")  # fmt: skip
        if home_shift and homeward is None:
            raise ValueError("a backward whose dK / dV travel home needs their add and cast, "
                             "the pair they travel in and the copy out")  # fmt: skip
        self.last_step, self.home_shift = last_step, home_shift
        self._delta = delta
        self._steps = tuple(steps)
        self.busy = tuple(planned is not None for planned in self._steps)
        self._q_pos = q_pos
        self._dq_out, self._dkv_out = dq_out, dkv_out
        self.direct = direct
        self.scratch = scratch
        self.fresh, self.clear = fresh, clear
        self._add = add
        self._add_cast, self.travel, self._copy = homeward or (None, None, None)
        self._keep = keep

    def launch_delta(self, dout: int, out: int, delta: int) -> None:
        """``delta = rowsum(dout * out)`` (float32 [B, H, Sq]) on CuPy's current stream."""
        self._delta.launch(dout, out, delta)

    def launch_step(
        self, step: int, dout: int, lse: int, delta: int, dq_acc: int, dk_acc: int, dv_acc: int,
        q: int, k: int, v: int, flags: int, dk: int = 0, dv: int = 0,
    ) -> None:  # fmt: skip
        """Launch ``step``'s block (nothing for an EMPTY one): its gradients added into the
        accumulators (``dk_acc`` / ``dv_acc``: those held at this step); ``flags``: the address
        of the scratch flags array (0 when there is none); where :attr:`direct`, ``dk`` / ``dv``:
        the gradients, which the block writes."""
        planned = self._steps[step]
        if planned is None:
            return
        launch, k_pos, offsets = planned
        redo, dq_turns, dkv_turns = (0 if at is None else flags + at for at in offsets)
        if not self.direct:
            dk = dv = 0
        elif not (dk and dv):
            raise ValueError("a direct backward step needs the dK / dV addresses")
        launch.launch(dout, lse, delta, dq_acc, dk_acc, dv_acc, q, k, v, self._q_pos, k_pos,
                      redo, dq_turns, dkv_turns, dk, dv)  # fmt: skip

    def add(self, x: int, acc: int) -> None:
        """``acc += x`` over float32 dK / dV accumulators (what arrived += a later step's)."""
        self._add.launch(x, acc)

    def finish_queries(self, dq_acc: int, dq: int) -> None:
        """dq from the dq accumulator (complete after the last step: it may run while dK / dV
        travel home)."""
        self._dq_out.launch(dq_acc, dq)

    def leave(self, part: list | None, held: list, pair: list) -> None:
        """The whole dK / dV into ``pair`` (:attr:`travel`'s, their dtype) after the last
        step: the accumulators ``held`` plus the step's ``part`` (None where it added nothing
        apart), cast; all CuPy arrays."""
        for i in range(2):
            if part is None:
                self._dkv_out.launch(held[i].data.ptr, pair[i].data.ptr)
            else:
                self._add_cast.launch(part[i].data.ptr, held[i].data.ptr, pair[i].data.ptr)

    def finish_keys(self, dk_got: int, dv_got: int, dk: int, dv: int) -> None:
        """dk / dv from what this rank holds after the last step: where they travelled home
        (``home_shift``), copied out of the pair that arrived in their dtype; else cast from
        its float32 accumulators (where :attr:`direct`, the step wrote them)."""
        if self.direct:
            return
        if self.home_shift:
            self._copy.launch(dk_got, dk)
            self._copy.launch(dv_got, dv)
        else:
            self._dkv_out.launch(dk_got, dk)
            self._dkv_out.launch(dv_got, dv)


class PlannedGatherBackward(_GatheredLaunches):
    """The launches of one rank's gathered ring backward (``schedule.gathered_backward``): its
    own block (into float32 dK / dV of its shard) while the other ranks' K/V arrive, their rows
    put in position order, one block over all of them (into float32 dK / dV of every gathered
    key), each step's rows of those copied out for their owner, what comes back added in step
    order, then cast.

    Args:
        last_step: the plan's last step.
        gather: the launch putting K/V rows in order (as :class:`PlannedGather`'s), or None
            where the one received shard is in order already (no returns then: the gathered
            dK / dV are that shard's rows in order).
        blocks: a two-step :class:`PlannedBackward` (step 0 this rank's shard, step 1 the
            gathered K/V; delta, the dq conversion, the cast of accumulators of this rank's
            shard shape into dK / dV, and their float32 add, :meth:`add`).
        returns: per step 1 .. last_step, the launch copying that step's rows out of the
            gathered dK / dV (``kv_gather.gather_launch`` with one part: pointers dk_t, dv_t,
            dk_all, dv_all, its sources).
        sources, step_sources: device addresses of the gather's map and of each step's map back.
        scratch: a callable giving, on the current stream, ``(blocks scratch, (k_all, v_all),
            (dk_all, dv_all), pieces)``: ``blocks.scratch()`` (its float32 pair: this rank's
            zeroed dK / dV), the gathered K / V (k's dtype, uninitialised; () without a
            gather), their zeroed float32 dK / dV, and per step 1 .. last_step a float32 (dk_t,
            dv_t) pair of that step's shard shape (uninitialised; none without a gather).
        keep: objects the launches read (device arrays): kept alive with the plan.

    Attributes:
        gathers: True (``schedule.run_planned_gathered_backward`` runs it).
        identity: whether the gathered block reads the received shard itself (no gather).
    """

    def __init__(self, last_step: int, gather: Any, blocks: PlannedBackward, returns: tuple,
                 sources: int, step_sources: tuple, scratch: Any, keep: tuple = ()):  # fmt: skip
        self.identity = gather is None
        backs = 0 if self.identity else last_step
        if last_step < 1 or len(returns) != backs or len(step_sources) != last_step or (
            blocks is not None and blocks.last_step != 1
        ) or (self.identity and last_step != 1):  # fmt: skip
            raise ValueError(
                f"a gathered backward needs at least two steps, two blocks, and a way back for "
                f"each received shard unless one is received in order (no gather), got "
                f"{last_step=}, {'no gather' if self.identity else 'a gather'}, "
                f"{len(returns)} launches back, {len(step_sources)} maps"
            )
        self.last_step = last_step
        self._gather, self.blocks, self._returns = gather, blocks, returns
        self._sources, self._step_sources = sources, tuple(step_sources)
        self.scratch = scratch
        self._keep = keep

    def launch_return(self, step: int, dk_all: int, dv_all: int, dk: int, dv: int) -> None:
        """Step ``step``'s (1 .. last_step) rows of the gathered float32 dK / dV into ``dk`` /
        ``dv``."""
        self._returns[step - 1].launch(dk, dv, dk_all, dv_all, self._step_sources[step - 1])

    def add(self, x: int, acc: int) -> None:
        """``acc += x`` over float32 arrays of this rank's shard shape (the blocks' add)."""
        self.blocks.add(x, acc)
