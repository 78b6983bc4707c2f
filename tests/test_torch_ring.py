"""Ring.from_torch: the ring on a torch.distributed process group (gloo with 3 CPU processes; NCCL
with one process per GPU where 2 GPUs are present), forward and backward, plain and through
cuparing.torch, against the dense float64 reference."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import requires_gpu, torch_has_cuda
from numerics import check_backward, check_forward
from torch_ring_worker import problem

import cuparing as cr

pytest.importorskip("torch")
WORKER = Path(__file__).resolve().parent / "torch_ring_worker.py"


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


@pytest.mark.parametrize(
    "backend,world",
    [
        ("gloo", 3),
        pytest.param("nccl", 2, marks=[
            pytest.mark.gpu, requires_gpu(2),
            pytest.mark.skipif(not torch_has_cuda(), reason="needs a torch build with CUDA"),
        ]),  # fmt: skip
    ],
)
def test_ring_on_a_process_group(tmp_path, backend, world):
    port = _free_port()
    procs = [
        subprocess.Popen([sys.executable, str(WORKER), str(r), str(world), port, str(tmp_path),
                          backend],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(world)
    ]  # fmt: skip
    logs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    parts = [np.load(tmp_path / f"rank{r}.npz") for r in range(world)]
    q, k, v, dout, cu = problem(backend)  # the workers' global problem

    def whole(name, axis=1):
        return cr.unshard([p[name] for p in parts], layout="zigzag", axis=axis, cu_seqlens=cu)

    mask = {"causal": True, "cu_seqlens": cu}
    for suffix in ("", "_t"):
        lse = whole("lse", axis=2) if suffix == "" else None  # the torch op returns out only
        check_forward(whole("out" + suffix), lse, q, k, v, **mask)
        grads = [whole(g + suffix) for g in ("dq", "dk", "dv")]
        check_backward(grads, dout, q, k, v, **mask)
