"""NaN and inf through the GPU kernels behave exactly as in dense float64 attention.

What is tested: NaN / +inf / -inf planted at random elements of q, k, v and dout (a fresh draw
every run) reach the results exactly as in the float64 reference (``cuparing.reference``, which
decides visibility on its own): ``out`` and ``lse`` carry its NaN, +inf and -inf pattern exactly,
``dq``, ``dk``, ``dv`` are non-finite exactly where its gradients are, and every row no plant can
reach still meets the usual bounds of tests/numerics.py. Covered: the forward kernels of every
family (the ``kernel_family`` fixture), the backward kernel, and rings of 2-3 simulated ranks on
one GPU (zigzag and striped: the merge of block results in the forward, the accumulation of dk
and dv across ranks in the backward).

Why: a key a query does not see must never reach it, whatever it holds. Inside a partially masked
tile (some of its pairs visible, others hidden: every tile on a causal diagonal, at a window's
edge, at a document boundary) the tensor-core products still multiply a hidden pair's zero weight
by its operand, and ``0 * NaN`` is NaN; the kernels had exactly that gap, for V in the forward
and for Q, dO, K and V in the backward. So the first plant (in an operand with that gap) goes on
a row that some rows of one aligned 16-row block see and another does not, a row no plant
reaches (so a leak into it cannot hide behind a NaN that belongs there). Every
kernel tile (forward 128 queries x 32-192 keys, backward 32-64 queries x 64-128 keys) is made of
such blocks, so that block lies in a partially masked tile of every kernel. Under causal masks
nearly every draw qualifies; packed documents (``cu_seqlens``) add partial tiles at each boundary.

Values: NaN anywhere; +inf and -inf in v and dout. An infinite q or k element makes some
visible logit -inf, i.e. a visible pair whose probability is exactly 0, where ``0 * inf`` (its
value, or its gradient) has no single right answer: README's Numerics section calls such cases
best effort. ``test_forward_infinite_key_element`` keeps the one such case that is well defined:
one infinite key element with finite values, forward only; ``test_backward_infinite_qk_element``
asserts what stays well defined in the backward: a gradient row the plant cannot reach (through
a pair the mask shows) is finite and within the usual bounds. The softmax scale stays the default
``1/sqrt(D)``: large scales make probabilities underflow to 0 in float32 but not in float64, the
same issue.

Every test needs a CUDA GPU and CuPy (``requires_gpu(1)``); on the CPU they are skipped.
"""

from __future__ import annotations

import itertools
import operator
from dataclasses import dataclass

import numpy as np
import pytest
from conftest import record_direct_grads, requires_gpu
from gpu_arrays import (
    poison_pool,
    random_array,
    ring_on_gpu,
    skip_unless_backward_family_runs,
    skip_unless_family_runs,
    to_gpu,
    to_host,
)
from numerics import Reference, nonfinite_reach, same_pattern, to_f64

import cuparing as cr
from cuparing.comm.local import SoloRing
from cuparing.layouts import split_factor
from cuparing.reference import visible_pairs

DTYPES = ("bfloat16", "float16")
MASKS = ("none", "causal", "window", "causal_window", "documents")
HEAD_DIMS = (64, 128)  # both have tiles in every family (128: what sm90 runs most)
# the forward also at head dims the sm90 family runs in a wider instantiation (zero columns)
FORWARD_HEAD_DIMS = (*HEAD_DIMS, 40, 96)
# the backward also runs above 128 as two launches (dV; dK and dQ) with other tiles
BACKWARD_HEAD_DIMS = (64, 128, 192)
HEADS = ((2, 1), (2, 2), (3, 1), (3, 3), (4, 1), (4, 2), (4, 4))  # (H, Hkv)
BLOCK = 16  # rows: every kernel tile is made of aligned blocks of 16 (module docstring)
# B * H * S^2 at most: keeps the float64 references (gradients included) near a second of CPU
SCORE_BUDGET = 800_000


@dataclass
class Case:
    """One drawn problem: host inputs in the input dtype (``arrays``: q, k, v, and d for dout), the
    mask arguments (``mask``: causal, window, cu_seqlens) and the pairs they show (``seen``: bool
    [S, S], queries by keys)."""

    arrays: dict
    mask: dict
    seen: np.ndarray

    @property
    def qkv(self):
        return [self.arrays[n] for n in "qkv"]


def _awkward_length(rng, low, high, split=1):
    """A length in [low, high], a multiple of ``split`` (what a ring layout must split) and not of
    64 (so the last tile of every kernel is a partial one)."""
    while True:
        length = split * int(rng.integers(-(-low // split), high // split + 1))
        if length % 64:
            return length


def _draw_mask(rng, name, seqlen):
    """The causal / window / cu_seqlens arguments of mask ``name``: window sides below a quarter of
    the length (so most keys are hidden from some queries of their tile); documents: 1-5
    boundaries at random tokens (repeats make empty documents), causal or not."""

    def side():
        return int(rng.integers(0, seqlen // 4))

    causal, window, cu = name.startswith("causal"), None, None
    if name == "window":
        window = (side(), side())
    elif name == "causal_window":
        window = (side(), 0)
    elif name == "documents":
        cuts = rng.integers(1, seqlen, size=int(rng.integers(1, 6)))
        if (cuts % BLOCK == 0).all():  # one boundary inside a block, so one hides pairs there
            cuts[0] -= int(rng.integers(1, BLOCK))
        cu = np.concatenate([[0], np.sort(cuts), [seqlen]]).astype(np.int64)
        causal = bool(rng.integers(2))
    return {"causal": causal, "window": window, "cu_seqlens": cu}


def _draw_case(rng, mask, dtype, headdim, seqlen=None):
    """Fresh inputs (B 1-2, H 2-4, Hkv dividing H, a length of 100-600 unless given) under a drawn
    mask of kind ``mask``."""
    seqlen = seqlen or _awkward_length(rng, 100, 600)
    sizes = [(b, h, hkv) for b in (1, 2) for h, hkv in HEADS if b * h * seqlen**2 <= SCORE_BUDGET]
    b, h, hkv = sizes[int(rng.integers(len(sizes)))]
    shapes = {"q": (b, seqlen, h, headdim), "k": (b, seqlen, hkv, headdim)}
    shapes.update(v=shapes["k"], d=shapes["q"])
    arrays = {name: random_array(rng, shape, dtype) for name, shape in shapes.items()}
    mask = _draw_mask(rng, mask, seqlen)
    positions = np.arange(seqlen)
    return Case(arrays, mask, visible_pairs(positions, positions, **mask))


def _exposes(case, reach, plant):
    """Whether ``plant`` would show a leak through a hidden pair: within one aligned block of
    ``BLOCK`` rows some see it and another is hidden from it, and that hidden row is one no plant
    reaches (else a leak there would be masked by a NaN that belongs there). The rows are
    queries (out, dq) for a k / v plant, keys (dk, dv) for a q / dout plant; ``reach`` is
    ``nonfinite_reach`` of the planted inputs."""
    name, (b, row, head, _), _ = plant
    queries, keys = reach
    group = queries.shape[2] // keys.shape[2]
    if name in "kv":
        line, quiet = case.seen[:, row], ~queries[b, :, head * group : (head + 1) * group].all(-1)
    else:
        line, quiet = case.seen[row], ~keys[b, :, head // group]
    blocks = (slice(start, start + BLOCK) for start in range(0, len(line), BLOCK))
    return any(line[rows].any() and (quiet[rows] & ~line[rows]).any() for rows in blocks)


def _exposing_rows(case, name):
    """Rows of array ``name`` (keys for k / v, queries for q / dout) that some aligned block of
    ``BLOCK`` rows of the other side partly sees and partly does not: where a plant can show a
    leak through a hidden pair (``_exposes``)."""
    lines = case.seen.T if name in "kv" else case.seen  # [row, rows of the other side]
    pad = -lines.shape[1] % BLOCK
    seen = np.pad(lines, ((0, 0), (0, pad))).reshape(len(lines), -1, BLOCK)
    real = np.pad(np.ones(lines.shape[1], bool), (0, pad)).reshape(-1, BLOCK)
    split = seen.any(-1) & (~seen & real).any(-1)  # [row, block]
    return np.flatnonzero(split.any(-1))


def _one_plant(rng, case, names, row=None, qk_values=(np.nan,)):
    """(array name, element index, value): one of ``qk_values`` in q and k, NaN or +-inf in v and
    dout; at a random element of a random array of ``names``, on sequence row ``row`` if
    given."""
    name = names[int(rng.integers(len(names)))]
    index = [int(rng.integers(n)) for n in case.arrays[name].shape]
    if row is not None:
        index[1] = row
    values = qk_values if name in "qk" else (np.nan, np.inf, -np.inf)
    value = float(values[int(rng.integers(len(values)))])
    return name, tuple(index), value


def _reaching_sign(rng, case, name, index, value):
    """The plant (``name``, ``index``, +-inf) with a sign that makes some logit of a visible pair
    +inf, so dense attention's gradients are reached: had every visible logit of its row gone to
    -inf, the row would see no key (output and gradients 0) and the case would test nothing."""
    q, k = case.arrays["q"], case.arrays["k"]
    group = q.shape[2] // k.shape[2]
    b, row, head, col = index
    if name == "q":
        meets = k[b][case.seen[row]][:, head // group, col]
    else:
        meets = q[b][case.seen[:, row]][:, head * group : (head + 1) * group, col]
    meets = meets.astype(np.float64)
    signs = [s for s in (1.0, -1.0) if (meets * s > 0).any()]
    assert signs, f"the {name} row {row} meets only zeros in column {col}: no sign reaches"
    return name, index, float(signs[int(rng.integers(len(signs)))] * np.inf)


def _planted(case, plants, names):
    """The arrays with ``plants`` set, and ``nonfinite_reach`` of them (dout only when planted
    into: forward-only cases reach out and lse rows)."""
    trial = {name: array.copy() for name, array in case.arrays.items()}
    for name, index, value in plants:
        trial[name][index] = value
    dout = trial["d"] if "d" in names else None
    return trial, nonfinite_reach(case.seen, trial["q"], trial["k"], trial["v"], dout)


def _plant(rng, case, names, gap, infinite_qk=False):
    """Plant 1-4 non-finite values into the arrays ``names``, in place; returns the plants (also
    printed, so a failure shows them). ``infinite_qk``: q and k get +-inf (the first plant) or
    NaN / +-inf (the others), not only NaN.

    Where the mask hides some pair, the first plant goes where a leak would show: into one of
    the arrays ``gap`` (those whose hidden values the kernels used to let through), on a row
    drawn from ``_exposing_rows``. The others go anywhere, and are kept only if the first still
    shows a leak next to them (another plant may reach the row it needs to stay clean)."""
    first = []
    if not case.seen.all():
        rows = {name: _exposing_rows(case, name) for name in gap}
        rows = {name: found for name, found in rows.items() if found.size}
        assert rows, "the mask hides pairs, but none inside a block: the draw must make some"
        name = sorted(rows)[int(rng.integers(len(rows)))]
        infinite = (np.inf, -np.inf) if infinite_qk else (np.nan,)
        first = [_one_plant(rng, case, name, int(rng.choice(rows[name])), qk_values=infinite)]
        if infinite_qk:
            first = [_reaching_sign(rng, case, *first[0])]
    qk_values = (np.nan, np.inf, -np.inf) if infinite_qk else (np.nan,)
    count = int(rng.integers(0 if first else 1, 4))
    others = [_one_plant(rng, case, names, qk_values=qk_values) for _ in range(count)]
    trial, reach = _planted(case, first + others, names)
    if first and not _exposes(case, reach, first[0]):
        trial, reach = _planted(case, first, names)  # alone it shows a leak, by construction
        others = []
    assert not first or _exposes(case, reach, first[0])
    case.arrays.update(trial)
    plants = first + others
    print("plants (array, [b, s, h, d], value):", plants)
    return plants


def _zero_nonfinite(x):
    """``x`` with its NaN and inf elements replaced by 0 (rows no plant reaches are the same)."""
    return np.where(np.isfinite(to_f64(x)), x, 0).astype(x.dtype)


def _check_quiet(got, want, bound, what):
    err = float(np.linalg.norm(to_f64(got) - want))
    assert err <= bound, f"{what}, rows no plant reaches: error {err:.3g} > bound {bound:.3g}"


def _check_forward(out, lse, case, reached=True):
    """out / lse (host) against the float64 reference: the same NaN, +inf, -inf pattern, and the
    rows no plant reaches within the GPU forward's bounds (the inputs' finite part gives them).
    ``reached``: the plants must reach some output (false only when all of them are in dout)."""
    q, k, v = case.qkv
    want_out, want_lse = cr.reference_attention(q, k, v, return_lse=True, **case.mask)
    if reached:
        assert not np.isfinite(want_out).all(), "no plant reached the output: a vacuous case"
    same_pattern(out, want_out, "out")
    same_pattern(lse, want_lse, "lse")
    quiet = ~nonfinite_reach(case.seen, q, k, v)[0]  # [B, S, H]
    ref = Reference(*map(_zero_nonfinite, (q, k, v)), **case.mask)
    rows = operator.itemgetter(quiet)
    _check_quiet(rows(out), rows(ref.out), ref.kernel_out_bound(select=rows), "out")
    lse_rows = operator.itemgetter(quiet.transpose(0, 2, 1))  # lse is [B, H, S]
    err, bound = ref.lse_excess(lse_rows(to_f64(lse)), select=lse_rows)
    assert err <= bound, f"lse, rows no plant reaches: error {err:.3g} > bound {bound:.3g}"


def _check_backward(grads, case, pattern=True):
    """(dq, dk, dv) (host) against the float64 reference: non-finite exactly where its gradients
    are (``pattern``; else only: finite on the rows no plant reaches), and the rows no plant
    reaches within the usual gradient bounds."""
    q, k, v, dout = (case.arrays[n] for n in "qkvd")
    want = cr.reference_attention_backward(dout, q, k, v, **case.mask)
    assert not all(np.isfinite(w).all() for w in want), "no plant reached a gradient: vacuous"
    queries, keys = nonfinite_reach(case.seen, q, k, v, dout)
    ref = Reference(*map(_zero_nonfinite, (q, k, v, dout)), **case.mask)
    for i, (name, reached) in enumerate(
        zip(("dq", "dk", "dv"), (queries, keys, keys), strict=True)
    ):
        finite, want_finite = np.isfinite(to_f64(grads[i])), np.isfinite(want[i])
        if pattern:
            where = np.argwhere(finite != want_finite)
        else:
            where = np.argwhere(~finite.all(-1) & ~reached)
        assert where.size == 0, f"{name}: finiteness differs at {where[:5].tolist()}"
        rows = operator.itemgetter(~reached)
        _check_quiet(rows(grads[i]), rows(ref.grads[i]), ref.bound(name, i, select=rows), name)


@requires_gpu(1)
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_nonfinite_as_dense(dtype, mask, kernel_family, fresh_rng):
    """The forward kernel of each family: NaN planted in q, k or v and +-inf in v reach exactly
    the output rows (and LSE rows) dense attention lets them reach, nothing else; a hidden V row
    inside a partially masked tile reaches no query that does not see it."""
    rng = fresh_rng
    headdim = int(rng.choice(FORWARD_HEAD_DIMS))
    skip_unless_family_runs(kernel_family, dtype, headdim)
    case = _draw_case(rng, mask, dtype, headdim)
    _plant(rng, case, "qkv", gap="v")
    poison_pool()
    out, lse = cr.attention(*map(to_gpu, case.qkv), return_lse=True, **case.mask)
    _check_forward(to_host(out), to_host(lse), case)


@requires_gpu(1)
@pytest.mark.parametrize("value,mask", [(np.inf, "causal"), (-np.inf, "none")])
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_infinite_key_element(dtype, value, mask, kernel_family, fresh_rng):
    """One infinite element of a random key, values finite: each query that sees the key gets a
    logit of +inf (its row is NaN, as in every max-subtracted softmax) or -inf (the key is hidden
    from it, as the mask hides it), by the sign of the query element it meets; output and LSE
    match dense attention exactly (forward only: the gradients meet ``0 * inf``)."""
    rng = fresh_rng
    headdim = int(rng.choice(FORWARD_HEAD_DIMS))
    skip_unless_family_runs(kernel_family, dtype, headdim)
    case = _draw_case(rng, mask, dtype, headdim)
    q, k = case.arrays["q"], case.arrays["k"]
    group = q.shape[2] // k.shape[2]
    while True:  # a key element that makes some visible logit +inf (else nothing is reached)
        b, j, hk, d = (int(rng.integers(n)) for n in k.shape)
        meets = q[b][case.seen[:, j]][:, hk * group : (hk + 1) * group, d].astype(np.float64)
        if (meets * value > 0).any():
            break
    k[b, j, hk, d] = value
    print("plant (k, [b, s, h, d], value):", (b, j, hk, d), value)
    poison_pool()
    out, lse = cr.attention(*map(to_gpu, case.qkv), return_lse=True, **case.mask)
    _check_forward(to_host(out), to_host(lse), case)


def _backward_head_dim(rng, backward_family) -> int:
    """A head dim the family's backward runs (sm90: its own head dims only)."""
    dims = HEAD_DIMS if backward_family == "sm90" else BACKWARD_HEAD_DIMS
    headdim = int(rng.choice(dims))
    skip_unless_backward_family_runs(backward_family, headdim)
    return headdim


def _backward_on_gpu(case, deterministic=False):
    """(dq, dk, dv) on the host: the GPU forward's own out and LSE, then the backward kernel on a
    ring of one, outputs poisoned first."""
    q, k, v, dout = (to_gpu(case.arrays[n]) for n in "qkvd")
    poison_pool()
    out, lse = cr.attention(q, k, v, return_lse=True, **case.mask)
    grads = cr.ring_attention_backward(
        dout, q, k, v, out, lse, SoloRing(), deterministic=deterministic, **case.mask
    )
    return [to_host(g) for g in grads]


@requires_gpu(1)
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_nonfinite_as_dense(dtype, mask, backward_family, fresh_rng):
    """The backward kernel of each family (on the forward's own out and LSE): NaN planted in q,
    k, v or dout and +-inf in v or dout make dq, dk, dv non-finite exactly where dense
    attention's gradients are; a Q, dO, K or V row reaches no gradient row through a pair the
    mask hides, also inside a partially masked tile (the sm90 kernel hands such tiles to the
    sm80 kernel's redo pass)."""
    rng = fresh_rng
    case = _draw_case(rng, mask, dtype, _backward_head_dim(rng, backward_family))
    _plant(rng, case, "qkvd", gap="qkvd")
    _check_backward(_backward_on_gpu(case), case)


@requires_gpu(1)
@pytest.mark.parametrize("mask", [m for m in MASKS if m != "none"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_deterministic_backward_with_nonfinite_inputs(dtype, mask, monkeypatch, fresh_rng):
    """Deterministic mode when a plant stops CTAs of the Hopper kernel: the stopped CTAs still
    take their turns on the tiles they leave to the redo pass (else the CTAs after them would
    wait forever), and the gradients are dense attention's as in the default mode."""
    monkeypatch.setenv("CUPARING_BWD", "sm90")
    rng = fresh_rng
    case = _draw_case(rng, mask, dtype, _backward_head_dim(rng, "sm90"))
    _plant(rng, case, "qkvd", gap="qkvd")
    _check_backward(_backward_on_gpu(case, deterministic=True), case)


@requires_gpu(1)
@pytest.mark.parametrize("mask", [m for m in MASKS if m != "none"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_direct_gradients_with_nonfinite_inputs(dtype, mask, monkeypatch, fresh_rng):
    """One device, one query head per K/V head: the Hopper backward writes dK / dV straight
    (backends.direct_grads). A plant next to a mask edge stops CTAs, which store their part as
    float32 scratch; the redo pass adds the rest there and cuparing_direct_rows converts those
    rows: the gradients are still dense attention's, in either mode (drawn)."""
    monkeypatch.setenv("CUPARING_BWD", "sm90")
    monkeypatch.setitem(globals(), "HEADS", tuple((h, h) for h in (1, 2, 3, 4)))
    made = record_direct_grads(monkeypatch)
    rng = fresh_rng
    case = _draw_case(rng, mask, dtype, _backward_head_dim(rng, "sm90"))
    _plant(rng, case, "qkvd", gap="qkvd")
    _check_backward(_backward_on_gpu(case, deterministic=bool(rng.integers(2))), case)
    assert len(made) == 2, "the direct gradients were not used"


@requires_gpu(1)
@pytest.mark.parametrize("mask", [m for m in MASKS if m != "none"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_infinite_qk_element(dtype, mask, backward_family, fresh_rng):
    """+inf or -inf in a q or k row that some rows of an aligned 16-row block see and another
    does not (plus up to 3 more NaN / inf anywhere): every gradient row the plants cannot reach
    through a visible pair is finite and within the usual bounds. The hidden pair inside that
    partially masked tile must not form 0 * inf in dK (a q plant) or dQ (a k plant). The rows the
    plants do reach are best effort (module docstring: a -inf logit), so their pattern is not
    compared."""
    rng = fresh_rng
    case = _draw_case(rng, mask, dtype, _backward_head_dim(rng, backward_family))
    _plant(rng, case, "qkvd", gap="qk", infinite_qk=True)
    _check_backward(_backward_on_gpu(case), case, pattern=False)


RING_CASES = list(itertools.product(("zigzag", "striped"), ("causal", "documents")))


@requires_gpu(1)
@pytest.mark.parametrize("layout,mask", RING_CASES)
def test_ring_nonfinite_as_dense(layout, mask, kernel_family, fresh_rng):
    """A ring of 2-3 simulated ranks on one GPU, forward and backward: the merge of each block's
    result into the running output, and dk / dv travelling the ring, keep the NaN / inf pattern
    of dense attention, and the rows no plant reaches within the usual bounds."""
    rng = fresh_rng
    world = int(rng.integers(2, 4))
    dtype = DTYPES[int(rng.integers(len(DTYPES)))]
    headdim = int(rng.choice(FORWARD_HEAD_DIMS))
    skip_unless_family_runs(kernel_family, dtype, headdim)
    split = 1 if mask == "documents" else split_factor(layout, world)  # documents pad instead
    case = _draw_case(rng, mask, dtype, headdim, _awkward_length(rng, 100, 400, split))
    plants = _plant(rng, case, "qkvd", gap="qkvd")
    host = [case.arrays[n] for n in "qkvd"]
    out, lse, *grads = ring_on_gpu(host, world, layout, **case.mask)
    _check_forward(out, lse, case, reached=any(name in "qkv" for name, _, _ in plants))
    _check_backward(grads, case)
