"""tools/ablate.py's checkout variants (``--tree NAME=PATH``): parsed with clear errors, and
copied from that checkout rather than this one."""

from __future__ import annotations

import pytest
from tool_modules import load_tool


def _checkout(root, marker: str):
    for name in ("cuparing", "tools"):
        (root / name).mkdir(parents=True)
        (root / name / "marker.txt").write_text(marker)
    return root


def test_tree_variant_copies_that_checkout(tmp_path):
    ablate = load_tool("ablate")
    source = _checkout(tmp_path / "other", "from the other checkout")
    name, root = ablate.parse_tree(f"main={source}")
    assert (name, root) == ("main", source.resolve())
    copy = ablate.make_variant(tmp_path / "copy", [], root)
    for sub in ("cuparing", "tools"):
        assert (copy / sub / "marker.txt").read_text() == "from the other checkout"


@pytest.mark.parametrize("text", ["main", "=somewhere", "base=somewhere"])
def test_tree_needs_a_name_other_than_base(text):
    with pytest.raises(ValueError, match="NAME=PATH"):
        load_tool("ablate").parse_tree(text)


def test_tree_needs_a_checkout(tmp_path):
    (tmp_path / "cuparing").mkdir()
    with pytest.raises(ValueError, match="has no tools directory"):
        load_tool("ablate").parse_tree(f"x={tmp_path}")


def test_ablate_needs_a_variants_file_or_a_tree(capsys):
    ablate = load_tool("ablate")
    with pytest.raises(SystemExit):
        ablate.main(["--", "tools/bench_backward.py"])
    assert "variants file, --tree" in capsys.readouterr().err
