"""One rank of the multi-GPU checks; started by tests/test_multigpu.py through cuparing.launch.

    python -m cuparing.launch --nproc-per-node N tests/multigpu/ring_worker.py check
    python -m cuparing.launch --nproc-per-node N --grace 90 tests/multigpu/ring_worker.py killed

``check``: every rank builds the same seeded global q/k/v/dout, takes its shard, runs the ring
forward and backward, and compares its shard of out/lse/dq/dk/dv with the float64 dense reference
on the whole sequence. Prints ``PASS``/``FAIL`` per quantity and ``WORKER OK`` at the end.

Both modes use the transport ``CUPARING_TRANSPORT`` names (``nccl``, the default, or ``ipc``); the
ring's class is printed in the ``WORKER OK`` line.

``killed``: rank 1 dies (``os._exit(1)``) in the middle of the ring; every other rank must print
``CAUGHT`` with a ``RingTimeoutError``/``RingError`` within the ring timeout (20 s) instead of
hanging (the failure channel tells them within about a second).
"""

from __future__ import annotations

import os
import sys
import time

import ml_dtypes
import numpy as np

import cuparing as cr
from cuparing.comm.local import SoloRing

# the one tolerance table (tests/numerics.py): per-shard bounds and the ring-vs-one-device factor
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from numerics import BACKWARD_FACTOR, RING_VS_SOLO  # noqa: E402
from numerics import SHARD_FORWARD_BOUND as FORWARD_BOUND  # noqa: E402

DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32}
LOCAL_LEN = 128  # tokens per rank: global S = 128 * C, divisible by 2C for zigzag


def rel_error(got, want) -> float:
    """||got - want||_F / ||want||_F over the entries where want is finite (masked rows: -inf
    lse must match exactly)."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    finite = np.isfinite(want)
    if not np.array_equal(np.isfinite(got), finite):
        return float("inf")
    diff = np.linalg.norm((got - want)[finite])
    return float(diff / max(np.linalg.norm(want[finite]), 1e-30))


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
    ref_out, ref_lse = cr.reference_attention(q, k, v, causal=causal, window=window,
                                              return_lse=True)  # fmt: skip
    ref_grads = cr.reference_attention_backward(dout, q, k, v, causal=causal, window=window)

    def local(x, axis=1):
        return cr.shard(x, rank, world, layout=layout, axis=axis)

    def device(x):
        array = cupy.asarray(x)
        return torch.from_dlpack(array) if framework == "torch" else array

    q_l, k_l, v_l, dout_l = (device(local(x)) for x in (q, k, v, dout))
    out_l, lse_l = cr.ring_attention(q_l, k_l, v_l, ring, causal=causal, window=window,
                                     layout=layout, return_lse=True)  # fmt: skip
    grads = cr.ring_attention_backward(dout_l, q_l, k_l, v_l, out_l, lse_l, ring, causal=causal,
                                       window=window, layout=layout)  # fmt: skip
    bound = FORWARD_BOUND[dtype]
    checks = [("out", out_l, local(ref_out), bound), ("lse", lse_l, local(ref_lse, 2), bound)]
    checks += [
        (label, got, local(want), bound * BACKWARD_FACTOR)
        for label, got, want in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True)
    ]
    if framework == "torch":
        # the same ring through PyTorch autograd (cuparing.ring_attention_torch)
        leaves = [x.detach().clone().requires_grad_() for x in (q_l, k_l, v_l)]
        out_t = cr.ring_attention_torch(*leaves, ring, causal=causal, window=window,
                                        layout=layout)  # fmt: skip
        out_t.backward(dout_l)
        checks.append(("autograd out", out_t, local(ref_out), bound))
        checks += [
            (f"autograd {label}", leaf.grad, local(want), bound * BACKWARD_FACTOR)
            for label, leaf, want in zip(("dq", "dk", "dv"), leaves, ref_grads, strict=True)
        ]
    errors = {}
    for label, got, want, limit in checks:
        errors[label] = err = rel_error(to_host(got), want)
        report(err <= limit, f"{name} {label}: rel err {err:.2e} (bound {limit:.0e})")
    if framework != "cupy":
        return
    # one device, same kernels, whole sequence: the ring may not be worse beyond RING_VS_SOLO
    solo = SoloRing()
    full = [cupy.asarray(x) for x in (q, k, v)]
    solo_out, solo_lse = cr.ring_attention(*full, solo, causal=causal, window=window,
                                           return_lse=True)  # fmt: skip
    for label, got, want in (("out", solo_out, ref_out), ("lse", solo_lse, ref_lse)):
        axis = 2 if label == "lse" else 1
        solo_err = rel_error(local(to_host(got), axis), local(want, axis))
        limit = RING_VS_SOLO * solo_err + 1e-7  # the floor keeps fp32 noise from flaking
        report(errors[label] <= limit, f"{name} {label}: ring err {errors[label]:.2e} vs "
               f"C=1 err {solo_err:.2e} (limit {limit:.2e})")  # fmt: skip


def check() -> int:
    ring = cr.Ring.from_env(timeout=120)
    failures = []

    def report(ok: bool, line: str) -> None:
        print(("PASS " if ok else "FAIL ") + line, flush=True)
        if not ok:
            failures.append(line)

    count = 0
    for index, case in enumerate(cases()):
        try:
            run_case(ring, index, case, report)
            count += 1
        except cr.RingError:
            raise  # the ring is gone: no further case can run
        except Exception as exc:  # noqa: BLE001 - same inputs on every rank: all fail alike
            report(False, f"case #{index} {case}: {type(exc).__name__}: {exc}")
    ring.synchronize()
    ring.close()
    if failures:
        print(f"WORKER FAILED rank {ring.rank}: {len(failures)} failure(s)", flush=True)
        return 1
    print(f"WORKER OK rank {ring.rank} cases={count} ring={type(ring).__name__}", flush=True)
    return 0


class DyingRing(cr.Ring):
    """Delegates to a real ring; on rank 1 the process dies at the ``die_at``-th exchange."""

    def __init__(self, ring, die_at: int):
        self._ring, self._die_at, self._calls = ring, die_at, 0
        self.rank, self.size, self.timeout = ring.rank, ring.size, ring.timeout

    def exchange(self, arrays, shift=1, tag="kv"):
        self._calls += 1
        if self.rank == 1 and self._calls == self._die_at:
            print(f"DYING at {time.time():.3f}", flush=True)
            os._exit(1)
        return self._ring.exchange(arrays, shift, tag)

    def synchronize(self):
        self._ring.synchronize()

    def check(self):
        self._ring.check()


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


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else "check"
    sys.exit({"check": check, "killed": killed}[mode]())
