"""The CPU block loop skips exactly the tiles a mask hides, and tiling never changes the answer.

The ring property tests use shards shorter than one tile; these draw tiles of 1-9 entries so every
path of the tile loop (many query and key tiles, tiles ending at zigzag's jump) runs.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from numerics import Reference

import cuparing as cr
from cuparing.backends import array_ops
from cuparing.layouts import plain_geometry, split_factor
from cuparing.masks import BlockKind, MaskSpec
from cuparing.reference import visible_pairs


def visible_by_definition(q_pos, k_pos, causal, left, right):
    """README's visibility rule as the oracle states it (not through MaskSpec): [Sq, Sk] bools."""
    return visible_pairs(q_pos, k_pos, causal, (left, right))


@st.composite
def blocks(draw):
    """One (query shard, key shard) block of a ring: positions, mask and tile sizes."""
    world = draw(st.integers(1, 5))
    layout = draw(st.sampled_from(cr.LAYOUTS))
    per_rank = draw(st.integers(1, 12))
    local_len = per_rank * split_factor(layout, 1)  # zigzag, packed: two chunks per rank
    q_rank, k_rank = draw(st.integers(0, world - 1)), draw(st.integers(0, world - 1))
    side = st.one_of(st.none(), st.integers(-3, world * local_len + 3))
    mask = (draw(st.booleans()), draw(side), draw(side))
    tiles = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    q_pos = cr.layouts.global_positions(layout, q_rank, world, local_len)
    k_pos = cr.layouts.global_positions(layout, k_rank, world, local_len)
    return layout, q_pos, k_pos, mask, tiles


def consecutive(pos) -> bool:
    """Whether sorted ``pos`` are consecutive integers."""
    return int(pos[-1]) - int(pos[0]) == len(pos) - 1


def block_kind(spec, q_pos, k_pos):
    return spec.classify(int(q_pos[0]), int(q_pos[-1]), int(k_pos[0]), int(k_pos[-1]))


@given(blocks())
def test_tiles_cover_every_visible_pair_and_full_tiles_hide_none(block):
    layout, q_pos, k_pos, mask, (q_tile, k_tile) = block
    spec = MaskSpec(*mask)
    seen = visible_by_definition(q_pos, k_pos, *mask)
    kind = block_kind(spec, q_pos, k_pos)
    if layout == "contiguous" or (plain_geometry(layout) == "zigzag" and len(q_pos) >= 4):
        # runs of consecutive positions: a tile never crosses zigzag's jump between its chunks
        for pos, tile in ((q_pos, q_tile), (k_pos, k_tile)):
            assert all(consecutive(pos[a:b]) for a, b in array_ops._tiles(pos, tile)), pos
    covered = np.zeros_like(seen, dtype=int)
    some_offset_seen = -spec.left_bound <= spec.right_bound
    if kind != BlockKind.EMPTY:
        for (q0, q1), key_tiles in array_ops._block_tiles(kind, spec, q_pos, k_pos, q_tile, k_tile):
            for k0, k1, tile_kind in key_tiles:
                covered[q0:q1, k0:k1] += 1
                if tile_kind == BlockKind.FULL:
                    assert seen[q0:q1, k0:k1].all(), (q0, q1, k0, k1)
                if some_offset_seen and consecutive(q_pos[q0:q1]) and consecutive(k_pos[k0:k1]):
                    # then classify is exact: no computed tile is wholly hidden
                    assert seen[q0:q1, k0:k1].any(), (q0, q1, k0, k1)
    assert covered.max(initial=0) <= 1  # no pair computed twice
    assert (covered[seen] == 1).all()  # every visible pair computed


def test_causal_zigzag_diagonal_block_skips_its_hidden_tiles():
    # rank 0 of 2 holds chunks 0 and 3 of 8 tokens: [0, 1, 6, 7]; with 1-token tiles the
    # computed pairs are exactly the 10 visible ones (before, all 16 of the block were computed)
    q_pos = cr.layouts.global_positions("zigzag", 0, 2, 4)
    spec = MaskSpec(causal=True)
    pairs = [
        (q, k)
        for (q, _), key_tiles in array_ops._block_tiles(BlockKind.PARTIAL, spec, q_pos, q_pos, 1, 1)
        for k, _, _ in key_tiles
    ]
    assert len(pairs) == int(visible_by_definition(q_pos, q_pos, True, None, None).sum()) == 10
    # default tiles: the two chunks never share a tile, so chunk 0 never meets chunk 3's keys
    default = list(array_ops._block_tiles(BlockKind.PARTIAL, spec, q_pos, q_pos, None, None))
    assert [(rows, [k[:2] for k in keys]) for rows, keys in default] == [
        ((0, 2), [(0, 2)]),
        ((2, 4), [(0, 2), (2, 4)]),
    ]


@given(blocks(), st.integers(0, 2**32 - 1))
def test_any_tiling_gives_the_dense_block_in_float64(block, seed):
    layout, q_pos, k_pos, mask, (q_tile, k_tile) = block
    spec = MaskSpec(*mask)
    kind = block_kind(spec, q_pos, k_pos)
    if kind == BlockKind.EMPTY:
        return
    rng = np.random.default_rng(seed)
    q, dout = rng.standard_normal((2, 2, len(q_pos), 4, 8))
    k, v = rng.standard_normal((2, 2, len(k_pos), 2, 8))
    causal, left, right = mask
    # the dense float64 oracle on the same positions; bounds from the one table
    ref = Reference(q, k, v, dout, causal=causal, scale=0.3, window=(left, right),
                    q_positions=q_pos, k_positions=k_pos)  # fmt: skip

    got_out, got_lse = array_ops.block_forward(
        np, q, k, v, q_pos, k_pos, kind, spec, 0.3, tile=k_tile, q_tile=q_tile
    )
    assert np.linalg.norm(got_out - ref.out) <= ref.bound("out")
    ref.check_lse(got_lse)

    grads = [np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)]
    delta = array_ops.backward_delta(np, dout, got_out)
    array_ops.block_backward(
        np, *grads, dout, q, k, v, got_lse, delta, q_pos, k_pos, kind, spec, 0.3,
        tile=k_tile, q_tile=q_tile,
    )  # fmt: skip
    for i, (name, got) in enumerate(zip(("dq", "dk", "dv"), grads, strict=True)):
        assert np.linalg.norm(got - ref.grads[i]) <= ref.bound(name, i), name
