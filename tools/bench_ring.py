"""Ring attention throughput per GPU, ring efficiency, hidden transfer, and PyTorch's own ring.

    python -m cuparing.launch --nproc-per-node N tools/bench_ring.py [--quick] [--json PATH]
        [--transport nccl|ipc] [--rounds R]

Definitions (S = global sequence length, C = ranks, B = batch):

- FLOPs per rank: forward ``4 * B * H * S^2 * D / C``, halved for causal; backward 2.5x that.
- ring time: median over repeats (after warm-up, ranks aligned by a barrier) of one
  ``ring_attention`` (forward) or ``ring_attention_backward`` call, timed with CUDA events on the
  calling stream; the table takes the slowest rank, which is when the step is done.
- no-comm time: the same call on a :class:`NoCommRing`, which has this rank's rank and size but
  hands K/V straight back: exactly this rank's non-empty blocks (same plan, kernels and merges)
  run back to back on one GPU, with no communication. Slowest rank again.
- ring efficiency = no-comm time / ring time (1.0 = transfers fully hidden and free); kernel
  efficiency (keff) = the no-comm call's time when five are queued back to back (the host then
  queues ahead of the GPU: the kernels' time alone, the work's rate on one GPU) / ring time;
  keff5: the same over the ring call's time when five ring calls are queued back to back (as
  the layers of a model call it: the host's cost hides behind the previous call's kernels).
- hidden transfer: fraction of the traced transfer time (comm-stream events around each NCCL
  group) that overlapped compute windows on the calling stream, from one extra traced forward
  (``hidden``) and, with ``--backward``, one traced backward (``hid bwd``: its dK / dV
  transfers too).
- transport: ``nccl`` (NCCL send/recv, SM-driven) or ``ipc`` (copy-engine pushes between the GPUs
  of one host, :class:`cuparing.comm.ipc.IpcRing`); default ``CUPARING_TRANSPORT``, else
  ``Ring.from_env``'s (``ipc`` on GPUs of one host with cuda-bindings, else nccl).
- torch CP: ``torch.distributed.tensor.experimental.context_parallel`` with SDPA pinned to its
  cuDNN backend (PyTorch's fastest on Hopper) on the same global shapes and card, in the same
  process; skipped with the reason if absent or if cuDNN refuses the shape.
- training step (``--backward``): forward + backward. Ours: the medians of the forward and the
  backward call added; PyTorch's: the median of one ``scaled_dot_product_attention`` and its
  ``backward`` inside ``context_parallel``, timed together. FLOPs 3.5x the forward's.

Rank 0 prints the table; ``--json PATH`` writes the rows and the run's metadata.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys

import ml_dtypes
import numpy as np

import cuparing as cr
from cuparing.comm.base import ReadyExchange, Ring

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import checkout_commit  # noqa: E402

SHAPES = [(32, 8, 128), (32, 32, 128)]  # (H, Hkv, D)
TOKENS_PER_GPU = [8192, 32768]
MASKS = [("full", "contiguous", False), ("causal", "zigzag", True), ("causal", "striped", True)]


class NoCommRing(Ring):
    """Rank ``rank`` of a ring of ``size`` whose exchanges move nothing (for the no-comm time)."""

    def __init__(self, rank: int, size: int):
        self.rank, self.size, self.timeout = rank, size, float("inf")

    def exchange(self, arrays, shift=1, tag="kv"):
        return ReadyExchange(arrays)

    def agree(self, fields):
        """Nothing moves, so nothing can mismatch (the real ring checks the same calls)."""


def flops(batch, heads, seqlen, headdim, world, causal) -> float:
    total = 4.0 * batch * heads * seqlen * seqlen * headdim / world
    return total / 2 if causal else total


def time_ms(fn, ring, repeats: int, warmup: int) -> float:
    """Median milliseconds of ``fn()`` on the current stream, ranks aligned before each run."""
    import cupy

    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        ring.barrier()
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(cupy.cuda.get_elapsed_time(start, end))
    ring.synchronize()
    return statistics.median(samples)


def back_to_back_ms(fn, ring, repeats: int, warmup: int, calls: int = 5) -> float:
    """Median milliseconds per call of ``calls`` calls of ``fn()`` queued back to back: while
    the GPU works through one call the host queues the next, so where the host is quicker than
    the kernels this is the kernels' time alone (the work's rate on one GPU)."""
    return time_ms(lambda: [fn() for _ in range(calls)], ring, repeats, warmup) / calls


def gather(ring, values: list[float]) -> list[list[float]]:
    """Every rank's ``values`` on every rank (C-1 ring exchanges at growing distance)."""
    import cupy

    mine = cupy.asarray(values, dtype=cupy.float64)
    rows = [None] * ring.size
    rows[ring.rank] = values
    for shift in range(1, ring.size):
        got = ring.exchange([mine], shift, tag=f"bench-gather-{shift}").wait()[0]
        rows[(ring.rank - shift) % ring.size] = cupy.asnumpy(got).tolist()
    return rows


def as_inputs(arrays, kind: str) -> list:
    """``arrays`` (CuPy bf16) as the calls take them: CuPy, or torch CUDA tensors over the same
    memory (``torch``: repeats then run the plans kept by the first call, CUDA graphs on rings
    that can be captured)."""
    if kind == "cupy":
        return list(arrays)
    import cupy
    import torch

    return [torch.from_dlpack(x.view(cupy.uint16)).view(torch.bfloat16) for x in arrays]


def bench_ours(ring, cfg, repeats, warmup, backward, inputs="cupy"):
    import cupy

    heads, heads_kv, headdim, tokens, layout, causal = cfg
    shape_q, shape_kv = (1, tokens, heads, headdim), (1, tokens, heads_kv, headdim)

    def rand(shape):
        x = cupy.random.standard_normal(shape, dtype=cupy.float32).astype(ml_dtypes.bfloat16)
        return as_inputs([x], inputs)[0]

    q, k, v, dout = rand(shape_q), rand(shape_kv), rand(shape_kv), rand(shape_q)
    nocomm = NoCommRing(ring.rank, ring.size)
    out, lse = cr.ring_attention(q, k, v, ring, causal=causal, layout=layout, return_lse=True)

    def fwd(r):
        return lambda: cr.ring_attention(q, k, v, r, causal=causal, layout=layout)

    def bwd(r):
        return lambda: cr.ring_attention_backward(dout, q, k, v, out, lse, r, causal=causal,
                                                  layout=layout)  # fmt: skip

    result = {
        "fwd_ms": time_ms(fwd(ring), ring, repeats, warmup),
        "fwd_nocomm_ms": time_ms(fwd(nocomm), ring, repeats, warmup),
        "fwd_kernels_ms": back_to_back_ms(fwd(nocomm), ring, repeats, warmup),
        "fwd_queued_ms": back_to_back_ms(fwd(ring), ring, repeats, warmup),
        "bwd_ms": time_ms(bwd(ring), ring, repeats, warmup) if backward else float("nan"),
        "bwd_nocomm_ms": time_ms(bwd(nocomm), ring, repeats, warmup) if backward else float("nan"),
    }
    result["hidden"] = traced_hidden(ring, fwd(ring))
    result["hidden_bwd"] = traced_hidden(ring, bwd(ring)) if backward else float("nan")
    return result


def traced_hidden(ring, call) -> float:
    """The fraction of one traced ``call``'s transfer time that overlapped its compute on the
    calling stream (NaN on a ring of one, which moves nothing)."""
    if ring.size == 1:
        return float("nan")
    ring.barrier()
    ring.start_trace()
    call()
    hidden = ring.hidden_transfer_fraction()
    ring.stop_trace()
    return hidden


def bench_torch_cp(ring, local_rank, cfg, repeats, warmup, backward=False):
    """PyTorch's context-parallel ring on the same global shapes.

    Returns:
        ((forward ms, forward + backward ms or NaN), None or why the backward could not run), or
        (None, the reason it could not run at all).
    """
    try:
        import torch
        import torch.distributed as dist
        import torch.nn.functional as F
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.experimental import context_parallel
    except Exception as exc:  # noqa: BLE001 - any import failure: report and go on
        return None, f"torch context_parallel unavailable: {type(exc).__name__}: {exc}"

    def median_ms(fn):
        samples = []
        for _ in range(repeats):
            dist.barrier()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        return statistics.median(samples)

    heads, heads_kv, headdim, tokens, _, causal = cfg
    backward_note = None
    try:
        if not dist.is_initialized():
            torch.cuda.set_device(local_rank)
            dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
        try:  # ring-style rotation, as ours (recent torch defaults to all-gather)
            from torch.distributed.tensor.experimental._attention import set_rotate_method

            set_rotate_method("alltoall")
        except Exception:  # noqa: BLE001 - older torch: its only method is the ring
            pass
        try:  # its load balancing (a zigzag layout) exists for causal masks only
            from torch.distributed.tensor.experimental._attention import _cp_options

            _cp_options.enable_load_balance = bool(causal)
        except Exception:  # noqa: BLE001 - older torch: no such option
            pass
        mesh = init_device_mesh("cuda", (ring.size,))
        seqlen = tokens * ring.size
        gen = torch.Generator(device="cuda").manual_seed(0)

        def rand(h):
            return torch.randn(1, h, seqlen, headdim, device="cuda", dtype=torch.bfloat16,
                               generator=gen)  # fmt: skip

        q, k, v = rand(heads), rand(heads_kv), rand(heads_kv)
        gqa = {"enable_gqa": True} if heads != heads_kv else {}
        from torch.nn.attention import SDPBackend, sdpa_kernel

        # its fastest backend on Hopper: cuDNN's attention
        with (
            sdpa_kernel([SDPBackend.CUDNN_ATTENTION]),
            context_parallel(mesh, buffers=[q, k, v], buffer_seq_dims=[2, 2, 2]),
        ):
            def forward():
                with torch.no_grad():
                    F.scaled_dot_product_attention(q, k, v, is_causal=causal, **gqa)

            # inside the context q, k, v hold this rank's shards: leaves that need gradients are
            # made from them, as a model's projections would be
            leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
            dout = torch.randn_like(q)

            def step():  # (autograd.grad: no .grad accumulation timed along)
                out = F.scaled_dot_product_attention(*leaves, is_causal=causal, **gqa)
                torch.autograd.grad(out, leaves, dout)

            for _ in range(warmup):
                forward()
            fwd_ms = median_ms(forward)
            step_ms = float("nan")
            if backward:
                try:  # a refused backward keeps the forward's timing
                    for _ in range(warmup):
                        step()
                    step_ms = median_ms(step)
                except Exception as exc:  # noqa: BLE001 - reported beside the forward's
                    backward_note = f"backward failed: {type(exc).__name__}: {str(exc)[:160]}"
        q = k = v = dout = None  # free the memory before the next row's rings
        leaves.clear()
        torch.cuda.empty_cache()
        return (fwd_ms, step_ms), backward_note
    except Exception as exc:  # noqa: BLE001 - report why the peer could not run
        return None, f"torch context_parallel failed: {type(exc).__name__}: {str(exc)[:200]}"


def configs(quick: bool, only_heads: str | None = None, tokens: str | None = None):
    """The benchmark's (mask, config) rows; ``only_heads`` ("32/32,32/8") and ``tokens`` ("8192")
    pick rows of :data:`SHAPES` and :data:`TOKENS_PER_GPU`, overriding ``quick``."""
    shapes = SHAPES[:1] if quick else SHAPES
    if only_heads:
        wanted = {tuple(int(x) for x in item.split("/")) for item in only_heads.split(",")}
        shapes = [s for s in SHAPES if s[:2] in wanted]
    tokens = [int(t) for t in tokens.split(",")] if tokens else (
        TOKENS_PER_GPU[:1] if quick else TOKENS_PER_GPU)  # fmt: skip
    for heads, heads_kv, headdim in shapes:
        for t in tokens:
            for mode, layout, causal in MASKS:
                yield mode, (heads, heads_kv, headdim, t, layout, causal)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one shape, 8k tokens per GPU")
    parser.add_argument("--json", metavar="PATH", help="write rows and metadata (rank 0)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--no-torch", action="store_true", help="skip PyTorch's ring")
    parser.add_argument("--backward", action="store_true", help="also time the backward ring")
    parser.add_argument("--heads", help="only these H/Hkv shapes, e.g. 32/32 (comma list)")
    parser.add_argument("--tokens", help="tokens per GPU, e.g. 8192 (comma list)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="alternate ours and PyTorch's ring R times per row (medians)")
    parser.add_argument("--inputs", choices=["cupy", "torch"], default="cupy",
                        help="what our ring is called with (torch: repeats run kept plans)")
    parser.add_argument("--transport", choices=["nccl", "ipc"], default=None,
                        help="how K/V move (default: CUPARING_TRANSPORT, else auto)")  # fmt: skip
    args = parser.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 10)
    warmup = 1 if args.quick else 3

    import cupy

    ring = cr.Ring.from_env(timeout=600, transport=args.transport)
    transport = "ipc" if type(ring).__name__ == "IpcRing" else "nccl"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    card = cupy.cuda.runtime.getDeviceProperties(ring.device.id)["name"]
    card = card.decode() if isinstance(card, bytes) else str(card)
    rows = []
    for mode, cfg in configs(args.quick, args.heads, args.tokens):
        heads, heads_kv, headdim, tokens, layout, causal = cfg
        # rounds alternate the two rings, so drifts of the card's clock between them show up
        # in both (the medians over rounds are what the table reports)
        rounds, peer_ms, why = [], [], "skipped (--no-torch)"
        for _ in range(max(args.rounds, 1)):
            rounds.append(bench_ours(ring, cfg, repeats, warmup, args.backward, args.inputs))
            if not args.no_torch:
                ms, why = bench_torch_cp(ring, local_rank, cfg, repeats, warmup, args.backward)
                if ms is not None:
                    peer_ms.append(ms)
        ours = {key: float(np.nanmedian([r[key] for r in rounds])) if any(
            r[key] == r[key] for r in rounds) else float("nan") for key in rounds[0]}
        torch_ms = [float(np.median([m[i] for m in peer_ms])) if peer_ms else float("nan")
                    for i in range(2)]  # fmt: skip
        keys = ["fwd_ms", "fwd_nocomm_ms", "bwd_ms", "bwd_nocomm_ms", "hidden", "fwd_kernels_ms",
                "fwd_queued_ms", "hidden_bwd"]
        values = [ours[k] for k in keys] + torch_ms
        per_rank = gather(ring, values)
        slowest = [max(r[i] for r in per_rank) for i in range(len(values))]
        fwd_ms, fwd_nc, bwd_ms, bwd_nc, _, fwd_kernels, fwd_queued, _, torch_slow, torch_step = (
            slowest
        )
        hidden = statistics.fmean(r[4] for r in per_rank)
        hidden_bwd = statistics.fmean(r[7] for r in per_rank)
        seqlen = tokens * ring.size
        fwd_flops = flops(1, heads, seqlen, headdim, ring.size, causal)
        rows.append({
            "mask": mode, "layout": layout, "H": heads, "Hkv": heads_kv, "D": headdim,
            "tokens_per_gpu": tokens, "S": seqlen, "C": ring.size,
            "fwd_ms": fwd_ms, "fwd_tflops_per_gpu": fwd_flops / fwd_ms / 1e9,
            "fwd_efficiency": fwd_nc / fwd_ms,
            "fwd_kernels_ms": fwd_kernels, "fwd_kernel_efficiency": fwd_kernels / fwd_ms,
            "fwd_queued_ms": fwd_queued, "fwd_queued_kernel_efficiency": fwd_kernels / fwd_queued,
            "bwd_ms": bwd_ms, "bwd_tflops_per_gpu": 2.5 * fwd_flops / bwd_ms / 1e9,
            "bwd_efficiency": bwd_nc / bwd_ms, "hidden_transfer": hidden,
            "hidden_transfer_bwd": hidden_bwd,
            "torch_cp_fwd_ms": torch_slow,
            "torch_cp_fwd_tflops_per_gpu": fwd_flops / torch_slow / 1e9,
            "step_ms": fwd_ms + bwd_ms,
            "step_tflops_per_gpu": 3.5 * fwd_flops / (fwd_ms + bwd_ms) / 1e9,
            "torch_cp_step_ms": torch_step,
            "torch_cp_step_tflops_per_gpu": 3.5 * fwd_flops / torch_step / 1e9,
            "torch_cp_note": why,
        })  # fmt: skip
    ring.close()
    if ring.rank == 0:
        meta = {"card": card, "C": ring.size, "commit": checkout_commit(), "dtype": "bfloat16",
                "B": 1,
                "date": datetime.datetime.now().isoformat(timespec="seconds"),
                "command": " ".join(sys.argv), "repeats": repeats, "rounds": args.rounds,
                "transport": transport, "inputs": args.inputs}  # fmt: skip
        print_table(meta, rows)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return 0


def print_table(meta, rows) -> None:
    print(f"{meta['card']} x {meta['C']}, bf16, B=1, transport {meta.get('transport', 'nccl')}, "
          f"commit {meta['commit']}, {meta['date']}")  # fmt: skip
    print("TFLOP/s per GPU (FLOPs 4*B*H*S^2*D/C, /2 causal; bwd 2.5x); eff = no-comm / ring time;"
          " keff = the no-comm calls back to back (the kernels' time) / ring time; keff5 = the"
          " same / ring time with five ring calls queued back to back")
    header = (f"{'mask':<7}{'layout':<11}{'H/Hkv':>6}{'D':>5}{'tok/GPU':>8}  "
              f"{'fwd ms':>8}{'TF/s':>7}{'eff':>6}{'keff':>6}{'keff5':>6}"
              f"  {'bwd ms':>8}{'TF/s':>7}{'eff':>6}{'hidden':>8}{'hid bwd':>8}"
              f"  {'torchCP ms':>10}{'TF/s':>7}{'ours/CP':>8}")  # fmt: skip
    print(header)
    print("-" * len(header))
    notes = set()
    steps = [r for r in rows if r["step_ms"] == r["step_ms"]]
    for r in rows:
        ratio = r["torch_cp_fwd_ms"] / r["fwd_ms"]
        print(f"{r['mask']:<7}{r['layout']:<11}{r['H']:>3}/{r['Hkv']:<2}{r['D']:>5}"
              f"{r['tokens_per_gpu']:>8}  {r['fwd_ms']:>8.2f}{r['fwd_tflops_per_gpu']:>7.0f}"
              f"{r['fwd_efficiency']:>6.2f}{r['fwd_kernel_efficiency']:>6.2f}"
              f"{r['fwd_queued_kernel_efficiency']:>6.2f}  "
              f"{r['bwd_ms']:>8.2f}{r['bwd_tflops_per_gpu']:>7.0f}"
              f"{r['bwd_efficiency']:>6.2f}{r['hidden_transfer']:>8.2f}"
              f"{r['hidden_transfer_bwd']:>8.2f}  "
              f"{r['torch_cp_fwd_ms']:>10.2f}{r['torch_cp_fwd_tflops_per_gpu']:>7.0f}"
              f"{ratio:>8.2f}")  # fmt: skip
        if r["torch_cp_note"]:
            notes.add(r["torch_cp_note"])
    if steps:  # the training step: forward + backward, ours and PyTorch's
        print("\ntraining step (fwd + bwd), TFLOP/s per GPU with FLOPs 3.5x the forward's")
        head = (f"{'mask':<7}{'layout':<11}{'H/Hkv':>6}{'tok/GPU':>8}  {'ours ms':>8}{'TF/s':>7}"
                f"  {'torchCP ms':>10}{'TF/s':>7}{'ours/CP':>8}")  # fmt: skip
        print(head)
        print("-" * len(head))
        for r in steps:
            print(f"{r['mask']:<7}{r['layout']:<11}{r['H']:>3}/{r['Hkv']:<2}"
                  f"{r['tokens_per_gpu']:>8}  {r['step_ms']:>8.2f}{r['step_tflops_per_gpu']:>7.0f}"
                  f"  {r['torch_cp_step_ms']:>10.2f}{r['torch_cp_step_tflops_per_gpu']:>7.0f}"
                  f"{r['torch_cp_step_ms'] / r['step_ms']:>8.2f}")  # fmt: skip
    for note in sorted(notes):
        print(f"note: {note}")


if __name__ == "__main__":
    sys.exit(main())
