"""The Hopper backward's dq accumulator, host side.

The sm90 backward kernel adds dQ in float32 into an accumulator laid out by query tile rather
than by row ("dq tiles", ``kernels/common/dq_tiles.cuh``): per (batch, query head, 64-query
tile, 64-column box of the head dim) one contiguous chunk, in the order a consumer warp holds its
part of dQ, so that part leaves as one bulk reduction of 4 KB. The rows and columns that pad the
last tile and box are added into and never read. At the end of a backward one kernel
(``cuparing_dq_from_tiles``) turns the accumulator into dq [B, Sq, H, D] in the query dtype.
"""

from __future__ import annotations

import math
from typing import Any

TILE_ROWS = 64  # queries per chunk
TILE_COLS = 64  # head-dim columns per chunk


class DqTiles:
    """A float32 dq accumulator in the sm90 backward's layout.

    Args:
        array: flat float32 device array of :func:`floats` ``(shape)`` elements, zeroed.
        shape: the queries' shape [B, Sq, H, D] (dq's shape once converted).
    """

    def __init__(self, array: Any, shape: tuple[int, int, int, int]):
        if array.size != floats(shape):
            raise ValueError(
                f"a dq tiles accumulator for queries {shape} holds {floats(shape)} floats, got "
                f"{array.size}"
            )
        self.array = array
        self.shape = tuple(shape)


def floats(shape: tuple[int, int, int, int]) -> int:
    """Elements of the accumulator for queries of ``shape`` [B, Sq, H, D]."""
    batch, seqlen, heads, headdim = shape
    tiles = math.ceil(seqlen / TILE_ROWS) * math.ceil(headdim / TILE_COLS)
    return batch * heads * tiles * TILE_ROWS * TILE_COLS
