"""Host cost of ``cuGraphLaunch`` for graphs with stream memory-operation nodes (one GPU).

    python tools/graph_launch_cost.py [--launches 300]

The copy-engine ring's captured calls hold a flag write or wait node per flag operation
(:mod:`cuparing.comm.ipc`); this measures what such nodes cost each launch. Graphs of ``pairs``
steps, each a small kernel, a ``cuStreamWriteValue32`` on one stream and a
``cuStreamWaitValue32`` on a second one joined by events, and a device copy; printed: the host
microseconds of one ``cuGraphLaunch`` (median), alone (the stream synchronised before) and
queued, without memop nodes, with them, and with every node's value changed before each launch
(``cuGraphExecBatchMemOpNodeSetParams``, the time of those updates beside it). Then graphs whose
write and wait share one stream, as two nodes per pair or one two-operation batch node
(``cuStreamBatchMemOp``). Needs CuPy and cuda-bindings.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--launches", type=int, default=300)
    args = parser.parse_args(argv)

    import cupy
    from cuda.bindings import driver as d

    cupy.cuda.Device(0).use()
    ok = d.CUresult.CUDA_SUCCESS
    words = cupy.zeros(64, dtype=cupy.uint32)
    main_stream, side = cupy.cuda.Stream(non_blocking=True), cupy.cuda.Stream(non_blocking=True)
    cs, cside = d.CUstream(main_stream.ptr), d.CUstream(side.ptr)
    relaxed = d.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_RELAXED
    geq = int(d.CUstreamWaitValue_flags.CU_STREAM_WAIT_VALUE_GEQ)
    fenced = int(d.CUstreamWriteValue_flags.CU_STREAM_WRITE_VALUE_DEFAULT)
    at = [d.CUdeviceptr(words.data.ptr + 4 * i) for i in range(64)]
    context = d.cuCtxGetCurrent()[1]
    write_op = d.CUstreamBatchMemOpType.CU_STREAM_MEM_OP_WRITE_VALUE_32
    wait_op = d.CUstreamBatchMemOpType.CU_STREAM_MEM_OP_WAIT_VALUE_32
    x = cupy.zeros(1 << 16, dtype=cupy.float32)
    src = cupy.arange(1 << 18, dtype=cupy.float32)
    dst = cupy.zeros_like(src)

    def check(result):
        """The call's values after its status, which must be success."""
        status = result[0] if isinstance(result, tuple) else result
        if status != ok:
            raise RuntimeError(f"driver call failed: {status!r}")
        return result

    def last_node(stream):
        return check(d.cuStreamGetCaptureInfo(stream))[4][0]

    def operation(kind, address, value, flags):
        op = d.CUstreamBatchMemOpParams()
        field = op.writeValue if kind == "write" else op.waitValue
        field.operation = write_op if kind == "write" else wait_op
        field.address, field.value, field.flags = address, value, flags
        return op

    def instantiate():
        graph = check(d.cuStreamEndCapture(cs))[1]
        return check(d.cuGraphInstantiate(graph, 0))[1]

    def two_streams(pairs, memops):
        """(executable, [(node, params, value field, captured value)])."""
        recorded = []
        check(d.cuStreamBeginCapture(cs, relaxed))
        for i in range(pairs):
            with main_stream:
                cupy.add(x, 1, out=x)
            if memops:
                check(d.cuStreamWriteValue32(cs, at[i], i + 1, fenced))
                recorded.append((last_node(cs), "write", at[i], i + 1, fenced))
            event = cupy.cuda.Event(disable_timing=True)
            event.record(main_stream)
            side.wait_event(event)
            if memops:
                check(d.cuStreamWaitValue32(cside, at[i], i + 1, geq))
                recorded.append((last_node(cside), "wait", at[i], i + 1, geq))
            cupy.cuda.runtime.memcpyAsync(dst.data.ptr, src.data.ptr, src.nbytes, 3, side.ptr)
            joined = cupy.cuda.Event(disable_timing=True)
            joined.record(side)
            main_stream.wait_event(joined)
        executable = instantiate()
        nodes = []
        for node, kind, address, value, flags in recorded:
            params = d.CUDA_BATCH_MEM_OP_NODE_PARAMS()
            params.ctx, params.count, params.flags = context, 1, 0
            params.paramArray = [operation(kind, address, value, flags)]
            kept = params.paramArray[0]
            nodes.append((node, params, kept.writeValue if kind == "write" else kept.waitValue,
                          value))  # fmt: skip
        return executable, nodes

    def one_stream(pairs, batched):
        check(d.cuStreamBeginCapture(cs, relaxed))
        for i in range(pairs):
            with main_stream:
                cupy.add(x, 1, out=x)
            word = at[32 + i]
            if batched:
                ops = [operation("write", word, i + 1, fenced), operation("wait", word, i + 1, geq)]
                check(d.cuStreamBatchMemOp(cs, 2, ops, 0))
            else:
                check(d.cuStreamWriteValue32(cs, word, i + 1, fenced))
                check(d.cuStreamWaitValue32(cs, word, i + 1, geq))
        return instantiate()

    bias = [0]

    def timed(executable, nodes, update, alone):
        """Median µs of the updates and of the launch."""
        updates, launches = [], []
        for i in range(args.launches + 20):
            if alone:
                main_stream.synchronize()
            statuses = []
            t0 = time.perf_counter()
            if update:
                bias[0] += 64  # (every wait stays satisfied by its own graph's write)
                for node, params, field, value in nodes:
                    field.value = value + bias[0]
                    statuses.append(d.cuGraphExecBatchMemOpNodeSetParams(executable, node, params))
            t1 = time.perf_counter()
            statuses.append(d.cuGraphLaunch(executable, cs))
            t2 = time.perf_counter()
            for status in statuses:
                check(status)  # (after the clock: the checks are not what is timed)
            if i >= 20:
                updates.append(t1 - t0)
                launches.append(t2 - t1)
        main_stream.synchronize()
        return statistics.median(updates) * 1e6, statistics.median(launches) * 1e6

    print(f"card: {cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()}")
    print(f"{'pairs':>5} {'memops':>6} {'update':>6} {'alone':>5} {'update us':>9} "
          f"{'launch us':>9}")  # fmt: skip
    for pairs in (2, 4):
        for memops in (False, True):
            executable, nodes = two_streams(pairs, memops)
            for update in (False, True) if memops else (False,):
                for alone in (True, False):
                    u, launch = timed(executable, nodes, update, alone)
                    print(f"{pairs:>5} {memops!s:>6} {update!s:>6} {alone!s:>5} {u:9.1f} "
                          f"{launch:9.1f}")  # fmt: skip
    print("write and wait on one stream, two nodes or one batch node per pair:")
    print(f"{'pairs':>5} {'batched':>7} {'alone':>5} {'launch us':>9}")
    for pairs in (2, 4, 8):
        for batched in (False, True):
            executable = one_stream(pairs, batched)
            for alone in (True, False):
                _, launch = timed(executable, [], False, alone)
                print(f"{pairs:>5} {batched!s:>7} {alone!s:>5} {launch:9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
