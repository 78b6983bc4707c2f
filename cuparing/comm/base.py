"""The communicator protocol the ring schedule talks to.

A :class:`Ring` knows its ``rank`` and ``size`` and can do one thing: a grouped exchange in which
every rank sends a list of arrays to ``rank + shift`` and receives arrays of the same shapes and
dtypes from ``rank - shift`` (mod ``size``). The schedule calls :meth:`Ring.exchange` in the same
order on every rank; an implementation may run it asynchronously (the NCCL ring does, on its own
stream) and must hand back received buffers through :meth:`PendingExchange.wait`.

Besides exchanges a ring offers one collective, :meth:`Ring.allgather_bytes` (small messages),
and with it :meth:`Ring.agree`, by which every rank checks its call against the others' once.

Buffer ownership: arrays returned by ``wait()`` belong to the ring. They stay valid, and may be
read or updated in place by the caller, until the *second* following exchange on the same
``tag`` (double buffering). Arrays passed to ``exchange`` must not be modified until its ``wait()``.
"""

from __future__ import annotations

import abc
import contextlib
import os
from collections.abc import Mapping, Sequence
from typing import Any

from . import agreement


class RingError(RuntimeError):
    """A ring operation failed: a peer died, timed out, or the communicator was aborted."""


class RingTimeoutError(RingError):
    """An exchange did not complete within the ring's timeout."""


class CaptureDeferred(RuntimeError):
    """An exchange inside a CUDA-graph capture that must first run eagerly (its transport sets
    something up on the first exchange of a kind, e.g. the copy-engine ring's channels): the
    call runs without a graph this time and may be captured on a later repeat. Nothing of that
    exchange was queued; the capture is dropped (what earlier exchanges queued into it never
    runs) and the ring is intact."""


class PendingExchange(abc.ABC):
    """Handle of an exchange in flight."""

    @abc.abstractmethod
    def wait(self) -> list[Any]:
        """Arrays received from ``rank - shift``, in the order they were sent.

        Raises:
            RingTimeoutError: the peer did not deliver within the ring's timeout.
            RingError: the ring was aborted (another rank failed).
        """


class ReadyExchange(PendingExchange):
    """An exchange that moved nothing (a ring of one, or a shift of a whole turn): ``wait()``
    hands back the arrays it was given."""

    def __init__(self, arrays: Sequence[Any]):
        self._arrays = list(arrays)

    def wait(self) -> list[Any]:
        return self._arrays


class Ring(abc.ABC):
    """A group of ``size`` ranks joined in a ring; this object is one of them.

    Build one with :meth:`Ring.from_env` (one process per GPU: the copy engines between GPUs of
    one host, else NCCL), or let
    :func:`cuparing.simulate` hand simulated CPU ranks to your function.
    """

    rank: int
    size: int
    #: this ring's integer handle in cuparing.torch's custom ops, once it has one
    #: (``cuparing.torch.ring_handle``): a plain attribute, which torch.compile reads
    torch_handle: int | None = None
    #: seconds an exchange may take before the ring is aborted and an error raised
    timeout: float

    @abc.abstractmethod
    def exchange(self, arrays: Sequence[Any], shift: int = 1, tag: str = "kv") -> PendingExchange:
        """Send ``arrays`` to rank ``rank + shift``, receive the same from ``rank - shift``.

        Args:
            arrays: arrays of this ring's backend; receivers get C-contiguous arrays of the
                same shapes and dtypes (the planned ring calls launch on them as such).
            shift: ring distance, ``1`` for the ordinary ring step.
            tag: names the double-buffer channel the received arrays live in (see module doc).
        """

    def allgather_bytes(self, data: bytes) -> list[bytes]:
        """Every rank's ``data``, in rank order, on every rank (ranks may pass different lengths).

        Collective: every rank calls it at the same point of its sequence of ring calls. Meant
        for small, rare messages (setup, agreement checks), not for tensors.

        Raises:
            NotImplementedError: this ring has no collective (a ring of one always has one).
            RingTimeoutError, RingError: as :meth:`PendingExchange.wait`.
        """
        if self.size == 1:
            return [bytes(data)]
        raise NotImplementedError(
            f"{type(self).__name__} of {self.size} ranks implements no allgather_bytes"
        )

    def agree(self, fields: Mapping[str, str]) -> None:
        """Check that every rank makes this call with the same ``fields``.

        A call whose ``fields`` differ from this rank's previous call is gathered from every
        rank (:meth:`allgather_bytes`) and compared; a call equal to the previous one returns at
        once without communicating (the common case: every layer and step alike), which is
        cheap enough for the hot path. Never silently wrong: if the previous calls agreed and no
        rank changed, all still agree; if some rank changed, it checks, so the ranks either all
        check (a mismatch raises ``ValueError`` everywhere) or the checking ones wait for the
        others and the ring's timeout ends it. Remembering more than one call would break this
        (two ranks could each repeat a different remembered call), so models that alternate
        configurations pay one small collective per change. Collective otherwise: call it on
        every rank at the same point of its ring calls, before the first exchange the fields
        describe.

        Args:
            fields: what every rank must have alike, names to values, both ``str`` (e.g.
                ``{"layout": "zigzag", "dtype": "bfloat16", "q": "(1, 4096, 32, 128)"}``). A
                frozen :class:`~cuparing.comm.agreement.CallFields` passed again after it
                agreed is taken as the same call without reading it.

        Raises:
            TypeError: ``fields`` is not a mapping of ``str`` to ``str`` (nothing is exchanged).
            ValueError: the ranks differ; raised on every rank, naming the first differing field
                (by name), this rank's value and that of the lowest-numbered rank that differs.
            NotImplementedError: a ring of several ranks without :meth:`allgather_bytes`.
            RingTimeoutError, RingError: a rank did not take part: it died, or it repeated its
                previous call while this rank changed its own.
        """
        # Ring has no __init__ of its own, so the previous call lives in the instance dict.
        # The very frozen fields agreed last time (a kept plan's) are the same call: their key
        # need not be made again (sorting and checking the fields, every call of a layer)
        previous = self.__dict__.get("_previous_fields")
        if type(fields) is agreement.CallFields and fields is previous:
            return
        key = agreement.call_key(fields)
        if key != self.__dict__.get("_previous_call"):
            if self.size > 1:
                why = agreement.disagreement(
                    self.rank, key, self.allgather_bytes(agreement.encode(key))
                )
                if why is not None:
                    # the next call checks again, on every rank
                    self._previous_call = self._previous_fields = None
                    raise ValueError(why)
            self._previous_call = key
        self._previous_fields = fields

    def refuse(self, entry: str, error: BaseException) -> None:
        """Take part in the other ranks' :meth:`agree` of a call this rank cannot make.

        This rank's call failed its local checks (``error``, which the caller raises next); the
        other ranks get a ``ValueError`` from their :meth:`agree` naming this rank and ``error``
        at once, instead of waiting for it until the ring's timeout. Never raises itself.

        Args:
            entry: the function that was called (``"ring_attention"``, ...).
            error: why this rank's call is invalid.
        """
        # the next call is checked again, on every rank
        self._previous_call = self._previous_fields = None
        if self.size <= 1:
            return
        fields = {"entry": entry, agreement.REFUSED: f"{type(error).__name__}: {error}"}
        # the ranks may be gone, or the ring cannot gather: the local error stands either way
        with contextlib.suppress(RingError, NotImplementedError):
            self.allgather_bytes(agreement.encode(agreement.call_key(fields)))

    def synchronize(self) -> None:
        """Block until every exchange issued by this rank has completed (or raise on timeout)."""

    def check(self) -> None:
        """Raise a pending ring error (e.g. a watchdog timeout) without blocking."""

    def trace_compute(self, label: str) -> contextlib.AbstractContextManager:
        """Context manager marking the work queued inside it as compute on this rank's timeline.

        A no-op unless the ring records a trace (a GPU ring built with ``trace=True``, or
        ``CUPARING_TRACE``; see :class:`cuparing.comm.gpu_ring.GpuRing`).
        """
        return contextlib.nullcontext()

    def close(self) -> None:
        """Release communicator resources. Idempotent."""

    def __enter__(self) -> Ring:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @classmethod
    def from_env(cls, timeout: float = 300.0, transport: str | None = None,
                 **kwargs: Any) -> Ring:  # fmt: skip
        """Join the ring described by the launcher's environment (torchrun, mpirun, srun, ours).

        Reads rank, world size and local rank, binds GPU ``local_rank`` and creates an NCCL
        communicator; with world size 1 no NCCL is needed. Extra keyword arguments (``init_file``,
        ``device``, ``trace``, ``health``) go to :meth:`cuparing.comm.nccl.NcclRing.from_env` or
        :meth:`cuparing.comm.ipc.IpcRing.from_env`.

        Args:
            timeout: seconds for the rendezvous, and for any exchange to make progress.
            transport: ``"nccl"`` (NCCL send/recv, any topology), ``"ipc"`` (GPUs of one host:
                copy-engine pushes through CUDA IPC, :class:`cuparing.comm.ipc.IpcRing`, which
                leaves the SMs to the kernels) or ``"auto"``: :func:`default_transport`.
                Default: ``CUPARING_TRANSPORT``, else ``"auto"``.

        Raises:
            RuntimeError: CuPy or NCCL unavailable, or the rendezvous failed or timed out (where
                ``"auto"`` chose the copy engines, the message says so and how to choose NCCL).
            ValueError: an unknown transport.
        """
        name = (transport or os.environ.get("CUPARING_TRANSPORT") or "auto").strip().lower()
        chosen = name == "auto"
        if chosen:
            from .rendezvous import RankInfo

            name = default_transport(RankInfo.from_env())
        if name == "nccl":
            from .nccl import NcclRing

            return NcclRing.from_env(timeout=timeout, **kwargs)
        if name == "ipc":
            from .ipc import IpcRing

            try:
                return IpcRing.from_env(timeout=timeout, **kwargs)
            except RuntimeError as exc:
                if not chosen or isinstance(exc, RingError):  # (a ring's failure keeps its type)
                    raise
                raise RuntimeError(
                    f"{exc} (the copy-engine transport was chosen by default for a ring of GPUs "
                    "of one host; CUPARING_TRANSPORT=nccl or transport='nccl' selects NCCL)"
                ) from exc
        raise ValueError(
            f"transport must be 'nccl', 'ipc' or 'auto', got {name!r} (argument transport= or "
            "CUPARING_TRANSPORT)"
        )

    @classmethod
    def from_torch(
        cls, group: Any = None, timeout: float = 300.0, device: str | None = None
    ) -> Ring:
        """A ring on an existing ``torch.distributed`` process group (no second communicator):
        see :class:`cuparing.comm.torch_ring.TorchRing` for the arguments and how transfers,
        streams and timeouts work.

        Raises:
            RuntimeError: ``torch.distributed`` is not initialised.
        """
        from .torch_ring import TorchRing

        return TorchRing(group, timeout=timeout, device=device)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, size={self.size})"


# the copy-engine ring beat NCCL's send/recv on rings of 4 GPUs of one host in every case
# measured (plain rings at 2k and 8k tokens per GPU, forward and backward; packed documents),
# and on 2 since the backward's dK / dV travel behind the next step: an 8k training step 1-5%
# faster, packed documents' forward 15% (BENCHMARKS.md, "The transport's default on two GPUs");
# NCCL keeps only the smallest backwards' host time (2 GPUs, 512 tokens: ~80 against ~150 us)
IPC_DEFAULT_MIN_RANKS = 2


def default_transport(info: Any) -> str:
    """The transport ``"auto"`` takes for the job of ``info`` (a
    :class:`cuparing.comm.rendezvous.RankInfo`): ``"ipc"`` where it has at least
    ``IPC_DEFAULT_MIN_RANKS`` ranks, the launcher says they all run on this host
    (:func:`cuparing.comm.rendezvous.on_one_host`) and the driver says the copy engines can
    serve them with device flags (:func:`cuparing.comm.ipc.copy_engines_unavailable`: NVIDIA's
    cuda-bindings, every GPU visible, stream memory operations, peer access between every
    pair); else ``"nccl"``. The same answer on every rank of a job launched alike."""
    from .ipc import copy_engines_unavailable
    from .rendezvous import on_one_host

    if info.world_size < IPC_DEFAULT_MIN_RANKS or not on_one_host(info):
        return "nccl"
    return "nccl" if copy_engines_unavailable(info.world_size) else "ipc"
