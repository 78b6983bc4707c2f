"""Where the deterministic backward's time goes: its turns' waits and its CTAs' launch order.

    python tools/turn_profile.py [--seqlen 8192] [--heads 32] [--headdim 128]

Compiles the sm90 backward with ``CUPARING_CTA_PROFILE`` (common/cta_profile.cuh and
common/turns.cuh: per CTA, the cycles its warps waited in ``wait_turn``, its start and end on
``%globaltimer`` and its SM; nothing of it exists in the library's own build; read with
tools/cta_profile.py's helpers) and runs one ``ring_attention_backward`` on a ring of one,
bf16, B=1, Hkv = H, full and causal, default and ``deterministic=True``. Per case it prints the
kernel's span (first CTA start to last CTA end), the mean CTA time, the share of the consumer
warps' time spent waiting for turns (8 consumer warps per CTA), and the launch order as the
hardware took it: the share of CTAs that started after some CTA of higher linear index (``x``
fastest, then ``y``, then ``z``: the ordered kernel's grid is its (batch, head) pairs, then key
tiles; the order the turns assume is 0), and the mean start of each of the first "waves" of as
many CTAs as there are SMs. Hopper only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cta_profile import enable_profile, read_profile, summarize  # noqa: E402

WAITS = {"cuparing_turn_wait_cycles": "uint64"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seqlen", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--headdim", type=int, default=128)
    args = parser.parse_args(argv)

    import cupy
    import numpy as np
    import torch

    import cuparing as cr
    from cuparing.comm.local import SoloRing
    from cuparing.kernels import loader

    enable_profile()  # the backward's module is compiled (and cached) with the profile
    b, s, h, d = 1, args.seqlen, args.heads, args.headdim
    ring = SoloRing()
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, generator=gen)
                     for _ in range(4))  # fmt: skip
    props = cupy.cuda.runtime.getDeviceProperties(0)
    # (kHz: the rated clock; waits are converted with it, so a throttled clock understates them)
    clock_ghz = props["clockRate"] / 1e6
    sms = props["multiProcessorCount"]
    print(f"card: {props['name'].decode()}, {sms} SMs; B={b} S={s} H={h} D={d} bf16; "
          f"cycles -> ns at {clock_ghz:.2f} GHz")
    print(f"{'causal':>6} {'determ.':>7} {'span ms':>8} {'CTA us':>7} {'wait %':>7} "
          f"{'CTAs':>6} {'early %':>8}  first wave starts (us after the first CTA)")
    padded = loader.backward_head_dim(d, loader.device_arch())
    for causal in (False, True):
        out, lse = cr.ring_attention(q, k, v, ring, causal=causal, return_lse=True)
        for deterministic in (False, True):
            name = loader.sm90_bwd_name(padded, "bfloat16", deterministic)

            def backward(causal=causal, deterministic=deterministic, out=out, lse=lse):
                cr.ring_attention_backward(dout, q, k, v, out, lse, ring, causal=causal,
                                           deterministic=deterministic)  # fmt: skip

            backward()  # compiles, warms up
            module = loader.get_module((name,), "sm90")
            ctas = h * b * ((s + 127) // 128)
            got = read_profile(module, backward, ctas, WAITS)
            timeline = summarize(got, sms)
            span, cta_us = timeline["span_ms"], timeline["cta_us"]
            start = got["cuparing_cta_start_ns"].astype(np.float64)
            end = got["cuparing_cta_end_ns"].astype(np.float64)
            ran = end > 0  # (a CTA whose keys no query sees ends before recording)
            t0 = start[ran].min()
            waited_ns = got["cuparing_turn_wait_cycles"].astype(np.float64) / clock_ghz
            busy_ns = float(np.sum(end[ran] - start[ran])) * 8  # consumer warps
            wait_share = 100 * float(waited_ns.sum()) / busy_ns
            # launch order: CTAs that started after some CTA of higher index (timer jitter
            # within a wave counts too: an upper bound of the out-of-order starts)
            order = start[start > 0]
            later_min = np.minimum.accumulate(order[::-1])[::-1]
            early = 100 * float(np.mean(order[:-1] > later_min[1:]))
            waves = [(order[i:i + sms].mean() - t0) / 1e3 for i in range(0, sms * 4, sms)
                     if i < len(order)]  # fmt: skip
            print(f"{causal!s:>6} {deterministic!s:>7} {span:8.3f} {cta_us:7.1f} "
                  f"{wait_share:7.1f} {int(ran.sum()):>6} {early:8.1f}  "
                  + " ".join(f"{w:7.1f}" for w in waves))
    return 0


if __name__ == "__main__":
    sys.exit(main())
