"""Launch plans (cuparing.backends.launch_plans): a planned launch hands the kernel exactly the
parameter bytes a fresh pack of the same call would, whatever the pointers; on the CPU, with
recording stand-ins for the CuPy kernels."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cuparing.backends import launch_plans
from cuparing.kernels import loader

FWD_POINTERS = ("out", "lse", "q", "k", "v", "q_pos", "k_pos")
BWD_POINTERS = ("dout", "lse", "delta", "dq", "dk", "dv", "q", "k", "v", "q_pos", "k_pos")


class RecordingKernel:
    def __init__(self):
        self.calls = []

    def __call__(self, grid, block, args, shared_mem=0):
        self.calls.append((grid, block, args, shared_mem))


def _fields(dtype: np.dtype, rng) -> dict:
    """Random values for every field of a params struct."""
    values = {}
    for name in dtype.names:
        field = dtype.fields[name][0]
        if field == np.float32:
            values[name] = np.float32(rng.standard_normal())
        elif field == np.uint64:
            values[name] = int(rng.integers(0, 2**63))
        else:
            info = np.iinfo(field)
            values[name] = int(rng.integers(info.min, info.max))
    return values


pointer_values = st.integers(0, 2**64 - 1)


@settings(deadline=None, max_examples=50)
@given(which=st.sampled_from(["fwd", "bwd"]), seed=st.integers(0, 2**32 - 1), data=st.data())
def test_patched_parameters_equal_a_fresh_pack(which, seed, data):
    rng = np.random.default_rng(seed)
    dtype, pack, names = {
        "fwd": (loader.PARAMS_DTYPE, loader.pack_params, FWD_POINTERS),
        "bwd": (loader.BWD_PARAMS_DTYPE, loader.pack_bwd_params, BWD_POINTERS),
    }[which]
    first = _fields(dtype, rng)
    kernels = (RecordingKernel(), RecordingKernel())
    plan = launch_plans.PackedLaunch(
        kernels, (3, 2, 1), (128,), 4096, pack(**first), loader.pointer_offsets(which, names)
    )
    for _ in range(3):  # the template is not consumed by a launch
        pointers = data.draw(st.tuples(*[pointer_values] * len(names)))
        plan.launch(*pointers)
        want = pack(**{**first, **dict(zip(names, pointers, strict=True))}).tobytes()
        for kernel in kernels:
            grid, block, args, smem = kernel.calls[-1]
            assert (grid, block, smem) == ((3, 2, 1), (128,), 4096)
            (params,) = args
            # one unstructured blob: CuPy passes it by value without walking fields
            assert params.shape == (1,) and params.dtype.names is None
            assert params.tobytes() == want


def test_extra_arguments_come_from_the_pointers():
    seen = []

    def extra(pointers):
        seen.append(pointers)
        return (launch_plans.blob(bytes([pointers[0] % 256]) * 8),)

    kernel = RecordingKernel()
    params = loader.pack_params(**{n: 0 for n in loader.PARAMS_DTYPE.names})
    plan = launch_plans.PackedLaunch(
        (kernel,), (1, 1, 1), (32,), 0, params, loader.pointer_offsets("fwd", FWD_POINTERS),
        extra,
    )  # fmt: skip
    plan.launch(*range(7, 14))
    assert seen == [tuple(range(7, 14))]
    args = kernel.calls[0][2]
    assert len(args) == 2 and args[1].tobytes() == bytes([7]) * 8


def test_wrong_pointer_count_and_non_pointer_fields_are_refused():
    params = loader.pack_params(**{n: 0 for n in loader.PARAMS_DTYPE.names})
    plan = launch_plans.PackedLaunch(
        (RecordingKernel(),), (1, 1, 1), (32,), 0, params, loader.pointer_offsets("fwd", ("q",))
    )
    with pytest.raises(TypeError, match="expected 1 pointers, got 2"):
        plan.launch(1, 2)
    with pytest.raises(KeyError, match="batch is not a pointer field"):
        loader.pointer_offsets("fwd", ("batch",))


def test_plan_cache_is_bounded():
    cache = launch_plans.PlanCache(limit=4)
    for i in range(10):
        cache.put(i, object())
        assert len(cache) <= 4
    assert cache.get(9) is not None and cache.get(0) is None
