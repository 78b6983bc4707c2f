"""The gathered ring forward's pieces on the CPU: the plan's gathered key order and its inverse
(cuparing.schedule.gathered_keys), and the gather kernel's packed arguments
(cuparing.backends.kv_gather), read back through a recording stand-in for the driver. The kernel
itself runs on GPUs (test_gpu_attention.py: gathered forwards against the float64 reference)."""

from __future__ import annotations

import itertools
import re
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numerics import check_forward
from test_launch_plans import Function, RecordingDriver

from cuparing import schedule
from cuparing.backends import kv_gather
from cuparing.kernels import loader
from cuparing.masks import BlockKind, MaskSpec

_addresses = itertools.count(1 << 24, 1 << 16)


class _DeviceArray:
    """What gather_launch reads of a CuPy array: shape, byte strides, dtype, address, flags."""

    def __init__(self, shape, dtype="bfloat16", strides=None, ptr=None):
        self.shape = tuple(shape)
        self.dtype = SimpleNamespace(itemsize=2, name=dtype) if dtype != "int32" else np.dtype(
            np.int32
        )  # fmt: skip
        itemsize = self.dtype.itemsize
        contiguous = tuple(int(np.prod(self.shape[i + 1 :])) * itemsize for i in range(len(shape)))
        self.strides = tuple(strides) if strides is not None else contiguous
        self.flags = SimpleNamespace(c_contiguous=self.strides == contiguous)
        self.data = SimpleNamespace(ptr=next(_addresses) if ptr is None else ptr)


@settings(max_examples=40, deadline=None)
@given(
    world=st.integers(2, 9), layout=st.sampled_from(["contiguous", "zigzag", "striped"]),
    local=st.integers(1, 40), causal=st.booleans(), rank=st.integers(0, 8),
)  # fmt: skip
def test_gathered_keys_sort_the_other_shards_keys_and_invert_their_rows(world, layout, local,
                                                                        causal, rank):  # fmt: skip
    """Every key row of steps 1 .. last_step lands once, in ascending position order;
    ``sources`` names for each gathered row the shard (step - 1) and row it came from,
    ``step_sources`` each step's rows in that order; the blocks' kinds are step 0's and the
    others' together."""
    local = local * 2 if layout == "zigzag" else local
    plan = schedule.plan_ring(layout, rank % world, world, local, MaskSpec(causal=causal))
    if plan.last_step == 0:
        return  # (nothing to gather)
    keys = schedule.gathered_keys(plan)
    held = [plan.positions[plan.source(t)] for t in range(1, plan.last_step + 1)]
    assert len(keys.positions) == sum(len(p) for p in held)
    assert np.all(np.diff(keys.positions) >= 0)
    for part, at in enumerate(keys.rows):
        np.testing.assert_array_equal(keys.positions[at], held[part])
        np.testing.assert_array_equal(keys.sources[at], np.stack([np.full(len(at), part),
                                                                  np.arange(len(at))], axis=1))
        np.testing.assert_array_equal(keys.step_sources[part][:, 1], at)
        assert not keys.step_sources[part][:, 0].any()
    assert keys.sources.dtype == np.int32 and not keys.sources.flags.writeable
    assert keys.own_kind == plan.kinds[0]
    others = set(plan.kinds[1 : plan.last_step + 1])
    assert keys.kind == (others.pop() if len(others) == 1 else BlockKind.PARTIAL)
    assert keys.blocks == (plan.kinds[0] != BlockKind.EMPTY) + (keys.kind != BlockKind.EMPTY)


def _decode(raw: bytes) -> dict:
    """GatherRowsParams' fields from the bytes a launch handed the driver."""
    assert len(raw) == loader.GATHER_ROWS_SIZE
    return {
        name: struct.unpack_from(f"<{count}{code}", raw, offset)
        for name, offset, count, code in loader.GATHER_ROWS_LAYOUT
    }


def test_a_repeated_call_reuses_its_plan_and_gathered_order():
    """The order a gathered call computes once per plan (an argsort over every received key, and
    on the GPU device copies of its maps) is found again by a call with the same arguments: the
    plan is one object per arguments, documents or not."""
    mask = MaskSpec(causal=True)
    first = schedule.plan_ring("zigzag", 1, 4, 64, mask)
    assert schedule.plan_ring("zigzag", 1, 4, 64, mask) is first
    assert schedule.gathered_keys(first) is schedule.gathered_keys(
        schedule.plan_ring("zigzag", 1, 4, 64, mask)
    )
    assert schedule.plan_ring("zigzag", 2, 4, 64, mask) is not first
    cu = (0, 50, 61, 200)
    docs = schedule.plan_documents("packed", 0, 3, cu, mask)
    assert schedule.gathered_keys(docs) is schedule.gathered_keys(
        schedule.plan_documents("packed", 0, 3, cu, mask)
    )


@settings(max_examples=40, deadline=None)
@given(
    parts=st.integers(1, loader.GATHER_MAX_PARTS), batch=st.integers(1, 3),
    heads=st.integers(1, 8), words=st.integers(1, 32), pad=st.integers(0, 3),
    lengths=st.lists(st.integers(1, 50), min_size=8, max_size=8), seed=st.integers(0, 2**31),
)  # fmt: skip
def test_the_launch_packs_every_part_with_its_own_strides(parts, batch, heads, words, pad,
                                                           lengths, seed):  # fmt: skip
    """Each launch hands the kernel its pointers in their fields (the plan's templates' and
    then any other addresses), every part's byte strides (the caller's shard strided, the
    received ones contiguous), the shapes, and the grid of four rows per CTA by batch."""
    headdim = 8 * words
    rows = lengths[:parts]
    length = sum(rows)
    def strided(extra):  # (the caller's K and V padded differently: a swap would show)
        head_stride = 2 * headdim + 16 * (pad + extra)
        row_stride = heads * head_stride + 16 * pad
        return _DeviceArray((batch, rows[0], heads, headdim),
                            strides=(rows[0] * row_stride + 32, row_stride, head_stride, 2))

    first = [strided(0), strided(1)]
    shards = [tuple(first)] + [
        tuple(_DeviceArray((batch, n, heads, headdim)) for _ in range(2)) for n in rows[1:]
    ]
    k_all, v_all = (_DeviceArray((batch, length, heads, headdim)) for _ in range(2))
    sources = _DeviceArray((length, 2), dtype="int32")
    driver = RecordingDriver([loader.GATHER_ROWS_SIZE])
    launch = kv_gather.gather_launch(k_all, v_all, shards, sources, kernel=Function(77),
                                     driver=driver)  # fmt: skip
    rng = np.random.default_rng(seed)
    for _ in range(2):
        pointers = [int(p) for p in rng.integers(1, 2**48, size=3 + 2 * parts) * 16]
        launch.launch(*pointers)
        function, geometry, (raw,) = driver.calls[-1]
        fields = _decode(raw)
        assert function == 77
        assert geometry == (-(-length // loader.GATHER_ROWS_PER_CTA), batch, 1,
                            loader.GATHER_ROWS_THREADS, 1, 1, 0)  # fmt: skip
        assert fields["k_dst"] == (pointers[0],) and fields["v_dst"] == (pointers[1],)
        pad_slots = (0,) * (loader.GATHER_MAX_PARTS - parts)
        assert fields["k_src"] == (*pointers[2 : 2 + parts], *pad_slots)
        assert fields["v_src"] == (*pointers[2 + parts : 2 + 2 * parts], *pad_slots)
        assert fields["sources"] == (pointers[-1],)
        for i, name in enumerate(("k_strides", "v_strides")):
            strides = [s for pair in shards for s in pair[i].strides[:3]]
            assert fields[name] == (*strides, *(0,) * (24 - len(strides)))
        assert fields["ints"] == (batch, length, heads, headdim * 2 // 16)


def test_what_the_kernel_cannot_hold_is_refused_by_name():
    k_all, v_all = (_DeviceArray((1, 9, 2, 64)) for _ in range(2))
    sources = _DeviceArray((9, 2), dtype="int32")
    part = tuple(_DeviceArray((1, 1, 2, 64)) for _ in range(2))
    common = {"kernel": Function(1), "driver": RecordingDriver([loader.GATHER_ROWS_SIZE])}
    with pytest.raises(ValueError, match="takes 1..8 shards, got 9"):
        kv_gather.gather_launch(k_all, v_all, [part] * 9, sources, **common)
    with pytest.raises(ValueError, match="int32"):
        kv_gather.gather_launch(k_all, v_all, [part], _DeviceArray((9, 2)), **common)
    wrong = (_DeviceArray((1, 1, 3, 64)), part[1])
    with pytest.raises(ValueError, match="part 1's k must be"):
        kv_gather.gather_launch(k_all, v_all, [part, wrong], sources, **common)
    odd = tuple(_DeviceArray((1, 9, 2, 4)) for _ in range(2))
    with pytest.raises(ValueError, match="16-byte words"):
        kv_gather.gather_launch(*odd, [part], sources, **common)
    wide = tuple(_DeviceArray((65536, 9, 2, 64)) for _ in range(2))
    with pytest.raises(ValueError, match="1..65535 batch rows, got 65536"):
        kv_gather.gather_launch(*wide, [part], sources, **common)


def test_the_limits_agree_across_python_and_cuda():
    """The shards a gathered call holds and the kernel's rows and threads per CTA: one value
    each in the schedule, the loader and gather_rows.cuh."""
    header = (Path(loader.KERNEL_DIR) / "common" / "gather_rows.cuh").read_text()
    constants = dict(re.findall(r"constexpr int (kGather\w+) = ([^;]+);", header))
    parts = int(constants["kGatherMaxParts"])
    assert schedule.GATHER_MAX_SHARDS == loader.GATHER_MAX_PARTS == parts
    assert loader.GATHER_ROWS_PER_CTA == int(constants["kGatherRowsPerCta"])
    assert constants["kGatherThreads"] == "32 * kGatherRowsPerCta"
    assert loader.GATHER_ROWS_THREADS == 32 * loader.GATHER_ROWS_PER_CTA


@pytest.mark.parametrize("flip_to", [True, False])
def test_the_switch_is_read_once_per_call(monkeypatch, flip_to):
    """``CUPARING_KV_GATHER`` changed while a ring call runs (here: on every rank right after the
    ranks agreed on it) changes nothing of that call: its plan and exchanges follow the answer it
    agreed on, whichever way the switch turns, and the result is the dense one."""
    import os

    from switches import kv_gather, ranks_calling

    import cuparing as cr
    from cuparing.comm.local import LocalRing

    agree = LocalRing.agree

    def agree_then_flip(ring, fields):
        agree(ring, fields)
        os.environ[schedule.GATHER_ENV] = "1" if flip_to else "0"

    monkeypatch.setattr(LocalRing, "agree", agree_then_flip)
    q, k, v = np.random.default_rng().standard_normal((3, 1, 48, 2, 8))

    def rank_fn(ring):
        shards = [cr.shard(x, ring.rank, ring.size, layout="zigzag") for x in (q, k, v)]
        return cr.ring_attention(*shards, ring, causal=True, layout="zigzag", return_lse=True)

    with kv_gather(not flip_to), ranks_calling() as ran:
        results = cr.simulate(4, rank_fn)
    assert sorted(ran["gathered_forward"]) == ([] if flip_to else [0, 1, 2, 3])
    out, lse = (cr.unshard([r[i] for r in results], layout="zigzag", axis=1 + i) for i in (0, 1))
    check_forward(out, lse, q, k, v, causal=True)


@pytest.mark.parametrize("value, expected", [(None, None), ("", None), (" ", None), ("1", True),
                                             ("0", False), (" 1 ", True)])  # fmt: skip
def test_the_switch_reads_on_off_or_unset(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv(schedule.GATHER_ENV, raising=False)
    else:
        monkeypatch.setenv(schedule.GATHER_ENV, value)
    assert schedule.gather_requested() is expected


@pytest.mark.parametrize("value", ["yes", "true", "2", "on"])
def test_any_other_switch_value_is_an_error_naming_it(monkeypatch, value):
    monkeypatch.setenv(schedule.GATHER_ENV, value)
    with pytest.raises(ValueError, match=rf"CUPARING_KV_GATHER.*{value!r}"):
        schedule.gather_requested()


@settings(max_examples=60, deadline=None)
@given(world=st.integers(1, 12), documents=st.booleans(), tokens=st.integers(1, 1 << 20),
       heads=st.sampled_from([1, 2, 8, 32]), dim=st.sampled_from([64, 128, 256]),
       dtype=st.sampled_from(["bfloat16", "float16", "float32", "float64"]),
       backward=st.booleans())  # fmt: skip
def test_unset_gathers_packed_document_forwards_on_rings_of_four_within_the_byte_bound(
    world, documents, tokens, heads, dim, dtype, backward
):
    """The switch's answer wins, either direction; unset, a call gathers exactly when it is a
    forward over packed documents, its ring has 4 or more ranks and the other ranks' K and V
    (world - 1 shards of [1, tokens, heads, dim]) fit in GATHER_DEFAULT_MAX_BYTES."""
    item = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8}[dtype]
    shard = 2 * tokens * heads * dim * item  # (one rank's K and V)
    for requested in (True, False):
        got = schedule.gather_decided(requested, world, documents, shard, backward)
        assert got is requested
    gathered = (world - 1) * shard
    expected = (not backward and documents and world >= 4
                and gathered <= schedule.GATHER_DEFAULT_MAX_BYTES)  # fmt: skip
    assert schedule.gather_decided(None, world, documents, shard, backward) is expected


def test_the_byte_bound_is_inclusive():
    """At the bound exactly the call gathers; one token more and it does not (5 ranks, bf16)."""
    per_token = 4 * 2 * 8 * 128 * 2  # four other shards, K and V, 8 heads of 128, bf16
    tokens = schedule.GATHER_DEFAULT_MAX_BYTES // per_token
    assert tokens * per_token == schedule.GATHER_DEFAULT_MAX_BYTES  # (the bound is a power of 2)
    shard = 2 * 8 * 128 * 2  # bytes a token of one rank's K and V takes
    assert schedule.gather_decided(None, 5, True, tokens * shard)
    assert not schedule.gather_decided(None, 5, True, (tokens + 1) * shard)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_ring_call_weighs_its_own_k_and_v_against_the_bound(monkeypatch, dtype):
    """The default weighs what the call's K and V take (shape and element size): with the
    bound at exactly the other ranks' K and V a packed forward on 4 ranks gathers, a byte
    under it does not."""
    from switches import ranks_calling

    import cuparing as cr

    monkeypatch.delenv(schedule.GATHER_ENV, raising=False)
    q, k, v = np.random.default_rng().standard_normal((3, 1, 40, 2, 8)).astype(dtype)
    cu = [0, 9, 40]
    shard = cr.shard(k, 0, 4, layout="zigzag", cu_seqlens=cu)
    others = 3 * 2 * shard.nbytes  # three other ranks' K and V
    for bound, gathers in ((others, True), (others - 1, False)):
        monkeypatch.setattr(schedule, "GATHER_DEFAULT_MAX_BYTES", bound)

        def rank_fn(ring):
            local = [cr.shard(x, ring.rank, ring.size, layout="zigzag", cu_seqlens=cu)
                     for x in (q, k, v)]  # fmt: skip
            return cr.ring_attention(*local, ring, causal=True, layout="zigzag", cu_seqlens=cu)

        with ranks_calling() as ran:
            cr.simulate(4, rank_fn)
        assert sorted(ran["gathered_forward"]) == ([0, 1, 2, 3] if gathers else [])


@pytest.mark.parametrize("world, documents, expected", [
    (4, "several", True), (5, "several", True), (3, "several", False), (2, "several", False),
    (4, "one", False), (4, "none", False),
])  # fmt: skip
def test_the_default_gathers_packed_documents_on_four_ranks(monkeypatch, world, documents,
                                                            expected):  # fmt: skip
    """With the switch unset, a ring forward over packed documents on 4 or more ranks runs the
    gathered forward on every rank; fewer ranks, or one sequence (``cu_seqlens`` of one
    document, or none), the ring; the backward always the ring.
    Either way the results are the dense ones."""
    from numerics import check_backward
    from switches import ranks_calling

    import cuparing as cr

    monkeypatch.delenv(schedule.GATHER_ENV, raising=False)
    rng = np.random.default_rng()
    seqlen = 2 * world * int(rng.integers(3, 7))  # (a plain zigzag sequence splits in 2C)
    cut = sorted(rng.choice(np.arange(1, seqlen), size=3, replace=False).tolist())
    cu = {"several": [0, *cut, seqlen], "one": [0, seqlen], "none": None}[documents]
    q, k, v, dout = rng.standard_normal((4, 1, seqlen, 2, 8))
    opts = {"causal": True, "layout": "zigzag", "cu_seqlens": cu}

    def rank_fn(ring):
        local = [cr.shard(x, ring.rank, ring.size, layout="zigzag", cu_seqlens=cu)
                 for x in (q, k, v, dout)]  # fmt: skip
        out, lse = cr.ring_attention(*local[:3], ring, return_lse=True, **opts)
        return out, lse, *cr.ring_attention_backward(local[3], *local[:3], out, lse, ring, **opts)

    with ranks_calling() as ran:
        results = cr.simulate(world, rank_fn)
    ranks = list(range(world)) if expected else []
    assert sorted(ran["gathered_forward"]) == ranks
    assert ran["gathered_backward"] == []

    def whole(i, axis=1):
        return cr.unshard([r[i] for r in results], layout="zigzag", axis=axis, cu_seqlens=cu)

    check_forward(whole(0), whole(1, axis=2), q, k, v, causal=True, cu_seqlens=cu)
    check_backward([whole(2), whole(3), whole(4)], dout, q, k, v, causal=True, cu_seqlens=cu)


@pytest.mark.parametrize("entry", ["forward", "backward"])
def test_a_bad_switch_on_one_rank_refuses_the_call_on_every_rank(monkeypatch, entry):
    """A rank whose ``CUPARING_KV_GATHER`` is unreadable refuses the call before any transfer,
    and the other ranks' call fails at once naming it, instead of waiting for the ring's
    timeout."""
    import threading
    import time

    import cuparing as cr
    from cuparing import api

    local = threading.local()
    monkeypatch.setattr(api, "gather_switch", lambda: getattr(local, "switch", ""))
    rng = np.random.default_rng()
    q, k, v, dout = rng.standard_normal((4, 1, 24, 2, 8))
    cu = [0, 5, 24]

    def rank_fn(ring):
        shards = [cr.shard(x, ring.rank, ring.size, layout="zigzag", cu_seqlens=cu)
                  for x in (q, k, v, dout)]  # fmt: skip
        opts = {"causal": True, "layout": "zigzag", "cu_seqlens": cu}
        if entry == "backward":
            out, lse = cr.ring_attention(*shards[:3], ring, return_lse=True, **opts)
        local.switch = "yes" if ring.rank == 1 else ""
        try:
            if entry == "forward":
                cr.ring_attention(*shards[:3], ring, **opts)
            else:
                cr.ring_attention_backward(shards[3], *shards[:3], out, lse, ring, **opts)
        except ValueError as error:
            return error
        return None

    start = time.monotonic()
    errors = cr.simulate(4, rank_fn, timeout=30)  # (a rank left waiting would time out there)
    assert time.monotonic() - start < 10
    assert all(isinstance(e, ValueError) for e in errors), errors
    assert "CUPARING_KV_GATHER" in str(errors[1]) and "'yes'" in str(errors[1])
    for rank in (0, 2, 3):
        assert "rank 1" in str(errors[rank]) and "CUPARING_KV_GATHER" in str(errors[rank])
