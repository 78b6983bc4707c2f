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
``Q*`` and the padding keys positions from ``K*`` on, all beyond every real position by more than
the window, and far enough from each other: a padding token sees no key and no query sees it.
Padding keys count up from ``K*`` (rank by rank, so the largest is ``K*`` plus the padding
rows less one), so every rank's key positions, and any union of them, strictly increase: the
kernels read a key tile whose end positions lie its length apart as consecutive positions
without loading them.

Layouts with documents: ``zigzag`` splits every document into ``2C`` pieces whose lengths differ by
at most one, rank ``r`` holding pieces ``r`` and ``2C-1-r`` of each (causal work balances with no
divisibility rule); ``contiguous`` gives rank ``r`` the ``r``-th of ``C`` chunks of
``ceil(S / C)`` tokens; ``striped`` the tokens ``t = r (mod C)``; ``packed`` keeps every document
of at most ``S / (4C)`` tokens whole and deals them, in their order, as ``C`` contiguous runs of
equal causal work (document ``i`` to the rank whose share of the total holds the middle of its
work), while longer documents are split as zigzag splits them. Short documents cut into ``2C``
pieces make tiles that straddle many pieces (every one partly masked) and need every ring step;
kept whole in runs, they are seen by no other rank, so a batch of short documents needs no ring
step beyond the first (PERF.md has the tile counts). The price: ranks balance work, not tokens,
so the shards (padded to the fullest rank) are longer than zigzag's: on bench_varlen's batches at
8k tokens per rank, 9-29% more rows at C=8 (memory, and the per-token layers around attention).

The functions trust their arguments (``cu_seqlens`` checked by ``cuparing.validation``).
"""

from __future__ import annotations

import functools

import numpy as np

from .masks import MaskSpec

PAD = -1  # token_positions' mark for a padding row
# packed: documents of at most S / (WHOLE_DOCUMENT_SHARE * C) tokens stay whole (PERF.md: at a
# quarter of a shard the tile counts match zigzag's on bench_varlen's batch; half a shard and a
# whole one leave runs too lumpy to balance, 0.68 and 0.65 of ideal at C=8 against 0.77)
WHOLE_DOCUMENT_SHARE = 4


def document_of(cu_seqlens: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """The document index of each global token index (int64)."""
    return np.searchsorted(cu_seqlens, tokens, side="right") - 1


def longest(cu_seqlens: np.ndarray) -> int:
    """The longest document's length (at least 1)."""
    return max(int(np.diff(cu_seqlens).max(initial=0)), 1)


def held_tokens(layout: str, rank: int, world_size: int, cu_seqlens: np.ndarray) -> np.ndarray:
    """Global indices (int64, ascending) of the real tokens ``rank`` holds, padding excluded."""
    return _held(layout, world_size, tuple(int(x) for x in cu_seqlens))[rank]


@functools.lru_cache(maxsize=32)
def _held(layout: str, world_size: int, cu_seqlens: tuple) -> tuple:
    """Every rank's real tokens (a tuple indexed by rank), computed at once: O(S) per rank, with
    no loop over the documents (a packed batch may hold thousands)."""
    cu = np.asarray(cu_seqlens, dtype=np.int64)
    seqlen = int(cu[-1])
    if layout == "striped":
        return tuple(np.arange(r, seqlen, world_size, dtype=np.int64) for r in range(world_size))
    if layout == "contiguous":
        chunk = -(-seqlen // world_size)
        return tuple(
            np.arange(r * chunk, min((r + 1) * chunk, seqlen), dtype=np.int64)
            for r in range(world_size)
        )
    starts, lengths = cu[:-1], np.diff(cu)
    if layout == "zigzag":
        return _zigzag_pieces(starts, lengths, world_size)
    # packed: long documents as zigzag, short ones whole in work-balanced contiguous runs
    short = lengths <= seqlen // (WHOLE_DOCUMENT_SHARE * world_size)
    pieces = _zigzag_pieces(starts[~short], lengths[~short], world_size)
    work = lengths[short] * (lengths[short] + 1) / 2.0  # causal pairs of each short document
    middle = np.cumsum(work) - work / 2
    owner = np.minimum((middle * world_size / max(work.sum(), 1.0)).astype(np.int64),
                       world_size - 1)  # fmt: skip
    held = []
    for r in range(world_size):
        mine = owner == r
        whole = _ranges(starts[short][mine], starts[short][mine] + lengths[short][mine])
        held.append(np.sort(np.concatenate([pieces[r], whole])))
    return tuple(held)



def _zigzag_pieces(starts: np.ndarray, lengths: np.ndarray, world_size: int) -> tuple:
    """Every rank's tokens of the documents ``[starts, starts + lengths)`` split into ``2C``
    pieces each (lengths differing by at most one, the longer first), rank ``r`` holding pieces
    ``r`` and ``2C-1-r``: a tuple of sorted int64 arrays indexed by rank."""
    parts = 2 * world_size
    # [docs, 2C + 1] piece bounds
    bounds = starts[:, None] + (np.arange(parts + 1) * lengths[:, None] + parts - 1) // parts
    held = []
    for r in range(world_size):
        first = (bounds[:, r], bounds[:, r + 1])
        second = (bounds[:, parts - 1 - r], bounds[:, parts - r])
        begin = np.concatenate([first[0], second[0]])
        end = np.concatenate([first[1], second[1]])
        held.append(np.sort(_ranges(begin, end)))
    return tuple(held)


def _ranges(begin: np.ndarray, end: np.ndarray) -> np.ndarray:
    """The concatenation of ``arange(b, e)`` for every pair, without a Python loop."""
    counts = end - begin
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.repeat(begin - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
    return np.arange(total, dtype=np.int64) + offsets


def shard_length(layout: str, world_size: int, cu_seqlens: np.ndarray) -> int:
    """The common (padded) length of every rank's shard: the most tokens any rank holds."""
    return max(len(t) for t in _held(layout, world_size, tuple(int(x) for x in cu_seqlens)))


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

    Only non-empty documents are spread apart (repeated boundaries, e.g. a fixed-size
    ``cu_seqlens`` padded with trailing repeats, add nothing), and the padding sentinels sit just
    past the largest real position (the padding keys counting up from there), keeping positions
    as small as the documents allow (the GPU kernels take them as 32-bit integers below 2^30).
    Every rank's keys strictly increase, and no two ranks share a key position.

    Returns:
        (q_positions, k_positions): tuples indexed by rank of int64 arrays (ascending, padded
        length); they differ only in the padding rows (``Q*`` for queries, ``K*`` on for keys).
    """
    cu = np.asarray(cu_seqlens, dtype=np.int64)
    gap = longest(cu)
    seqlen = int(cu[-1])
    # spread index of each document: how many non-empty documents come before it
    nonempty_before = np.concatenate([[0], np.cumsum(np.diff(cu) > 0)])
    last_token = seqlen - 1
    last_real = last_token + int(nonempty_before[document_of(cu, np.array([last_token]))[0]]) * gap
    q_pad = last_real + 2 * (gap + 1)
    k_pad = q_pad + 2 * (gap + 1)
    queries, keys = [], []
    padding_before = 0  # padding keys of the ranks before: theirs count up from K* first
    for rank in range(world_size):
        rows = token_positions(layout, rank, world_size, cu)
        real = rows != PAD
        docs = document_of(cu, np.where(real, rows, 0))
        spread = np.where(real, rows + nonempty_before[docs] * gap, 0)
        queries.append(np.where(real, spread, q_pad).astype(np.int64))
        # (padding keys distinct and increasing, across ranks too: see the module's docstring;
        # padding rows come last)
        padding = len(rows) - int(np.count_nonzero(real))
        key_positions = spread.astype(np.int64)
        key_positions[len(rows) - padding :] = k_pad + padding_before + np.arange(padding)
        keys.append(key_positions)
        padding_before += padding
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
