"""Run one pytest selection as N processes at once (``CUPARING_TEST_SHARD``, tests/conftest.py)
and sum their results: for the GPU tests, whose time goes mostly to host work (the float64
references, first-call compiles), on a machine with cores to spare.

    python tools/sharded_pytest.py [--shards 4] [--log-dir DIR] [--timeout S] -- \\
        tests/test_gpu_attention.py -k "sm90 and matches_reference"

Each shard's output goes to DIR/shard_<i>.log (default: a temporary directory); prints each
shard's summary line, the failures' names, and the summed counts last (pytest's wording). Exit
status: 0 when every shard passed (pytest's 0, or 5: nothing selected in that shard), else 1.
``--timeout``: shards still running that many seconds after the start are killed (their
summaries then missing: a failure), so that no test process outlives the call.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUMMARY = re.compile(r"^=*\s*(\d+ \w+.*) in [\d.]+s", re.MULTILINE)
COUNT = re.compile(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed|warnings?)")
NOTHING_COLLECTED = 5  # pytest's exit status when a shard selected no test


def summed(summaries: list[str]) -> dict[str, int]:
    """The counts of pytest summary lines (``"3 passed, 1 skipped in 2.0s"``) added by kind."""
    total: dict[str, int] = {}
    for line in summaries:
        for number, kind in COUNT.findall(line):
            kind = {"error": "errors", "warning": "warnings"}.get(kind, kind)
            total[kind] = total.get(kind, 0) + int(number)
    return total


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        raise SystemExit("usage: sharded_pytest.py [--shards N] [--log-dir DIR] -- PYTEST ARGS")
    split = argv.index("--")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--log-dir", help="where the shards' outputs go")
    parser.add_argument("--timeout", type=float, default=None, help="seconds before shards die")
    args = parser.parse_args(argv[:split])
    if args.shards < 1:
        parser.error(f"--shards must be at least 1, got {args.shards}")
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="shards-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    processes = []
    for index in range(args.shards):
        log = open(log_dir / f"shard_{index}.log", "w")  # noqa: SIM115 - closed below
        env = {**os.environ, "CUPARING_TEST_SHARD": f"{index}/{args.shards}"}
        command = [sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider",
                   *argv[split + 1 :]]  # fmt: skip
        processes.append((subprocess.Popen(command, cwd=ROOT, env=env, stdout=log,
                                           stderr=subprocess.STDOUT), log))  # fmt: skip
    ok, summaries = True, []
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    for index, (process, log) in enumerate(processes):
        try:
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            status = process.wait(timeout=left)
        except subprocess.TimeoutExpired:
            process.kill()
            status = process.wait()
            print(f"shard {index}/{args.shards}: killed after {args.timeout:g} s")
        log.close()
        text = (log_dir / f"shard_{index}.log").read_text()
        found = SUMMARY.findall(text)
        summary = found[-1] if found else f"no summary (exit status {status})"
        summaries.append(summary if found else "")
        print(f"shard {index}/{args.shards}: {summary}")
        for line in text.splitlines():
            if line.startswith(("FAILED", "ERROR")):
                print(f"  {line}")
        ok &= status in (0, NOTHING_COLLECTED) and bool(found)
    total = summed(summaries)
    # (not "deselected": each shard deselects the others' tests)
    order = ("passed", "failed", "errors", "skipped", "xfailed", "xpassed")
    print("all shards: " + ", ".join(f"{total[k]} {k}" for k in order if total.get(k)))
    print(f"logs: {log_dir}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
