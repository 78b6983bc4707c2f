"""Packed documents through the ring: per-GPU throughput on visible work and parallel efficiency.

    python -m cuparing.launch --nproc-per-node N tools/bench_varlen.py [--tokens-per-gpu 8192]
        [--layouts zigzag,striped,contiguous,packed] [--backward] [--seed 0] [--short]
        [--inputs cupy|torch] [--json PATH]

The batch: document lengths drawn log-uniformly from 256 to 32k tokens (``--short``: 64 to 2048;
``--seed``, default 0) until they fill ``S = C * tokens_per_gpu`` tokens (the last one cut to
fit), packed into one causal sequence, bf16, B=1, H/Hkv 32/8, D=128; every rank draws the same
batch.

- visible FLOPs: ``4 * H * D * sum(L * (L + 1) / 2)`` over the documents (forward; backward
  2.5x), the work a document-by-document dense attention must do; per GPU: / C / ring time.
- ring time: median over repeats of one ``ring_attention`` (or ``ring_attention_backward``) call
  on the shards of ``cr.shard(..., cu_seqlens=cu)``, ranks aligned first; slowest rank.
- one-GPU time: the same kernels on the whole packed sequence on one GPU
  (``cr.attention(..., cu_seqlens=cu)``), timed on every rank's GPU at once; the median rank.
- parallel efficiency = one-GPU time / (C x ring time): 1.0 means C GPUs are C times as fast.
  ``par5``: the same for the forward with five calls queued back to back on each side (the
  host's per-call cost then hides behind the GPU's work, as a model's layers queue them).
- no-comm efficiency = no-comm time / ring time (tools/bench_ring.py): how much of the loss is
  communication rather than how the layout cuts the documents into kernel tiles.
- torch CP: PyTorch's ``context_parallel`` asked for the same batch (SDPA with the document mask,
  then ``flex_attention`` with a document block mask); what it says is printed when it cannot.
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
from bench_ring import NoCommRing, as_inputs, back_to_back_ms, gather, time_ms
from timing import checkout_commit

import cuparing as cr

HEADS, HEADS_KV, HEADDIM = 32, 8, 128
SHORTEST, LONGEST = 256, 32768


def packed_batch(seqlen: int, seed: int, shortest: int = SHORTEST, longest: int = LONGEST):
    """``cu_seqlens`` (int64) of ``seqlen`` tokens of documents with lengths log-uniform in
    [shortest, longest] (the last one cut to fit)."""
    rng = np.random.default_rng(seed)
    lengths: list[int] = []
    while sum(lengths) < seqlen:
        lengths.append(int(np.exp(rng.uniform(np.log(shortest), np.log(longest)))))
    lengths[-1] -= sum(lengths) - seqlen
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def visible_flops(cu: np.ndarray) -> float:
    lengths = np.diff(cu).astype(np.float64)
    return 4.0 * HEADS * HEADDIM * float(np.sum(lengths * (lengths + 1) / 2))


def global_inputs(seqlen: int, seed: int, heads: int = HEADS, heads_kv: int = HEADS_KV):
    """q, k, v, dout of the whole sequence: [1, seqlen, heads (k, v: heads_kv), HEADDIM] bf16
    CuPy arrays drawn from ``seed``."""
    import cupy

    rng = cupy.random.default_rng(seed)

    def rand(heads):
        x = rng.standard_normal((1, seqlen, heads, HEADDIM), dtype=cupy.float32)
        return x.astype(ml_dtypes.bfloat16)

    return rand(heads), rand(heads_kv), rand(heads_kv), rand(heads)


def bench_one_gpu(ring, inputs, cu, repeats, warmup, backward, kind="cupy"):
    """The whole packed sequence on this rank's GPU: (forward ms, backward ms, forward ms per
    call with five queued)."""
    q, k, v, dout = as_inputs(inputs, kind)
    opts = {"causal": True, "cu_seqlens": cu}
    out, lse = cr.attention(q, k, v, return_lse=True, **opts)
    fwd = time_ms(lambda: cr.attention(q, k, v, **opts), ring, repeats, warmup)
    fwd5 = back_to_back_ms(lambda: cr.attention(q, k, v, **opts), ring, repeats, warmup)
    bwd = float("nan")
    if backward:
        bwd = time_ms(lambda: cr.attention_backward(dout, q, k, v, out, lse, **opts), ring,
                      repeats, warmup)  # fmt: skip
    return fwd, bwd, fwd5


def bench_layout(ring, inputs, cu, layout, repeats, warmup, backward, kind="cupy"):
    """This rank's ring times for ``layout``: [fwd, fwd no-comm, bwd, bwd no-comm, fwd with
    five calls queued (per call)] ms."""
    shards = [cr.shard(x, ring.rank, ring.size, layout=layout, cu_seqlens=cu) for x in inputs]
    q, k, v, dout = as_inputs(shards, kind)
    opts = {"causal": True, "layout": layout, "cu_seqlens": cu}
    nocomm = NoCommRing(ring.rank, ring.size)
    out, lse = cr.ring_attention(q, k, v, ring, return_lse=True, **opts)

    def fwd(r):
        return lambda: cr.ring_attention(q, k, v, r, **opts)

    def bwd(r):
        return lambda: cr.ring_attention_backward(dout, q, k, v, out, lse, r, **opts)

    times = [time_ms(fwd(ring), ring, repeats, warmup), time_ms(fwd(nocomm), ring, repeats, warmup)]
    if backward:
        times += [time_ms(bwd(ring), ring, repeats, warmup),
                  time_ms(bwd(nocomm), ring, repeats, warmup)]  # fmt: skip
    else:
        times += [float("nan"), float("nan")]
    times.append(back_to_back_ms(fwd(ring), ring, repeats, warmup))
    return times


def torch_cp_verdict(ring, local_rank, cu) -> str:
    """What PyTorch's ``context_parallel`` does with this batch: the first error of SDPA with a
    document mask and of flex_attention with a document block mask, or that it ran."""
    try:
        import torch
        import torch.distributed as dist
        import torch.nn.functional as F
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.experimental import context_parallel
    except Exception as exc:  # noqa: BLE001 - any import failure: report and go on
        return f"unavailable: {type(exc).__name__}: {exc}"
    if not dist.is_initialized():
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    mesh = init_device_mesh("cuda", (ring.size,))
    seqlen = int(cu[-1])
    small = 64  # heads x dim kept small: the verdict, not a timing
    doc = torch.as_tensor(np.searchsorted(cu, np.arange(seqlen), side="right") - 1, device="cuda")
    verdicts = []

    def rand():
        return torch.randn(1, 2, seqlen, small, device="cuda", dtype=torch.bfloat16)

    try:
        q, k, v = rand(), rand(), rand()
        pos = torch.arange(seqlen, device="cuda")
        mask = (doc[:, None] == doc[None, :]) & (pos[None, :] <= pos[:, None])
        with context_parallel(mesh, buffers=[q, k, v], buffer_seq_dims=[2, 2, 2]):
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        verdicts.append("SDPA + document mask ran")
    except Exception as exc:  # noqa: BLE001 - the verdict is the error
        verdicts.append(f"SDPA + document mask: {type(exc).__name__}: {str(exc)[:160]}")
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def document_causal(b, h, qi, ki):
            return (doc[qi] == doc[ki]) & (ki <= qi)

        block_mask = create_block_mask(document_causal, None, None, seqlen, seqlen, device="cuda")
        q, k, v = rand(), rand(), rand()
        with context_parallel(mesh, buffers=[q, k, v], buffer_seq_dims=[2, 2, 2]):
            flex_attention(q, k, v, block_mask=block_mask)
        verdicts.append("flex_attention + document block mask ran")
    except Exception as exc:  # noqa: BLE001 - the verdict is the error
        verdicts.append(f"flex_attention + block mask: {type(exc).__name__}: {str(exc)[:160]}")
    torch.cuda.empty_cache()
    return "; ".join(verdicts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens-per-gpu", type=int, default=8192)
    parser.add_argument("--layouts", default="zigzag,striped,contiguous,packed")
    parser.add_argument("--backward", action="store_true", help="also time the backward")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--short", action="store_true",
                        help="documents of 64..2048 tokens instead of 256..32k")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-torch", action="store_true", help="skip PyTorch's verdict")
    parser.add_argument("--json", metavar="PATH", help="write rows and metadata (rank 0)")
    parser.add_argument("--inputs", choices=("cupy", "torch"), default="cupy",
                        help="what the calls take (torch: repeats run the kept plans)")
    args = parser.parse_args(argv)
    warmup = 3

    import cupy

    ring = cr.Ring.from_env(timeout=600)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    card = cupy.cuda.runtime.getDeviceProperties(ring.device.id)["name"]
    card = card.decode() if isinstance(card, bytes) else str(card)
    seqlen = args.tokens_per_gpu * ring.size
    cu = packed_batch(seqlen, args.seed, *((64, 2048) if args.short else ()))
    inputs = global_inputs(seqlen, args.seed)
    work = visible_flops(cu)

    one = bench_one_gpu(ring, inputs, cu, args.repeats, warmup, args.backward, args.inputs)
    one = gather(ring, list(one))
    one_fwd, one_bwd, one_fwd5 = (statistics.median(r[i] for r in one) for i in range(3))
    rows = []
    for layout in args.layouts.split(","):
        mine = bench_layout(ring, inputs, cu, layout, args.repeats, warmup, args.backward,
                            args.inputs)  # fmt: skip
        per_rank = gather(ring, mine)
        fwd, fwd_nc, bwd, bwd_nc, fwd5 = (max(r[i] for r in per_rank) for i in range(5))
        rows.append({
            "layout": layout, "fwd_ms": fwd, "fwd_tflops_per_gpu": work / ring.size / fwd / 1e9,
            "fwd_parallel_efficiency": one_fwd / (ring.size * fwd),
            "fwd_nocomm_efficiency": fwd_nc / fwd,
            "fwd_queued_ms": fwd5, "fwd_queued_parallel_efficiency": one_fwd5 / (ring.size * fwd5),
            "bwd_ms": bwd, "bwd_tflops_per_gpu": 2.5 * work / ring.size / bwd / 1e9,
            "bwd_parallel_efficiency": one_bwd / (ring.size * bwd),
            "bwd_nocomm_efficiency": bwd_nc / bwd,
            "shard_rows": int(len(cr.token_positions(seqlen, 0, ring.size, layout=layout,
                                                      cu_seqlens=cu))),
        })  # fmt: skip
    meta = {"card": card, "C": ring.size, "commit": checkout_commit(), "dtype": "bfloat16",
            "H": HEADS, "Hkv": HEADS_KV, "D": HEADDIM, "S": seqlen,
            "documents": np.diff(cu).tolist(), "one_gpu_fwd_ms": one_fwd,
            "one_gpu_bwd_ms": one_bwd, "one_gpu_fwd_queued_ms": one_fwd5,
            "one_gpu_fwd_tflops": work / one_fwd / 1e9,
            "one_gpu_bwd_tflops": 2.5 * work / one_bwd / 1e9,
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv), "repeats": args.repeats,
            "inputs": args.inputs, "transport": transport_name(ring),
            "gathers": gather_choice(ring.size, seqlen, cu)}  # fmt: skip
    if ring.rank == 0:  # our table first: PyTorch's attempt below may fail in any way
        print_table(meta, rows)
    meta["torch_cp"] = "skipped (--no-torch)"
    if not args.no_torch:
        meta["torch_cp"] = torch_cp_verdict(ring, local_rank, cu)
    ring.close()
    if ring.rank == 0:
        print(f"torch context_parallel: {meta['torch_cp']}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return 0


def transport_name(ring) -> str:
    """The ring's transport as the table names it (``Ring.from_env`` may have chosen it)."""
    name = {"NcclRing": "nccl", "IpcRing": "ipc"}.get(type(ring).__name__, type(ring).__name__)
    return name + (f" sync={ring.sync}" if hasattr(ring, "sync") else "")


def gather_choice(world: int, seqlen: int, cu) -> str:
    """Whether this batch's ring forward and backward gather K/V (``CUPARING_KV_GATHER`` as
    set, else the default), as a ring call decides it."""
    from cuparing import schedule

    switch = schedule.gather_switch()
    requested = schedule.gather_requested(switch)
    shard_bytes = 2 * (seqlen // world) * HEADS_KV * HEADDIM * 2  # (K and V, bfloat16)
    fwd, bwd = (schedule.gather_decided(requested, world, len(cu) > 2, shard_bytes, b)
                for b in (False, True))  # fmt: skip
    return (f"CUPARING_KV_GATHER={switch or 'unset'}: forward {'gathers' if fwd else 'rings'}, "
            f"backward {'gathers' if bwd else 'rings'}")


def print_table(meta, rows) -> None:
    print(f"{meta['card']} x {meta['C']}, bf16, causal packed documents, H/Hkv "
          f"{meta['H']}/{meta['Hkv']}, D={meta['D']}, S={meta['S']}, commit {meta['commit']}, "
          f"{meta['date']}, {meta.get('inputs', 'cupy')} inputs")  # fmt: skip
    if "transport" in meta:
        print(f"transport {meta['transport']}; {meta['gathers']}")
    print(f"documents: {meta['documents']}")
    print(f"one GPU, whole sequence: fwd {meta['one_gpu_fwd_ms']:.2f} ms "
          f"({meta['one_gpu_fwd_tflops']:.0f} TF/s), bwd {meta['one_gpu_bwd_ms']:.2f} ms "
          f"({meta['one_gpu_bwd_tflops']:.0f} TF/s)")  # fmt: skip
    print("TFLOP/s per GPU on visible work; par = 1-GPU time / (C x ring time); "
          "nc = no-comm / ring time; par5 = par with five calls queued")
    header = (f"{'layout':<11}{'rows':>6}  {'fwd ms':>8}{'TF/s':>6}{'par':>6}{'nc':>6}"
              f"{'par5':>6}  {'bwd ms':>8}{'TF/s':>6}{'par':>6}{'nc':>6}")  # fmt: skip
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['layout']:<11}{r['shard_rows']:>6}  {r['fwd_ms']:>8.2f}"
              f"{r['fwd_tflops_per_gpu']:>6.0f}{r['fwd_parallel_efficiency']:>6.2f}"
              f"{r['fwd_nocomm_efficiency']:>6.2f}"
              f"{r['fwd_queued_parallel_efficiency']:>6.2f}  {r['bwd_ms']:>8.2f}"
              f"{r['bwd_tflops_per_gpu']:>6.0f}{r['bwd_parallel_efficiency']:>6.2f}"
              f"{r['bwd_nocomm_efficiency']:>6.2f}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
