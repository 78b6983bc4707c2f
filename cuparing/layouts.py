"""How a global sequence of ``S`` tokens is split across ``C`` ranks: the geometry, no checks.

- ``contiguous``: rank ``r`` holds tokens ``[r*S/C, (r+1)*S/C)``.
- ``zigzag``: the sequence is cut into ``2C`` chunks; rank ``r`` holds chunks ``r`` and ``2C-1-r``,
  so every rank gets the same amount of causal work.
- ``striped``: token ``t`` lives on rank ``t mod C``; also balanced under a causal mask.
- ``packed``: the layout for packed documents (``cuparing.documents``: short documents whole, in
  contiguous runs balanced by causal work; long ones as zigzag splits them); a plain sequence is
  one long document, so without documents it is zigzag.

Every rank's global positions are sorted ascending; the kernels rely on that to classify tiles
from their first and last position.

The functions here trust their arguments: the public :func:`cuparing.shard`,
:func:`cuparing.unshard` and :func:`cuparing.global_positions` (``cuparing.api``) check user input
in ``cuparing.validation`` first, and the schedule only passes checked values.
"""

from __future__ import annotations

import numpy as np

LAYOUTS = ("contiguous", "zigzag", "striped", "packed")


def plain_geometry(layout: str) -> str:
    """How ``layout`` splits a plain sequence (no documents): ``packed`` as ``zigzag``, every
    other layout as itself."""
    return "zigzag" if layout == "packed" else layout


def split_factor(layout: str, world_size: int) -> int:
    """The number the global length must be a multiple of for ``layout`` on ``world_size`` ranks:
    ``2C`` for zigzag (two chunks per rank), else ``C``."""
    return 2 * world_size if plain_geometry(layout) == "zigzag" else world_size


def global_positions(layout: str, rank: int, world_size: int, local_len: int) -> np.ndarray:
    """Global token positions (int64 [local_len], ascending) held by ``rank``.

    ``layout`` is one of :data:`LAYOUTS`, ``0 <= rank < world_size`` and, for zigzag (and
    packed), ``local_len`` is even.
    """
    layout = plain_geometry(layout)
    if layout == "contiguous":
        return np.arange(rank * local_len, (rank + 1) * local_len, dtype=np.int64)
    if layout == "striped":
        return np.arange(local_len, dtype=np.int64) * world_size + rank
    half = local_len // 2
    first = np.arange(rank * half, (rank + 1) * half, dtype=np.int64)
    mirror = 2 * world_size - 1 - rank
    second = np.arange(mirror * half, (mirror + 1) * half, dtype=np.int64)
    return np.concatenate([first, second])


def unshard_order(layout: str, world_size: int, local_len: int) -> np.ndarray:
    """Indices (int64 [world_size * local_len]) that put the concatenation of every rank's shard,
    rank 0 first, back into global order."""
    held = np.concatenate(
        [global_positions(layout, r, world_size, local_len) for r in range(world_size)]
    )
    return np.argsort(held)
