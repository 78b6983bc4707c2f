"""Packed variable-length sequences (``cu_seqlens``) on the CPU: every layout and ring size, forward
and backward, against the dense float64 reference with the document mask; padding rows; the plan's
empty blocks; helpers; bad boundaries refused before any work."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numerics import check_backward, check_forward
from strategies import np_dtype
from switches import kv_gather

import cuparing as cr
from cuparing.masks import BlockKind, MaskSpec
from cuparing.schedule import plan_documents


@st.composite
def packed_cases(draw):
    world_size = draw(st.integers(1, 8))
    lengths = draw(st.lists(st.integers(0, 24), min_size=1, max_size=20))
    if sum(lengths) == 0:
        lengths[0] = 1
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    hkv = draw(st.integers(1, 2))
    return {
        "world_size": world_size,
        "layout": draw(st.sampled_from(cr.LAYOUTS)),
        "cu": cu,
        "heads": (hkv * draw(st.integers(1, 2)), hkv),
        "headdim": draw(st.sampled_from([1, 4, 8])),
        "causal": draw(st.booleans()),
        "window": draw(st.one_of(st.none(), st.tuples(st.integers(0, 6), st.integers(0, 6)))),
        "dtype": draw(st.sampled_from(["float64", "float32", "bfloat16"])),
        "seed": draw(st.integers(0, 2**32 - 1)),
        "gather": draw(st.booleans()),  # CUPARING_KV_GATHER: the forward gathers K/V first
    }


@settings(deadline=None)
@given(case=packed_cases())
def test_packed_ring_matches_the_document_masked_reference(case):
    world, layout, cu = case["world_size"], case["layout"], case["cu"]
    h, hkv = case["heads"]
    seqlen, d = int(cu[-1]), case["headdim"]
    rng = np.random.default_rng(case["seed"])
    dtype = np_dtype(case["dtype"])
    q, dout = (rng.standard_normal((1, seqlen, h, d)).astype(dtype) for _ in range(2))
    k, v = (rng.standard_normal((1, seqlen, hkv, d)).astype(dtype) for _ in range(2))
    mask = {"causal": case["causal"], "window": case["window"]}
    opts = {**mask, "layout": layout, "cu_seqlens": cu}

    def rank_fn(ring):
        rows = cr.token_positions(seqlen, ring.rank, ring.size, layout=layout, cu_seqlens=cu)
        local = [cr.shard(x, ring.rank, ring.size, layout=layout, cu_seqlens=cu)
                 for x in (q, k, v, dout)]  # fmt: skip
        out, lse = cr.ring_attention(*local[:3], ring, return_lse=True, **opts)
        grads = cr.ring_attention_backward(local[3], *local[:3], out, lse, ring, **opts)
        pad = rows == -1  # padding: no key seen, seen by none
        assert np.all(np.asarray(out, dtype=np.float64)[:, pad] == 0)
        assert np.all(np.isneginf(lse[:, :, pad]))
        for g in grads:
            assert np.all(np.asarray(g, dtype=np.float64)[:, pad] == 0)
        return out, lse, *grads

    with kv_gather(case["gather"]):
        results = cr.simulate(world, rank_fn)

    def whole(i, axis=1):
        return cr.unshard([r[i] for r in results], layout=layout, axis=axis, cu_seqlens=cu)

    check_forward(whole(0), whole(1, axis=2), q, k, v, cu_seqlens=cu, **mask)
    check_backward([whole(2), whole(3), whole(4)], dout, q, k, v, cu_seqlens=cu, **mask)


@given(
    lengths=st.lists(st.integers(0, 30), min_size=1, max_size=10),
    causal=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_one_device_packed_attention_is_per_document_attention(lengths, causal, seed):
    if sum(lengths) == 0:
        lengths[0] = 1
    cu = np.concatenate([[0], np.cumsum(lengths)])
    rng = np.random.default_rng(seed)
    q, k, v, dout = (rng.standard_normal((2, int(cu[-1]), 2, 4)) for _ in range(4))
    out, lse = cr.attention(q, k, v, causal=causal, cu_seqlens=cu, return_lse=True)
    grads = cr.attention_backward(dout, q, k, v, out, lse, causal=causal, cu_seqlens=cu)
    for a, b in zip(cu[:-1], cu[1:], strict=True):  # each document alone, dense
        if a == b:
            continue
        part = slice(a, b)
        alone = [x[:, part] for x in (q, k, v)]  # the document as a sequence of its own
        check_forward(out[:, part], lse[:, :, part], *alone, causal=causal)
        check_backward([g[:, part] for g in grads], dout[:, part], *alone, causal=causal)


def test_blocks_of_disjoint_documents_are_empty_and_the_ring_stops_early():
    # one document per rank, aligned to the contiguous shards: only the diagonal blocks remain
    cu = (0, 5, 10, 15, 20)
    for rank in range(4):
        plan = plan_documents("contiguous", rank, 4, cu, MaskSpec(causal=False))
        assert plan.kinds[0] == BlockKind.FULL
        assert all(kind == BlockKind.EMPTY for kind in plan.kinds[1:])
        assert plan.last_step == 0  # no transfer at all
    # a padded shard is never FULL: its padding rows must be masked
    plan = plan_documents("contiguous", 1, 2, (0, 3), MaskSpec(causal=False))  # 1 token + 1 pad
    assert plan.kinds[0] == BlockKind.PARTIAL


@given(
    world_size=st.integers(1, 8),
    layout=st.sampled_from(cr.LAYOUTS),
    lengths=st.lists(st.integers(0, 300), min_size=1, max_size=20),
)
def test_key_positions_strictly_increase_padding_included(world_size, layout, lengths):
    """Every rank's key positions strictly increase and no two ranks share one, padding rows
    included (what lets the Hopper forward read a key tile whose end positions lie its length
    apart as consecutive positions: common/mask.cuh ``apply_mask_run``); padding keys lie past
    every real position and every query by more than the clamped window."""
    from cuparing import documents

    if sum(lengths) == 0:
        lengths[0] = 1
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    queries, keys = documents.ring_positions(layout, world_size, cu)
    reach = documents.longest(cu) - 1
    for rank, k in enumerate(keys):
        assert (np.diff(k) > 0).all(), f"rank {rank}: {k}"
        padding = documents.token_positions(layout, rank, world_size, cu) == documents.PAD
        if padding.any():
            real_most = max(int(q.max()) for q in queries)
            assert int(k[padding].min()) - real_most > reach
    joined = np.concatenate(keys)
    assert len(np.unique(joined)) == len(joined)
    # the padding keys are one run from K* (positions stay as small as they were)
    padded = np.concatenate([k[documents.token_positions(layout, r, world_size, cu)
                               == documents.PAD] for r, k in enumerate(keys)])  # fmt: skip
    if len(padded):
        np.testing.assert_array_equal(np.sort(padded), padded.min() + np.arange(len(padded)))


@given(
    world_size=st.integers(1, 8),
    lengths=st.lists(st.integers(0, 400), min_size=1, max_size=40),
)
def test_packed_keeps_short_documents_whole_in_balanced_runs(world_size, lengths):
    """The packed layout (cuparing.documents): documents of at most S / (4C) tokens lie whole on
    one rank, ranks taking consecutive runs of them in document order; longer ones are split
    exactly as zigzag splits them; the ranks' causal work on short documents differs by at most
    twice the largest short document's (a run's two ends each gain or lose at most half a
    document: a document goes to the rank whose share holds the middle of its work)."""
    from cuparing import documents

    if sum(lengths) == 0:
        lengths[0] = 1
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    seqlen, c = int(cu[-1]), world_size
    held = [documents.held_tokens("packed", r, c, cu) for r in range(c)]
    zigzag = [documents.held_tokens("zigzag", r, c, cu) for r in range(c)]
    owner_of = np.full(seqlen, -1)
    for r, tokens in enumerate(held):
        assert (np.diff(tokens) > 0).all()
        assert (owner_of[tokens] == -1).all()  # no token on two ranks
        owner_of[tokens] = r
    assert (owner_of >= 0).all()  # every token somewhere
    limit = seqlen // (documents.WHOLE_DOCUMENT_SHARE * c)
    runs = []
    work = np.zeros(c)
    for d, length in enumerate(lengths):
        span = np.arange(cu[d], cu[d + 1])
        if length == 0:
            continue
        if length <= limit:
            owners = set(owner_of[span].tolist())
            assert len(owners) == 1, (d, owners)  # whole
            runs.append(owners.pop())
            work[runs[-1]] += length * (length + 1) / 2
        else:  # exactly zigzag's pieces
            for r in range(c):
                want = zigzag[r][(zigzag[r] >= cu[d]) & (zigzag[r] < cu[d + 1])]
                assert np.array_equal(span[owner_of[span] == r], want)
    assert runs == sorted(runs)  # consecutive runs in document order
    short = [length for length in lengths if 0 < length <= limit]
    if short:
        largest = max(length * (length + 1) / 2 for length in short)
        assert work.max() - work.min() <= 2 * largest + 1e-9 * work.sum(), work


def test_packed_short_documents_need_no_ring_step_beyond_the_first():
    # 40 documents of 50 tokens on 4 ranks: all short (50 <= 2000 / 16), ten whole ones per
    # rank, so no query sees a key held elsewhere and the ring moves nothing
    cu = tuple(range(0, 2001, 50))
    for rank in range(4):
        plan = plan_documents("packed", rank, 4, cu, MaskSpec(causal=True))
        assert plan.last_step == 0
        zigzag = plan_documents("zigzag", rank, 4, cu, MaskSpec(causal=True))
        assert zigzag.last_step == 3  # every document spread over every rank


def test_plain_sequences_of_any_length_through_padding():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 13, 2, 4))  # 13 tokens on 4 ranks, zigzag wants a multiple of 8
    cu = [0, 13]

    def rank_fn(ring):
        xl = cr.shard(x, ring.rank, ring.size, layout="zigzag", cu_seqlens=cu)
        return cr.ring_attention(xl, xl, xl, ring, causal=True, layout="zigzag", cu_seqlens=cu)

    out = cr.unshard(cr.simulate(4, rank_fn), layout="zigzag", cu_seqlens=cu)
    assert out.shape == x.shape
    check_forward(out, None, x, x, x, causal=True)


def test_helpers_make_cu_seqlens():
    assert cr.cu_seqlens_from_segment_ids([3, 3, 7, 7, 7, 1]).tolist() == [0, 2, 5, 6]
    assert cr.cu_seqlens_from_position_ids([0, 1, 2, 0, 1, 0]).tolist() == [0, 3, 5, 6]
    assert cr.cu_seqlens_from_position_ids(np.array([[0, 1, 0]])).tolist() == [0, 2, 3]


@pytest.mark.parametrize(
    "cu,error,message",
    [
        ([1, 4], ValueError, "must start at 0"),
        ([0, 5, 3, 8], ValueError, "non-decreasing, got 5 then 3 at index 1"),
        ([0, 7], ValueError, "must end at the sequence length 8"),
        ([0.0, 8.0], TypeError, "must hold integers"),
        (np.array([[0, 8]]), ValueError, "must be 1-D"),
        ("0,8", TypeError, "1-D integer array or a list"),
    ],
)
def test_bad_cu_seqlens_are_refused_before_any_work(cu, error, message):
    x = np.zeros((1, 8, 2, 4))
    with pytest.raises(error, match=message):
        cr.attention(x, x, x, cu_seqlens=cu)
    with pytest.raises(error, match=message):
        cr.shard(x, 0, 2, cu_seqlens=cu)


def test_a_shard_of_the_wrong_length_is_refused():
    x = np.zeros((1, 4, 2, 4))  # 13 tokens zigzag on 2 ranks give shards of 7 rows

    def rank_fn(ring):
        return cr.ring_attention(x, x, x, ring, layout="zigzag", cu_seqlens=[0, 13])

    with pytest.raises(ValueError, match="holds 7 rows"):
        cr.simulate(2, rank_fn)
