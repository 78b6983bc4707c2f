"""The launcher: environment of the children, prefixed output, failure propagation, timeouts."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
import time

import pytest

from cuparing.launch import _split, launch

ENV_NAMES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
             "CUPARING_RUN_TOKEN", "NCCL_NVLS_ENABLE")  # fmt: skip


def _script(tmp_path, name, body):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return str(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _by_rank(text: str) -> dict[int, list[str]]:
    lines: dict[int, list[str]] = {}
    for line in text.splitlines():
        assert line.startswith("[rank "), line
        rank, rest = line[len("[rank ") :].split("] ", 1)
        lines.setdefault(int(rank), []).append(rest)
    return lines


def test_children_get_torchrun_env_and_prefixed_output(tmp_path):
    script = _script(tmp_path, "env.py", f"""
        import os, sys
        for name in {ENV_NAMES!r}:
            print(name + "=" + os.environ.get(name, "<unset>"))
        print("argv=" + ",".join(sys.argv[1:]))
        print("to stderr", file=sys.stderr)
    """)  # fmt: skip
    out, err = io.StringIO(), io.StringIO()
    code = launch(3, [script, "a", "--b"], env={"NCCL_NVLS_ENABLE": "1"}, stdout=out, stderr=err)
    assert code == 0
    lines = _by_rank(out.getvalue())
    assert sorted(lines) == [0, 1, 2]
    envs = {r: dict(line.split("=", 1) for line in lines[r] if "=" in line) for r in lines}
    for rank, env in envs.items():
        assert env["RANK"] == env["LOCAL_RANK"] == str(rank)
        assert env["WORLD_SIZE"] == env["LOCAL_WORLD_SIZE"] == "3"
        assert env["MASTER_ADDR"] == "127.0.0.1"
        assert 0 < int(env["MASTER_PORT"]) < 65536
        assert env["NCCL_NVLS_ENABLE"] == "0"  # forced, whatever the caller's environment says
        assert env["argv"] == "a,--b"
    assert len({env["CUPARING_RUN_TOKEN"] for env in envs.values()}) == 1
    assert len({env["MASTER_PORT"] for env in envs.values()}) == 1
    assert sorted(_by_rank(err.getvalue())) == [0, 1, 2]
    assert all(v == ["to stderr"] for v in _by_rank(err.getvalue()).values())


def test_failing_child_stops_siblings_and_sets_exit_code(tmp_path):
    pids = tmp_path / "pids"
    pids.mkdir()
    script = _script(tmp_path, "fail.py", f"""
        import os, sys, time
        rank = int(os.environ["RANK"])
        open(os.path.join({str(pids)!r}, str(rank)), "w").write(str(os.getpid()))
        if rank == 1:
            while len(os.listdir({str(pids)!r})) < 3:
                time.sleep(0.01)
            print("rank 1 giving up", flush=True)
            sys.exit(3)
        time.sleep(120)
    """)  # fmt: skip
    out, err = io.StringIO(), io.StringIO()
    start = time.monotonic()
    code = launch(3, [script], stdout=out, stderr=err)
    elapsed = time.monotonic() - start
    assert code == 3
    assert elapsed < 20
    assert "[rank 1] rank 1 giving up" in out.getvalue()
    assert "rank 1 exited with code 3" in err.getvalue()
    for rank in (0, 2):
        assert not _alive(int((pids / str(rank)).read_text()))


def test_sibling_ignoring_sigterm_is_killed(tmp_path):
    script = _script(tmp_path, "stubborn.py", """
        import os, signal, sys, time
        if os.environ["RANK"] == "0":
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            print("ready", flush=True)
            time.sleep(120)
        time.sleep(0.5)
        sys.exit(5)
    """)  # fmt: skip
    start = time.monotonic()
    code = launch(2, [script], kill_after=0.5, stdout=io.StringIO(), stderr=io.StringIO())
    assert code == 5
    assert time.monotonic() - start < 20


def test_grace_lets_survivors_report(tmp_path):
    script = _script(tmp_path, "grace.py", """
        import os, sys, time
        if os.environ["RANK"] == "1":
            sys.exit(7)
        time.sleep(0.5)
        print("survivor reported", flush=True)
        sys.exit(1)
    """)  # fmt: skip
    out = io.StringIO()
    code = launch(2, [script], grace=30, stdout=out, stderr=io.StringIO())
    assert code == 7  # the first failure's code, not the survivor's
    assert "[rank 0] survivor reported" in out.getvalue()


def test_signal_death_maps_to_128_plus_signal(tmp_path):
    script = _script(tmp_path, "sig.py", """
        import os, signal
        os.kill(os.getpid(), signal.SIGKILL)
    """)  # fmt: skip
    assert launch(1, [script], stdout=io.StringIO(), stderr=io.StringIO()) == 128 + 9


def test_timeout_stops_everything(tmp_path):
    script = _script(tmp_path, "slow.py", "import time\ntime.sleep(120)\n")
    err = io.StringIO()
    start = time.monotonic()
    assert launch(2, [script], timeout=0.5, stdout=io.StringIO(), stderr=err) == 124
    assert time.monotonic() - start < 20
    assert "timed out" in err.getvalue()


def test_cli_module_mode_and_exit_code(tmp_path):
    (tmp_path / "ranky.py").write_text(
        "import os, sys\nprint('hello', sys.argv[1:])\nsys.exit(int(os.environ['RANK']) * 2)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    proc = subprocess.run(
        [sys.executable, "-m", "cuparing.launch", "--nproc-per-node", "2", "--grace", "10",
         "-m", "ranky", "--flag", "x"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "[rank 0] hello ['--flag', 'x']" in proc.stdout
    assert "[rank 1] hello ['--flag', 'x']" in proc.stdout


def test_cli_requires_a_command():
    proc = subprocess.run([sys.executable, "-m", "cuparing.launch", "--nproc-per-node", "2"],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2 and "script" in proc.stderr


def test_split_keeps_child_options_untouched():
    assert _split(["--nproc-per-node", "2", "s.py", "--timeout", "3"]) == (
        ["--nproc-per-node", "2"], ["s.py", "--timeout", "3"],
    )  # fmt: skip
    assert _split(["--nproc_per_node=4", "--grace", "1", "-m", "m", "-x"]) == (
        ["--nproc_per_node=4", "--grace", "1"], ["-m", "m", "-x"],
    )  # fmt: skip


def test_bad_arguments():
    with pytest.raises(ValueError, match="nproc"):
        launch(0, ["x.py"])
    with pytest.raises(ValueError, match="argv"):
        launch(1, [])
