"""Start one process per GPU on this host: ``python -m cuparing.launch --nproc-per-node N ...``.

Usage::

    python -m cuparing.launch --nproc-per-node 4 train.py --steps 10
    python -m cuparing.launch --nproc-per-node 2 --timeout 600 -m mypkg.bench --quick

Each child gets torchrun's variables (``RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE MASTER_ADDR
MASTER_PORT``), a random ``CUPARING_RUN_TOKEN`` shared by the run, and ``NCCL_NVLS_ENABLE=0``
(forced: NVLink multicast is never needed for a ring). Its stdout and stderr are streamed line by
line with a ``[rank N] `` prefix. When a child fails, the others get ``--grace`` seconds to finish
on their own (default 0), then SIGTERM, then SIGKILL; the launcher exits with the first failing
child's code (``128 + signal`` for a child killed by a signal), ``124`` when ``--timeout`` expires.
Children run in their own process groups, so their own children are stopped with them.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import TextIO

TIMEOUT_EXIT = 124


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def child_env(
    base: Mapping[str, str], rank: int, nproc: int, master_addr: str, master_port: int, token: str
) -> dict[str, str]:
    """The environment of child ``rank``: ``base`` plus the rendezvous variables."""
    env = dict(base)
    env.update(
        RANK=str(rank),
        WORLD_SIZE=str(nproc),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(nproc),
        GROUP_RANK="0",
        MASTER_ADDR=master_addr,
        MASTER_PORT=str(master_port),
        CUPARING_RUN_TOKEN=token,
        PYTHONUNBUFFERED="1",  # lines reach us as they are printed, not at exit
        NCCL_NVLS_ENABLE="0",
    )
    return env


class _Output:
    """Copies a child's pipe to a sink, line by line, with the rank prefix."""

    def __init__(self, lock: threading.Lock):
        self._lock = lock
        self.threads: list[threading.Thread] = []

    def follow(self, pipe, sink: TextIO, prefix: str) -> None:
        def pump():
            with pipe:
                for raw in iter(pipe.readline, b""):
                    line = raw.decode("utf-8", errors="replace")
                    with self._lock:
                        sink.write(prefix + (line if line.endswith("\n") else line + "\n"))
                        sink.flush()

        thread = threading.Thread(target=pump, daemon=True)
        thread.start()
        self.threads.append(thread)

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _stop(procs: Sequence[subprocess.Popen], kill_after: float) -> None:
    """SIGTERM every running child's process group; SIGKILL what is left after ``kill_after``."""
    running = [p for p in procs if p.poll() is None]
    for proc in running:
        _signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + kill_after
    while any(p.poll() is None for p in running) and time.monotonic() < deadline:
        time.sleep(0.02)
    for proc in running:
        if proc.poll() is None:
            _signal_group(proc, signal.SIGKILL)
        proc.wait()


def _exit_code(code: int) -> int:
    return 128 - code if code < 0 else code


def launch(
    nproc: int,
    argv: Sequence[str],
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    *,
    master_addr: str = "127.0.0.1",
    master_port: int | None = None,
    grace: float = 0.0,
    kill_after: float = 5.0,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Run ``python argv...`` as ``nproc`` ranks and return the job's exit code.

    Args:
        nproc: number of processes (one per GPU), ``>= 1``.
        argv: ``["script.py", args...]`` or ``["-m", "module", args...]``.
        env: variables added to (overriding) this process's environment for the children.
        timeout: seconds the whole job may run; then every child is stopped and 124 returned.
        master_addr, master_port: rendezvous address (default 127.0.0.1 and a free port).
        grace: seconds the other children may keep running after the first failure.
        kill_after: seconds between SIGTERM and SIGKILL.
        stdout, stderr: where prefixed output goes (default: this process's).

    Returns:
        0 if every child exited 0; else the first failing child's exit code (``128 + signal``
        if a signal killed it); 124 on timeout; 130 if the launcher was interrupted.

    Raises:
        ValueError: ``nproc < 1`` or an empty ``argv``.
    """
    if int(nproc) < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc=}")
    if not argv or (argv[0] == "-m" and len(argv) < 2):
        raise ValueError(f"argv must name a script or '-m module', got {list(argv)!r}")
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    port = master_port if master_port is not None else free_port()
    token = secrets.token_hex(16)
    base = dict(os.environ)
    base.update(env or {})
    lock = threading.Lock()
    output = _Output(lock)

    def say(message: str) -> None:
        with lock:
            err.write(f"[launch] {message}\n")
            err.flush()

    procs: list[subprocess.Popen] = []
    code = 0
    try:
        for rank in range(nproc):
            proc = subprocess.Popen(
                [sys.executable, *argv],
                env=child_env(base, rank, nproc, master_addr, port, token),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,  # its own process group: we can stop its children too
            )
            procs.append(proc)
            output.follow(proc.stdout, out, f"[rank {rank}] ")
            output.follow(proc.stderr, err, f"[rank {rank}] ")
        started = time.monotonic()
        failed_at = None
        while True:
            codes = [p.poll() for p in procs]
            now = time.monotonic()
            if failed_at is None:
                for rank, c in enumerate(codes):
                    if c is not None and c != 0:
                        code, failed_at = _exit_code(c), now
                        others = "stopping the others" + (f" in {grace:g} s" if grace else "")
                        say(f"rank {rank} exited with code {_exit_code(c)}; {others}")
                        break
            if all(c is not None for c in codes):
                break
            if failed_at is not None and now - failed_at >= grace:
                break
            if timeout is not None and now - started > timeout:
                say(f"timed out after {timeout:g} s; stopping every rank")
                code = TIMEOUT_EXIT
                break
            time.sleep(0.02)
    except KeyboardInterrupt:
        say("interrupted; stopping every rank")
        code = 130
    finally:
        _stop(procs, kill_after)
        output.join(timeout=5.0)
    return code


_VALUE_OPTIONS = {
    "--nproc-per-node", "--nproc_per_node", "--master-addr", "--master_addr",
    "--master-port", "--master_port", "--timeout", "--grace",
}  # fmt: skip


def _split(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Launcher options vs the child's command (from the script or ``-m`` on, untouched)."""
    i = 0
    while i < len(argv):
        token = argv[i]
        if token == "-m" or not token.startswith("-"):
            return list(argv[:i]), list(argv[i:])
        if token in _VALUE_OPTIONS:
            i += 1  # its value follows
        i += 1
    return list(argv), []


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cuparing.launch",
        description="Start N ranks of a Python program on this host (one per GPU).",
        usage="%(prog)s --nproc-per-node N [options] (script.py | -m module) [args ...]",
    )
    parser.add_argument("--nproc-per-node", "--nproc_per_node", type=int, required=True,
                        dest="nproc", help="number of processes (GPUs) to start")  # fmt: skip
    parser.add_argument("--master-addr", "--master_addr", default="127.0.0.1")
    parser.add_argument("--master-port", "--master_port", type=int, default=None,
                        help="rendezvous port (default: a free one)")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds the whole job may run (exit code 124 after)")  # fmt: skip
    parser.add_argument("--grace", type=float, default=0.0,
                        help="seconds the other ranks may run on after one fails")  # fmt: skip
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (``cuparing-launch`` / ``python -m cuparing.launch``)."""
    options, command = _split(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(options)
    if not command or command == ["-m"]:
        parser.error("name a script or '-m module' to run")
    if args.nproc < 1:
        parser.error(f"--nproc-per-node must be >= 1, got {args.nproc}")

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)  # stop the ranks when we are asked to stop
    return launch(
        args.nproc, command, timeout=args.timeout, master_addr=args.master_addr,
        master_port=args.master_port, grace=args.grace,
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
