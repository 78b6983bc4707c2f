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

# The most sections a grid may have (its z dimension's limit).
MAX_SECTIONS = 65535


def section_pairs(pairs: int, group: int, pair_bytes: int, l2_bytes: int) -> int:
    """How many (batch, head) pairs a section holds: the most that divides ``pairs`` and whose
    shared operands (``pair_bytes`` each) fit in ``L2_SHARE`` of ``l2_bytes``: in whole GQA
    groups of ``group`` consecutive pairs where a group fits, else any divisor (a group's query
    heads then span consecutive sections); 1 at the least, and never so few that the sections
    outnumber the grid's z limit (then the fewest pairs that keep them within it).

    Raises:
        ValueError: ``pairs`` or ``group`` below 1, or ``group`` not dividing ``pairs``.
    """
    if pairs < 1 or group < 1 or pairs % group:
        raise ValueError(f"pairs ({pairs}) must be a positive multiple of group ({group})")
    fit = max(1, int(L2_SHARE * l2_bytes) // max(pair_bytes, 1))
    least = -(-pairs // MAX_SECTIONS)
    divisors = [d for d in range(1, pairs + 1) if pairs % d == 0 and d >= least]
    whole = [d for d in divisors if d % group == 0] if group <= fit else divisors
    fitting = [d for d in whole if d <= fit]
    return max(fitting) if fitting else min(whole)


def sectioned_grid(batch: int, heads: int, tiles: int, section: int) -> tuple[int, int, int]:
    """The grid (section, tiles, sections) of ``batch * heads`` pairs in sections of
    ``section`` (a divisor of the pairs; all of them: the plain order, pairs fastest).

    Raises:
        ValueError: ``section`` does not divide the pairs.
    """
    pairs = batch * heads
    if section < 1 or pairs % section or pairs // section > MAX_SECTIONS:
        raise ValueError(
            f"a section of {section} pairs does not divide {pairs} pairs into at most "
            f"{MAX_SECTIONS} sections"
        )
    return (section, tiles, pairs // section)
