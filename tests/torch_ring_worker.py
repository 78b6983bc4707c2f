"""One rank of a ring on a torch.distributed group (run by tests/test_torch_ring.py).

Usage: python torch_ring_worker.py RANK WORLD PORT OUT_DIR [gloo|nccl]
Each rank runs the forward and backward ring on its zigzag shard of one global problem (arrays,
and again torch tensors through cuparing.torch) and saves what it got. gloo (default): NumPy
arrays and CPU tensors; nccl: rank r on GPU r, CuPy arrays and CUDA tensors.
"""

from __future__ import annotations

import gc
import os
import sys

import numpy as np

import cuparing as cr

CU_SEQLENS = [0, 11, 12, 29]  # packed documents, a length no layout divides


def problem(backend: str):
    """The global (q, k, v, dout, cu_seqlens) every rank shards: float64, float32 on NCCL (the
    GPU path has no float64)."""
    rng = np.random.default_rng(0)
    seqlen, dtype = CU_SEQLENS[-1], np.float32 if backend == "nccl" else np.float64
    q, dout = (rng.standard_normal((1, seqlen, 4, 8)).astype(dtype) for _ in range(2))
    k, v = (rng.standard_normal((1, seqlen, 2, 8)).astype(dtype) for _ in range(2))
    return q, k, v, dout, CU_SEQLENS


def main() -> int:
    import torch  # imported here: the suite's doctest collection imports this file without torch
    import torch.distributed as dist

    rank, world, port, out_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    backend = sys.argv[5] if len(sys.argv) > 5 else "gloo"
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    if backend == "nccl":
        import cupy

        cupy.cuda.Device(rank).use()
        torch.cuda.set_device(rank)
        device, to_device, to_host = "cuda", cupy.asarray, cupy.asnumpy
    else:
        device, to_device, to_host = "cpu", np.asarray, np.asarray
    dist.init_process_group(backend, rank=rank, world_size=world)
    ring = cr.Ring.from_torch()
    q, k, v, dout, cu = problem(backend)
    opts = {"causal": True, "layout": "zigzag", "cu_seqlens": cu}
    host = [cr.shard(x, rank, world, layout="zigzag", cu_seqlens=cu) for x in (q, k, v, dout)]
    local = [to_device(x) for x in host]
    out, lse = cr.ring_attention(*local[:3], ring, return_lse=True, **opts)
    grads = cr.ring_attention_backward(local[3], *local[:3], out, lse, ring, **opts)
    out, lse, grads = to_host(out), to_host(lse), [to_host(g) for g in grads]
    # the same through the differentiable torch op
    import cuparing.torch as crt

    tensors = [torch.tensor(x, device=device, requires_grad=True) for x in host[:3]]
    out_t = crt.ring_attention(*tensors, ring, **opts)
    out_t.backward(torch.tensor(host[3], device=device))
    np.savez(
        os.path.join(out_dir, f"rank{rank}.npz"), out=out, lse=lse, dq=grads[0], dk=grads[1],
        dv=grads[2], out_t=out_t.detach().cpu().numpy(),
        dq_t=tensors[0].grad.cpu().numpy(), dk_t=tensors[1].grad.cpu().numpy(),
        dv_t=tensors[2].grad.cpu().numpy(),
    )  # fmt: skip
    try:  # a call that differs across ranks is refused on every rank
        cr.ring_attention(*local[:3], ring, causal=rank == 0, layout="zigzag", cu_seqlens=cu)
    except ValueError as error:
        assert "disagree" in str(error), error
    else:
        raise AssertionError("ranks disagreeing on causal were not refused")
    # Tear down in order: every rank past its last collective, then what the calls left holding
    # on to the group (the ring, the autograd graph of the torch op) released, then the group.
    # Left to interpreter exit, after the group's destruction, about one run in twelve ended in
    # gloo's std::terminate ("terminate called without an active exception") after "OK".
    dist.barrier()
    del ring, out_t, tensors
    gc.collect()
    dist.destroy_process_group()
    print(f"rank {rank} OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
