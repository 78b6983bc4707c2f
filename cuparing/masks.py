"""Which keys a query may see, decided by global token positions.

A key at global position ``j`` is visible to a query at global position ``i`` iff

    (not causal or j <= i)  and  i - left <= j  and  j <= i + right

where ``window=(left, right)`` and ``None`` on either side means unbounded. Every layout and
every backend (the NumPy oracle and the CUDA kernels) uses this one definition, so sharding
never changes the answer.

Blocks of queries and keys are classified from the extreme positions they contain:
``EMPTY`` blocks are skipped, ``FULL`` blocks run without a mask, ``PARTIAL`` blocks apply the
element-wise mask. Classification is conservative: a block is only called ``EMPTY`` or ``FULL``
when that holds for every pair inside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

# Sentinel for an unbounded window side. Kernels get it as int32; positions stay far below it.
UNBOUNDED = 1 << 30


def _clamp(side: int | None) -> int:
    """A window side as an int in [-UNBOUNDED, UNBOUNDED] (None: UNBOUNDED). Positions stay below
    UNBOUNDED, so larger sides decide every pair the same way; kernels take them as int32."""
    return UNBOUNDED if side is None else max(-UNBOUNDED, min(int(side), UNBOUNDED))


class BlockKind(IntEnum):
    """Visibility of a whole (query block, key block) pair."""

    EMPTY = 0
    PARTIAL = 1
    FULL = 2


@dataclass(frozen=True)
class MaskSpec:
    """Causal flag plus sliding window, by global position.

    Attributes:
        causal: keys after the query are hidden.
        left: how many positions before the query stay visible (``None``: all).
        right: how many positions after the query stay visible (``None``: all).
    """

    causal: bool = False
    left: int | None = None
    right: int | None = None

    @property
    def left_bound(self) -> int:
        """``left`` as an integer, ``UNBOUNDED`` for None."""
        return _clamp(self.left)

    @property
    def right_bound(self) -> int:
        """``right`` as an integer, with causality folded in (at most 0 when causal)."""
        right = _clamp(self.right)
        return min(right, 0) if self.causal else right

    def visible(self, q_pos, k_pos):
        """Element-wise visibility of 1-D positions: ``q_pos[:, None]`` against ``k_pos[None, :]``.

        Works on any array namespace (NumPy, CuPy). Returns a boolean array ``[Sq, Sk]``.
        """
        delta = k_pos[None, :] - q_pos[:, None]  # j - i
        return (delta >= -self.left_bound) & (delta <= self.right_bound)

    def classify(self, q_min: int, q_max: int, k_min: int, k_max: int) -> BlockKind:
        """Classify a block: query positions in ``[q_min, q_max]``, keys in ``[k_min, k_max]``."""
        lo, hi = -self.left_bound, self.right_bound  # allowed range of j - i
        if k_min - q_max > hi or k_max - q_min < lo:
            return BlockKind.EMPTY
        if k_max - q_min <= hi and k_min - q_max >= lo:
            return BlockKind.FULL
        return BlockKind.PARTIAL
