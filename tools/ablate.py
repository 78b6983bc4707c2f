"""Time variants of the package side by side: ablations and candidate changes of the kernels.

Each variant is a copy of ``cuparing/`` and ``tools/`` with some exact text replacements applied
(each ``old`` must occur exactly once in its file, so a stale variant fails loudly instead of
timing the unchanged code). A benchmark script is then run once per variant and round, the
variants interleaved round by round, each from its own copy's ``tools/`` (the tools put their own
checkout first on ``sys.path``: a copy timed through the main tree's tools would time the main
tree). The copies share the GPU one at a time, in one process each.

Variants come from a Python file defining ``VARIANTS``: a dict from name to a list of
``(path, old, new)`` triples, paths relative to the repository root; the name ``"base"`` with no
replacements is always run first. A variant's results are wrong wherever a replacement removes
work: only its time counts. ``--tree NAME=PATH`` adds another checkout as a variant (its own
``cuparing/`` and ``tools/`` as they are, e.g. a ``git archive`` of another commit or branch):
a branch timed against this tree in the same process order and on the same card.

Usage:
    python tools/ablate.py VARIANTS_FILE [--rounds 2] [--out DIR] [--lines 2] \\
        -- tools/bench_backward.py --quick --families sm90
    python tools/ablate.py [VARIANTS_FILE] --tree main=PATH [--tree ...] -- tools/...
    python tools/ablate.py VARIANTS_FILE --apply NAME

``--apply NAME`` writes variant NAME's replacements into this checkout instead (to run the
tests on it; ``git checkout`` undoes it).

Prints, per round and variant, the last ``--lines`` lines of the benchmark's output; the full
outputs go to DIR (default: a temporary directory, printed).
"""

from __future__ import annotations

import argparse
import runpy
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COPIED = ("cuparing", "tools")


def make_variant(
    where: Path, replacements: list[tuple[str, str, str]], source: Path = ROOT
) -> Path:  # fmt: skip
    """A copy of the package and tools of the checkout ``source`` (this one by default) under
    ``where`` with ``replacements`` applied.

    Raises:
        ValueError: an ``old`` text that does not occur exactly once in its file.
        FileNotFoundError: ``source`` has no ``cuparing/`` or ``tools/``.
    """
    for name in COPIED:
        shutil.copytree(source / name, where / name, ignore=shutil.ignore_patterns("__pycache__"))
    return apply(where, replacements)


def parse_tree(text: str) -> tuple[str, Path]:
    """``NAME=PATH`` of ``--tree`` as (name, path).

    Raises:
        ValueError: no ``=``, an empty name, the name ``base``, or a path without ``cuparing/``
            and ``tools/``.
    """
    name, sep, path = text.partition("=")
    if not sep or not name or name == "base":
        raise ValueError(f"--tree takes NAME=PATH with a NAME other than 'base', got {text!r}")
    root = Path(path).resolve()
    missing = [d for d in COPIED if not (root / d).is_dir()]
    if missing:
        raise ValueError(f"--tree {name}: {root} has no {' or '.join(missing)} directory")
    return name, root


def apply(where: Path, replacements: list[tuple[str, str, str]]) -> Path:
    """``replacements`` written into the files under ``where``, each checked first.

    Raises:
        ValueError: an ``old`` text that does not occur exactly once in its file (found before
            any file is written, unless an earlier replacement of the same file made it so).
    """
    for path, old, _ in replacements:
        count = (where / path).read_text().count(old)
        if count != 1:
            raise ValueError(f"{path}: the text to replace occurs {count} times, not once:\n{old}")
    for path, old, new in replacements:
        target = where / path
        text = target.read_text()
        if text.count(old) != 1:
            raise ValueError(
                f"{path}: the text to replace occurs {text.count(old)} times, not once:\n{old}"
            )
        target.write_text(text.replace(old, new))
    return where


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    bench = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("variants", nargs="?", help="Python file defining VARIANTS")
    parser.add_argument("--tree", action="append", default=[], metavar="NAME=PATH",
                        help="another checkout's package and tools, timed as variant NAME")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", help="directory for the copies and the full outputs")
    parser.add_argument("--lines", type=int, default=2, help="output lines shown per run")
    parser.add_argument("--apply", metavar="NAME", help="write variant NAME into this checkout")
    args = parser.parse_args(argv)
    if args.apply:
        if not args.variants:
            parser.error("--apply needs the variants file")
        apply(ROOT, runpy.run_path(args.variants)["VARIANTS"][args.apply])
        print(f"applied {args.apply} to {ROOT}")
        return 0
    if not bench or not bench[0].startswith("tools/"):
        parser.error("give the benchmark after --, as a path under tools/ and its arguments")
    if not args.variants and not args.tree:
        parser.error("give a variants file, --tree NAME=PATH, or both")
    try:
        trees = dict(parse_tree(text) for text in args.tree)
    except ValueError as error:
        parser.error(str(error))
    variants = {"base": [], **(runpy.run_path(args.variants)["VARIANTS"] if args.variants else {})}
    clash = set(trees) & set(variants)
    if clash:
        parser.error(f"--tree names also in the variants file: {sorted(clash)}")
    out = Path(args.out or tempfile.mkdtemp(prefix="ablate-"))
    out.mkdir(parents=True, exist_ok=True)
    copies = {name: make_variant(out / name, changes) for name, changes in variants.items()}
    copies |= {name: make_variant(out / name, [], source) for name, source in trees.items()}
    print(f"variants in {out}: {', '.join(copies)}")
    for round_index in range(args.rounds):
        for name, copy in copies.items():
            run = subprocess.run(
                [sys.executable, str(copy / bench[0]), *bench[1:]],
                capture_output=True, text=True, cwd=copy,
            )  # fmt: skip
            text = run.stdout + run.stderr
            (out / f"{name}.round{round_index}.log").write_text(text)
            shown = "\n".join(text.rstrip().splitlines()[-args.lines :])
            print(f"== {name} (round {round_index + 1}, rc={run.returncode})\n{shown}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
