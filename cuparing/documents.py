"""Packed variable-length sequences: documents given by ``cu_seqlens``, as positions and masks.

A packed sequence of ``S`` tokens holds documents ``[cu[i], cu[i+1])``; key ``j`` is visible to
query ``i`` iff both lie in one document and the causal/window rule holds. Everything else in
cuparing (the kernels, block classification, the ring schedule) decides visibility from sorted
global positions and the window ``lo <= k_pos - q_pos <= hi``; documents become exactly that:

- *spread positions*: token ``t`` of document ``d`` gets position ``t + d * G``, with ``G`` the
  longest document's length. Within a document differences are unchanged; across documents they
  exceed ``G - 1`` in size, so
- *the window is clamped* to ``[-(G - 1), G - 1]`` (nothing inside a document lies further
  apart), which hides every cross-document pair and changes nothing inside one.

Shards of unequal length are padded at their end to one length. A padding query gets position
``Q*`` and a padding key ``K*``, both beyond every real position by more than the window, and far
enough from each other: a padding token sees no key and no query sees it.

Layouts with documents: ``zigzag`` splits every document into ``2C`` pieces whose lengths differ by
at most one, rank ``r`` holding pieces ``r`` and ``2C-1-r`` of each (causal work balances with no
divisibility rule); ``contiguous`` gives rank ``r`` the ``r``-th of ``C`` chunks of
``ceil(S / C)`` tokens; ``striped`` the tokens ``t = r (mod C)``.

The functions trust their arguments (``cu_seqlens`` checked by ``cuparing.validation``).
"""

from __future__ import annotations

import numpy as np

from .masks import MaskSpec

PAD = -1  # token_positions' mark for a padding row


def document_of(cu_seqlens: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """The document index of each global token index (int64)."""
    return np.searchsorted(cu_seqlens, tokens, side="right") - 1


def longest(cu_seqlens: np.ndarray) -> int:
    """The longest document's length (at least 1)."""
    return max(int(np.diff(cu_seqlens).max(initial=0)), 1)


def held_tokens(layout: str, rank: int, world_size: int, cu_seqlens: np.ndarray) -> np.ndarray:
    """Global indices (int64, ascending) of the real tokens ``rank`` holds, padding excluded."""
    seqlen = int(cu_seqlens[-1])
    if layout == "striped":
        return np.arange(rank, seqlen, world_size, dtype=np.int64)
    if layout == "contiguous":
        chunk = -(-seqlen // world_size)
        return np.arange(rank * chunk, min((rank + 1) * chunk, seqlen), dtype=np.int64)
    pieces = []
    parts = 2 * world_size
    for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:], strict=True):
        # 2C pieces whose lengths differ by at most one (the longer ones first)
        bounds = start + (np.arange(parts + 1) * (end - start) + parts - 1) // parts
        for piece in (rank, parts - 1 - rank):
            pieces.append(np.arange(bounds[piece], bounds[piece + 1], dtype=np.int64))
    return np.sort(np.concatenate(pieces)) if pieces else np.zeros(0, dtype=np.int64)


def shard_length(layout: str, world_size: int, cu_seqlens: np.ndarray) -> int:
    """The common (padded) length of every rank's shard: the most tokens any rank holds."""
    return max(len(held_tokens(layout, r, world_size, cu_seqlens)) for r in range(world_size))


def token_positions(layout: str, rank: int, world_size: int, cu_seqlens: np.ndarray) -> np.ndarray:
    """The global token index of every row of ``rank``'s padded shard (int64; ``PAD`` = -1 for
    padding rows, which come last)."""
    tokens = held_tokens(layout, rank, world_size, cu_seqlens)
    pad = shard_length(layout, world_size, cu_seqlens) - len(tokens)
    return np.concatenate([tokens, np.full(pad, PAD, dtype=np.int64)])


def clamped_mask(mask: MaskSpec, cu_seqlens: np.ndarray) -> MaskSpec:
    """``mask`` with its window clamped to the longest document: what hides cross-document
    pairs once positions are spread (module docstring)."""
    reach = longest(cu_seqlens) - 1
    left = reach if mask.left is None else min(mask.left, reach)
    right = reach if mask.right is None else min(mask.right, reach)
    return MaskSpec(mask.causal, left, right)


def ring_positions(layout: str, world_size: int, cu_seqlens: np.ndarray):
    """Spread positions of every rank's padded shard, as the schedule takes them.

    Returns:
        (q_positions, k_positions): tuples indexed by rank of int64 arrays (ascending, padded
        length); they differ only in the padding rows (``Q*`` for queries, ``K*`` for keys).
    """
    gap = longest(cu_seqlens)
    n_docs = len(cu_seqlens) - 1
    last_real = int(cu_seqlens[-1]) + n_docs * gap  # above every spread position
    q_pad = last_real + 2 * (gap + 1)
    k_pad = q_pad + 2 * (gap + 1)
    queries, keys = [], []
    for rank in range(world_size):
        rows = token_positions(layout, rank, world_size, cu_seqlens)
        real = rows != PAD
        spread = np.where(real, rows + document_of(cu_seqlens, rows) * gap, 0)
        queries.append(np.where(real, spread, q_pad).astype(np.int64))
        keys.append(np.where(real, spread, k_pad).astype(np.int64))
    return tuple(queries), tuple(keys)


def from_segment_ids(segment_ids) -> np.ndarray:
    """``cu_seqlens`` of a packed sequence given one segment id per token (the JAX convention:
    a document is a run of equal ids)."""
    ids = np.asarray(segment_ids).reshape(-1)
    starts = np.flatnonzero(ids[1:] != ids[:-1]) + 1
    return np.concatenate([[0], starts, [len(ids)]]).astype(np.int64)


def from_position_ids(position_ids) -> np.ndarray:
    """``cu_seqlens`` of a packed sequence given Hugging Face ``position_ids`` that restart at 0
    for every document."""
    pos = np.asarray(position_ids).reshape(-1)
    starts = np.flatnonzero(pos[1:] == 0) + 1
    return np.concatenate([[0], starts, [len(pos)]]).astype(np.int64)
