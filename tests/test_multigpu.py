"""Multi-GPU checks: the ring against the float64 reference, the ring under random stream delays
(race detector), and a rank killed mid-ring.

Each test starts ``tests/multigpu/ring_worker.py`` on N GPUs through ``python -m cuparing.launch``
and asserts on the exit code and the ranks' output lines, once per transport: ``nccl``, the
copy-engine ``ipc`` ring through ``CUPARING_TRANSPORT=ipc`` (device flags where cuda-bindings is
installed), and ``ipc-host``, the same ring on its host handshake (``CUPARING_IPC_FLAGS=0``).
Skipped with fewer than 2 GPUs.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import gpu_count, requires_gpu

from cuparing.comm.ipc import import_driver

WORKER = Path(__file__).parent / "multigpu" / "ring_worker.py"
RING_TIMEOUT = 20.0  # killed mode's Ring.from_env(timeout=...)
WORLDS = [pytest.param(n, id=f"C={n}") for n in (2, 4, 8)]  # each skips without n GPUs
# the IPC ring takes device flags where cuda-bindings is installed (and the driver has them)
_IPC_SYNC = "host" if import_driver() is None else "device"
# transport -> (its environment, the ring the workers must report)
TRANSPORTS = {
    "nccl": ({"CUPARING_TRANSPORT": "nccl"}, "NcclRing"),
    "ipc": ({"CUPARING_TRANSPORT": "ipc"}, f"IpcRing sync={_IPC_SYNC}"),
    "ipc-host": ({"CUPARING_TRANSPORT": "ipc", "CUPARING_IPC_FLAGS": "0"}, "IpcRing sync=host"),
}


def _launch(world: int, mode: str, job_timeout: float, *options: str, transport: str = "nccl",
            switches: dict | None = None):  # fmt: skip
    command = [sys.executable, "-m", "cuparing.launch", "--nproc-per-node", str(world),
               "--timeout", str(job_timeout), *options, str(WORKER), mode]  # fmt: skip
    env = dict(os.environ, **TRANSPORTS[transport][0], **(switches or {}))
    return subprocess.run(command, capture_output=True, text=True, timeout=job_timeout + 60,
                          env=env)  # fmt: skip


def _tail(proc, lines: int = 60) -> str:
    return "\n".join((proc.stdout + proc.stderr).splitlines()[-lines:])


def _assert_workers_ok(proc, world: int, transport: str, what: str) -> None:
    """Exit code 0, no FAIL line, and every rank's ``WORKER OK rank r <what>... ring=...``."""
    assert proc.returncode == 0, _tail(proc)
    assert not re.search(r"^\[rank \d+\] FAIL", proc.stdout, re.M), _tail(proc)
    for rank in range(world):
        ring = TRANSPORTS[transport][1]
        ok = rf"^\[rank {rank}\] WORKER OK rank {rank} {what}.* ring={ring}$"
        assert re.search(ok, proc.stdout, re.M), _tail(proc)


def _need(world: int) -> None:
    if gpu_count() < world:
        pytest.skip(f"needs {world} GPUs, found {gpu_count()}")


@requires_gpu(2)
@pytest.mark.gpu
@pytest.mark.parametrize("transport", list(TRANSPORTS))
@pytest.mark.parametrize("world", WORLDS)
def test_ring_matches_dense_reference(world, transport):
    _need(world)
    proc = _launch(world, "check", 1200, transport=transport)
    _assert_workers_ok(proc, world, transport, "cases=")
    assert re.search(r"PASS .* ring err .* vs C=1 err", proc.stdout)  # the C=1 comparison ran


@requires_gpu(2)
@pytest.mark.gpu
@pytest.mark.parametrize("world", WORLDS)
def test_the_default_transport_is_the_copy_engines_on_one_host(world):
    """``CUPARING_TRANSPORT`` unset: the copy-engine ring (device flags) on GPUs that the
    launcher puts on one host (``cuparing.launch`` sets ``LOCAL_WORLD_SIZE``), NCCL where the
    driver says they cannot serve the ring (no cuda-bindings, no peer access: the same check
    ``default_transport`` makes); either passes K/V around."""
    _need(world)
    command = [sys.executable, "-m", "cuparing.launch", "--nproc-per-node", str(world),
               "--timeout", "120", str(WORKER), "hello"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "CUPARING_TRANSPORT"}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)
    from cuparing.comm.ipc import copy_engines_unavailable

    want = "ipc" if copy_engines_unavailable(world) is None else "nccl"
    _assert_workers_ok(proc, world, want, "hello")


@requires_gpu(2)
@pytest.mark.gpu
@pytest.mark.parametrize("transport", ["nccl", "ipc"])
@pytest.mark.parametrize("world", WORLDS)
def test_packed_documents_match_reference(world, transport):
    """Packed documents (a one-token document, one longer than a shard, S not a multiple of 2C)
    through the zigzag and packed layouts, CuPy and torch (repeats through the kept plans and
    graphs), with ``CUPARING_KV_GATHER`` unset (forwards on rings of 4+ gather by default), 0
    and 1."""
    _need(world)
    proc = _launch(world, "documents", 1200, transport=transport)
    _assert_workers_ok(proc, world, transport, "documents=12")


@requires_gpu(2)
@pytest.mark.gpu
@pytest.mark.parametrize("transport", list(TRANSPORTS))
@pytest.mark.parametrize("world", WORLDS)
def test_ring_is_race_free_under_random_stream_delays(world, transport):
    _need(world)
    proc = _launch(world, "stress", 600, transport=transport)
    _assert_workers_ok(proc, world, transport, "stress")
    # per rank and case: 10 disturbed runs, 6 of the planned forward and its count of runs
    assert len(re.findall(r"PASS stress", proc.stdout)) == 2 * 17 * world, _tail(proc)


@requires_gpu(2)
@pytest.mark.gpu
@pytest.mark.parametrize("transport", ["nccl", "ipc"])
@pytest.mark.parametrize("world", WORLDS)
def test_gathered_ring_matches_and_is_race_free(world, transport):
    """``CUPARING_KV_GATHER=1`` (the other ranks' K/V at once, two launches a rank; the
    backward sends dK / dV rows back to their owners): the reference checks, then the stress
    run's random stream delays, whose planned forward repeats are the gathered plans."""
    _need(world)
    switches = {"CUPARING_KV_GATHER": "1"}
    proc = _launch(world, "check", 1200, transport=transport, switches=switches)
    _assert_workers_ok(proc, world, transport, "cases=")
    proc = _launch(world, "stress", 600, transport=transport, switches=switches)
    _assert_workers_ok(proc, world, transport, "stress")
    assert len(re.findall(r"PASS stress", proc.stdout)) == 2 * 17 * world, _tail(proc)


@requires_gpu(2)
@pytest.mark.gpu
@pytest.mark.parametrize("transport", list(TRANSPORTS))
@pytest.mark.parametrize("world", WORLDS)
def test_killed_rank_is_diagnosed_not_hung(world, transport):
    _assert_survivors_raise(world, "killed", transport)


@requires_gpu(2)
@pytest.mark.gpu
@pytest.mark.parametrize("transport", ["nccl", "ipc"])
@pytest.mark.parametrize("world", WORLDS)
def test_killed_rank_ends_replayed_graphs(world, transport):
    """A peer dying while the others replay a ring call captured as a CUDA graph (NCCL, and
    the copy-engine ring's device flags)."""
    if import_driver() is None:
        pytest.skip("ring calls are captured as CUDA graphs only with cuda-bindings")
    _assert_survivors_raise(world, "killed-graph", transport)


@requires_gpu(2)
@pytest.mark.gpu
@pytest.mark.parametrize("transport", ["nccl", "ipc"])
@pytest.mark.parametrize("world", WORLDS)
def test_replays_cycle_through_the_flag_states_without_patching(world, transport):
    """A training loop's ring calls (forward and backward) replayed as CUDA graphs for 16 steps,
    two input sets in turn: every step right, and once the copy-engine ring's graphs have an
    instantiation for each state of their channels' counts modulo 4, no replay gives a flag
    node a value (the worker counts ``CapturedExchanges.patch``)."""
    if import_driver() is None:
        pytest.skip("ring calls are captured as CUDA graphs only with cuda-bindings")
    _need(world)
    proc = _launch(world, "replay-cycle", 600, transport=transport)
    _assert_workers_ok(proc, world, transport, "replay-cycle")
    steps = len(re.findall(r"^\[rank \d+\] PASS step \d+ \(set \d\) forward", proc.stdout, re.M))
    assert steps == 16 * world, _tail(proc)
    assert len(re.findall(r"PASS graph replays in the last 8 steps: 16$", proc.stdout, re.M)) \
        == world, _tail(proc)
    if transport == "ipc":
        late = re.findall(r"PASS flag values given in the last 8 steps: 0 ", proc.stdout)
        assert len(late) == world, _tail(proc)


def _assert_survivors_raise(world: int, mode: str, transport: str) -> None:
    """Rank 1 of ``mode`` dies; every other rank raises within the ring timeout."""
    _need(world)
    start = time.monotonic()
    # --grace: the survivors get time to find the failure themselves before the launcher stops them
    proc = _launch(world, mode, 300, "--grace", str(4 * RING_TIMEOUT), transport=transport)
    elapsed = time.monotonic() - start
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, _tail(proc)
    died = re.search(r"^\[rank 1\] DYING at ([0-9.]+)", proc.stdout, re.M)
    assert died, _tail(proc)
    for rank in (r for r in range(world) if r != 1):
        # the watchdog's immediate stderr line, or the exception the rank caught
        hit = re.search(rf"^\[rank {rank}\] .*(RingTimeoutError|RingError)", text, re.M)
        assert hit, f"rank {rank} never reported the failure\n{_tail(proc)}"
        # every survivor raises, not only rank 1's neighbours: the failure channel tells them all
        caught = re.search(rf"^\[rank {rank}\] CAUGHT \w+ at ([0-9.]+)", proc.stdout, re.M)
        assert caught, f"rank {rank} never raised the failure\n{_tail(proc)}"
        delay = float(caught.group(1)) - float(died.group(1))
        assert delay < RING_TIMEOUT + 10, f"rank {rank} took {delay:.1f} s to report"
    assert elapsed < 4 * RING_TIMEOUT + 120, f"the job took {elapsed:.0f} s: something hung"
