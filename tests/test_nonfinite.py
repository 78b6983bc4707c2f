"""NaN and inf behave as in dense attention, on every layout and ring size (CPU backend).

A row whose visible logits include NaN (or +inf) comes out NaN, a visible inf value gives inf,
and a key a query does not see never reaches it, whatever it holds. The oracle is the float64
dense reference, which decides visibility on its own (``cuparing.reference``). Non-finite values
are planted at random places of q, k, v and dout; every output's NaN/inf pattern must equal the
reference's, and rows that no planted value can reach must still meet the usual bounds.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from numerics import Reference, nonfinite_reach, same_pattern, to_f64
from strategies import ring_cases

import cuparing as cr
from cuparing.reference import visible_pairs

SPECIALS = (np.nan, np.inf, -np.inf)


@st.composite
def planted(draw):
    """A ring case and 1-3 (array, flat index, value) plants.

    The scale stays the default 1/sqrt(D): with large logits a probability can underflow to 0 in
    float32 but not in the float64 reference, and ``0 * inf`` (NaN) vs ``p * inf`` (inf) would
    then differ for a reason that is not ours to fix."""
    case = replace(draw(ring_cases(dtypes=("float64", "float32", "bfloat16"))), scale=None)
    plant = st.tuples(st.sampled_from("qkvd"), st.integers(0, 2**31), st.sampled_from(SPECIALS))
    plants = draw(st.lists(plant, min_size=1, max_size=3))
    return case, plants


def run_ring(case, arrays):
    def per_rank(ring):
        local = [cr.shard(x, ring.rank, ring.size, layout=case.layout) for x in arrays]
        ql, kl, vl, dl = local
        out, lse = cr.ring_attention(ql, kl, vl, ring, layout=case.layout, return_lse=True,
                                     **case.mask)  # fmt: skip
        grads = cr.ring_attention_backward(dl, ql, kl, vl, out, lse, ring, layout=case.layout,
                                           **case.mask)  # fmt: skip
        return out, lse, grads

    results = cr.simulate(case.world_size, per_rank, timeout=60)
    out = cr.unshard([r[0] for r in results], layout=case.layout)
    lse = cr.unshard([r[1] for r in results], layout=case.layout, axis=2)
    grads = [cr.unshard([r[2][i] for r in results], layout=case.layout) for i in range(3)]
    return out, lse, grads


def touched_rows(case, arrays):
    """[B, Sq, H] bool: query rows a planted value can reach (its own q, or a key it sees)."""
    positions = np.arange(case.seqlen)
    seen = visible_pairs(positions, positions, case.causal, case.window)  # [Sq, Sk]
    return nonfinite_reach(seen, *arrays[:3])[0]


@given(planted())
def test_nonfinite_inputs_behave_as_dense_attention(drawn):
    case, plants = drawn
    arrays = case.arrays()
    for name, index, value in plants:
        target = arrays["qkvd".index(name)]
        target.reshape(-1)[index % target.size] = value
    q, k, v, dout = arrays
    out, lse, grads = run_ring(case, arrays)
    want_out, want_lse = cr.reference_attention(q, k, v, return_lse=True, **case.mask)
    same_pattern(out, want_out, "out")
    same_pattern(lse, want_lse, "lse")
    want_grads = cr.reference_attention_backward(dout, q, k, v, **case.mask)
    for name, got, want in zip(("dq", "dk", "dv"), grads, want_grads, strict=True):
        assert np.array_equal(np.isfinite(to_f64(got)), np.isfinite(want)), f"{name} pattern"
    # rows no planted value reaches: exactly what the clean inputs give, within the usual bounds
    clean = [np.where(np.isfinite(to_f64(x)), x, 0).astype(x.dtype) for x in arrays[:3]]
    quiet = ~touched_rows(case, arrays)
    ref = Reference(*clean, **case.mask)

    def select(x):
        return x[quiet]

    err = np.linalg.norm(to_f64(out)[quiet] - ref.out[quiet])
    assert err <= ref.bound("out", select=select), f"quiet rows: out error {err:.3g}"
