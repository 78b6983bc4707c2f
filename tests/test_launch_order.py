"""The sm90 kernels' sectioned grids (kernels/launch_order.py with common/launch_order.cuh's
cta_work, modelled here): every (tile, batch, head) once, sections of whole GQA groups that fit
the L2 share, and one section of every pair is the plain order the deterministic backward needs."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cuparing.kernels import launch_order

MB = 1 << 20


def cta_work(grid: tuple[int, int, int], x: int, y: int, z: int, heads: int):
    """common/launch_order.cuh's cta_work for block (x, y, z): (tile, batch, head)."""
    pair = z * grid[0] + x
    return y, pair // heads, pair % heads


def launch_order_of(grid):
    """Blocks in the hardware's start order: x fastest, then y, then z."""
    return [(x, y, z) for z in range(grid[2]) for y in range(grid[1]) for x in range(grid[0])]


@given(
    batch=st.integers(1, 4), kv_heads=st.integers(1, 8), group=st.sampled_from([1, 2, 4, 8]),
    pair_mb=st.integers(0, 64), l2_mb=st.sampled_from([40, 50, 60, 96]),
)  # fmt: skip
def test_sections_divide_the_pairs_in_whole_groups_that_fit(batch, kv_heads, group, pair_mb,
                                                            l2_mb):  # fmt: skip
    heads = kv_heads * group
    pairs = batch * heads
    pair_bytes = max(1, pair_mb * MB)
    section = launch_order.section_pairs(pairs, group, pair_bytes, l2_mb * MB)
    fit = max(1, int(launch_order.L2_SHARE * l2_mb * MB) // pair_bytes)
    assert pairs % section == 0 and 1 <= section <= max(1, min(pairs, fit))
    if group <= fit:  # whole groups where one fits
        assert section % group == 0

    def qualifies(d):
        return pairs % d == 0 and (d % group == 0 or group > fit)

    # the largest such: no bigger divisor of the pairs qualifies
    assert not any(qualifies(d) for d in range(section + 1, min(pairs, fit) + 1))


def test_sections_stay_within_the_grid_limit(monkeypatch):
    """So many pairs that sections of what fits would outnumber the z limit: the fewest pairs a
    section may hold to stay within it (here a divisor of 2 x 3 x 5 x 7 x 11 x 13 x 17 x 19)."""
    monkeypatch.setattr(launch_order, "MAX_SECTIONS", 100)
    pairs = 2 * 3 * 5 * 7 * 11 * 13 * 17 * 19
    section = launch_order.section_pairs(pairs, 1, 64 * MB, 50 * MB)  # 1 pair fits
    assert pairs // section <= 100 and pairs % section == 0
    assert not any(pairs % d == 0 and pairs // d <= 100 for d in range(1, section))
    launch_order.sectioned_grid(1, pairs, 3, section)
    with pytest.raises(ValueError, match="at most 100 sections"):
        launch_order.sectioned_grid(1, pairs, 3, 1)


@given(batch=st.integers(1, 3), heads=st.integers(1, 12), tiles=st.integers(1, 9),
       data=st.data())  # fmt: skip
def test_every_tile_of_every_pair_once_section_by_section(batch, heads, tiles, data):
    pairs = batch * heads
    section = data.draw(st.sampled_from([d for d in range(1, pairs + 1) if pairs % d == 0]))
    grid = launch_order.sectioned_grid(batch, heads, tiles, section)
    work = [cta_work(grid, *block, heads) for block in launch_order_of(grid)]
    assert sorted(work) == [(t, b, h) for t in range(tiles) for b in range(batch)
                            for h in range(heads)]  # fmt: skip
    # a section's pairs fastest, then its tiles, then the next section
    pairs_in_order = [b * heads + h for _, b, h in work]
    for start in range(0, len(work), section * tiles):
        chunk = pairs_in_order[start : start + section * tiles]
        assert len(set(chunk)) == section
        assert [t for t, _, _ in work[start : start + section * tiles]] == [
            t for t in range(tiles) for _ in range(section)
        ]


@given(batch=st.integers(1, 3), heads=st.integers(1, 8), tiles=st.integers(1, 6))
def test_one_section_of_every_pair_is_the_plain_order(batch, heads, tiles):
    """The deterministic backward's waits need the plain order: the old grid (heads, batch,
    tiles) started (h, b, t) at linear index h + heads (b + batch t)."""
    grid = launch_order.sectioned_grid(batch, heads, tiles, batch * heads)
    work = [cta_work(grid, *block, heads) for block in launch_order_of(grid)]
    plain = [(t, b, h) for t in range(tiles) for b in range(batch) for h in range(heads)]
    assert work == plain


def test_bad_sections_are_refused():
    with pytest.raises(ValueError, match="does not divide"):
        launch_order.sectioned_grid(1, 6, 4, 4)
    with pytest.raises(ValueError, match="multiple of group"):
        launch_order.section_pairs(6, 4, MB, 50 * MB)
