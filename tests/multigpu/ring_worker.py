"""One rank of the multi-GPU checks; started by tests/test_multigpu.py through cuparing.launch.

    python -m cuparing.launch --nproc-per-node N tests/multigpu/ring_worker.py check
    python -m cuparing.launch --nproc-per-node N tests/multigpu/ring_worker.py stress
    python -m cuparing.launch --nproc-per-node N --grace 90 tests/multigpu/ring_worker.py killed

``check``: every rank builds the same seeded global q/k/v/dout, takes its shard, runs the ring
forward and backward, and compares its shard of out/lse/dq/dk/dv with the float64 dense reference
on the whole sequence. Prints ``PASS``/``FAIL`` per quantity and ``WORKER OK`` at the end.

Every mode uses the transport ``CUPARING_TRANSPORT`` names (``nccl`` or ``ipc``; unset:
``Ring.from_env``'s default); the ring's class (and the IPC ring's ``sync`` mode) is printed in the
``WORKER OK`` line.

``stress``: the same ring, forward and backward, ten times with random GPU-side delays put in
front of every exchange, on the caller's stream (compute late: a transfer must not overwrite a
buffer still being read) or on the ring's transfer stream (data late: compute must not read a
buffer still being written). The forward has no atomics, so every disturbed run must reproduce the
undisturbed output and LSE bit for bit; a missing wait anywhere shows up as a moved bit.

``replay-cycle``: a training loop's ring calls replayed as CUDA graphs for many steps, two input
sets in turn: every step right, and the copy-engine ring's replays give no flag node a value once
its graphs have met each state of their channels' counts modulo 4.

``documents``: packed documents (``cu_seqlens`` with a one-token document and one longer than a
shard, S not a multiple of 2C) through the zigzag and packed layouts, forward and backward, CuPy
and torch (whose repeats run the kept plans, replayed as graphs where the ring can be captured),
each with ``CUPARING_KV_GATHER`` unset (the default: forwards on rings of 4+ gather), ``0`` and
``1``: each rank's real rows against the float64 reference, padding rows 0 / -inf / zero gradients.

``hello``: the ring ``Ring.from_env`` builds with the environment as it is (the transport test
unsets ``CUPARING_TRANSPORT``) passes one array around once; its class is in the verdict line.

``killed``: rank 1 dies (``os._exit(1)``) in the middle of the ring; every other rank must print
``CAUGHT`` with a ``RingTimeoutError``/``RingError`` within the ring timeout (20 s) instead of
hanging (the failure channel tells them within about a second). ``killed-graph``: the same while
the survivors replay a ring call captured as a CUDA graph.
"""

from __future__ import annotations

import os
import sys
import time

import ml_dtypes
import numpy as np

import cuparing as cr
from cuparing.comm.local import SoloRing

# the one tolerance table (tests/numerics.py): bounds from the arithmetic, checked on this
# rank's rows, and the ring-vs-one-device limit
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from gpu_arrays import poison_torch_pools  # noqa: E402
from numerics import Reference, ring_vs_solo_limit  # noqa: E402

DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32}
# ring calls run at pointer level (call_plans.RingForwardPlan.run, RingBackwardPlan.run)
PLANNED_RUNS = {"forward": 0, "backward": 0}


def _count_planned_runs() -> None:
    from cuparing import call_plans

    for kind, plan in (("forward", call_plans.RingForwardPlan),
                       ("backward", call_plans.RingBackwardPlan)):  # fmt: skip

        def counted(self, *args, real_run=plan.run, kind=kind):
            result = real_run(self, *args)
            PLANNED_RUNS[kind] += result is not None
            return result

        plan.run = counted


_count_planned_runs()
# repeats that ran as CUDA graphs (a graph of call_plans.GraphSlot launched, whether kept or
# captured by that repeat: a copy-engine ring keeps one graph per slot parity of its channels)
GRAPH_REPLAYS = {"count": 0}


def _count_graph_replays() -> None:
    from cuparing import call_plans

    def counted(self, *args, real_replayed=call_plans.GraphSlot._replayed):
        replayed = real_replayed(self, *args)
        GRAPH_REPLAYS["count"] += replayed
        return replayed

    call_plans.GraphSlot._replayed = counted


_count_graph_replays()


def graphs_expected(ring) -> bool:
    """Whether this ring's repeats should run as CUDA graphs (NCCL or the copy-engine ring's
    device flags, graphs not switched off)."""
    from cuparing.backends import ring_graphs

    return ring_graphs.enabled(ring)
LOCAL_LEN = 128  # tokens per rank: global S = 128 * C, divisible by 2C for zigzag


def norm_error(got, want) -> float:
    """||got - want||_F in float64 (inf where got holds NaN or inf)."""
    got = np.asarray(got, dtype=np.float64)
    if not np.isfinite(got).all():
        return float("inf")
    return float(np.linalg.norm(got - np.asarray(want, dtype=np.float64)))


def to_host(x) -> np.ndarray:
    """A result (CuPy or torch, any dtype) as a float64 NumPy array."""
    if type(x).__module__.startswith("torch"):
        return x.detach().float().cpu().numpy().astype(np.float64)
    import cupy

    return cupy.asnumpy(x.astype(cupy.float32)).astype(np.float64)


def cases():
    for layout in cr.LAYOUTS:
        for causal in (False, True):
            for dtype in DTYPES:
                yield dict(layout=layout, causal=causal, dtype=dtype, heads=(4, 4), headdim=64)
    yield dict(layout="zigzag", causal=True, dtype="bfloat16", heads=(4, 4), headdim=64,
               window=(96, 0))  # fmt: skip
    yield dict(layout="striped", causal=False, dtype="float16", heads=(4, 4), headdim=64,
               window=(40, 24))  # fmt: skip
    yield dict(layout="zigzag", causal=True, dtype="bfloat16", heads=(8, 2), headdim=128)
    yield dict(layout="contiguous", causal=False, dtype="float16", heads=(8, 2), headdim=128)
    # the same checks with torch tensors in and out (DLPack), where torch is installed
    yield dict(layout="zigzag", causal=True, dtype="bfloat16", heads=(8, 2), headdim=128,
               framework="torch")  # fmt: skip
    yield dict(layout="striped", causal=True, dtype="float16", heads=(4, 4), headdim=64,
               framework="torch")  # fmt: skip


def mixed_replays(ring, name, report, call, want) -> None:
    """``call()`` three times while rank 1's graph driver refuses to launch: every rank's result
    bit-identical to ``want``, rank 1 warned once and ran eagerly, the others replayed."""
    import warnings

    import torch

    from cuparing.backends import ring_graphs

    real = ring_graphs.GraphDriver.launch

    def refusing(self, executable, stream):
        raise RuntimeError("cuGraphLaunch refused (a test's stand-in)")

    if ring.rank == 1:
        ring_graphs.GraphDriver.launch = refusing
    before = GRAPH_REPLAYS["count"]
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for trial in range(3):
                got = call()
                same = all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
                report(same, f"{name} graphs refused on rank 1, call {trial}: "
                             f"bit-identical={same}")  # fmt: skip
    finally:
        ring_graphs.GraphDriver.launch = real
    replays = GRAPH_REPLAYS["count"] - before
    refusals = sum("could not be replayed" in str(w.message) for w in caught)
    want_counts = (0, 1) if ring.rank == 1 else (3, 0)
    report((replays, refusals) == want_counts,
           f"{name} graphs refused on rank 1: replays {replays}, warnings {refusals} "
           f"(expected {want_counts})")


def global_inputs(seed, world, heads, headdim, dtype):
    rng = np.random.default_rng(seed)
    nheads, nheads_kv = heads
    seqlen = LOCAL_LEN * world
    shape_q, shape_kv = (1, seqlen, nheads, headdim), (1, seqlen, nheads_kv, headdim)
    make = lambda shape: rng.standard_normal(shape, dtype=np.float32).astype(DTYPES[dtype])  # noqa: E731
    return make(shape_q), make(shape_kv), make(shape_kv), make(shape_q)


def run_case(ring, index, case, report) -> None:
    import cupy

    world, rank, layout = ring.size, ring.rank, case["layout"]
    causal, window, dtype = case["causal"], case.get("window"), case["dtype"]
    framework = case.get("framework", "cupy")
    name = (
        f"#{index} {layout} causal={causal} window={window} {dtype} H/Hkv={case['heads']} "
        f"D={case['headdim']} {framework}"
    )
    if framework == "torch":
        try:
            import torch
        except ImportError as exc:
            print(f"SKIP {name}: torch unavailable ({exc})", flush=True)
            return
    q, k, v, dout = global_inputs(1000 + index, world, case["heads"], case["headdim"], dtype)
    # the reference sees exactly the rounded inputs the GPU sees
    ref = Reference(q, k, v, dout, causal=causal, window=window)

    def local(x, axis=1):
        return cr.shard(x, rank, world, layout=layout, axis=axis)

    def device(x):
        array = cupy.asarray(x)
        return torch.from_dlpack(array) if framework == "torch" else array

    q_l, k_l, v_l, dout_l = (device(local(x)) for x in (q, k, v, dout))
    out_l, lse_l = cr.ring_attention(q_l, k_l, v_l, ring, causal=causal, window=window,
                                     layout=layout, return_lse=True)  # fmt: skip
    if framework == "torch":
        # a repeat runs the kept launches at pointer level (call_plans.RingForwardPlan), into
        # memory torch's allocator hands out NaN-filled: the same bits as the checked call
        poison_torch_pools()
        planned_before = PLANNED_RUNS["forward"]
        again = cr.ring_attention(q_l, k_l, v_l, ring, causal=causal, window=window,
                                  layout=layout, return_lse=True)  # fmt: skip
        same = torch.equal(again[0], out_l) and torch.equal(again[1], lse_l)
        planned = PLANNED_RUNS["forward"] - planned_before
        report(same and planned == 1,
               f"{name} repeat at pointer level: bit-identical={same}, planned runs {planned}")
        # later repeats replay the captured graph where the ring can be captured: inputs and
        # outputs at other addresses each time (fresh copies, NaN-filled memory), same bits
        replays_before = GRAPH_REPLAYS["count"]
        for trial in range(2):
            poison_torch_pools()
            copies = [x.clone() for x in (q_l, k_l, v_l)]
            again = cr.ring_attention(*copies, ring, causal=causal, window=window,
                                      layout=layout, return_lse=True)  # fmt: skip
            same = torch.equal(again[0], out_l) and torch.equal(again[1], lse_l)
            report(same, f"{name} repeat {trial + 2} (new addresses): bit-identical={same}")
        # on another stream (a replay there waits for the last one), then after the ring
        # dropped its receive buffers (the graph is released; the next repeat captures again)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            copies = [x.clone() for x in (q_l, k_l, v_l)]
            again = cr.ring_attention(*copies, ring, causal=causal, window=window,
                                      layout=layout, return_lse=True)  # fmt: skip
        torch.cuda.current_stream().wait_stream(side)
        same = torch.equal(again[0], out_l) and torch.equal(again[1], lse_l)
        report(same, f"{name} repeat on another stream: bit-identical={same}")
        ring.release_buffers()
        for trial in ("captured again", "replayed"):
            again = cr.ring_attention(q_l, k_l, v_l, ring, causal=causal, window=window,
                                      layout=layout, return_lse=True)  # fmt: skip
            same = torch.equal(again[0], out_l) and torch.equal(again[1], lse_l)
            report(same, f"{name} repeat after release_buffers ({trial}): bit-identical={same}")
        replays = GRAPH_REPLAYS["count"] - replays_before
        want_replays = 0
        if graphs_expected(ring):
            # every repeat but the copy-engine ring's first after release_buffers, which sets
            # its channels up again eagerly
            want_replays = 4 if type(ring).__name__ == "IpcRing" else 5
        report(replays == want_replays,
               f"{name} forward graph replays {replays} (expected {want_replays})")
        # two input sets in turn through the kept plan: a replay that read a slot before the
        # peer's push landed would show the other set's K/V, which repeats of identical inputs
        # cannot reveal. The second set's reference: the same call with the scale passed
        # explicitly (another signature, so the checked path, eagerly; the same kernels)
        from cuparing.validation import check_scale

        other = [x.flip(1).contiguous() for x in (q_l, k_l, v_l)]
        want_other = cr.ring_attention(*other, ring, causal=causal, window=window,
                                       layout=layout, return_lse=True,
                                       scale=check_scale(None, q_l.shape[-1]))  # fmt: skip
        for trial in range(4):
            inputs, want = ((q_l, k_l, v_l), (out_l, lse_l)) if trial % 2 == 0 else (
                other, want_other)  # fmt: skip
            poison_torch_pools()
            got = cr.ring_attention(*inputs, ring, causal=causal, window=window, layout=layout,
                                    return_lse=True)  # fmt: skip
            same = torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
            report(same, f"{name} alternating inputs, call {trial}: bit-identical={same}")
        if graphs_expected(ring):
            # the driver refuses a replay on rank 1 only: that rank runs the call without its
            # graph from then on while the others replay theirs (captured and eager exchanges
            # of one call must pair: NCCL's send/recv, the copy-engine ring's flag values)
            mixed_replays(ring, name, report, lambda: cr.ring_attention(
                q_l, k_l, v_l, ring, causal=causal, window=window, layout=layout,
                return_lse=True), (out_l, lse_l))  # fmt: skip
    grads = cr.ring_attention_backward(dout_l, q_l, k_l, v_l, out_l, lse_l, ring, causal=causal,
                                       window=window, layout=layout)  # fmt: skip
    out_bound = ref.kernel_out_bound(select=local)
    checks = [("out", out_l, local(ref.out), out_bound)]
    grad_checks = [
        (label, local(want), ref.bound(label, i, select=local))
        for i, (label, want) in enumerate(zip(("dq", "dk", "dv"), ref.grads, strict=True))
    ]
    checks += [(label, got, want, bound)
               for (label, want, bound), got in zip(grad_checks, grads, strict=True)]  # fmt: skip
    if framework == "torch":
        # the backward's repeat at pointer level (call_plans.RingBackwardPlan: its dK/dV travel
        # and go home through this transport), into NaN-filled memory from torch's allocator
        poison_torch_pools()
        planned_before = PLANNED_RUNS["backward"]
        again = cr.ring_attention_backward(dout_l, q_l, k_l, v_l, out_l, lse_l, ring,
                                           causal=causal, window=window, layout=layout)  # fmt: skip
        planned = PLANNED_RUNS["backward"] - planned_before
        report(planned == 1, f"{name} backward repeat at pointer level: planned runs {planned}")
        checks += [
            (f"repeat {label}", got, want, bound)
            for (label, want, bound), got in zip(grad_checks, again, strict=True)
        ]
        # and its graph replay (where the ring can be captured), every array somewhere else
        replays_before = GRAPH_REPLAYS["count"]
        poison_torch_pools()
        copies = [x.clone() for x in (dout_l, q_l, k_l, v_l, out_l, lse_l)]
        again = cr.ring_attention_backward(*copies, ring, causal=causal, window=window,
                                           layout=layout)  # fmt: skip
        replays = GRAPH_REPLAYS["count"] - replays_before
        want_replays = 1 if graphs_expected(ring) else 0
        report(replays == want_replays,
               f"{name} backward graph replays {replays} (expected {want_replays})")
        checks += [
            (f"repeat 2 {label}", got, want, bound)
            for (label, want, bound), got in zip(grad_checks, again, strict=True)
        ]
    if framework == "torch":
        # the same ring through PyTorch autograd (cuparing.ring_attention_torch)
        leaves = [x.detach().clone().requires_grad_() for x in (q_l, k_l, v_l)]
        out_t = cr.ring_attention_torch(*leaves, ring, causal=causal, window=window,
                                        layout=layout)  # fmt: skip
        out_t.backward(dout_l)
        checks.append(("autograd out", out_t, local(ref.out), out_bound))
        checks += [
            (f"autograd {label}", leaf.grad, want, bound)
            for (label, want, bound), leaf in zip(grad_checks, leaves, strict=True)
        ]
    lse_err, lse_bound = ref.lse_excess(to_host(lse_l), select=lambda x: local(x, 2))
    report(lse_err <= lse_bound, f"{name} lse: worst err {lse_err:.2e} (bound {lse_bound:.2e})")
    errors = {}
    for label, got, want, limit in checks:
        errors[label] = err = norm_error(to_host(got), want)
        report(err <= limit, f"{name} {label}: err {err:.2e} (bound {limit:.2e})")
    if framework != "cupy":
        return
    # one device, same kernels, whole sequence: the ring may not be worse beyond RING_VS_SOLO
    solo = SoloRing()
    full = [cupy.asarray(x) for x in (q, k, v)]
    solo_out, solo_lse = cr.ring_attention(*full, solo, causal=causal, window=window,
                                           return_lse=True)  # fmt: skip
    solo_err = norm_error(local(to_host(solo_out)), local(ref.out))
    limit = ring_vs_solo_limit(solo_err, ref, select=local)
    report(errors["out"] <= limit, f"{name} out: ring err {errors['out']:.2e} vs "
           f"C=1 err {solo_err:.2e} (limit {limit:.2e})")  # fmt: skip
    # the LSE likewise, on the rows that see a key (the -inf pattern is checked above)
    finite = np.isfinite(local(ref.lse, 2))
    lse_err = norm_error(to_host(lse_l)[finite], local(ref.lse, 2)[finite])
    solo_lse_err = norm_error(local(to_host(solo_lse), 2)[finite], local(ref.lse, 2)[finite])
    lse_limit = ring_vs_solo_limit(solo_lse_err, ref, lambda x: local(x, 2), quantity="lse")
    report(lse_err <= lse_limit, f"{name} lse: ring err {lse_err:.2e} vs C=1 err "
           f"{solo_lse_err:.2e} (limit {lse_limit:.2e})")  # fmt: skip


def document_boundaries(world: int) -> list[int]:
    """Fixed boundaries of a packed sequence of ``LOCAL_LEN * world - 3`` tokens (not a multiple
    of 2C): a one-token document, one longer than a shard, and short ones between."""
    seqlen = LOCAL_LEN * world - 3
    rng = np.random.default_rng(7 + world)
    long_end = 1 + LOCAL_LEN + 37  # the one-token document [0, 1), then one past a shard
    cuts = sorted(rng.choice(np.arange(long_end + 1, seqlen), size=2 * world, replace=False))
    return [0, 1, long_end, *(int(c) for c in cuts), seqlen]


def run_documents_case(ring, name, layout, framework, cu, report) -> None:
    """One packed-documents case: forward, backward (and on torch a repeat of each) on this
    rank's shard, its real rows against the float64 reference."""
    import cupy

    world, rank = ring.size, ring.rank
    seqlen = cu[-1]
    rng = np.random.default_rng(seqlen + len(cu))
    make = lambda *shape: rng.standard_normal(shape, dtype=np.float32).astype(  # noqa: E731
        ml_dtypes.bfloat16)
    q, dout = make(1, seqlen, 8, 128), make(1, seqlen, 8, 128)
    k, v = make(1, seqlen, 2, 128), make(1, seqlen, 2, 128)
    ref = Reference(q, k, v, dout, causal=True, cu_seqlens=cu)
    rows = cr.token_positions(seqlen, rank, world, layout=layout, cu_seqlens=cu)
    real = rows >= 0
    picked = rows[real]

    def device(x):
        array = cupy.asarray(cr.shard(x, rank, world, layout=layout, cu_seqlens=cu))
        if framework == "torch":
            import torch

            return torch.from_dlpack(array)
        return array

    opts = dict(causal=True, layout=layout, cu_seqlens=cu)
    q_l, k_l, v_l, dout_l = (device(x) for x in (q, k, v, dout))
    calls = 2 if framework == "torch" else 1
    for call in range(calls):
        if framework == "torch":
            poison_torch_pools()
        out_l, lse_l = cr.ring_attention(q_l, k_l, v_l, ring, return_lse=True, **opts)
        grads = cr.ring_attention_backward(dout_l, q_l, k_l, v_l, out_l, lse_l, ring, **opts)
        label = f"{name} call {call}"
        out_h, lse_h = to_host(out_l), to_host(lse_l)
        grads_h = [to_host(g) for g in grads]
        pad_ok = (np.all(out_h[:, ~real] == 0) and np.all(np.isneginf(lse_h[:, :, ~real]))
                  and all(np.all(g[:, ~real] == 0) for g in grads_h))  # fmt: skip
        report(pad_ok, f"{label} padding rows: out 0, lse -inf, zero gradients: {pad_ok}")
        rows_of = lambda x: x[:, picked]  # noqa: E731
        err, bound = norm_error(out_h[:, real], rows_of(ref.out)), ref.kernel_out_bound(
            select=rows_of)  # fmt: skip
        report(err <= bound, f"{label} out: err {err:.2e} (bound {bound:.2e})")
        lse_err, lse_bound = ref.lse_excess(lse_h[:, :, real], select=lambda x: x[:, :, picked])
        report(lse_err <= lse_bound, f"{label} lse: worst err {lse_err:.2e} (bound "
               f"{lse_bound:.2e})")  # fmt: skip
        for i, (grad_name, got) in enumerate(zip(("dq", "dk", "dv"), grads_h, strict=True)):
            err = norm_error(got[:, real], rows_of(ref.grads[i]))
            bound = ref.bound(grad_name, i, select=rows_of)
            report(err <= bound, f"{label} {grad_name}: err {err:.2e} (bound {bound:.2e})")


def hello() -> int:
    import cupy

    ring = cr.Ring.from_env(timeout=60)
    report, failures = reporter()
    mine = cupy.full(1024, ring.rank, dtype=cupy.float32)
    got = ring.exchange([mine], tag="hello").wait()[0]
    want = (ring.rank - 1) % ring.size
    report(bool((got == want).all()), f"hello from rank {want}: {float(got[0])}")
    return finish(ring, len(failures), "hello")


def documents() -> int:
    ring = cr.Ring.from_env(timeout=120)
    report, failures = reporter()
    cu = document_boundaries(ring.size)
    count = 0
    for switch in ("", "0", "1"):  # CUPARING_KV_GATHER, alike on every rank
        os.environ["CUPARING_KV_GATHER"] = switch
        for layout in ("zigzag", "packed"):
            for framework in ("cupy", "torch"):
                name = f"documents {layout} {framework} CUPARING_KV_GATHER={switch or 'unset'}"
                try:
                    run_documents_case(ring, name, layout, framework, cu, report)
                    count += 1
                except cr.RingError:
                    raise
                except Exception as exc:  # noqa: BLE001 - same on every rank
                    report(False, f"{name}: {type(exc).__name__}: {exc}")
    return finish(ring, len(failures), f"documents={count}")


def reporter():
    """``report(ok, line)``, which prints a ``PASS``/``FAIL`` line, and the list of the failed
    lines it fills."""
    failures = []

    def report(ok: bool, line: str) -> None:
        print(("PASS " if ok else "FAIL ") + line, flush=True)
        if not ok:
            failures.append(line)

    return report, failures


def check() -> int:
    ring = cr.Ring.from_env(timeout=120)
    report, failures = reporter()

    count = 0
    for index, case in enumerate(cases()):
        try:
            run_case(ring, index, case, report)
            count += 1
        except cr.RingError:
            raise  # the ring is gone: no further case can run
        except Exception as exc:  # noqa: BLE001 - same inputs on every rank: all fail alike
            report(False, f"case #{index} {case}: {type(exc).__name__}: {exc}")
    return finish(ring, len(failures), f"cases={count}")


def finish(ring, failures: int, what: str) -> int:
    """Close the ring and print the worker's verdict line; the exit code."""
    ring.synchronize()
    ring.close()
    if failures:
        print(f"WORKER FAILED rank {ring.rank}: {failures} failure(s)", flush=True)
        return 1
    sync = f" sync={ring.sync}" if hasattr(ring, "sync") else ""  # the IPC ring's mode
    print(f"WORKER OK rank {ring.rank} {what} ring={type(ring).__name__}{sync}", flush=True)
    return 0


class WrappedRing(cr.Ring):
    """Passes every ring call but ``exchange`` (which subclasses define) on to a real ring."""

    def __init__(self, ring):
        self._ring = ring
        self.rank, self.size, self.timeout = ring.rank, ring.size, ring.timeout

    def agree(self, fields):
        self._ring.agree(fields)

    def synchronize(self):
        self._ring.synchronize()

    def check(self):
        self._ring.check()


class DyingRing(WrappedRing):
    """Delegates to a real ring; on rank 1 the process dies at the ``die_at``-th exchange."""

    def __init__(self, ring, die_at: int):
        super().__init__(ring)
        self._die_at, self._calls = die_at, 0

    def exchange(self, arrays, shift=1, tag="kv"):
        self._calls += 1
        if self.rank == 1 and self._calls == self._die_at:
            print(f"DYING at {time.time():.3f}", flush=True)
            os._exit(1)
        return self._ring.exchange(arrays, shift, tag)


class DelayingRing(WrappedRing):
    """Delegates to a real ring; before each exchange, sometimes stalls one of the two streams.

    The stall is a one-thread kernel spinning for a random number of clock cycles (up to ~1 ms),
    so it moves the GPU-side timing without any host synchronisation.
    """

    SPIN = r"""
    extern "C" __global__ void spin(long long cycles) {
        long long start = clock64();
        while (clock64() - start < cycles) {}
    }"""

    def __init__(self, ring, seed: int):
        import cupy

        super().__init__(ring)
        self._rng = np.random.default_rng(seed)
        self._spin = cupy.RawKernel(self.SPIN, "spin")

    def _stall(self, stream) -> None:
        cycles = np.int64(self._rng.integers(0, 2_000_000))
        with stream:
            self._spin((1,), (1,), (cycles,))

    def exchange(self, arrays, shift=1, tag="kv"):
        import cupy

        where = self._rng.integers(0, 3)  # 0: no stall, 1: compute late, 2: transfer late
        if where == 1:
            self._stall(cupy.cuda.get_current_stream())
        elif where == 2:
            self._stall(self._ring.stream)
        return self._ring.exchange(arrays, shift, tag)


def stress_planned(ring, q_l, k_l, v_l, mask, want_out, want_lse) -> int:
    """The ring forward on torch tensors, checked once and then repeated at pointer level
    (call_plans.RingForwardPlan) under the same delays: every run bit-identical to ``want``.
    Returns the number of failed runs."""
    import torch

    q_t, k_t, v_t = (torch.from_dlpack(x) for x in (q_l, k_l, v_l))
    planned_before, failures = PLANNED_RUNS["forward"], 0
    for trial in range(6):
        out, lse = cr.ring_attention(q_t, k_t, v_t, ring, return_lse=True, **mask)
        same = np.array_equal(out.cpu().view(torch.int16).numpy(), want_out.view(np.int16))
        same = same and np.array_equal(lse.cpu().numpy(), want_lse)
        failures += not same
        print(f"{'PASS' if same else 'FAIL'} stress planned {mask} trial {trial}: forward "
              f"bit-identical={same}", flush=True)  # fmt: skip
    planned = PLANNED_RUNS["forward"] - planned_before
    failures += planned != 5  # the first call is checked, the others run the kept launches
    print(f"{'PASS' if planned == 5 else 'FAIL'} stress planned runs {planned} of 5", flush=True)
    return failures


def stress() -> int:
    import cupy

    ring = cr.Ring.from_env(timeout=120)
    failures = 0
    for index, (layout, causal) in enumerate([("zigzag", True), ("contiguous", False)]):
        q, k, v, dout = global_inputs(500 + index, ring.size, (8, 2), 128, "bfloat16")
        ref = Reference(q, k, v, dout, causal=causal)

        def local(x, axis=1, layout=layout):
            return cr.shard(x, ring.rank, ring.size, layout=layout, axis=axis)

        q_l, k_l, v_l, dout_l = (cupy.asarray(local(x)) for x in (q, k, v, dout))
        mask = dict(causal=causal, layout=layout)
        want_out, want_lse = (x.get() for x in cr.ring_attention(q_l, k_l, v_l, ring,
                                                                 return_lse=True, **mask))
        delaying = DelayingRing(ring, seed=ring.rank * 1000 + index)
        failures += stress_planned(delaying, q_l, k_l, v_l, mask, want_out, want_lse)
        for trial in range(10):
            out, lse = cr.ring_attention(q_l, k_l, v_l, delaying, return_lse=True, **mask)
            grads = cr.ring_attention_backward(dout_l, q_l, k_l, v_l, out, lse, delaying, **mask)
            same = np.array_equal(out.get().view(np.uint16), want_out.view(np.uint16))
            same = same and np.array_equal(lse.get(), want_lse)
            worst = max(
                norm_error(to_host(g), local(ref.grads[i])) / ref.bound(name, i, select=local)
                for i, (name, g) in enumerate(zip(("dq", "dk", "dv"), grads, strict=True))
            )
            ok = same and worst <= 1
            failures += not ok
            print(f"{'PASS' if ok else 'FAIL'} stress {layout} causal={causal} trial {trial}: "
                  f"forward bit-identical={same}, worst gradient err/bound {worst:.2f}",
                  flush=True)  # fmt: skip
    return finish(ring, failures, "stress")


def settle(ring) -> None:
    """Wait for the work queued on the current stream, checking the ring while waiting.

    Polls an event instead of a blocking stream sync, so that a failure the watchdog or the
    failure channel finds is raised here at once, not after the abort has drained the stream.
    """
    import cupy

    done = cupy.cuda.Event(disable_timing=True)
    done.record()
    while not done.done:
        ring.check()
        time.sleep(0.001)


def killed() -> int:
    import cupy

    ring = cr.Ring.from_env(timeout=20)
    q, k, v, dout = global_inputs(7, ring.size, (4, 4), 64, "bfloat16")
    q_l, k_l, v_l, dout_l = (
        cupy.asarray(cr.shard(x, ring.rank, ring.size, layout="zigzag")) for x in (q, k, v, dout)
    )
    dying = DyingRing(ring, die_at=ring.size + 1)  # past the first forward, inside the backward
    try:
        for _ in range(3):
            out, lse = cr.ring_attention(q_l, k_l, v_l, dying, causal=True, layout="zigzag",
                                         return_lse=True)  # fmt: skip
            cr.ring_attention_backward(dout_l, q_l, k_l, v_l, out, lse, dying, causal=True,
                                       layout="zigzag")  # fmt: skip
            settle(ring)
        ring.synchronize()
    except cr.RingError as exc:
        print(f"CAUGHT {type(exc).__name__} at {time.time():.3f}: {exc}", flush=True)
        return 2
    print("NO ERROR: the ring finished although rank 1 died", flush=True)
    return 0


def killed_graph() -> int:
    """``killed`` for repeats replayed as CUDA graphs (torch tensors): rank 1 dies before its
    fourth forward, when every rank has captured the call; the others' replays wait on a peer
    that never sends, and the flight each replay arms must end them."""
    import torch

    ring = cr.Ring.from_env(timeout=20)
    q, k, v, _ = global_inputs(8, ring.size, (8, 2), 128, "bfloat16")
    q_l, k_l, v_l = (
        torch.from_numpy(np.ascontiguousarray(
            cr.shard(x, ring.rank, ring.size, layout="zigzag").view(np.uint16)
        )).cuda().view(torch.bfloat16)
        for x in (q, k, v)
    )  # fmt: skip
    if not graphs_expected(ring):
        print("NO GRAPHS on this ring", flush=True)
        return 0
    try:
        for call in range(8):
            if ring.rank == 1 and call == 3:
                print(f"DYING at {time.time():.3f}", flush=True)
                os._exit(1)
            cr.ring_attention(q_l, k_l, v_l, ring, causal=True, layout="zigzag")
            ring.synchronize()
        settle(ring)
    except cr.RingError as exc:
        print(f"CAUGHT {type(exc).__name__} at {time.time():.3f} after {GRAPH_REPLAYS['count']} "
              f"graph replays: {exc}", flush=True)  # fmt: skip
        return 2
    print("NO ERROR: the ring finished although rank 1 died", flush=True)
    return 0


def replay_cycle() -> int:
    """``replay-cycle``: a training loop's ring calls (forward, then backward, torch tensors)
    for 16 steps, two input sets in turn, replayed as CUDA graphs from the second step where
    the ring can be captured. Every step: the forward bit-identical to its set's first, the
    gradients within the float64 reference's bounds (a replay that read a slot before the
    peer's push landed would show the other set's K/V). The copy-engine ring's graphs take one
    instantiation per state of their channels' counts modulo 4, each given its flag values
    once: after the first 8 steps (every state met) no replay gives a flag node a value."""
    import torch

    from cuparing.backends import ring_graphs
    from cuparing.comm import ipc_capture

    ring = cr.Ring.from_env(timeout=120)
    report, failures = reporter()

    counts = {"patch": 0, "instantiate": 0, "capture": 0}

    def counting(name, real):
        def counted(*args):
            counts[name] += 1
            return real(*args)

        return counted

    ipc_capture.CapturedExchanges.patch = counting("patch", ipc_capture.CapturedExchanges.patch)
    ring_graphs.GraphDriver.instantiate = counting("instantiate",
                                                   ring_graphs.GraphDriver.instantiate)
    ring_graphs.capture = counting("capture", ring_graphs.capture)
    world, rank = ring.size, ring.rank

    def local(x, axis=1):
        return cr.shard(x, rank, world, layout="zigzag", axis=axis)

    def device(x):
        bits = np.ascontiguousarray(local(x).view(np.uint16))
        return torch.from_numpy(bits).cuda().view(torch.bfloat16)

    sets = []
    for seed in (31, 32):
        q, k, v, dout = global_inputs(seed, world, (8, 2), 128, "bfloat16")
        sets.append((Reference(q, k, v, dout, causal=True), [device(x) for x in (q, k, v, dout)]))
    steps, tail = 16, 8
    first = [None, None]
    for step in range(steps):
        if step == steps - tail:
            patched, replays = counts["patch"], GRAPH_REPLAYS["count"]
        which = step % 2
        ref, (q_l, k_l, v_l, dout_l) = sets[which]
        poison_torch_pools()
        out, lse = cr.ring_attention(q_l, k_l, v_l, ring, causal=True, layout="zigzag",
                                     return_lse=True)  # fmt: skip
        grads = cr.ring_attention_backward(dout_l, q_l, k_l, v_l, out, lse, ring, causal=True,
                                           layout="zigzag")  # fmt: skip
        name = f"step {step} (set {which})"
        if first[which] is None:
            first[which] = (out.clone(), lse.clone())
            err, bound = norm_error(to_host(out), local(ref.out)), ref.kernel_out_bound(
                select=local)  # fmt: skip
            report(err <= bound, f"{name} out: err {err:.2e} (bound {bound:.2e})")
        same = torch.equal(out, first[which][0]) and torch.equal(lse, first[which][1])
        report(same, f"{name} forward bit-identical to the set's first: {same}")
        for i, (label, got) in enumerate(zip(("dq", "dk", "dv"), grads, strict=True)):
            err = norm_error(to_host(got), local(ref.grads[i]))
            bound = ref.bound(label, i, select=local)
            report(err <= bound, f"{name} {label}: err {err:.2e} (bound {bound:.2e})")
    ring.synchronize()
    graphs = graphs_expected(ring)
    replayed = GRAPH_REPLAYS["count"] - replays
    report(replayed == (2 * tail if graphs else 0),
           f"graph replays in the last {tail} steps: {replayed}")  # fmt: skip
    print(f"INFO captures {counts['capture']}, instantiations {counts['instantiate']}, flag "
          f"values given {counts['patch']} times", flush=True)  # fmt: skip
    if graphs and type(ring).__name__ == "IpcRing":
        late = counts["patch"] - patched
        report(late == 0, f"flag values given in the last {tail} steps: {late} (expected 0)")
        # each instantiation beyond a graph's first is given its state's values once
        extra = counts["instantiate"] - counts["capture"]
        report(counts["patch"] == extra and extra <= 3 * counts["capture"],
               f"flag values given {counts['patch']} times for {extra} instantiations beyond "
               f"the {counts['capture']} graphs' first")  # fmt: skip
    return finish(ring, len(failures), f"replay-cycle steps={steps}")


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else "check"
    modes = {"check": check, "stress": stress, "killed": killed, "killed-graph": killed_graph,
             "replay-cycle": replay_cycle, "documents": documents, "hello": hello}
    sys.exit(modes[mode]())
