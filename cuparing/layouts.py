"""How a global sequence of ``S`` tokens is split across ``C`` ranks.

- ``contiguous``: rank ``r`` holds tokens ``[r*S/C, (r+1)*S/C)``.
- ``zigzag``: the sequence is cut into ``2C`` chunks; rank ``r`` holds chunks ``r`` and ``2C-1-r``,
  so every rank gets the same amount of causal work.
- ``striped``: token ``t`` lives on rank ``t mod C``; also balanced under a causal mask.

Every rank's global positions are sorted ascending; the kernels rely on that to classify tiles
from their first and last position.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

LAYOUTS = ("contiguous", "zigzag", "striped")


def check_layout(layout: str) -> str:
    """Return ``layout`` if known, else raise ``ValueError`` naming the choices."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not one of {LAYOUTS}")
    return layout


def check_world(world_size: int) -> int:
    """Return ``world_size`` if it is an integer >= 1, else raise ``ValueError``."""
    if isinstance(world_size, bool) or not isinstance(world_size, (int, np.integer)):
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size=}")
    return int(world_size)


def split_factor(layout: str, world_size: int) -> int:
    """The number the global length must be a multiple of for ``layout`` on ``world_size`` ranks."""
    return 2 * world_size if check_layout(layout) == "zigzag" else world_size


def check_global_length(seqlen: int, layout: str, world_size: int) -> None:
    """Raise ``ValueError`` if ``seqlen`` tokens cannot be split evenly by ``layout``."""
    factor = split_factor(layout, world_size)
    if seqlen % factor:
        lower = seqlen - seqlen % factor
        suggestion = f"{lower} or {lower + factor}" if lower else f"{factor}"
        raise ValueError(
            f"sequence length {seqlen} must be a multiple of {factor} for layout={layout!r} "
            f"with world_size={world_size} (nearest valid lengths: {suggestion}); pad the sequence"
        )


def global_positions(layout: str, rank: int, world_size: int, local_len: int) -> np.ndarray:
    """Global token positions (int64, ascending) held by ``rank``, ``local_len`` of them."""
    check_layout(layout)
    if layout == "contiguous":
        return np.arange(rank * local_len, (rank + 1) * local_len, dtype=np.int64)
    if layout == "striped":
        return np.arange(local_len, dtype=np.int64) * world_size + rank
    if local_len % 2:
        raise ValueError(f"zigzag needs an even local length, got local_len={local_len}")
    half = local_len // 2
    first = np.arange(rank * half, (rank + 1) * half, dtype=np.int64)
    mirror = 2 * world_size - 1 - rank
    second = np.arange(mirror * half, (mirror + 1) * half, dtype=np.int64)
    return np.concatenate([first, second])


def shard(x: Any, rank: int, world_size: int, layout: str = "contiguous", axis: int = 1) -> Any:
    """Take ``rank``'s share of a global array along ``axis`` (the sequence axis).

    Args:
        x: any array (NumPy, CuPy, torch, JAX, ...) with the full sequence on ``axis``.
        rank: which rank's share, ``0 <= rank < world_size``.
        world_size: number of ranks ``C``.
        layout: ``"contiguous"``, ``"zigzag"`` or ``"striped"``.
        axis: the sequence axis (1 for ``[B, S, H, D]``, 2 for an LSE ``[B, H, S]``).

    Returns:
        The shard, ``S / C`` long on ``axis``, in the caller's array type.

    Raises:
        ValueError: unknown layout, bad rank or world size, or a length the layout cannot split.

    Example:
        >>> import numpy as np, cuparing as cr
        >>> cr.shard(np.arange(8)[None], 0, 2, layout="zigzag").tolist()
        [[0, 1, 6, 7]]
    """
    world_size = check_world(world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank=}")
    seqlen = x.shape[axis]
    check_global_length(seqlen, layout, world_size)
    local_len = seqlen // world_size
    positions = global_positions(layout, rank, world_size, local_len)
    return _take(x, positions, axis)


def unshard(shards: Sequence[Any], layout: str = "contiguous", axis: int = 1) -> Any:
    """Reassemble the global array from every rank's shard (inverse of :func:`shard`).

    Args:
        shards: ``C`` arrays, shard ``r`` from rank ``r``, all the same shape.
        layout: the layout they were sharded with.
        axis: the sequence axis.

    Returns:
        The global array, ``C`` times longer on ``axis``, in the type of the first shard.

    Raises:
        ValueError: no shards, unknown layout, or shards of different shapes.
    """
    check_layout(layout)
    if len(shards) == 0:
        raise ValueError("unshard needs at least one shard, got an empty sequence")
    world_size = len(shards)
    shapes = {tuple(s.shape) for s in shards}
    if len(shapes) != 1:
        raise ValueError(f"all shards must have the same shape, got {sorted(shapes)}")
    local_len = shards[0].shape[axis]
    order = np.concatenate(
        [global_positions(layout, r, world_size, local_len) for r in range(world_size)]
    )
    inverse = np.argsort(order)
    xp = _namespace(shards[0])
    stacked = (
        xp.concatenate(list(shards), axis=axis) if xp is not None else _torch_cat(shards, axis)
    )
    return _take(stacked, inverse, axis)


def _namespace(x):
    module = type(x).__module__.split(".")[0]
    if module == "numpy":
        return np
    if module == "cupy":
        import cupy

        return cupy
    if module in ("jax", "jaxlib"):
        import jax.numpy as jnp

        return jnp
    return None


def _torch_cat(shards, axis):
    import torch

    return torch.cat(list(shards), dim=axis)


def _take(x, positions: np.ndarray, axis: int):
    """``x`` indexed by ``positions`` along ``axis``, using the array's own indexing."""
    module = type(x).__module__.split(".")[0]
    index = [slice(None)] * x.ndim
    if module == "torch":
        import torch

        index[axis] = torch.as_tensor(positions, device=x.device)
        return x[tuple(index)]
    if module == "cupy":
        import cupy

        index[axis] = cupy.asarray(positions)
        return x[tuple(index)]
    index[axis] = positions
    return x[tuple(index)]
