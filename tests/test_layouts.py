"""Sharding layouts: round trips, positions, and causal load balance."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from numerics import check_forward

import cuparing as cr
from cuparing.layouts import split_factor
from cuparing.masks import BlockKind, MaskSpec
from cuparing.schedule import plan_ring


@given(
    world=st.integers(1, 8),
    per_rank=st.integers(1, 9),
    layout=st.sampled_from(cr.LAYOUTS),
    axis=st.integers(0, 2),
)
def test_shard_unshard_round_trip(world, per_rank, layout, axis):
    local = per_rank * split_factor(layout, 1)  # zigzag and packed: two chunks per rank
    shape = [3, 4, 2]
    shape[axis] = local * world
    x = np.random.default_rng(per_rank).standard_normal(shape)
    shards = [cr.shard(x, r, world, layout=layout, axis=axis) for r in range(world)]
    assert all(s.shape[axis] == local for s in shards)
    np.testing.assert_array_equal(cr.unshard(shards, layout=layout, axis=axis), x)


@given(world=st.integers(1, 8), per_rank=st.integers(1, 9), layout=st.sampled_from(cr.LAYOUTS))
def test_positions_partition_the_sequence_in_ascending_order(world, per_rank, layout):
    local = per_rank * split_factor(layout, 1)
    positions = [cr.global_positions(layout, r, world, local) for r in range(world)]
    assert all((np.diff(p) > 0).all() for p in positions)
    np.testing.assert_array_equal(np.sort(np.concatenate(positions)), np.arange(local * world))


def test_layouts_place_tokens_as_documented():
    x = np.arange(8)[None]
    assert cr.shard(x, 1, 2, layout="contiguous").tolist() == [[4, 5, 6, 7]]
    assert cr.shard(x, 1, 2, layout="zigzag").tolist() == [[2, 3, 4, 5]]
    assert cr.shard(x, 1, 2, layout="striped").tolist() == [[1, 3, 5, 7]]
    # a plain sequence is one long document: packed splits it as zigzag does
    assert cr.shard(x, 1, 2, layout="packed").tolist() == [[2, 3, 4, 5]]


def causal_work(layout, world, local, tile):
    """Per rank: visible (full or partial) tile area summed over every ring step, in tiles."""
    mask = MaskSpec(causal=True)
    work = []
    for rank in range(world):
        plan = plan_ring(layout, rank, world, local, mask)
        q = plan.positions[rank]
        total = 0
        for step in range(world):
            k = plan.positions[plan.source(step)]
            for i in range(0, local, tile):
                for j in range(0, local, tile):
                    kind = mask.classify(q[i], q[i + tile - 1], k[j], k[j + tile - 1])
                    total += kind != BlockKind.EMPTY
        work.append(total)
    return work


@pytest.mark.parametrize("world", [2, 3, 4, 8])
def test_zigzag_balances_causal_work_within_one_block(world):
    tile = 4
    work = causal_work("zigzag", world, local=8 * tile, tile=tile)
    assert max(work) - min(work) <= 1, work
    contiguous = causal_work("contiguous", world, local=8 * tile, tile=tile)
    assert max(contiguous) - min(contiguous) > 1  # the layout zigzag exists to fix


@pytest.mark.parametrize("world", [2, 4, 8])
def test_striped_balances_causal_work(world):
    work = causal_work("striped", world, local=32, tile=4)
    assert max(work) - min(work) <= world, work


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((np.zeros((1, 10, 1, 1)), 0, 4, "contiguous"), "multiple of 4"),
        ((np.zeros((1, 12, 1, 1)), 0, 4, "zigzag"), "multiple of 8"),
        ((np.zeros((1, 8, 1, 1)), 0, 4, "diagonal"), "layout='diagonal'"),
        ((np.zeros((1, 8, 1, 1)), 4, 4, "contiguous"), "rank must be in"),
        ((np.zeros((1, 8, 1, 1)), 0, 0, "contiguous"), "world_size must be >= 1"),
    ],
)
def test_shard_rejects_bad_arguments(args, message):
    with pytest.raises(ValueError, match=message):
        cr.shard(*args)


def test_shard_error_suggests_a_valid_length():
    with pytest.raises(ValueError, match="nearest valid lengths: 8 or 16"):
        cr.shard(np.zeros((1, 12, 1, 1)), 0, 4, layout="zigzag")


@pytest.mark.parametrize(
    ("seqlen", "layout", "needed"),
    [
        (12, "zigzag", r"multiple of 8 .*2 \* world_size = 8 chunks"),
        (10, "striped", "multiple of 4"),
    ],
)
def test_length_errors_say_what_is_needed_and_never_advise_zero_padding(seqlen, layout, needed):
    """Zero-padding changes non-causal results (padded keys enter the softmax) and there is no
    padding mask yet: the message names the length rule and warns against padding."""
    with pytest.raises(ValueError, match=needed) as error:
        cr.shard(np.zeros((1, seqlen, 1, 1)), 0, 4, layout=layout)
    assert not re.search(r"\bpad (the|your|it)\b", str(error.value)), error.value
    assert "Zero-padding is not equivalent" in str(error.value)
    assert f"cu_seqlens=[0, {seqlen}]" in str(error.value)  # (the length-free route)


def test_the_suggested_cu_seqlens_route_works_for_that_length():
    """What the length error suggests does what it says: [0, S] shards, runs the ring and
    unshards any length, equal to one device's attention."""
    x = np.random.default_rng().standard_normal((1, 13, 2, 4))
    cu = [0, 13]

    def rank_fn(ring):
        xl = cr.shard(x, ring.rank, ring.size, layout="zigzag", cu_seqlens=cu)
        return cr.ring_attention(xl, xl, xl, ring, causal=True, layout="zigzag", cu_seqlens=cu)

    out = cr.unshard(cr.simulate(4, rank_fn), layout="zigzag", cu_seqlens=cu)
    check_forward(out, None, x, x, x, causal=True)


def test_ring_length_error_names_the_local_rule_without_padding_advice():
    q = np.zeros((1, 3, 1, 2))  # 3 tokens per rank: 12 in all, zigzag on 4 ranks needs 8k
    with pytest.raises(ValueError, match=r"multiple of 8 \(local length a multiple of 2") as error:
        cr.simulate(4, lambda ring: cr.ring_attention(q, q, q, ring, layout="zigzag"))
    assert "pad" not in str(error.value)  # (no padding advice: cu_seqlens=[0, S] is the route)
    assert "cu_seqlens=[0, S]" in str(error.value)
