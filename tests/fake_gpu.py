"""One fake CuPy/NCCL stack for the CPU tests of the GPU rings (NCCL and copy-engine IPC).

The fake keeps CUDA's stream semantics where they matter: each stream is a queue run in order by
one "GPU" thread; ``record`` captures a generation; a stream wait on an event waits for the
event's *latest record at the time of the wait call* (none: no wait), the very semantics that
make the IPC ring's host handshake necessary; IPC handles alias the same event or memory across
ranks (here threads). Stream memory operations (:func:`fake_driver`, a ``cuda.bindings.driver``)
act on 32-bit words of that memory when the stream runs them: a wait blocks its stream until
its condition holds (``CU_STREAM_WAIT_VALUE_AND``: ``word & value != 0``; also GEQ, CUDA's
cyclic ``(int32)(word - value) >= 0``, EQ and NOR), a write stores the value. New memory holds
garbage, as after ``cudaMalloc``, so a flag that is used before it is set up satisfies waits it
should not. Captured operations (:meth:`FakeGpu.capturing`) replay as graphs:
:class:`FakeGraphDriver` instantiates them, each instantiation with its own flag values. NCCL
sends read their bytes when the GPU runs them and receives complete when the matching send has
run, in order per (sender, receiver); an all-gather runs once every rank has posted its part.
A scheduler policy can starve chosen streams, which turns a missing GPU wait into a
deterministic wrong answer: negative controls use it to show that each wait a ring issues is
needed.

Use :class:`FakeStack`: ``stack.install(monkeypatch)`` puts its ``cupy``, ``nccl`` and driver in
place of the real ones for :mod:`cuparing.comm.gpu_ring`, :mod:`cuparing.comm.nccl` and
:mod:`cuparing.comm.ipc` (``stack.driver = None`` then stands for cuda-bindings not installed);
``stack.communicators(n)`` gives the NCCL communicators of one ring of ``n`` ranks.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import os
import random
import struct
import threading
import time
from collections import deque
from enum import IntEnum
from types import SimpleNamespace

import numpy as np

from cuparing.comm import gpu_ring as gpu_ring_mod
from cuparing.comm import ipc as ipc_mod
from cuparing.comm import nccl as nccl_mod

# every byte of new fake memory: a 32-bit word of it shares a bit with every one-hot flag value
# below 4 and is far "ahead" of small values in a cyclic comparison
GARBAGE = 0x5B


class FakeGpu:
    """The device: registered objects (raw handles) and a thread running the streams' queues."""

    def __init__(self, seed: int = 0):
        self.cond = threading.Condition()
        self.streams: list[FakeStream] = []
        self.objects: dict[int, object] = {}  # raw handles: streams, events, opened events
        self.memory: dict[int, FakeMemory] = {}
        self.next_ptr = 1 << 40
        self.rng = random.Random(seed)
        self.starve: set = set()  # streams that run only when nothing else can
        self.paused = False  # run nothing but streams a host is synchronising with
        self.synchronising: set = set()
        self.opened_mem, self.closed_mem, self.destroyed = [], [], []
        self.errors: list[str] = []  # what the device found wrong (sizes that disagree)
        # the captures in progress (several host threads may each capture their own streams,
        # as the driver allows: a stream belongs to at most one)
        self.captures: list[FakeCapture] = []
        self.local = threading.local()  # each host thread's current stream (``stack``)
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def register(self, obj) -> int:
        with self.cond:
            self.next_ptr += 16
            self.objects[self.next_ptr] = obj
            return self.next_ptr

    def enqueue(self, stream, op) -> None:
        with self.cond:
            self.put(stream, op)

    def put(self, stream, op) -> None:
        """Queue ``op`` on ``stream`` (the lock held), or record it where a capture holds the
        stream (:meth:`capturing`)."""
        capture = self.capture_of(stream)
        if capture is not None:
            capture.add(stream, op)
        else:
            stream.ops.append(op)

    def capture_of(self, stream):
        """The capture in progress that holds ``stream``, or None (the lock held)."""
        return next((c for c in self.captures if stream in c.streams), None)

    @contextlib.contextmanager
    def capturing(self, streams):
        """Within the block, what is queued on ``streams`` is recorded instead of queued (a
        stream capture, as the driver's capture of those streams into one graph); the
        :class:`FakeCapture` replays it."""
        capture = FakeCapture(self, set(streams))
        with self.cond:
            if any(self.capture_of(s) is not None for s in capture.streams):
                raise RuntimeError("a stream is already being captured")
            self.captures.append(capture)
        try:
            yield capture
        finally:
            with self.cond:
                self.captures.remove(capture)

    def _runnable(self, op) -> bool:
        if op[0] == "wait":
            return op[1].done_gen >= op[2]
        if op[0] in ("recv", "collective"):
            return op[1].ready(op)
        if op[0] == "wait_value":
            return wait_satisfied(word(op[1]), op[2], op[3])
        return True

    def step(self) -> bool:
        with self.cond:
            ready = [s for s in self.streams if s.ops and self._runnable(s.ops[0])
                     and (not self.paused or s in self.synchronising)]  # fmt: skip
            pick = [s for s in ready if s not in self.starve] or ready
            if not pick:
                return False
            stream = self.rng.choice(pick)
            op = stream.ops.popleft()
            kind = op[0]
            if kind == "record":
                op[1].done_gen = max(op[1].done_gen, op[2])
            elif kind == "copy":
                ctypes.memmove(op[1], op[2], op[3])
            elif kind == "fn":
                op[1]()
            elif kind == "write_value":
                ctypes.c_uint32.from_address(op[1]).value = op[2]
            elif kind in ("send", "recv", "collective"):
                op[1].execute(op, self)
            return True

    def _run(self) -> None:
        while not self._stop:
            if not self.step():
                time.sleep(0.0002)

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)


class FakeCapture:
    """What a capture recorded, in the order the host issued it (one graph): each operation
    with its stream. A replay queues it all again: event records as new records (waits on
    them wait for the replay's), flag operations with the values the graph's nodes were last
    given (``node_values``: node -> value), copies and "kernels" as they were."""

    def __init__(self, gpu: FakeGpu, streams: set):
        self.gpu, self.streams, self.ops = gpu, streams, []

    def add(self, stream, op) -> None:
        self.ops.append((stream, op))

    def node_of_last(self, stream):
        """The node standing for the last operation recorded on ``stream`` (None: none)."""
        for index in range(len(self.ops) - 1, -1, -1):
            if self.ops[index][0] is stream:
                return ("node", id(self), index)
        return None

    def replay(self, node_values: dict) -> None:
        with self.gpu.cond:
            for index, (stream, op) in enumerate(self.ops):
                kind = op[0]
                if kind == "record":
                    event = op[1]
                    event.recorded += 1
                    op = ("record", event, event.recorded)
                elif kind == "wait":
                    op = ("wait", op[1], op[1].recorded)
                elif kind in ("write_value", "wait_value"):  # (a node's flags stay)
                    op = (kind, op[1], node_values.get(("node", id(self), index), op[2]), *op[3:])
                stream.ops.append(op)


class FakeStream:
    def __init__(self, gpu: FakeGpu, non_blocking: bool = False):
        self.gpu, self.ops = gpu, deque()
        self.waited: list = []  # every event this stream was asked to wait on
        self.ptr = gpu.register(self)
        with gpu.cond:
            gpu.streams.append(self)

    def wait_event(self, event) -> None:
        with self.gpu.cond:
            self.waited.append(event)
            if event.recorded:  # the latest record now, or nothing at all
                self.gpu.put(self, ("wait", event, event.recorded))

    def is_capturing(self) -> bool:
        return False  # (this fake captures nothing)

    def __enter__(self):
        """The current stream of this thread within the block, as ``with stream:`` in CuPy."""
        local = self.gpu.local
        local.stack = [*getattr(local, "stack", []), self]
        return self

    def __exit__(self, *exc) -> None:
        self.gpu.local.stack.pop()

    def launch(self, fn) -> None:
        """Queue ``fn()`` as a "kernel" on this stream."""
        self.gpu.enqueue(self, ("fn", fn))

    def synchronize(self) -> None:
        """Wait until the queue is empty; a paused GPU still runs this stream meanwhile (a valid
        schedule: the others are merely slow)."""
        with self.gpu.cond:
            self.gpu.synchronising.add(self)
        try:
            while self.ops:
                time.sleep(0.0005)
        finally:
            with self.gpu.cond:
                self.gpu.synchronising.discard(self)


class FakeEvent:
    def __init__(self, gpu: FakeGpu, block=False, disable_timing=False, interprocess=False):
        self.gpu, self.interprocess = gpu, interprocess
        self.recorded = self.done_gen = 0
        self.stream = self.t = None
        self.ptr = gpu.register(self)

    def record(self, stream=None) -> None:
        with self.gpu.cond:
            self.recorded += 1
            self.stream = stream
            self.gpu.put(stream, ("record", self, self.recorded))
        self.t = time.perf_counter()

    @property
    def done(self) -> bool:
        return self.done_gen >= self.recorded


def word(addr: int) -> int:
    """The 32-bit word of fake memory at ``addr``."""
    return ctypes.c_uint32.from_address(addr).value


WAIT_GEQ, WAIT_EQ, WAIT_AND, WAIT_NOR = 0, 1, 2, 3  # CUstreamWaitValue_flags


def wait_satisfied(current: int, value: int, flags: int) -> bool:
    """Whether ``cuStreamWaitValue32(.., value, flags)`` ends on a word holding ``current``
    (the driver's documented conditions)."""
    if flags == WAIT_GEQ:  # cyclic: (int32)(current - value) >= 0
        return (current - value) % (1 << 32) < (1 << 31)
    if flags == WAIT_EQ:
        return current == value
    if flags == WAIT_AND:
        return current & value != 0
    if flags == WAIT_NOR:
        return ~(current | value) & 0xFFFFFFFF != 0
    raise ValueError(f"no such wait: flags {flags}")


class FakeMemory:
    def __init__(self, gpu: FakeGpu, size: int):
        self.buf = np.full(size, GARBAGE, np.uint8)  # cudaMalloc does not clear memory
        self.ptr, self.size = self.buf.ctypes.data, size
        gpu.memory[self.ptr] = self


class FakeArray(np.ndarray):
    """The fake ``cupy.ndarray``: also builds views of fake memory, as ``memptr=`` does."""

    def __new__(cls, shape, dtype=float, memptr=None):
        if memptr is None:
            return np.zeros(shape, dtype).view(cls)
        return np.ndarray(shape, dtype, buffer=memptr.mem.buf, offset=memptr.offset).view(cls)

    @property
    def data(self):
        return SimpleNamespace(ptr=self.ctypes.data)

    @property
    def device(self):
        return SimpleNamespace(id=0)


def dev(x) -> FakeArray:
    """A copy of ``x`` on the fake device."""
    return np.array(x).view(FakeArray)


class FakeDevice:
    def __init__(self, index=0):
        self.id = index

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def use(self):
        pass


def _handle(tag: bytes, ptr: int) -> bytes:
    return (tag + struct.pack("<Q", ptr)).ljust(64, b"\0")


def fake_cupy(gpu: FakeGpu) -> SimpleNamespace:
    """A ``cupy`` module over ``gpu``: the current stream is per thread, as on one device."""
    local = gpu.local

    def current():
        if getattr(local, "stack", None):
            return local.stack[-1]
        if not hasattr(local, "stream"):
            local.stream = FakeStream(gpu)
        return local.stream

    def open_event(handle: bytes) -> int:
        assert len(handle) == 64
        event = gpu.objects[struct.unpack("<Q", handle[1:9])[0]]
        assert event.interprocess
        return gpu.register(event)  # a new handle to the same event

    def open_mem(handle: bytes, flags=1) -> int:
        assert len(handle) == 64 and handle[:1] == b"M"
        ptr = struct.unpack("<Q", handle[1:9])[0]
        gpu.opened_mem.append(ptr)
        return ptr

    def destroy(ptr):
        gpu.destroyed.append(ptr)
        gpu.objects.pop(ptr)

    runtime = SimpleNamespace(
        getDeviceCount=lambda: 8, memcpyDeviceToDevice=3,
        memcpyAsync=lambda dst, src, n, kind, s: gpu.enqueue(gpu.objects[s], ("copy", dst, src, n)),
        streamWaitEvent=lambda s, e, flags=0: gpu.objects[s].wait_event(gpu.objects[e]),
        ipcGetMemHandle=lambda ptr: _handle(b"M", ptr),
        ipcOpenMemHandle=open_mem, ipcCloseMemHandle=gpu.closed_mem.append,
        ipcGetEventHandle=lambda ptr: _handle(b"E", ptr), ipcOpenEventHandle=open_event,
        eventDestroy=destroy,
        eventRecord=lambda e, s: gpu.objects[e].record(gpu.objects[s]),
        memsetAsync=lambda ptr, value, n, s: gpu.enqueue(
            gpu.objects[s], ("fn", lambda: ctypes.memset(ptr, value, n))),
    )  # fmt: skip
    cuda = SimpleNamespace(
        Device=FakeDevice, Stream=lambda non_blocking=False: FakeStream(gpu, non_blocking),
        Event=lambda **kw: FakeEvent(gpu, **kw), get_current_stream=current,
        get_elapsed_time=lambda a, b: (b.t - a.t) * 1e3, runtime=runtime,
        Memory=lambda size: FakeMemory(gpu, size),
        MemoryPointer=lambda mem, offset: SimpleNamespace(mem=mem, offset=offset),
    )  # fmt: skip
    return SimpleNamespace(
        ndarray=FakeArray, cuda=cuda, int32=np.int32, uint8=np.uint8,
        empty=lambda shape, dtype: FakeArray(shape, dtype),
        zeros=lambda shape, dtype: FakeArray(shape, dtype),
        asarray=dev, asnumpy=lambda a: np.array(a),
        ascontiguousarray=lambda a: np.ascontiguousarray(a).view(FakeArray),
    )  # fmt: skip


class CUresult(IntEnum):
    CUDA_SUCCESS = 0
    CUDA_ERROR_NOT_SUPPORTED = 801


class _Handle(int):
    """A ``CUstream`` or ``CUdeviceptr``: ``int()`` gives the raw value, as in cuda-bindings."""


def fake_driver(gpu: FakeGpu, version: int = 13000, v1_attribute: int = 0) -> SimpleNamespace:
    """A ``cuda.bindings.driver`` with the stream memory operations, over ``gpu``.

    ``version`` is what ``cuDriverGetVersion`` reports and ``v1_attribute`` the value of
    ``CU_DEVICE_ATTRIBUTE_CAN_USE_STREAM_MEM_OPS_V1`` (0, as current drivers report it). The
    operations check that their word lies in fake memory and is 4-byte aligned, and that a wait
    is the ring's AND and a write the fenced default (else the device records an error). Its set
    ``fail`` names operations (``"wait"``, ``"write"``) that return
    ``CUDA_ERROR_NOT_SUPPORTED``. ``node_values`` lists every
    ``cuGraphExecBatchMemOpNodeSetParams`` as ``(executable, node, value)``.
    """
    barrier, v1 = 0, 92

    def memory_op(kind: str, expected_flags: int):
        """``cuStreamWaitValue32`` (``kind`` "wait") or ``cuStreamWriteValue32`` ("write")."""

        def op(stream, addr, value, flags):
            if kind in driver.fail:
                return (CUresult.CUDA_ERROR_NOT_SUPPORTED,)
            addr = int(addr)
            inside = any(m.ptr <= addr <= m.ptr + m.size - 4 for m in list(gpu.memory.values()))
            if addr % 4 or not inside or flags != expected_flags:
                gpu.errors.append(f"{kind} at {addr:#x}, flags {flags}")
            if not 0 <= value < 1 << 32:  # the binding's uint32 conversion raises
                raise OverflowError("value too large to convert to uint32_t")
            gpu.enqueue(gpu.objects[int(stream)], (f"{kind}_value", addr, value, flags))
            return (CUresult.CUDA_SUCCESS,)

        return op

    def attribute(attr, device):
        return (CUresult.CUDA_SUCCESS, v1_attribute if attr == v1 else 0)

    def capture_info(stream):
        """The node a capture added last on ``stream``: the last operation a
        :meth:`FakeGpu.capturing` recorded there; outside one, the stream's last queued
        operation stands for it (the operations then run as they would eagerly)."""
        target = gpu.objects[int(stream)]
        with gpu.cond:
            capture = gpu.capture_of(target)
        if capture is not None:
            node = capture.node_of_last(target)
            return (CUresult.CUDA_SUCCESS, 1, 0, None, [] if node is None else [node], 1)
        ops = target.ops
        last = ops[-1] if ops else None
        return (CUresult.CUDA_SUCCESS, 1, 0, None, [("node", id(last), last)], 1)

    def set_memop_node(executable, node, params):
        (op,) = params.paramArray
        value = op.writeValue.value if op.operation == WRITE else op.waitValue.value
        driver.node_values.append((executable, node, int(value)))
        return (CUresult.CUDA_SUCCESS,)

    driver = SimpleNamespace(
        fail=set(), CUresult=CUresult, CUstream=_Handle, CUdeviceptr=_Handle,
        CUstreamWaitValue_flags=SimpleNamespace(
            CU_STREAM_WAIT_VALUE_GEQ=WAIT_GEQ, CU_STREAM_WAIT_VALUE_EQ=WAIT_EQ,
            CU_STREAM_WAIT_VALUE_AND=WAIT_AND, CU_STREAM_WAIT_VALUE_NOR=WAIT_NOR),
        CUstreamWriteValue_flags=SimpleNamespace(CU_STREAM_WRITE_VALUE_DEFAULT=barrier),
        CUdevice_attribute=SimpleNamespace(CU_DEVICE_ATTRIBUTE_CAN_USE_STREAM_MEM_OPS_V1=v1),
        cuInit=lambda flags: (CUresult.CUDA_SUCCESS,),
        cuDriverGetVersion=lambda: (CUresult.CUDA_SUCCESS, version),
        cuDeviceGet=lambda ordinal: (CUresult.CUDA_SUCCESS, ordinal),
        cuDeviceGetAttribute=attribute,
        cuStreamWaitValue32=memory_op("wait", WAIT_AND),
        cuStreamWriteValue32=memory_op("write", barrier),
        # what recording captured flag operations and patching their graph nodes use
        node_values=[], cuCtxGetCurrent=lambda: (CUresult.CUDA_SUCCESS, "context"),
        cuStreamGetCaptureInfo=capture_info,
        CUstreamBatchMemOpType=SimpleNamespace(CU_STREAM_MEM_OP_WAIT_VALUE_32=WAIT,
                                               CU_STREAM_MEM_OP_WRITE_VALUE_32=WRITE),
        CUstreamBatchMemOpParams=_MemOp, CUDA_BATCH_MEM_OP_NODE_PARAMS=_MemOpNodeParams,
        cuGraphExecBatchMemOpNodeSetParams=set_memop_node,
    )  # fmt: skip
    return driver


WAIT, WRITE = 1, 2  # CUstreamBatchMemOpType


class _MemOp:
    """``CUstreamBatchMemOpParams``: a union of wait and write operands (one object here)."""

    def __init__(self):
        self.waitValue = self.writeValue = SimpleNamespace(operation=0, address=0, value=0,
                                                           flags=0)  # fmt: skip

    @property
    def operation(self):
        return self.writeValue.operation


class _MemOpNodeParams:
    """``CUDA_BATCH_MEM_OP_NODE_PARAMS``: setting ``paramArray`` copies the operations, as the
    binding does (later changes to the given objects do not reach the node's parameters)."""

    def __init__(self):
        self.ctx, self.count, self.flags, self._ops = None, 0, 0, []

    @property
    def paramArray(self):
        return self._ops

    @paramArray.setter
    def paramArray(self, ops):
        self._ops = [copy.deepcopy(op) for op in ops]


class FakeExecutable:
    """An instantiation of a :class:`FakeCapture` made by ``owner`` (a
    :class:`FakeGraphDriver`): its flag nodes hold the values
    ``cuGraphExecBatchMemOpNodeSetParams`` last gave this instantiation, the others the
    captured ones."""

    def __init__(self, graph: FakeCapture, owner):
        self.graph, self.owner = graph, owner


class FakeGraphDriver:
    """The graph calls :class:`cuparing.backends.ring_graphs.CapturedRingCall` makes, over
    captures of the fake GPU (no kernel nodes). ``launch`` queues the capture's operations
    again, each on the stream it was captured on, with the instantiation's flag values from
    ``driver`` (a :func:`fake_driver`), then makes the stream it is given wait for the other
    captured streams (a graph ends once all its nodes have: what follows its launch on that
    stream comes after every one of them). The tests launch on the captured caller's stream;
    a launch on another stream is ordered only by the stream waits made before it."""

    def __init__(self, driver: SimpleNamespace):
        self.driver = driver
        self.instantiated: list[FakeExecutable] = []
        self.destroyed: list = []
        self.launched = 0

    def instantiate(self, graph: FakeCapture) -> FakeExecutable:
        executable = FakeExecutable(graph, self)
        self.instantiated.append(executable)
        return executable

    def launch(self, executable: FakeExecutable, stream: int) -> None:
        assert executable in self.instantiated and executable not in self.destroyed
        values = {node: value for made, node, value in list(self.driver.node_values)
                  if made is executable}  # fmt: skip
        graph = executable.graph
        graph.replay(values)
        target = graph.gpu.objects[int(stream)]
        for captured in graph.streams - {target}:
            end = FakeEvent(graph.gpu)
            end.record(captured)
            target.wait_event(end)
        self.launched += 1

    def patches(self) -> int:
        """How many flag nodes of this driver's instantiations were given values so far."""
        return sum(getattr(made, "owner", None) is self
                   for made, _, _ in list(self.driver.node_values))  # fmt: skip

    def new_event(self):
        return object()

    def record(self, event, stream) -> None:
        pass

    def wait_event(self, stream, event) -> None:
        pass

    def destroy(self, executable, graph) -> None:
        self.destroyed += [x for x in (executable, graph) if x is not None]

    def destroy_event(self, event) -> None:
        pass

    def on_device(self, device):
        return contextlib.nullcontext()


def fake_nccl() -> SimpleNamespace:
    """A ``cupy.cuda.nccl`` module: constants, groups (no-ops here) and fresh unique ids."""
    return SimpleNamespace(
        available=True, NCCL_UINT8=1, NCCL_INT32=2, NCCL_SUM=0, NcclError=RuntimeError,
        groupStart=lambda: None, groupEnd=lambda: None, get_unique_id=lambda: os.urandom(128),
    )  # fmt: skip


class Network:
    """What the communicators of one ring share: messages per (sender, receiver) in order, and
    the parts of each all-gather (the n-th all-gather of every rank belongs together)."""

    def __init__(self, size: int):
        self.size = size
        self.wires: dict[tuple[int, int], deque] = {}
        self.gathers: dict[int, dict[int, bytes]] = {}


class _Transfer:
    """The device side of a send, a receive or an all-gather op (``op[1]``)."""

    def __init__(self, network: Network, kind: str, key, ptr: int, nbytes: int, rank: int):
        self.network, self.kind, self.key = network, kind, key
        self.ptr, self.nbytes, self.rank = ptr, nbytes, rank

    def ready(self, op) -> bool:
        if self.kind == "recv":
            return bool(self.network.wires.get(self.key))
        return len(self.network.gathers[self.key]) == self.network.size

    def execute(self, op, gpu: FakeGpu) -> None:
        if self.kind == "send":  # the bytes as they are when the GPU runs the send
            wire = self.network.wires.setdefault(self.key, deque())
            wire.append(ctypes.string_at(self.ptr, self.nbytes))
        elif self.kind == "recv":
            data = self.network.wires[self.key].popleft()
            if len(data) != self.nbytes:
                gpu.errors.append(f"{self.key}: sent {len(data)} bytes, received {self.nbytes}")
            ctypes.memmove(self.ptr, data, min(len(data), self.nbytes))
        else:
            parts = self.network.gathers[self.key]
            data = b"".join(parts[r] for r in range(self.network.size))
            ctypes.memmove(self.ptr, data, len(data))


class FakeComm:
    """A ``cupy.cuda.nccl.NcclCommunicator`` of one rank; ``calls`` logs sends and receives."""

    def __init__(self, gpu: FakeGpu, network: Network, rank: int):
        self.gpu, self.network, self.rank = gpu, network, rank
        self.aborted = self.destroyed = False
        self.calls: list[tuple] = []
        self._gathers = 0

    def send(self, ptr, nbytes, dtype, peer, stream):
        self.calls.append(("send", peer, nbytes))
        op = _Transfer(self.network, "send", (self.rank, peer), ptr, nbytes, self.rank)
        self.gpu.enqueue(self.gpu.objects[stream], ("send", op))

    def recv(self, ptr, nbytes, dtype, peer, stream):
        self.calls.append(("recv", peer, nbytes))
        op = _Transfer(self.network, "recv", (peer, self.rank), ptr, nbytes, self.rank)
        self.gpu.enqueue(self.gpu.objects[stream], ("recv", op))

    def allGather(self, send, recv, count, dtype, stream):
        key, self._gathers = self._gathers, self._gathers + 1
        with self.gpu.cond:  # the fake's asarray is synchronous: the part is ready now
            self.network.gathers.setdefault(key, {})[self.rank] = ctypes.string_at(send, count)
        op = _Transfer(self.network, "collective", key, recv, count * self.network.size,
                       self.rank)  # fmt: skip
        self.gpu.enqueue(self.gpu.objects[stream], ("collective", op))

    def abort(self):
        self.aborted = True

    def destroy(self):
        self.destroyed = True


class FakeStack:
    """A fake GPU with its ``cupy``, ``nccl`` and driver modules (``driver``: None stands for
    cuda-bindings not installed)."""

    def __init__(self, seed: int = 0):
        self.gpu = FakeGpu(seed)
        self.cupy = fake_cupy(self.gpu)
        self.nccl = fake_nccl()
        self.driver = fake_driver(self.gpu)

    def install(self, monkeypatch) -> None:
        """Make the ring modules import this stack instead of CuPy, NCCL and cuda-bindings."""
        monkeypatch.setattr(gpu_ring_mod, "import_cupy", lambda: self.cupy)
        monkeypatch.setattr(nccl_mod, "import_nccl", lambda: self.nccl)
        monkeypatch.setattr(ipc_mod, "import_driver", lambda: self.driver)
        for name in ("CUPARING_TRACE", "CUPARING_IPC_FLAGS"):
            monkeypatch.delenv(name, raising=False)

    def communicators(self, size: int) -> list[FakeComm]:
        """The communicators of one new ring of ``size`` ranks."""
        network = Network(size)
        return [FakeComm(self.gpu, network, rank) for rank in range(size)]

    def close(self) -> None:
        """Stop the device; fail if it found transfers whose sizes disagree."""
        self.gpu.close()
        assert not self.gpu.errors, self.gpu.errors


def run_threads(fns, timeout: float = 30.0) -> list:
    """Run ``fns[r]()`` on one thread each; returns results (exceptions as values)."""
    out = [None] * len(fns)

    def run(r):
        try:
            out[r] = fns[r]()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out[r] = exc

    threads = [threading.Thread(target=run, args=(r,), daemon=True) for r in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a rank hung"
    return out


def peer_mesh(size: int, timeout: float = 10.0) -> list:
    """Every rank's :class:`~cuparing.comm.peerlink.PeerLinks` of a ring of ``size`` on
    loopback, connected (what an IpcRing of each rank takes)."""
    from cuparing.comm.peerlink import PeerLinks

    pairs = [PeerLinks.listen(r, size) for r in range(size)]
    addresses = [address for _, address in pairs]
    results = run_threads([lambda p=p: p[0].connect(addresses, timeout) for p in pairs])
    assert all(r is None for r in results), results
    return [links for links, _ in pairs]
