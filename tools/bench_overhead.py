"""Host cost per call: ``cr.attention`` (with and without caller-owned outputs, and replayed as
a CUDA graph) beside PyTorch SDPA (flash) in the same process, and ``cr.attention_backward``
into caller-owned gradients beside SDPA flash's backward (``torch.autograd.grad`` from its
output); ``ring_attention`` (forward, and backward) when launched on several
GPUs.

Host microseconds per call are ``time.perf_counter`` over ``--calls`` calls after warm-up, one
synchronisation at the end (tools/timing.py ``host_us``); the sizes are small enough that the GPU
keeps up, so the figure is what the caller pays per call. torch bf16 CUDA tensors, causal. The
ring rows add each call timed alone (``host_us_alone``: the median call after a
synchronisation), the caller's cost where a ring's exchanges make the GPU the slower side.

Usage:
    python tools/bench_overhead.py [--calls N] [--json PATH]
    python -m cuparing.launch --nproc-per-node 2 tools/bench_overhead.py   # adds the ring rows

The ring rows run on the transport ``CUPARING_TRANSPORT`` names (``nccl``, ``ipc``; unset:
``Ring.from_env``'s default, the copy engines on GPUs of one host with cuda-bindings;
``CUPARING_IPC_FLAGS=0`` puts the IPC ring on its host handshake instead of device flags).
``--profile DIR`` also writes a cProfile of each ring call, per rank, under DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import host_us, host_us_alone  # noqa: E402

SIZES = [(1, 128, 8, 64), (1, 1024, 16, 128), (2, 2048, 32, 128)]  # (B, S, H, D), Hkv = H / 4


def single_device_rows(calls: int) -> list[dict]:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import cuparing as cr

    rows = []
    for b, s, h, d in SIZES:
        gen = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, generator=gen)
        k, v = (torch.randn(b, s, h // 4, d, device="cuda", dtype=torch.bfloat16, generator=gen)
                for _ in range(2))  # fmt: skip
        out, lse = torch.empty_like(q), torch.empty(b, h, s, device="cuda")
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))

        def ours(q=q, k=k, v=v):
            cr.attention(q, k, v, causal=True)

        def ours_out(q=q, k=k, v=v, out=out, lse=lse):
            cr.attention(q, k, v, causal=True, out=out, lse=lse)

        def sdpa(qt=qt, kt=kt, vt=vt):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)

        dout = torch.randn_like(q)
        grads = [torch.empty_like(x) for x in (q, k, v)]
        fwd_out, fwd_lse = cr.attention(q, k, v, causal=True, return_lse=True)

        def backward(dout=dout, q=q, k=k, v=v, out=fwd_out, lse=fwd_lse, grads=grads):
            dq, dk, dv = grads
            cr.attention_backward(dout, q, k, v, out, lse, causal=True, dq=dq, dk=dk, dv=dv)

        # SDPA flash's backward as a training step reaches it: autograd from its output (the
        # graph kept for repeats); GQA through enable_gqa as in the forward above
        qg, kg, vg = (x.detach().requires_grad_() for x in (qt, kt, vt))
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            sdpa_out = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True, enable_gqa=True)
        sdpa_dout = dout.transpose(1, 2)

        def sdpa_backward(out=sdpa_out, inputs=(qg, kg, vg), dout=sdpa_dout):
            torch.autograd.grad(out, inputs, dout, retain_graph=True)

        ours_out()  # compile, cache positions and tensor maps before capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            ours_out()

        row = {"B": b, "S": s, "H": h, "Hkv": h // 4, "D": d}
        for name, fn in (("ours", ours), ("ours_out", ours_out), ("graph", graph.replay),
                         ("sdpa_flash", sdpa), ("backward", backward),
                         ("sdpa_backward", sdpa_backward)):  # fmt: skip
            row[f"{name}_us"] = host_us(fn, calls)
        rows.append(row)
    return rows


def ring_rows(calls: int, profile_dir: str | None = None) -> list[dict]:
    from profile_host import profile
    from ring_calls import SHAPE, ring_calls

    import cuparing as cr

    ring = cr.Ring.from_env()
    rows = []
    for tokens in (512, 2048):
        b, h, hkv, d = SHAPE
        fns = ring_calls(ring, tokens)
        row = {"ranks": ring.size, "tokens_per_gpu": tokens, "H": h, "Hkv": hkv, "D": d,
               "transport": type(ring).__name__, "sync": getattr(ring, "sync", None)}  # fmt: skip
        for name, call in (("ours", "forward"), ("ours_out", "forward_out"),
                           ("backward", "backward")):  # fmt: skip
            fn = fns[call]
            ring.barrier()
            row[f"{name}_us"] = host_us(fn, calls)
            ring.barrier()
            row[f"{name}_alone_us"] = host_us_alone(fn, calls)
            if profile_dir:
                ring.barrier()
                label = f"{row['transport']} {name} {tokens} rank{ring.rank}"
                profile(fn, label, calls, profile_dir, echo=False)
        rows.append(row)
    ring.close()  # (its captured graphs first, then the communicator: not left to exit)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--json", help="write the rows as JSON (rank 0)")
    parser.add_argument("--profile", help="directory for cProfile listings of the ring calls")
    parser.add_argument("--ring-only", action="store_true", help="skip the single-device rows")
    args = parser.parse_args(argv)

    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    card = torch.cuda.get_device_name()
    result = {"card": card, "torch": torch.__version__}
    if rank == 0 and not args.ring_only:
        result["single"] = single_device_rows(args.calls)
        print(f"card: {card}; torch {torch.__version__}; bf16, causal, Hkv = H/4; host us per call")
        print(f"{'B':>2} {'S':>6} {'H':>3} {'D':>4} {'ours':>8} {'out=':>8} {'graph':>8} "
              f"{'sdpa':>8} {'ours/sdpa':>9} {'backward':>9} {'sdpa bwd':>9}")  # fmt: skip
        for r in result["single"]:
            print(f"{r['B']:>2} {r['S']:>6} {r['H']:>3} {r['D']:>4} {r['ours_us']:>8.1f} "
                  f"{r['ours_out_us']:>8.1f} {r['graph_us']:>8.1f} {r['sdpa_flash_us']:>8.1f} "
                  f"{r['ours_us'] / r['sdpa_flash_us']:>9.1f} "
                  f"{r['backward_us']:>9.1f} {r['sdpa_backward_us']:>9.1f}")  # fmt: skip
    if world > 1:
        result["ring"] = ring_rows(args.calls, args.profile)
        if rank == 0:
            first = result["ring"][0]
            transport = first["transport"] + (f", sync={first['sync']}" if first["sync"] else "")
            print(f"ring ({transport}), {world} GPUs, causal zigzag, H/Hkv 32/8, D=128: host us "
                  "per call, queued / alone")  # fmt: skip
            for r in result["ring"]:
                print(f"  {r['tokens_per_gpu']:>6} tokens/GPU: {r['ours_us']:7.1f} / "
                      f"{r['ours_alone_us']:7.1f} (out=: {r['ours_out_us']:7.1f} / "
                      f"{r['ours_out_alone_us']:7.1f}, backward: {r['backward_us']:7.1f} / "
                      f"{r['backward_alone_us']:7.1f})")  # fmt: skip
    if args.json and rank == 0:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
