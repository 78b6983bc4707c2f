"""The ring calls the host-cost tools time: one rank's causal zigzag ring forward (fresh outputs
and caller-owned ``out=``/``lse=``) and backward on bf16 torch CUDA tensors, B=1, H/Hkv 32/8,
D=128, seeded by the rank. Shared by bench_overhead.py and replay_breakdown.py, so both time the
same calls."""

from __future__ import annotations

from collections.abc import Callable

SHAPE = (1, 32, 8, 128)  # B, H, Hkv, D
OPTIONS = {"causal": True, "layout": "zigzag"}


def ring_calls(ring, tokens: int) -> dict[str, Callable[[], None]]:
    """``{"forward", "forward_out", "backward"}``: each a call on this rank's shard of
    ``tokens`` tokens of ``ring``, with its inputs made once (the backward's from one forward)."""
    import torch

    import cuparing as cr

    b, h, hkv, d = SHAPE
    gen = torch.Generator(device="cuda").manual_seed(ring.rank)
    q = torch.randn(b, tokens, h, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    k, v = (torch.randn(b, tokens, hkv, d, device="cuda", dtype=torch.bfloat16, generator=gen)
            for _ in range(2))  # fmt: skip
    out, lse = cr.ring_attention(q, k, v, ring, return_lse=True, **OPTIONS)
    dout = torch.randn_like(out)
    given_out, given_lse = torch.empty_like(out), torch.empty_like(lse)

    def forward():
        cr.ring_attention(q, k, v, ring, **OPTIONS)

    def forward_out():
        cr.ring_attention(q, k, v, ring, out=given_out, lse=given_lse, **OPTIONS)

    def backward():
        cr.ring_attention_backward(dout, q, k, v, out, lse, ring, **OPTIONS)

    return {"forward": forward, "forward_out": forward_out, "backward": backward}
