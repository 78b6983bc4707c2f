"""The candidate changes kept for tools/ablate.py (tools/variants/) still apply to the tree: a
variant whose text to replace no longer occurs exactly once would time the unchanged code, so it
is updated or dropped when the code under it changes."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted((ROOT / "tools" / "variants").glob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_every_variant_applies_once_to_the_tree(path):
    variants = runpy.run_path(str(path))["VARIANTS"]
    assert variants
    for name, replacements in variants.items():
        texts: dict[str, str] = {}
        for target, old, new in replacements:
            text = texts.setdefault(target, (ROOT / target).read_text())
            assert text.count(old) == 1, f"{path.name}: {name}: {target}: {old!r}"
            assert old != new
            texts[target] = text.replace(old, new)
