"""Packed documents through a ring: causal attention that never crosses a document boundary.

A batch of documents of uneven lengths is packed into one sequence (``cu_seqlens`` marks where
each starts), sharded (no length needs to divide anything: shards are padded to one length),
run through a ring, and checked against dense float64 attention computed document by document,
on simulated CPU ranks. ``--layout zigzag`` (default) cuts every document into 2C pieces;
``--layout packed`` keeps the short ones whole, in contiguous runs per rank, for which the ring's
plan can need fewer steps (printed: the last ring step any rank needs; zero once every document
is short, e.g. ``--documents 40``).

    python examples/packed_documents.py [--ranks 4] [--documents 7] [--seed 0] [--layout packed]
"""

from __future__ import annotations

import argparse

import numpy as np

import cuparing as cr
from cuparing.masks import MaskSpec
from cuparing.schedule import plan_documents


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--documents", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layout", default="zigzag", choices=cr.LAYOUTS)
    args = parser.parse_args(argv)
    layout = args.layout

    rng = np.random.default_rng(args.seed)
    lengths = np.exp(rng.uniform(np.log(3), np.log(90), args.documents)).astype(int)
    cu = np.concatenate([[0], np.cumsum(lengths)])
    seqlen = int(cu[-1])
    heads, heads_kv, headdim = 8, 2, 32
    q = rng.standard_normal((1, seqlen, heads, headdim)).astype(np.float32)
    k, v = (rng.standard_normal((1, seqlen, heads_kv, headdim)).astype(np.float32) for _ in "kv")
    opts = {"causal": True, "layout": layout, "cu_seqlens": cu}

    def rank_fn(ring):
        local = [cr.shard(x, ring.rank, ring.size, layout=layout, cu_seqlens=cu)
                 for x in (q, k, v)]  # fmt: skip
        return cr.ring_attention(*local, ring, **opts)

    out = cr.unshard(cr.simulate(args.ranks, rank_fn), layout=layout, cu_seqlens=cu)

    want = np.zeros(q.shape)
    for a, b in zip(cu[:-1], cu[1:], strict=True):
        want[:, a:b] = cr.reference_attention(q[:, a:b], k[:, a:b], v[:, a:b], causal=True)
    rows = [cr.token_positions(seqlen, r, args.ranks, layout=layout, cu_seqlens=cu)
            for r in range(args.ranks)]  # fmt: skip
    last_step = max(plan_documents(layout, r, args.ranks, tuple(int(x) for x in cu),
                                   MaskSpec(causal=True)).last_step
                    for r in range(args.ranks))  # fmt: skip
    print(f"{args.documents} documents, lengths {lengths.tolist()} (S={seqlen}), "
          f"{args.ranks} ranks, layout {layout}: {len(rows[0])} rows per shard "
          f"({sum(int((r == -1).sum()) for r in rows)} padding rows in all), last ring step "
          f"{last_step}")  # fmt: skip
    print(f"max |ring - per-document dense float64| = {np.abs(out - want).max():.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
