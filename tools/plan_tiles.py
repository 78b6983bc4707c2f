"""Kernel tiles a ring call will run, counted from its plan on the CPU (no GPU needed).

    python tools/plan_tiles.py [--ranks 4] [--tokens-per-gpu 8192] [--documents | --short]
        [--layouts zigzag,striped,contiguous,packed] [--block-m 128] [--block-n 176]

For every rank and ring step, the (query tile, key tile) pairs of ``block_m`` x ``block_n`` that
the forward kernel computes, classified as the kernels classify them (by the first and last global
position of each tile, ``MaskSpec.classify``: FULL, PARTIAL or EMPTY; EMPTY ones are skipped), on
bench_varlen's packed batch (``--documents``: lengths log-uniform in 256..32k), a batch of short
documents (``--short``: 64..2048) or one causal sequence. Prints per layout: each rank's FULL and
PARTIAL tiles over all steps, the PARTIAL share, key tiles per query tile (median, and how many
query tiles get at most 3 over the whole ring), the tile-count efficiency ``tiles of the one-GPU
launch / (C x tiles of the busiest rank)`` (what the ring could reach if every tile cost the
same and transfers were free), its lockstep variant ``tiles of the one-GPU launch / (C x sum
over steps of the busiest rank's tiles at that step)`` (the ring's steps wait for each other),
and the last ring step any rank needs. The defaults are the sm90 d=128 forward tiles
(loader.SM90_FWD_CONFIGS).

``walked``: the key tiles the forward kernel actually runs. A CTA walks one contiguous range of
key tiles per query tile, every key whose position lies in ``[q_min + lo, q_max + hi]``
(``visible_key_tiles``), EMPTY tiles inside it included (masked whole); a query tile whose rows
come from two distant pieces of a shard (zigzag's pieces r and 2C-1-r of a document, or the
ends of two documents) walks everything between them. ``walked / counted`` is what that costs.

Each layout's summary also counts query-tile launches (CTAs per head: a ring step launches
every query tile of the rank, a busy one or not, and each pays a CTA's fixed costs) and the
same for a *gathered* forward (``CUPARING_KV_GATHER=1``: two launches per rank, its own shard
and the other ranks' K/V gathered into one ascending order; one float32 merge), with those
launches' tile-count and walked efficiency.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from bench_varlen import packed_batch

from cuparing import documents, schedule
from cuparing.masks import BlockKind, MaskSpec


def tiles(q_pos, k_pos, mask: MaskSpec, block_m: int, block_n: int) -> np.ndarray:
    """[query tiles, 3] counts of EMPTY, PARTIAL, FULL key tiles for each query tile."""
    counts = np.zeros((-(-len(q_pos) // block_m), 3), dtype=np.int64)
    for i, a in enumerate(range(0, len(q_pos), block_m)):
        q = q_pos[a : a + block_m]
        for b in range(0, len(k_pos), block_n):
            k = k_pos[b : b + block_n]
            counts[i, int(mask.classify(int(q[0]), int(q[-1]), int(k[0]), int(k[-1])))] += 1
    return counts


def walked(q_pos, k_pos, mask: MaskSpec, block_m: int, block_n: int) -> int:
    """Key tiles the kernel walks over all query tiles: per query tile, the tiles of the keys
    with positions in [q_min + lo, q_max + hi] (one contiguous range; k_pos ascending)."""
    lo, hi = -mask.left_bound, mask.right_bound
    total = 0
    for a in range(0, len(q_pos), block_m):
        q = q_pos[a : a + block_m]
        first = int(np.searchsorted(k_pos, int(q[0]) + lo, side="left"))
        end = int(np.searchsorted(k_pos, int(q[-1]) + hi, side="right"))
        if end > first:
            total += (end - 1) // block_n - first // block_n + 1
    return total


def rank_tiles(layout, rank, world, seqlen, cu, block_m, block_n) -> tuple[np.ndarray, int]:
    """([steps, query tiles, 3] tile counts of ``rank``'s blocks, ring step by ring step, on its
    real rows and keys; the key tiles its kernels walk over all steps, padding included as the
    kernel takes it: a query tile holding padding rows reaches their position)."""
    mask = MaskSpec(True, None, None)
    if cu is not None:
        plan = schedule.plan_documents(layout, rank, world, tuple(int(x) for x in cu), mask)
        real = len(documents.held_tokens(layout, rank, world, cu))
        q_pos = plan.q_positions[:real]  # padding rows see nothing
    else:
        plan = schedule.plan_ring(layout, rank, world, seqlen // world, mask)
        q_pos = plan.q_positions
    per_step, walks = [], 0
    for step in range(world):
        source = plan.source(step)
        k_pos = plan.positions[source]
        if cu is not None:
            k_pos = k_pos[: len(documents.held_tokens(layout, source, world, cu))]
        per_step.append(tiles(q_pos, k_pos, plan.mask, block_m, block_n))
        if plan.kinds[step] != BlockKind.EMPTY:
            walks += walked(plan.q_positions, plan.positions[source], plan.mask, block_m, block_n)
    return np.stack(per_step), walks


def gathered_tiles(layout, rank, world, seqlen, cu, block_m, block_n) -> tuple[np.ndarray, int]:
    """([query tiles, 3] tile counts, key tiles walked) of a gathered call's two launches of
    ``rank``'s queries (``schedule.gathered_forward``): against its own shard, and against the
    other ranks' keys in one ascending order (``schedule.gathered_keys``), summed; real rows
    and keys counted, padding walked as the kernel takes it (as :func:`rank_tiles`)."""
    mask = MaskSpec(True, None, None)
    if cu is not None:
        plan = schedule.plan_documents(layout, rank, world, tuple(int(x) for x in cu), mask)
        q_pos = plan.q_positions[: len(documents.held_tokens(layout, rank, world, cu))]
    else:
        plan = schedule.plan_ring(layout, rank, world, seqlen // world, mask)
        q_pos = plan.q_positions
    def real_rows(step):  # rows of step's shard that are real tokens (padding comes last)
        held = len(plan.positions[plan.source(step)])
        if cu is None:
            return held
        return len(documents.held_tokens(layout, plan.source(step), world, cu))

    own = plan.positions[plan.source(0)]
    launches = [(own, own[: real_rows(0)])]
    if plan.last_step > 0:
        keys = schedule.gathered_keys(plan)
        real = np.array([real_rows(1 + part) for part in range(plan.last_step)])
        launches.append((keys.positions, keys.positions[keys.sources[:, 1] <
                                                        real[keys.sources[:, 0]]]))  # fmt: skip
    counts, walks = 0, 0
    for k_pos, real_keys in launches:
        counts = counts + tiles(q_pos, real_keys, plan.mask, block_m, block_n)
        walks += walked(plan.q_positions, k_pos, plan.mask, block_m, block_n)
    return counts, walks


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--tokens-per-gpu", type=int, default=8192)
    batch = parser.add_mutually_exclusive_group()
    batch.add_argument("--documents", action="store_true", help="bench_varlen's packed batch")
    batch.add_argument("--short", action="store_true", help="documents of 64..2048 tokens")
    parser.add_argument("--layouts", default="zigzag,striped,contiguous,packed")
    parser.add_argument("--block-m", type=int, default=128)
    parser.add_argument("--block-n", type=int, default=176)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    world, bm, bn = args.ranks, args.block_m, args.block_n
    seqlen = args.tokens_per_gpu * world
    cu = None
    if args.documents:
        cu = packed_batch(seqlen, args.seed)
    elif args.short:
        cu = packed_batch(seqlen, args.seed, shortest=64, longest=2048)
    one, one_walked = rank_tiles("contiguous", 0, 1, seqlen, cu, bm, bn)
    one_total = int(one[..., 1:].sum())
    batch = "one sequence" if cu is None else f"documents {np.diff(cu).tolist()}"
    print(f"S={seqlen}, C={world}, causal, {batch}; tiles {bm}x{bn}")
    print(f"one GPU: {one_total} tiles, {one[..., 1].sum() / max(one_total, 1):.0%} PARTIAL, "
          f"{one_walked} walked")  # fmt: skip
    print(f"{'layout':<11}{'rank':>5}{'FULL':>7}{'PARTIAL':>8}{'partial%':>9}"
          f"{'median':>7}{'<=3':>5}{'walked':>8}")  # fmt: skip
    for layout in args.layouts.split(","):
        busiest, busiest_walked, per_step = 0, 0, []
        for rank in range(world):
            counts, walks = rank_tiles(layout, rank, world, seqlen, cu, bm, bn)
            full, partial = int(counts[..., 2].sum()), int(counts[..., 1].sum())
            per_query_tile = counts[..., 1:].sum(axis=-1).reshape(-1)
            busiest = max(busiest, full + partial)
            busiest_walked = max(busiest_walked, walks)
            per_step.append(counts[..., 1:].sum(axis=(1, 2)))  # [steps]
            print(f"{layout:<11}{rank:>5}{full:>7}{partial:>8}"
                  f"{partial / max(full + partial, 1):>9.0%}{np.median(per_query_tile):>7.0f}"
                  f"{int((per_query_tile <= 3).sum()):>5}{walks:>8}")  # fmt: skip
        steps = np.stack(per_step)  # [rank, step]
        busy_steps = np.flatnonzero(steps.any(axis=0))
        last = int(busy_steps[-1]) if len(busy_steps) else 0
        lockstep = one_total / (world * max(int(steps.max(axis=0).sum()), 1))
        print(f"{layout:<11} tile-count efficiency {one_total / (world * busiest):.2f}, "
              f"lockstep {lockstep:.2f}, walked {one_walked / (world * busiest_walked):.2f}, "
              f"last ring step {last}")  # fmt: skip
        gathered = [gathered_tiles(layout, r, world, seqlen, cu, bm, bn) for r in range(world)]
        query_tiles = max(len(g) for g, _ in gathered)
        busiest_gathered = max(int(g[:, 1:].sum()) for g, _ in gathered)
        partial = sum(int(g[:, 1].sum()) for g, _ in gathered)
        total = sum(int(g[:, 1:].sum()) for g, _ in gathered)
        gathered_walked = max(w for _, w in gathered)
        print(f"{layout:<11} query-tile launches per rank: ring {query_tiles * (last + 1)}, "
              f"gathered {query_tiles * min(last + 1, 2)} (one GPU {len(one[0])}); gathered "
              f"tile-count efficiency {one_total / (world * max(busiest_gathered, 1)):.2f}, "
              f"walked {one_walked / (world * max(gathered_walked, 1)):.2f} (busiest "
              f"{gathered_walked}), {partial / max(total, 1):.0%} PARTIAL")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
