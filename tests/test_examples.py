"""The examples run as a newcomer runs them (on the CPU here) and report success."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EXAMPLES / script), *args],
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def test_quickstart_matches_dense_attention():
    result = run("quickstart.py", "--device", "cpu", "--seqlen", "256")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "max |ring - dense float64|" in result.stdout


def test_torch_training_step_matches_the_dense_step():
    pytest.importorskip("torch")
    result = run("torch_training_step.py")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ring step matches the dense step: True" in result.stdout


@pytest.mark.parametrize("layout", ["zigzag", "packed"])
def test_packed_documents_example_runs(layout):
    # the example prints its own distance to dense attention; tests/test_documents.py checks
    # packed documents against the float64 reference with the table's derived bounds
    result = run("packed_documents.py", "--ranks", "3", "--layout", layout)
    assert result.returncode == 0, result.stdout + result.stderr
    error = float(result.stdout.split("max |ring - per-document dense float64| =")[1].split()[0])
    # float32 attention of O(1) inputs over at most ~100 keys: a few units of 2^-24 times the
    # row sums, far below this (a wrong mask or layout gives errors of order 1)
    assert error < 1e-4, result.stdout


def test_jax_training_step_matches_the_dense_step():
    pytest.importorskip("jax")
    result = run("jax_training_step.py")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ring step matches the dense step: True" in result.stdout


def test_jax_training_loss_curve_matches_one_device():
    pytest.importorskip("jax")
    result = run("train_jax.py", "--ranks", "3", "--steps", "30")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ring loss curve matches one device: True" in result.stdout


def test_jax_training_through_shard_map_across_processes_matches_one_device():
    pytest.importorskip("jax")
    pytest.importorskip("torch")  # the CPU processes' ring is a gloo process group
    launch = [sys.executable, "-m", "cuparing.launch", "--nproc-per-node", "2", "--timeout", "300"]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # the CPU processes, on any machine
    result = subprocess.run([*launch, str(EXAMPLES / "train_jax.py"), "--steps", "30"],
                            capture_output=True, text=True, timeout=360, env=env)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 processes (cpu)" in result.stdout
    assert "ring loss curve matches one device: True" in result.stdout


def test_torch_training_loss_curve_matches_one_device():
    pytest.importorskip("torch")
    # compiled (fullgraph) on the one device and on every simulated rank of the ring
    result = run("train_torch.py", "--ranks", "3", "--steps", "30")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "compiled" in result.stdout
    assert "ring loss curve matches one device: True" in result.stdout
