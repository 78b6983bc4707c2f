"""A repeated ring call as one CUDA graph: captured once, replayed with the caller's addresses.

A pointer-level repeat (:mod:`cuparing.call_plans`) still spends tens of microseconds of Python
per exchange (events, NCCL's group calls, the watchdog's flight) and per launch, every call. On a
ring whose exchanges can be captured (:attr:`cuparing.comm.gpu_ring.GpuRing.capturable`: NCCL's
send/recv, the copy-engine ring's copies and device flags) the repeat runs once inside a stream
capture instead, and its exchanges, memsets and launches become one graph. A replay then

1. picks the instantiation of the graph whose transport values fit the ring's state (the
   copy-engine ring's flag values, which repeat every four exchanges of a channel: one
   instantiation per state met, given its values once when it is made, so that in a steady
   loop a replay changes none; what the ring's capture yielded says which state and values);
2. rewrites that instantiation's kernel nodes whose addresses changed since it last ran: each
   launch seen during the capture is packed again by its
   :class:`~cuparing.backends.launch_plans.PackedLaunch` with the caller's addresses in place of
   the captured call's (tensor maps included), and the node takes those arguments
   (``cuGraphExecKernelNodeSetParams``);
3. launches the graph on the caller's stream (on the copy-engine ring, once that stream waits
   for the exchanges issued before on the slots the graph uses, which its first flag writes
   need, unless they were issued from that stream) and records one event after it, which
   orders the next replay on another stream after it and, on the copy-engine ring, is the
   slots' last exchange for the next one; the ring's :meth:`watch` then arms one flight on it,
   so a dead peer still ends the call within the ring's timeout.

The graph's first node copies the caller's K/V into the graph's own copies, which the rest of
it sends and reads: NCCL's graph nodes cannot be pointed at other memory (their parameters are
NCCL's own). The copy is a kernel node (``cuparing_copy_pair``) whose two source fields step 2
rewrites by position when K or V moved (not by value: K and V may be the caller's other
arrays, e.g. ``q is k``): that node's update where they did. A replay on the stream of the
last one, with K and V and the caller's arrays where they were, queues only the launch and
that one event.

The graph owns its K/V copies and every scratch array of the captured call (accumulators,
flags) for as long as it lives; replays on one stream reuse them in stream order. Driver calls go
through NVIDIA's cuda-bindings (an optional dependency, as for the tensor maps).
"""

from __future__ import annotations

import contextlib
import os
import struct
import threading
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..comm.base import RingError
from ..kernels import loader
from . import launch_plans


class GraphBudget:
    """At most ``limit()`` captured ring calls alive in the process, least recently replayed
    released first. Each holds its K/V copies and its call's float32 scratch (a ring
    forward's accumulator alone is 4 bytes per output element) for as long as it lives, and
    calls of ever new signatures (sequence lengths that change, packed documents whose
    boundaries change every step) would otherwise pin one set per signature until their plans
    are dropped. ``CUPARING_RING_GRAPHS_MAX`` sets the limit (default 16), read at each
    capture. A plan whose graph was released captures again at its next repeat."""

    DEFAULT = 16

    def __init__(self):
        self._lock = threading.Lock()
        self._order: OrderedDict = OrderedDict()  # id -> weak reference, oldest first

    @classmethod
    def limit(cls) -> int:
        raw = os.environ.get("CUPARING_RING_GRAPHS_MAX", "").strip()
        try:
            return max(1, int(raw)) if raw else cls.DEFAULT
        except ValueError:
            return cls.DEFAULT

    def admit(self, captured: Any) -> None:
        """Count ``captured`` (just made) in, releasing the least recently used beyond the
        limit."""
        evicted = []
        with self._lock:
            self._order[id(captured)] = weakref.ref(captured)
            self._order.move_to_end(id(captured))
            limit = self.limit()
            while len(self._order) > limit:
                _, ref = self._order.popitem(last=False)
                old = ref()
                if old is not None and old is not captured:
                    evicted.append(old)
        for old in evicted:  # (outside the lock: a release waits on events and frees memory)
            old.release()

    def used(self, captured: Any) -> None:
        """``captured`` was just replayed: the most recently used now."""
        with self._lock:
            if id(captured) in self._order:
                self._order.move_to_end(id(captured))

    def forget(self, captured: Any) -> None:
        """``captured`` was released."""
        with self._lock:
            ref = self._order.get(id(captured))
            if ref is not None and (ref() is captured or ref() is None):
                del self._order[id(captured)]


LIVE = GraphBudget()


def enabled(ring: Any) -> bool:
    """Whether ring calls on ``ring`` may run as CUDA graphs: the ring can be captured, the
    environment variable ``CUPARING_RING_GRAPHS`` is not ``0``, and cuda-bindings is
    installed."""
    if not getattr(ring, "capturable", False):
        return False
    if os.environ.get("CUPARING_RING_GRAPHS", "1").strip().lower() in ("0", "false", "off"):
        return False
    return _graph_driver() is not None


@dataclass
class _Node:
    """A kernel node of the graph: the launch seen during the capture (``packed``), the
    pointers it was captured with, its kernel's index in ``packed``, the graph's node, and the
    node parameters a rewrite hands the driver (made at the first rewrite, then reused: the
    driver reads the argument values at each call)."""

    packed: Any
    pointers: tuple
    kernel: int
    node: Any
    params: Any = None


class _Executable:
    """One instantiation of a captured graph and what its kernel nodes were last given: the
    caller's addresses, and per kernel node its pointers (the K/V copy node's last)."""

    def __init__(self, handle: Any, addresses: tuple[int, ...], pointers: list[tuple]):
        self.handle, self.addresses, self.pointers = handle, addresses, pointers


class CapturedRingCall:
    """One ring call captured as a CUDA graph (made by :func:`capture`).

    Where the transport's captured operations need other values at other states of the ring
    (the copy-engine ring's flag values, which repeat every four exchanges of a channel), the
    graph is instantiated once per state met (``exchanges.key()``) and each instantiation is
    given that state's values once (``exchanges.patch``): a replay picks the instantiation of
    the state now and patches nothing. At most :attr:`EXECUTABLES` are kept; a state beyond
    them takes over the least recently replayed one, whose values it rewrites. Around each
    launch the transport orders it (``exchanges.before_launch``) and moves its state on
    (``exchanges.advance``), recording its event (``exchanges.launched``), which serves as the
    replay's end too: one event per replay.

    Args:
        driver: the :class:`GraphDriver` that captured it.
        graph, executable: the captured graph and its instantiation (for the capture's state).
        launches: per kernel node, ``[packed launch, captured pointers, kernel index, node]``.
        addresses: the captured call's caller addresses (what :meth:`replay` replaces).
        kv: the graph's own K/V copies (CuPy arrays); keep: what the graph's nodes read.
        kv_copy: the node that fills the copies, as an entry of ``launches``, its pointers
            (K, K's copy, V, V's copy); None: no such node (K/V left as captured).
        home_stream: the stream current when its memory was allocated (the caller's).
        device: the GPU it lives on.
        exchanges: what the ring's capture yielded (:meth:`GpuRing.capturing`): None, or
            the transport's captured operations (their ``key``, ``patch``, ``before_launch``,
            ``advance``, ``launched``; the copy-engine ring's are a
            :class:`cuparing.comm.ipc_capture.CapturedExchanges`).
    """

    # instantiations kept at most (a cap, not the number of states). A state is a tuple over
    # the channels the graph uses of their counts since the capture modulo 4, each 0 or 2 where
    # the graph replays: a steady loop meets one or two states per channel whose count moves
    # by 2 between replays, up to 2 ** channels in all; beyond the cap the least recently
    # replayed instantiation is re-patched
    EXECUTABLES = 4

    def __init__(self, driver: GraphDriver, graph: Any, executable: Any, launches: list,
                 addresses: tuple[int, ...], kv: Sequence[Any], keep: Any, home_stream: int,
                 device: int, exchanges: Any = None, kv_copy: list | None = None):  # fmt: skip
        self._driver = driver
        self._released = False  # (release() sets it: the graph and its instantiations are gone)
        self._exchanges = exchanges
        self._graph = graph
        # the kernel nodes; the K/V copy node, where there is one, last
        self._nodes = [_Node(*entry) for entry in launches]
        self._repointed = len(self._nodes)  # the nodes the caller's addresses reach
        if kv_copy is not None:
            self._nodes.append(_Node(*kv_copy))
        self._captured = addresses
        # the state the capture left the transport in: what the captured nodes hold
        self._executables: OrderedDict = OrderedDict()
        self._executables[self._key()] = self._fresh(executable)
        self._keep = (kv, keep)
        self._device = device
        # the stream the graph's memory was allocated on (its allocator reuses it in that
        # stream's order), the stream of the last replay, and an event recorded after each
        # replay: the transport's, where it records one after each launch (its slots'
        # predecessor for the next exchanges: one record serves both; the transport's to free),
        # else one of its own (made now, in the graph's device's context)
        self._home_stream = self._last_stream = home_stream
        self._owns_done = exchanges is None
        self._done = driver.new_event() if exchanges is None else exchanges.launched
        self._ordered = True  # every replay so far recorded the event

    def replay(self, addresses: tuple[int, ...], kv: Sequence[int], stream: int) -> None:
        """Run the captured call on ``stream`` (a CUDA stream handle) with the caller's
        ``addresses`` (in the order the capture took them) and K/V at the addresses ``kv``
        (C-contiguous, of the captured shapes and dtypes, 16-byte aligned).

        Raises:
            RuntimeError: it was released, or a driver call failed, before the graph was
                launched (nothing of the call ran: the caller may run it another way). A
                failure after the launch only warns, or fails the ring where the transport
                says so (the ring's next call raises).
        """
        if self._released:
            raise RuntimeError("this captured ring call was released (its ring closed or "
                               "dropped its receive buffers)")  # fmt: skip
        if stream != self._last_stream and not self._ordered:
            raise RuntimeError("a replay on another stream cannot wait for the last one (its "
                               "event was not recorded)")  # fmt: skip
        # the node updates first: they change only launches to come, so a refusal here leaves
        # nothing of this call queued
        target = self._executable_now()
        if addresses != target.addresses:
            remap = dict(zip(self._captured, addresses, strict=True))
            for i in range(self._repointed):
                pointers = self._nodes[i].pointers
                self._set_node(target, i, tuple(remap.get(p, p) for p in pointers))
            target.addresses = addresses
        if self._repointed < len(self._nodes):  # the K/V copy node: its two sources
            _, k_copy, _, v_copy = self._nodes[-1].pointers
            self._set_node(target, self._repointed, (kv[0], k_copy, kv[1], v_copy))
        after_last = stream != self._last_stream
        if after_last:
            # the K/V copies and the scratch are one set: the last replay must be done with
            # them before this one's copies land
            self._driver.wait_event(stream, self._done)
            self._last_stream = stream
        exchanges = self._exchanges
        if exchanges is not None:
            exchanges.before_launch(stream, after_last)
        self._driver.launch(target.handle, stream)
        # from here the call has run: a failure must not send the caller to run it again
        LIVE.used(self)
        try:
            if exchanges is None:
                self._driver.record(self._done, stream)
            else:
                exchanges.advance(stream)
        except RingError:  # the transport failed the ring: its next call (watch) raises
            self._ordered = False
        except _DRIVER_ERRORS as exc:
            self._ordered = False  # later replays keep to this stream
            warnings.warn(f"cuparing: recording a replayed ring call's end failed ({exc}); "
                          "issue the next exchanges from its stream", RuntimeWarning,
                          stacklevel=2)  # fmt: skip

    def _key(self) -> Any:
        """The transport's state now, as far as the graph's values go (None: one state)."""
        return None if self._exchanges is None else self._exchanges.key()

    def _fresh(self, handle: Any) -> _Executable:
        """The record of a new instantiation: its nodes hold what the capture gave them."""
        return _Executable(handle, self._captured, [tuple(node.pointers) for node in self._nodes])

    def _executable_now(self) -> _Executable:
        """The instantiation whose transport values fit the ring's state now: a kept one, else
        a new one (or, with :attr:`EXECUTABLES` kept, the least recently replayed) given the
        values once.

        Raises:
            RuntimeError: the driver refused (an instantiation it made is destroyed).
        """
        key = self._key()
        kept = self._executables.get(key)
        if kept is not None:
            self._executables.move_to_end(key)
            return kept
        if len(self._executables) < self.EXECUTABLES:
            target = self._fresh(self._driver.instantiate(self._graph))
        else:  # (its kernel nodes keep what they hold; the transport's values change)
            target = self._executables.popitem(last=False)[1]
        try:
            self._exchanges.patch(target.handle)
        except BaseException:
            # its values may be half rewritten: it serves no state
            with contextlib.suppress(*_DRIVER_ERRORS):
                self._driver.destroy(target.handle, None)
            raise
        self._executables[key] = target
        return target

    def _set_node(self, target: _Executable, index: int, wanted: tuple) -> None:
        """Kernel node ``index`` of ``target`` takes the pointers ``wanted``, unless it has
        them."""
        if wanted == target.pointers[index]:
            return
        entry = self._nodes[index]

        def set_node(function, geometry, arguments):
            if entry.params is None:
                entry.params = self._driver.kernel_params(function, geometry, arguments)
            self._driver.set_kernel_node(target.handle, entry.node, entry.params)

        entry.packed.update(wanted, entry.kernel, set_node)
        target.pointers[index] = wanted

    @property
    def live(self) -> bool:
        """Whether it can still be replayed (not yet released)."""
        return not self._released

    @property
    def matches(self) -> bool:
        """Whether the ring's transport is where this graph can replay (a copy-engine ring's
        channels at the captured slot parity; always, on NCCL)."""
        return self._exchanges is None or self._exchanges.matches()

    def release(self) -> None:
        """Free the graph and its instantiations and hand its memory back (idempotent). An
        executable graph still running is destroyed when it completes; its memory goes back to
        the allocator in the order of the stream it was allocated on, which first waits for the
        last replay when that ran on another stream. Rings release their graphs before
        destroying the communicator (whose destroy waits for them) and before dropping the
        receive buffers the graphs point at.

        Warns (RuntimeWarning) when the driver refuses the destroy."""
        if self._released:
            return
        self._released = True
        executables, self._executables = list(self._executables.values()), OrderedDict()
        LIVE.forget(self)
        driver, handed_back = self._driver, True
        with driver.on_device(self._device):
            if self._last_stream != self._home_stream:
                try:
                    if not self._ordered:
                        raise RuntimeError("the last replay's end was not recorded")
                    driver.wait_event(self._home_stream, self._done)
                except _DRIVER_ERRORS as exc:
                    # a replay may still use the memory: keep it rather than hand it back
                    handed_back = False
                    _warn(f"its memory stays allocated ({exc})")
            frees = [("executable graph", lambda h=e.handle: driver.destroy(h, None))
                     for e in executables]  # fmt: skip
            frees.append(("graph", lambda: driver.destroy(None, self._graph)))
            if self._owns_done:  # (the transport's event may still order its next exchange)
                frees.append(("event", lambda: driver.destroy_event(self._done)))
            for what, free in frees:
                try:
                    free()
                except _DRIVER_ERRORS as exc:
                    _warn(f"its {what} was not freed ({exc})")
        if handed_back:
            self._keep = self._nodes = None
        if self._exchanges is not None:  # (the transport's channels it referred to)
            self._exchanges.release()

    def __del__(self):
        if getattr(self, "_done", None) is not None:
            with contextlib.suppress(Exception):  # at interpreter exit the driver may be gone
                self.release()


_DRIVER_ERRORS = (RuntimeError, TypeError, ValueError)  # what a refusing driver binding raises


def _warn(what: str) -> None:
    warnings.warn(f"cuparing: releasing a captured ring call: {what}", RuntimeWarning,
                  stacklevel=3)  # fmt: skip


def capture(ring: Any, run: Callable[[list], Any], kv: Sequence[Any],
            addresses: tuple[int, ...]) -> CapturedRingCall:  # fmt: skip
    """Capture one ring call into a CUDA graph.

    ``run(kv_copies)`` queues the call on CuPy's current stream exactly as an eager repeat
    would (exchanges on ``ring``, :class:`~cuparing.backends.launch_plans.PackedLaunch`
    launches), sending and reading the graph's own K/V copies, which the graph's first node
    fills from ``kv``; whatever it returns (its scratch arrays) lives as long as the graph.
    Nothing runs during the capture: the caller replays it.

    Args:
        ring: a capturable ring (:func:`enabled`); it adopts the graph (releases it when it
            closes).
        run: the call, as above.
        kv: the caller's K and V (CuPy arrays, C-contiguous, 16-byte aligned): the shapes of
            the copies, and where the graph's copy reads.
        addresses: the caller's addresses ``run`` hands its launches (non-zero and distinct:
            replays find them in the captured arguments by value).

    Raises:
        ValueError: ``addresses`` hold zero or a repeated address, or ``kv`` is not two
            arrays.
        RuntimeError: the capture failed (what the driver or the transport said); nothing was
            queued and the ring stays usable.
        RingError: the ring had failed before (as an eager call would raise).
    """
    if len(kv) != 2:
        raise ValueError(f"kv must be K and V, got {len(kv)} arrays")
    if 0 in addresses or len(set(addresses)) != len(addresses):
        raise ValueError(f"addresses must be distinct and non-zero, got {addresses}")
    import cupy

    driver = _graph_driver()
    if driver is None:
        raise RuntimeError("capturing a ring call needs cuda-bindings")
    copies = [cupy.empty(a.shape, a.dtype) for a in kv]
    copy_kv = copy_pair_launch(kv[0].nbytes, kv[1].nbytes)
    home, device = cupy.cuda.get_current_stream().ptr, cupy.cuda.Device().id
    stream = cupy.cuda.Stream(non_blocking=True)
    launches = []

    def observed(packed, pointers, index):
        launches.append([packed, pointers, index, driver.last_node(stream.ptr)])

    with stream:
        driver.begin(stream.ptr)
        try:
            with ring.capturing() as exchanges, launch_plans.observe(observed):
                copy_kv.launch(kv[0].data.ptr, copies[0].data.ptr, kv[1].data.ptr,
                               copies[1].data.ptr)  # fmt: skip
                keep = run(copies)
        except BaseException:
            with contextlib.suppress(RuntimeError):
                driver.destroy(None, driver.end(stream.ptr))
            ring.capture_failed()  # (raises RingError if the ring's streams stayed captured)
            raise
        graph = driver.end(stream.ptr)
    try:
        executable = driver.instantiate(graph)
    except RuntimeError:
        driver.destroy(None, graph)
        raise
    try:
        # the copy node is the first launch observed; its K/V sources are rewritten by position
        captured = CapturedRingCall(driver, graph, executable, launches[1:], addresses, copies,
                                    keep, home, device, exchanges, kv_copy=launches[0])  # fmt: skip
    except BaseException:
        driver.destroy(executable, graph)
        raise
    ring.adopt_capture(captured)
    LIVE.admit(captured)
    return captured


_COPY_PAIR_ARGS = struct.Struct("<QQqQQq")  # a_src, a_dst, a_bytes, b_src, b_dst, b_bytes


def copy_pair_launch(a_bytes: int, b_bytes: int) -> launch_plans.PackedLaunch:
    """Two device-to-device copies of ``a_bytes`` and ``b_bytes`` in one kernel launch on the
    current device; ``launch(a_src, a_dst, b_src, b_dst)`` (16-byte aligned addresses)."""
    words = max(a_bytes, b_bytes, 16) // 16
    blocks = min((words + 255) // 256, 1024)
    params = _COPY_PAIR_ARGS.pack(0, 0, a_bytes, 0, 0, b_bytes)
    return launch_plans.PackedLaunch((loader.get_copy_pair_kernel(),), (blocks, 2), (256,), 0,
                                     params, (0, 8, 24, 32), arg_offsets=(0, 8, 16, 24, 32, 40))


class GraphDriver:
    """The driver calls of :func:`capture` and :class:`CapturedRingCall` (cuda-bindings)."""

    def __init__(self, driver: Any):
        self._d = driver
        self._ok = driver.CUresult.CUDA_SUCCESS
        self._relaxed = driver.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_RELAXED
        self._streams: dict[int, Any] = {}

    def _stream(self, handle: int) -> Any:
        stream = self._streams.get(handle)
        if stream is None:
            if len(self._streams) >= 64:
                self._streams.clear()
            # handle 0 (torch's and CuPy's default stream) is the legacy default stream; say
            # so, as the driver API's NULL would follow the per-thread default if configured
            raw = handle if handle else int(self._d.CU_STREAM_LEGACY)
            stream = self._streams[handle] = self._d.CUstream(raw)
        return stream

    def _check(self, what: str, result: Any) -> Any:
        error = result[0] if isinstance(result, tuple) else result
        if error != self._ok:
            raise RuntimeError(f"{what} failed: {error!r}")
        return result

    def begin(self, stream: int) -> None:
        """Start capturing ``stream`` (relaxed: other threads, the watchdog's event queries
        among them, go on as usual)."""
        self._check("cuStreamBeginCapture",
                    self._d.cuStreamBeginCapture(self._stream(stream), self._relaxed))  # fmt: skip

    def end(self, stream: int) -> Any:
        """End the capture of ``stream``; the graph."""
        result = self._d.cuStreamEndCapture(self._stream(stream))
        return self._check("cuStreamEndCapture", result)[1]

    def instantiate(self, graph: Any) -> Any:
        """The executable graph of ``graph``."""
        return self._check("cuGraphInstantiate", self._d.cuGraphInstantiate(graph, 0))[1]

    def last_node(self, stream: int) -> Any:
        """The node the capture of ``stream`` added last (the kernel just launched)."""
        result = self._check("cuStreamGetCaptureInfo", self._d.cuStreamGetCaptureInfo(
            self._stream(stream)))  # fmt: skip
        nodes = result[4]  # (error, status, id, graph, dependencies, ...)
        if len(nodes) != 1:
            raise RuntimeError(f"expected one node at the captured stream's end, got {len(nodes)}")
        return nodes[0]

    def kernel_params(self, function: int, geometry: tuple, arguments: int) -> Any:
        """A kernel node's parameters: ``function`` with ``geometry`` (grid x, y, z, block x,
        y, z, dynamic shared memory) and the ``void*`` array at ``arguments``."""
        params = self._d.CUDA_KERNEL_NODE_PARAMS()
        params.func = self._d.CUfunction(function)
        (params.gridDimX, params.gridDimY, params.gridDimZ, params.blockDimX, params.blockDimY,
         params.blockDimZ, params.sharedMemBytes) = geometry  # fmt: skip
        params.kernelParams = arguments
        return params

    def set_kernel_node(self, executable: Any, node: Any, params: Any) -> None:
        """Point ``node`` of ``executable`` at ``params`` (the argument values are read now)."""
        self._check("cuGraphExecKernelNodeSetParams",
                    self._d.cuGraphExecKernelNodeSetParams(executable, node, params))  # fmt: skip

    def new_event(self) -> Any:
        """An event (no timing) in the current context."""
        created = self._d.cuEventCreate(int(self._d.CUevent_flags.CU_EVENT_DISABLE_TIMING))
        return self._check("cuEventCreate", created)[1]

    def record(self, event: Any, stream: int) -> None:
        """Record ``event`` (:meth:`new_event`'s) on ``stream`` (after what is queued there
        so far)."""
        self._check("cuEventRecord", self._d.cuEventRecord(event, self._stream(stream)))

    def wait_event(self, stream: int, event: Any) -> None:
        """Make ``stream`` wait for ``event``'s last recording (none yet: no wait); ``event``
        is :meth:`new_event`'s or a CuPy event (a transport's)."""
        ptr = getattr(event, "ptr", None)
        handle = event if ptr is None else self._d.CUevent(ptr)
        self._check("cuStreamWaitEvent",
                    self._d.cuStreamWaitEvent(self._stream(stream), handle, 0))  # fmt: skip

    def destroy_event(self, event: Any) -> None:
        """Free ``event`` (a wait queued on it still completes)."""
        self._check("cuEventDestroy", self._d.cuEventDestroy(event))

    def on_device(self, device: int) -> Any:
        """A context manager making ``device`` current (:func:`on_device`)."""
        return on_device(device)

    def launch(self, executable: Any, stream: int) -> None:
        """Launch ``executable`` on ``stream``."""
        self._check("cuGraphLaunch", self._d.cuGraphLaunch(executable, self._stream(stream)))

    def destroy(self, executable: Any, graph: Any) -> None:
        """Free ``executable`` and ``graph`` (each unless None; the graph even if freeing the
        executable failed)."""
        try:
            if executable is not None:
                self._check("cuGraphExecDestroy", self._d.cuGraphExecDestroy(executable))
        finally:
            if graph is not None:
                self._check("cuGraphDestroy", self._d.cuGraphDestroy(graph))


class _OnDevice:
    """``device`` current with its primary context bound: a replay's or a release's first CUDA
    calls are driver calls (node updates, destroys), and a thread that has made no runtime call
    yet (torch's autograd thread) has no current context, which ``cupy.cuda.Device`` does not
    bind when the device is already the current one."""

    def __init__(self, device: int):
        import cupy

        self._device, self._runtime = cupy.cuda.Device(device), cupy.cuda.runtime
        self._index = device

    def __enter__(self) -> None:
        self._device.__enter__()
        self._runtime.setDevice(self._index)  # (the device is current now: binds its context)

    def __exit__(self, *exc) -> None:
        self._device.__exit__(*exc)


def on_device(device: int) -> Any:
    """A context manager making ``device`` current, its primary context bound (what a replay's
    and a release's driver calls, copies and events need, and a kept one-device launch on a
    raw stream handle: ``call_plans.CallPlan``)."""
    return _OnDevice(device)


_DRIVER: list = []


def _graph_driver() -> GraphDriver | None:
    """The process's :class:`GraphDriver`, or None without cuda-bindings."""
    if not _DRIVER:
        try:
            from cuda.bindings import driver
        except ImportError:
            driver = None
        _DRIVER.append(GraphDriver(driver) if driver is not None else None)
    return _DRIVER[0]
