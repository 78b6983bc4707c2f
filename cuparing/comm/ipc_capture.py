"""The copy-engine ring's device flags inside a CUDA graph: how a captured call's stream memory
operations are recorded, given the flag values of one state of the channels' counts, and ordered
on replays.

A call captured on an :class:`cuparing.comm.ipc.IpcRing` with device flags holds each
exchange's *freed*, *await freed*, *pushed* and *await pushed* (:mod:`cuparing.comm.ipc`) as
graph nodes, with the values they were issued with: flag phases (:func:`flag_phase`), which
repeat every four exchanges of a channel. :class:`CapturedExchanges` notes each node as it is
captured; gives an instantiation of the graph the values of one state of the channels' counts
modulo 4, once, so that a replay at that state changes no node; and orders each launch after the
exchanges issued before it on the graph's slots, and the exchanges after it after the launch
(:class:`Received`: the note a slot keeps of its last exchange). The graph and its
instantiations are :class:`cuparing.backends.ring_graphs.CapturedRingCall`'s. Of the ring this
module sees only the channels (their exchange ``count`` and per-slot ``previous``), the driver
and ``cupy.cuda``, as arguments: :mod:`cuparing.comm.ipc` imports it, not the other way round.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from .base import RingError

_KEYS = 4  # flag values repeat every four exchanges of a channel


def flag_phase(k: int) -> int:
    """The one-hot value exchange ``k`` of a channel writes and awaits (:mod:`cuparing.comm.ipc`):
    1 or 2, the same for ``k`` and ``k + 4``, different for ``k`` and ``k + 2``; ``flag_phase(-2)
    == flag_phase(-1) == 2``."""
    return 1 << ((k >> 1) & 1)


class Received(NamedTuple):
    """A point on the GPU after which a slot's last exchange has evaluated its *await pushed*:
    ``event``'s latest record, on the stream whose raw handle is ``stream``, recorded inside
    the capture ``capture`` (None: outside any; it ran or will run)."""

    event: Any
    stream: int
    capture: CapturedExchanges | None = None


class CapturedExchanges:
    """The device flags' stream memory operations of the exchanges captured into one CUDA graph
    (one node each), and what replays need of them.

    The flag values of exchange ``k`` are ``flag_phase(k)`` and ``flag_phase(k - 2)``
    (:mod:`cuparing.comm.ipc`), which repeat every four exchanges: a replay that comes ``d``
    exchanges after the captured ones on a channel needs the captured values where ``d % 4 == 0``
    and the other phase where ``d % 4 == 2``. An instantiation of the graph whose nodes were given
    the values of one :meth:`key` (:meth:`patch`, once, when it is made; the captured nodes hold
    those of the capture's own key) thus serves every replay at that key unchanged, and the caller
    keeps one per key (:class:`cuparing.backends.ring_graphs.CapturedRingCall`). The channels'
    counts move on by the exchanges the graph makes at each launch (:meth:`advance`), so eager
    exchanges continue the sequence. The graph's copies and the arrays its kernels read are fixed to
    the captured slots ``k % 2``: it replays only where ``d`` is even on every channel it uses
    (:meth:`matches`; a call that makes an odd number of exchanges on a channel has a second graph
    for the other parity).

    Each launch is ordered after the exchanges issued before it on the slots the graph uses
    (:meth:`before_launch`: the first *freed* of each slot in the graph needs them,
    :mod:`cuparing.comm.ipc`), and after it one event recorded on the launch stream
    (:attr:`launched`) stands for the graph's exchanges on those slots (:meth:`advance`): the graph
    ends only once every captured stream is done (a capture joins them back into the caller's
    stream), so the next exchange on the slot, eager or replayed, waits for that. The caller's
    replays take the same event as the launch's end (a replay on another stream waits for it), so a
    replay records one event.

    Args:
        driver: cuda-bindings' driver module.
        channels: every channel of the ring (their counts and slots' predecessors now are the
            captured call's start).
        cuda: ``cupy.cuda`` (the launches' events and stream waits).
        fail: fails the ring, given why (a refused record after a launch); the error to
            raise.

    Attributes:
        launched: the event (a CuPy event) :meth:`advance` records after each launch.
    """

    def __init__(self, driver: Any, channels: list, cuda: Any,
                 fail: Callable[[str], RingError]):  # fmt: skip
        self._driver = driver
        self._ctx = driver.cuCtxGetCurrent()[1]
        self._runtime = cuda.runtime
        self._all = channels
        self._start = {id(c): c.count for c in channels}
        self._previous = {id(c): list(c.previous) for c in channels}
        self._channels: dict[int, Any] = {}  # those the call exchanged on
        self._made: dict[int, int] = {}  # exchanges per call, by channel
        self._slots: list[tuple[int, int]] = []  # (channel id, slot) the call exchanged on
        self._ops: list[tuple] = []  # (channel id, node, params, value field, captured step)
        # recorded on the launch stream after each launch (made now, in the ring's device); the
        # caller's replays use it as their end too. A cupy Event: it lives as long as a
        # channel's slot still refers to it, after release() too
        self.launched = cuda.Event(disable_timing=True)
        self._record: Received | None = None  # (launched, the last launch's stream)
        self._fail = fail
        self._released = False

    def add(self, stream: Any, channel: Any, write: bool, word: Any, step: int,
            flags: int) -> None:  # fmt: skip
        """Record the operation just captured on ``stream`` (its node is the stream's last),
        which writes or awaits ``flag_phase(step)``."""
        d = self._driver
        result = d.cuStreamGetCaptureInfo(stream)
        if result[0] != d.CUresult.CUDA_SUCCESS or len(result[4]) != 1:
            raise RuntimeError(f"cannot find the captured flag operation's node ({result[0]!r})")
        op = d.CUstreamBatchMemOpParams()
        operand = op.writeValue if write else op.waitValue
        kinds = d.CUstreamBatchMemOpType
        operand.operation = kinds.CU_STREAM_MEM_OP_WRITE_VALUE_32 if write else (
            kinds.CU_STREAM_MEM_OP_WAIT_VALUE_32)  # fmt: skip
        operand.address, operand.value, operand.flags = word, flag_phase(step), flags
        params = d.CUDA_BATCH_MEM_OP_NODE_PARAMS()
        params.ctx, params.count, params.paramArray, params.flags = self._ctx, 1, [op], 0
        # the node's operation as the params hold it (setting paramArray copied ``op``): an
        # instantiation for another key sets its value there
        kept = params.paramArray[0]
        operand = kept.writeValue if write else kept.waitValue
        self._channels[id(channel)] = channel
        self._ops.append((id(channel), result[4][0], params, operand, step))

    def finish(self) -> None:
        """At the capture's end (whether or not it succeeded): nothing ran, so every channel's
        count and slots' predecessors go back to the start (the replays move them on)."""
        for channel in self._all:
            key = id(channel)
            if key in self._channels:
                self._made[key] = made = channel.count - self._start[key]
                # (a replay starts at the captured parity: the same slots)
                start = self._start[key]
                self._slots += [(key, s % 2) for s in range(start, start + min(made, 2))]
            channel.count = self._start[key]
            channel.previous = self._previous[key]
        # from here only the channels the graph uses (the others, and their memory, are not
        # the graph's to keep alive)
        self._all, self._previous = [], {}
        self._start = {key: self._start[key] for key in self._channels}

    def key(self) -> tuple[int, ...]:
        """Where the channels the graph uses stand in the flag values' cycle: their counts
        since the capture, modulo 4 (each 0 or 2 where :meth:`matches`); the capture's own is
        all zeros. Instantiations given the values of one key (:meth:`patch`) replay alike."""
        return tuple((c.count - self._start[key]) % _KEYS for key, c in self._channels.items())

    def patch(self, executable: Any) -> None:
        """Give each recorded node of ``executable`` its value for the channels' counts now
        (for the current :meth:`key`).

        Raises:
            RuntimeError: the driver refused (nothing was launched).
        """
        d = self._driver
        for key, node, params, operand, step in self._ops:
            operand.value = flag_phase(step + self._channels[key].count - self._start[key])
            (err,) = d.cuGraphExecBatchMemOpNodeSetParams(executable, node, params)
            if err != d.CUresult.CUDA_SUCCESS:
                raise RuntimeError(f"cuGraphExecBatchMemOpNodeSetParams failed: {err!r}")

    def before_launch(self, stream: int, after_last: bool = False) -> None:
        """Before a launch on ``stream`` (a raw handle): ``stream`` waits for the last exchange
        on each slot the graph uses (once per event; none where it was recorded on ``stream``,
        whose order covers it: a steady loop of replays on one stream waits for nothing).

        Args:
            after_last: ``stream`` already waits for :attr:`launched` (the caller's wait for
                the last launch, on another stream): a slot whose last exchange is that launch
                needs no wait of its own.

        Raises:
            RuntimeError: the runtime refused a wait (nothing was launched).
        """
        waited = (self.launched,) if after_last else ()  # (no allocation in a steady loop)
        for key, slot in self._slots:
            previous = self._channels[key].previous[slot]
            if previous is None or previous.stream == stream or previous.event in waited:
                continue
            self._runtime.streamWaitEvent(stream, previous.event.ptr, 0)
            waited += (previous.event,)

    def advance(self, stream: int) -> None:
        """After a launch on ``stream``: each channel has made the graph's exchanges, and
        :attr:`launched`, recorded on ``stream`` now, is the slots' predecessor for the next
        exchange (and the launch's end for the caller's next launch on another stream).

        Where the runtime refuses the record the slots have no predecessor to wait for (the
        next exchange issued from another stream would not be ordered after the graph, and
        could leave a peer waiting for good): the ring fails.

        Raises:
            RingError: the runtime refused the record (the ring has failed).
        """
        channels = self._channels
        for key, made in self._made.items():
            channels[key].count += made
        try:
            self._runtime.eventRecord(self.launched.ptr, stream)
        except Exception as exc:
            for key, slot in self._slots:
                channels[key].previous[slot] = None
            raise self._fail(f"recording the end of a replayed CUDA graph failed: "
                             f"{type(exc).__name__}: {exc}") from exc  # fmt: skip
        record = self._record
        if record is None or record.stream != stream:  # (one record per launch stream)
            record = self._record = Received(self.launched, stream)
        for key, slot in self._slots:
            channels[key].previous[slot] = record

    def release(self) -> None:
        """Drop the channels and nodes (the graph is gone): their memory is the ring's to free
        (``release_buffers``, ``close``). Matches nothing from then on."""
        self._all, self._channels, self._ops, self._made, self._slots = [], {}, [], {}, []
        self._released = True

    def matches(self) -> bool:
        """Whether every channel the graph uses is at the captured slot parity (never once
        released)."""
        if self._released:
            return False
        return all((c.count - self._start[key]) % 2 == 0 for key, c in self._channels.items())
