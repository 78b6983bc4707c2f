"""Hypothesis strategies for ring problems: awkward sizes, every layout, masks and dtypes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hypothesis import assume
from hypothesis import strategies as st

import cuparing as cr
from cuparing.layouts import split_factor

HEAD_DIMS = st.one_of(st.integers(1, 16), st.sampled_from([59, 64, 96, 97, 128, 256]))
LOW_PRECISION = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class RingCase:
    """One drawn problem: global shapes, ring size, layout, mask, scale and dtype."""

    batch: int
    seqlen: int
    nheads: int
    nheads_kv: int
    headdim: int
    world_size: int
    layout: str
    causal: bool
    window: tuple | None
    scale: float | None
    dtype: str
    seed: int

    @property
    def mask(self) -> dict:
        return {"causal": self.causal, "window": self.window, "scale": self.scale}

    def arrays(self, with_dout: bool = True):
        """Fresh random q, k, v (and dout) of the case's global shape and dtype."""
        rng = np.random.default_rng(self.seed)
        shapes = [
            (self.batch, self.seqlen, self.nheads, self.headdim),
            (self.batch, self.seqlen, self.nheads_kv, self.headdim),
            (self.batch, self.seqlen, self.nheads_kv, self.headdim),
        ]
        if with_dout:
            shapes.append(shapes[0])
        return [rng.standard_normal(s).astype(np_dtype(self.dtype)) for s in shapes]


def np_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(name)


@st.composite
def windows(draw, seqlen: int, causal: bool):
    """None, or a (left, right) window that leaves some key visible to some query."""
    if draw(st.booleans()):
        return None
    side = st.one_of(st.none(), st.integers(-2, seqlen + 2))
    left, right = draw(side), draw(side)
    spec = cr.masks.MaskSpec(causal, left, right)
    assume(-spec.left_bound <= spec.right_bound)
    return (left, right)


@st.composite
def ring_cases(draw, dtypes=("float64",), max_world: int = 8, max_local: int = 12):
    """A whole ring problem; the global length always splits for the drawn layout."""
    world_size = draw(st.integers(1, max_world))
    layout = draw(st.sampled_from(cr.LAYOUTS))
    per_rank = draw(st.integers(1, max_local))
    local_len = per_rank * split_factor(layout, 1)  # zigzag, packed: two chunks per rank
    seqlen = local_len * world_size
    nheads_kv = draw(st.integers(1, 3))
    nheads = nheads_kv * draw(st.integers(1, 3))
    causal = draw(st.booleans())
    return RingCase(
        batch=draw(st.integers(1, 2)),
        seqlen=seqlen,
        nheads=nheads,
        nheads_kv=nheads_kv,
        headdim=draw(HEAD_DIMS),
        world_size=world_size,
        layout=layout,
        causal=causal,
        window=draw(windows(seqlen, causal)),
        scale=draw(st.one_of(st.none(), st.floats(0.05, 2.0))),
        dtype=draw(st.sampled_from(dtypes)),
        seed=draw(st.integers(0, 2**32 - 1)),
    )
