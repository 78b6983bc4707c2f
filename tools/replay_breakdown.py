"""Where one replayed ring call's host time goes, piece by piece, one call at a time.

    CUPARING_TRANSPORT=nccl|ipc python -m cuparing.launch --nproc-per-node 2 \\
        tools/replay_breakdown.py [--calls 200]

For the ring forward (``out=`` given) and backward at 512 and 2048 tokens per GPU (ring_calls.py:
causal zigzag, H/Hkv 32/8, D=128, bf16 torch tensors; repeats replay CUDA graphs), rank 0 prints
the median host microseconds of one call made after a synchronisation (timing.host_us_alone)
and, per call, the time spent inside each piece of the replay path (means over the calls): the
graph launch, the copy-engine ring's flag-value patch, its ordering of the launch after the
exchanges before it and its record after the launch, the watchdog's flight (``watch``), the
call's signature, the replay as a whole ("replay (all)"). The pieces are timed by wrapping the
functions, private ones included (a diagnostic of this package's internals), with
``time.perf_counter``; a piece a tree lacks (its function or its module) is left out, so the
script times other trees of the graph-replay era too (``PYTHONPATH=<tree>``: the cuparing it
imports is named first).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict

from ring_calls import ring_calls
from timing import host_us_alone

PIECES = [  # (module path, attribute owner, function, label)
    ("cuparing.backends.ring_graphs", "GraphDriver", "launch", "cuGraphLaunch"),
    ("cuparing.backends.ring_graphs", "GraphDriver", "copy", "K/V copies"),
    ("cuparing.comm.ipc_capture", "CapturedExchanges", "patch", "flag patch"),
    ("cuparing.comm.ipc_capture", "CapturedExchanges", "before_launch", "launch ordering"),
    ("cuparing.comm.ipc_capture", "CapturedExchanges", "advance", "after launch"),
    # the same three in trees where they were still part of cuparing/comm/ipc.py
    ("cuparing.comm.ipc", "_CapturedExchanges", "patch", "flag patch"),
    ("cuparing.comm.ipc", "_CapturedExchanges", "before_launch", "launch ordering"),
    ("cuparing.comm.ipc", "_CapturedExchanges", "advance", "after launch"),
    ("cuparing.comm.gpu_ring", "GpuRing", "watch", "watch"),
    ("cuparing.call_plans", None, "signature", "signature"),
    ("cuparing.backends.ring_graphs", "CapturedRingCall", "replay", "replay (all)"),
]


def wrap_pieces(spent: dict) -> None:
    """Wrap every piece this tree has so that its time adds up in ``spent[label]``."""
    import importlib

    for module_name, owner_name, name, label in PIECES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        owner = getattr(module, owner_name, None) if owner_name else module
        inner = getattr(owner, name, None)
        if inner is None:
            continue

        def wrapper(*args, _inner=inner, _label=label, **kwargs):
            start = time.perf_counter()
            try:
                return _inner(*args, **kwargs)
            finally:
                spent[_label] += time.perf_counter() - start

        setattr(owner, name, wrapper)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args(argv)

    import cuparing as cr

    spent: dict = defaultdict(float)
    wrap_pieces(spent)
    ring = cr.Ring.from_env()
    if ring.rank == 0:
        print(f"cuparing from {cr.__file__}; {type(ring).__name__}, {ring.size} GPUs")
    for tokens in (512, 2048):
        fns = ring_calls(ring, tokens)
        for name in ("forward_out", "backward"):
            fn = fns[name]
            for _ in range(20):
                fn()
            ring.barrier()
            spent.clear()
            median = host_us_alone(fn, args.calls, warmup=0)
            if ring.rank == 0:
                ranked = sorted(spent.items(), key=lambda item: -item[1])
                pieces = ", ".join(f"{label} {seconds / args.calls * 1e6:.1f}"
                                   for label, seconds in ranked)  # fmt: skip
                print(f"{tokens:5d} tokens/GPU {name:12s} median {median:6.1f} us; per call: "
                      f"{pieces}")
            ring.barrier()
    ring.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
