"""The sm90 kernels' grids: (batch, head) pairs dealt in sections that share L2.

``kernels/common/launch_order.cuh`` says why. The host picks the section (how many pairs) from
the bytes of the operands each pair's CTAs share and the device's L2, and lays the grid out as
(pairs in a section, tiles, sections): the hardware then starts a section's pairs fastest, then
its tiles, then the next section.
"""

from __future__ import annotations

# Of the device's L2, the share a section's shared operands may fill: 32 MB of an H100's or
# H200's 50 MB measured best of the first choice (PERF.md, backward v0.7); the rest holds what
# streams through (the backward's K / V and dq reductions, the forward's Q and outputs).
L2_SHARE = 0.64


def section_pairs(pairs: int, group: int, pair_bytes: int, l2_bytes: int) -> int:
    """How many (batch, head) pairs a section holds: the most that divides ``pairs`` and whose
    shared operands (``pair_bytes`` each) fit in ``L2_SHARE`` of ``l2_bytes``, in whole GQA
    groups of ``group`` consecutive pairs where a group fits (else a divisor of the group, its
    query heads then in consecutive sections); 1 at the least.

    Raises:
        ValueError: ``pairs`` or ``group`` below 1, or ``group`` not dividing ``pairs``.
    """
    if pairs < 1 or group < 1 or pairs % group:
        raise ValueError(f"pairs ({pairs}) must be a positive multiple of group ({group})")
    fit = max(1, int(L2_SHARE * l2_bytes) // max(pair_bytes, 1))
    fitting = [
        d for d in range(1, min(pairs, fit) + 1)
        if pairs % d == 0 and (d % group == 0 or group % d == 0)
    ]  # fmt: skip
    return max(fitting)


def sectioned_grid(batch: int, heads: int, tiles: int, section: int) -> tuple[int, int, int]:
    """The grid (section, tiles, sections) of ``batch * heads`` pairs in sections of
    ``section`` (a divisor of the pairs; all of them: the plain order, pairs fastest).

    Raises:
        ValueError: ``section`` does not divide the pairs.
    """
    pairs = batch * heads
    if section < 1 or pairs % section:
        raise ValueError(f"a section of {section} pairs does not divide {pairs} pairs")
    return (section, tiles, pairs // section)
