"""CUPARING_TEST_SHARD (tests/conftest.py) and tools/sharded_pytest.py: shards of one selection
are disjoint and together are the whole selection; a malformed shard is a usage error."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from tool_modules import load_tool

ROOT = Path(__file__).resolve().parents[1]
TARGET = "tests/test_layouts.py"


def collected(shard: str | None) -> tuple[int, list[str]]:
    env = {k: v for k, v in os.environ.items() if k != "CUPARING_TEST_SHARD"}
    if shard is not None:
        env["CUPARING_TEST_SHARD"] = shard
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", TARGET],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    return done.returncode, [line for line in done.stdout.splitlines() if "::" in line]


@pytest.mark.parametrize("count", [2, 3])
def test_shards_partition_the_selection(count):
    status, whole = collected(None)
    assert status == 0 and len(whole) >= count
    parts = []
    for index in range(count):
        status, part = collected(f"{index}/{count}")
        assert status == 0
        parts.append(part)
    flat = [test for part in parts for test in part]
    assert sorted(flat) == sorted(whole) and len(set(flat)) == len(flat)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


@pytest.mark.parametrize("shard", ["2/2", "1", "a/b", "-1/2"])
def test_malformed_shard_is_a_usage_error(shard):
    status, _ = collected(shard)
    assert status == pytest.ExitCode.USAGE_ERROR


def test_summary_counts_add_up():
    tool = load_tool("sharded_pytest")
    lines = ["3 passed, 2 skipped, 10 deselected, 1 warning in 2.00s",
             "1 failed, 4 passed, 1 error, 2 warnings in 1.5s"]  # fmt: skip
    found = [tool.SUMMARY.findall(line)[0] for line in lines]
    assert tool.summed(found) == {"passed": 7, "skipped": 2, "deselected": 10, "failed": 1,
                                  "errors": 1, "warnings": 3}  # fmt: skip


def test_timeout_kills_the_shards_still_running(tmp_path):
    """No shard outlives ``--timeout``: the slow one is killed (a failure, its summary
    missing), the others report as usual."""
    # (outside tests/, the shard hook of tests/conftest.py is loaded by a conftest of its own)
    (tmp_path / "conftest.py").write_text(
        "import runpy\n\npytest_collection_modifyitems = runpy.run_path("
        f"{str(ROOT / 'tests' / 'conftest.py')!r})['pytest_collection_modifyitems']\n"
    )
    slow = tmp_path / "test_slow_and_fast.py"
    slow.write_text("import time\n\n\ndef test_slow():\n    time.sleep(300)\n\n\n"
                    "def test_fast():\n    pass\n")  # fmt: skip
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "sharded_pytest.py"), "--shards", "2",
         "--timeout", "15", "--", str(slow)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1
    assert "shard 0/2: killed after 15 s" in done.stdout
    assert "shard 1/2: 1 passed" in done.stdout
