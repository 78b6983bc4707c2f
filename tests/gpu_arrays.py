"""Helpers the GPU test modules share: host <-> CuPy arrays of every input dtype (bfloat16 via its
bits), NaN-poisoned pool memory, which kernel family runs a case, and a whole ring (forward and
backward) of simulated ranks on one GPU.

CuPy is imported inside each function, so the modules that use these import (and skip) cleanly
on a machine without it.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from strategies import np_dtype

import cuparing as cr

ml_dtypes = pytest.importorskip("ml_dtypes")


def random_array(rng, shape, dtype):
    """Host array of ``dtype`` from standard normal data (never zeros)."""
    return rng.standard_normal(shape).astype(np.float32).astype(np_dtype(dtype))


def to_gpu(x):
    """Host fp16/bf16/fp32 array -> CuPy array of the same dtype (bf16 via uint16 bits)."""
    import cupy

    if x.dtype == ml_dtypes.bfloat16:
        return cupy.asarray(x.view(np.uint16)).view(x.dtype)
    return cupy.asarray(x)


def to_host(x):
    """CuPy array -> host array of the same dtype (bf16 via uint16 bits)."""
    import cupy

    if str(x.dtype) == "bfloat16":
        return cupy.asnumpy(x.view(cupy.uint16)).view(ml_dtypes.bfloat16)
    return cupy.asnumpy(x)


def poison_pool():
    """Fill recently freed pool memory with NaN bits so unwritten outputs cannot pass."""
    import cupy

    junk = [cupy.full(n, 0xFFFF, dtype=cupy.uint16) for n in (1 << 12, 1 << 16, 1 << 20, 1 << 23)]
    del junk


def poison_torch_pools():
    """Fill memory torch's caching allocator is about to hand out with NaN: blocks of several
    sizes freed into both of its pools (allocations of at most 1 MB come from the small one),
    so results a call leaves unwritten cannot pass."""
    import torch

    sizes = (1 << 10, 1 << 13, 1 << 16, *(1 << 17,) * 8, 1 << 22)  # float32s: 4 KB .. 16 MB
    junk = [torch.full((n,), float("nan"), device="cuda") for n in sizes]
    del junk


def skip_unless_backward_family_runs(backward_family, headdim):
    """Skip an sm90 variant of a backward case the sm90 backward has no kernel for (the sm80
    variant tests it)."""
    from cuparing.kernels import loader

    arch = loader.device_arch()
    if backward_family == "sm90" and not arch.startswith("sm_9"):
        pytest.skip("the sm90 (wgmma) kernels need a Hopper GPU")
    if backward_family == "sm90" and os.environ.get("CUPARING_KERNELS", "").lower() == "sm80":
        pytest.skip("CUPARING_KERNELS=sm80 is set: every kernel is the mma.sync family")
    padded = loader.backward_head_dim(headdim, arch)
    if backward_family == "sm90" and padded not in loader.SM90_BWD_HEAD_DIMS:
        pytest.skip("the sm80 backward runs this head dim; tested under backward_family=sm80")
    # the case must run the family it is named for (not a silent fallback to the other one)
    assert loader.backward_family(padded, arch) == backward_family


def skip_unless_family_runs(kernel_family, dtype, headdim):
    """Skip an sm90 variant of a case the sm90 family has no kernel for (float32 runs cuBLAS,
    head dims without sm90 tiles run sm80): the sm80 variant already tests exactly that."""
    from cuparing.kernels import loader

    padded = loader.forward_head_dim(headdim, "sm_90a")
    if kernel_family.startswith("sm90") and (
        dtype == "float32" or loader.forward_family(padded, "sm_90a") != "sm90"
    ):
        pytest.skip("the sm80 kernel runs this case; tested under kernel_family=sm80")


def ring_on_gpu(host, world, layout, **mask):
    """Forward and backward of a ring of ``world`` simulated ranks sharing one GPU (``cr.simulate``;
    the first block writes the float32 accumulator, later ones merge into it).

    Args:
        host: (q, k, v, dout), global host arrays; each rank uploads its ``layout`` shard.
        mask: causal, window, cu_seqlens (each optional), as the ring calls take them.

    Returns:
        [out, lse, dq, dk, dv], unsharded on the host (padding rows of documents dropped).
    """
    cu = mask.get("cu_seqlens")
    opts = {"layout": layout, **mask}

    def rank_fn(ring):
        # shard on the host (ml_dtypes indexing), then upload this rank's shard
        shards = [to_gpu(cr.shard(x, ring.rank, ring.size, layout=layout, cu_seqlens=cu))
                  for x in host]  # fmt: skip
        out, lse = cr.ring_attention(*shards[:3], ring, return_lse=True, **opts)
        grads = cr.ring_attention_backward(shards[3], *shards[:3], out, lse, ring, **opts)
        return [to_host(x) for x in (out, lse, *grads)]

    poison_pool()
    results = cr.simulate(world, rank_fn)
    return [
        cr.unshard([r[i] for r in results], layout=layout, axis=2 if i == 1 else 1, cu_seqlens=cu)
        for i in range(5)
    ]
