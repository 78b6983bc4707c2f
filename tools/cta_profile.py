"""Where a Hopper kernel's time goes around its main loop: each CTA's prologue and epilogue, the
gaps between CTAs on one SM, and the idle SMs of the last wave.

    python tools/cta_profile.py [--seqlen 8192] [--heads 32] [--headdim 128] [--backward]
        [--ring RANKS [--documents]]

Compiles the sm90 kernels with ``CUPARING_CTA_PROFILE`` (common/cta_profile.cuh: per CTA its
SM, its start and end, its consumers' first tile and last product on ``%globaltimer``; nothing
of it exists in the library's own build) and runs one forward (``--backward``: one
``ring_attention_backward`` on a ring of one) on one GPU, bf16, B=1, Hkv = H, full and causal.
``--ring RANKS``: instead, rank 0's forward of a causal zigzag ring of that many simulated ranks
whose exchanges hand K/V back (bench_ring.NoCommRing), ``--seqlen`` tokens per rank of
bench_varlen's inputs (H/Hkv 32/8, D=128; ``--documents``: its packed batch); the profile then
shows the call's last ring step (each launch overwrites the one before), whose epilogue merges
into the running result.
Per case it prints the kernel's span (first CTA start to last CTA end), the CTAs' mean time and
its parts: prologue (start to the consumers' first tile: barriers, the first loads), main loop,
epilogue (last product to the end: the output's normalisation and stores, the backward's dK / dV
adds); the mean gap between one CTA's end and the next CTA's start on the same SM; and the tail,
the share of the span's SM-time that SMs spend idle after their last CTA (beside the CTA count
in waves of one CTA per SM, whose fraction is what a last wave leaves idle when CTAs are equal).

The module's profile arrays are read with :func:`read_profile`, which tools/turn_profile.py
shares.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROFILE_DEFINE = "-DCUPARING_CTA_PROFILE"
ARRAYS = {"cuparing_cta_start_ns": "uint64", "cuparing_cta_first_ns": "uint64",
          "cuparing_cta_last_ns": "uint64", "cuparing_cta_end_ns": "uint64",
          "cuparing_cta_sm": "uint32"}  # fmt: skip
SLOTS = 1 << 16  # kCtaProfileSlots


def enable_profile() -> None:
    """Compile the sm90 modules with the profile from here on: call before the process compiles
    any (loader's in-process module cache does not key on options; CuPy's disk cache does)."""
    from cuparing.kernels import loader

    if PROFILE_DEFINE not in loader.SM90_OPTIONS:
        loader.SM90_OPTIONS = (*loader.SM90_OPTIONS, PROFILE_DEFINE)


def read_profile(module, run, ctas: int, extra: dict | None = None) -> dict:
    """The profile arrays of ``module`` (and ``extra``: name -> dtype), zeroed, after one call of
    ``run``, as NumPy arrays of the first ``ctas`` slots.

    Raises:
        SystemExit: more CTAs than the profile has slots.
    """
    import cupy

    if ctas > SLOTS:
        raise SystemExit(f"{ctas} CTAs: the profile holds {SLOTS} (a smaller --seqlen)")
    names = {**ARRAYS, **(extra or {})}
    arrays = {n: cupy.ndarray((SLOTS,), dtype=t, memptr=module.get_global(n))
              for n, t in names.items()}  # fmt: skip
    cupy.cuda.runtime.deviceSynchronize()
    for array in arrays.values():
        array.fill(0)
    cupy.cuda.runtime.deviceSynchronize()
    run()
    cupy.cuda.runtime.deviceSynchronize()
    return {n: cupy.asnumpy(a)[:ctas] for n, a in arrays.items()}


def summarize(got: dict, sms: int) -> dict:
    """Span (ms), mean CTA / prologue / main / epilogue / same-SM gap (µs) and the tail (% of the
    span's SM-time idle after each SM's last CTA) of the CTAs that ran."""
    import numpy as np

    start = got["cuparing_cta_start_ns"].astype(np.float64)
    end = got["cuparing_cta_end_ns"].astype(np.float64)
    ran = end > 0  # (a CTA with nothing to do ends before recording)
    if not ran.any():
        raise SystemExit("no CTA recorded: the call ran another kernel than the one read")
    first = got["cuparing_cta_first_ns"].astype(np.float64)
    last = got["cuparing_cta_last_ns"].astype(np.float64)
    # (a CTA with no tile keeps an earlier launch's marks, from before its start)
    worked = ran & (first >= start) & (last >= first)
    t0, t1 = start[ran].min(), end[ran].max()
    sm = got["cuparing_cta_sm"]
    used = np.unique(sm[ran])
    idle = (sms - len(used)) * (t1 - t0)  # SMs that ran no CTA idle the whole span
    gaps = []
    for s in used:
        on = np.nonzero(ran & (sm == s))[0]
        order = on[np.argsort(start[on])]
        gaps.extend(np.maximum(start[order[1:]] - end[order[:-1]], 0.0))
        idle += t1 - end[order].max()
    if not worked.any():
        raise SystemExit("no CTA of the last launch began a tile")
    return {
        "span_ms": (t1 - t0) / 1e6,
        "cta_us": float(np.mean(end[ran] - start[ran])) / 1e3,
        "prologue_us": float(np.mean(first[worked] - start[worked])) / 1e3,
        "main_us": float(np.mean(last[worked] - first[worked])) / 1e3,
        "epilogue_us": float(np.mean(end[worked] - last[worked])) / 1e3,
        "gap_us": float(np.mean(gaps)) / 1e3 if gaps else 0.0,
        "tail_pct": 100 * idle / (sms * (t1 - t0)),
        "ctas": int(ran.sum()),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seqlen", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--headdim", type=int, default=128)
    parser.add_argument("--backward", action="store_true")
    parser.add_argument("--ring", type=int, default=0, metavar="RANKS",
                        help="rank 0's last step of a simulated causal zigzag ring")
    parser.add_argument("--documents", action="store_true", help="with --ring: packed documents")
    args = parser.parse_args(argv)
    if args.ring and args.backward:
        parser.error("--ring profiles the forward")

    import cupy
    import torch

    import cuparing as cr
    from cuparing.comm.local import SoloRing
    from cuparing.kernels import loader, tensor_maps

    enable_profile()
    b, s, h, d = 1, args.seqlen, args.heads, args.headdim
    arch = loader.device_arch()
    tma = tensor_maps.available()  # which forward producer the calls run (bench inputs align)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, generator=gen)
                     for _ in range(4))  # fmt: skip
    props = cupy.cuda.runtime.getDeviceProperties(0)
    sms = props["multiProcessorCount"]
    kind = "backward" if args.backward else "forward"
    if args.ring:
        kind = (f"rank 0's last ring step of {args.ring}, zigzag, {s} tokens per rank, "
                f"H/Hkv 32/8 D=128 (bench_varlen's inputs)")
        kind += ", packed documents" if args.documents else ""
    else:
        kind += f", B={b} S={s} H={h} D={d}"
    print(f"card: {props['name'].decode()}, {sms} SMs; {kind}, bf16")
    print(f"{'causal':>6} {'span ms':>8} {'CTA us':>7} {'prolog':>7} {'main':>7} {'epilog':>7} "
          f"{'gap us':>7} {'tail %':>7} {'CTAs':>6} {'waves':>6}")
    for causal in (True,) if args.ring else (False, True):
        if args.ring:
            from bench_ring import NoCommRing
            from bench_varlen import global_inputs, packed_batch

            world = args.ring
            cu = packed_batch(s * world, 0) if args.documents else None
            docs = {"cu_seqlens": cu} if cu is not None else {}
            whole = global_inputs(s * world, 0)[:3]
            shards = [cr.shard(x, 0, world, layout="zigzag", **docs) for x in whole]
            rows_b, rows, heads, dim = shards[0].shape  # [B, S_local, H, D]
            padded = loader.forward_head_dim(dim, arch)
            name = loader.fwd_name(padded, "bfloat16", "sm90", tma)
            ctas = heads * rows_b * -(-rows // loader.SM90_FWD_CONFIGS[padded].block_m)

            def run(shards=shards, docs=docs, world=world):
                cr.ring_attention(*shards, NoCommRing(0, world), causal=True, layout="zigzag",
                                  **docs)  # fmt: skip
        elif args.backward:
            ring = SoloRing()
            out, lse = cr.ring_attention(q, k, v, ring, causal=causal, return_lse=True)
            name = loader.sm90_bwd_name(loader.backward_head_dim(d, arch), "bfloat16", False)
            ctas = h * b * -(-s // loader.SM90_BWD_CONFIG.block_n)

            def run(causal=causal, out=out, lse=lse, ring=ring):
                cr.ring_attention_backward(dout, q, k, v, out, lse, ring, causal=causal)
        else:
            padded = loader.forward_head_dim(d, arch)
            name = loader.fwd_name(padded, "bfloat16", "sm90", tma)
            ctas = h * b * -(-s // loader.SM90_FWD_CONFIGS[padded].block_m)

            def run(causal=causal):
                cr.attention(q, k, v, causal=causal)

        run()  # compiles, warms up
        module = loader.get_module((name,), "sm90")
        got = read_profile(module, run, ctas)
        r = summarize(got, sms)
        print(f"{causal!s:>6} {r['span_ms']:8.3f} {r['cta_us']:7.1f} {r['prologue_us']:7.2f} "
              f"{r['main_us']:7.1f} {r['epilogue_us']:7.2f} {r['gap_us']:7.2f} "
              f"{r['tail_pct']:7.1f} {r['ctas']:>6} {r['ctas'] / sms:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
