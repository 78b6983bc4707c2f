"""Launch plans (cuparing.backends.launch_plans): a planned launch hands the kernel exactly the
argument bytes a fresh pack of the same call would, whatever the pointers; on the CPU, with a
recording stand-in for the driver that reads the arguments the way ``cuLaunchKernel`` does."""

from __future__ import annotations

import ctypes
import struct
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cuparing.backends import launch_plans
from cuparing.kernels import loader

FWD_POINTERS = ("out", "lse", "q", "k", "v", "q_pos", "k_pos", "acc")
BWD_POINTERS = (
    "dout", "lse", "delta", "dq", "dk", "dv", "q", "k", "v", "q_pos", "k_pos", "redo",
    "dq_turns", "dkv_turns",
)  # fmt: skip


class Function:
    """A stand-in for a CuPy RawKernel: only its CUfunction handle (``.kernel.ptr``) is used."""

    def __init__(self, ptr: int):
        self.kernel = SimpleNamespace(ptr=ptr)


class RecordingDriver:
    """Records each launch: the function, the geometry, and the bytes of every argument, read
    through the ``void*`` array as the driver reads them (``sizes``: each argument's bytes)."""

    def __init__(self, sizes):
        self.sizes, self.calls, self.streams = list(sizes), [], []

    def launch(self, function, geometry, arguments, stream=None):
        addresses = (ctypes.c_uint64 * len(self.sizes)).from_address(arguments)
        args = [ctypes.string_at(int(a), n) for a, n in zip(addresses, self.sizes, strict=True)]
        self.calls.append((function, geometry, args))
        self.streams.append(stream)


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
    driver = RecordingDriver([dtype.itemsize])
    plan = launch_plans.PackedLaunch(
        (Function(11), Function(12)), (3, 2), (128,), 4096, pack(**first),
        loader.pointer_offsets(which, names), driver=driver,
    )  # fmt: skip
    for _ in range(3):  # the template is not consumed by a launch
        pointers = data.draw(st.tuples(*[pointer_values] * len(names)))
        plan.launch(*pointers)
        want = pack(**{**first, **dict(zip(names, pointers, strict=True))}).tobytes()
        # every kernel of the plan, in order, with the geometry and exactly these bytes
        assert driver.calls[-2:] == [
            (function, (3, 2, 1, 128, 1, 1, 4096), [want]) for function in (11, 12)
        ]


def test_extra_arguments_come_from_the_pointers():
    seen = []
    maps = {}

    def extra(pointers):
        seen.append(pointers)
        key = pointers[0] % 256
        if key not in maps:  # the owner keeps the arrays alive (as the tensor-map cache does)
            maps[key] = launch_plans.blob(bytes([key]) * 8)
        return (maps[key],)

    params = loader.pack_params(**{n: 0 for n in loader.PARAMS_DTYPE.names})
    driver = RecordingDriver([params.itemsize, 8])
    plan = launch_plans.PackedLaunch(
        (Function(5),), (1, 1, 1), (32,), 0, params, loader.pointer_offsets("fwd", FWD_POINTERS),
        extra, driver=driver,
    )  # fmt: skip
    for first in (7, 9, 7):
        plan.launch(*range(first, first + len(FWD_POINTERS)))
        assert seen[-1] == tuple(range(first, first + len(FWD_POINTERS)))
        assert driver.calls[-1][2][1] == bytes([first]) * 8


def test_a_launch_sequence_runs_each_kernel_in_order_with_the_same_pointers():
    """The sm90 backward and the sm80 redo pass after it: different kernels and geometries, one
    params struct, every pointer patched into both."""
    rng = np.random.default_rng(0)
    values = _fields(loader.BWD_PARAMS_DTYPE, rng)
    params = loader.pack_bwd_params(**values)
    driver = RecordingDriver([params.itemsize])
    offsets = loader.pointer_offsets("bwd", BWD_POINTERS)
    first = launch_plans.PackedLaunch(
        (Function(1),), (8, 2, 16), (384,), 1000, params, offsets, driver=driver
    )
    second = launch_plans.PackedLaunch(
        (Function(2),), (8, 2, 16), (256,), 500, params, offsets, driver=driver
    )
    pointers = [int(p) for p in rng.integers(0, 2**63, len(BWD_POINTERS))]
    launch_plans.LaunchSequence((first, second)).launch(*pointers)
    want = loader.pack_bwd_params(**{**values, **dict(zip(BWD_POINTERS, pointers, strict=True))})
    assert [(f, g) for f, g, _ in driver.calls] == [
        (1, (8, 2, 16, 384, 1, 1, 1000)), (2, (8, 2, 16, 256, 1, 1, 500)),
    ]  # fmt: skip
    assert all(args == [want.tobytes()] for _, _, args in driver.calls)


def test_observed_launches_and_updates_hand_over_the_same_arguments():
    """What a stream capture relies on: the observer hears of each kernel after it launched, and
    ``update`` packs new pointers exactly as a launch would, into a node instead of a launch."""
    rng = np.random.default_rng(1)
    values = _fields(loader.PARAMS_DTYPE, rng)
    params = loader.pack_params(**values)
    driver = RecordingDriver([params.itemsize])
    offsets = loader.pointer_offsets("fwd", FWD_POINTERS)
    plan = launch_plans.PackedLaunch((Function(1), Function(2)), (4,), (128,), 0, params, offsets,
                                     driver=driver)  # fmt: skip
    heard = []
    pointers = tuple(int(p) for p in rng.integers(0, 2**63, len(FWD_POINTERS)))
    with launch_plans.observe(lambda launch, ptrs, index: heard.append(
            (launch, ptrs, index, len(driver.calls)))):  # fmt: skip
        plan.launch(*pointers)
        with pytest.raises(RuntimeError, match="already being observed"):
            with launch_plans.observe(lambda *a: None):
                pass
    assert heard == [(plan, pointers, 0, 1), (plan, pointers, 1, 2)]
    plan.launch(*pointers)  # outside the block nobody hears
    assert len(heard) == 2
    moved = tuple(int(p) for p in rng.integers(0, 2**63, len(FWD_POINTERS)))
    plan.update(moved, 1, driver.launch)
    want = loader.pack_params(**{**values, **dict(zip(FWD_POINTERS, moved, strict=True))})
    assert driver.calls[-1] == (2, (4, 1, 1, 128, 1, 1, 0), [want.tobytes()])


def test_several_arguments_at_their_offsets():
    """A kernel of separate arguments (the casts: source, destination, count)."""
    driver = RecordingDriver([8, 8, 8])
    plan = launch_plans.PackedLaunch(
        (Function(3),), (4,), (256,), 0, struct.pack("<QQq", 0, 0, 1000), (0, 8),
        arg_offsets=(0, 8, 16), driver=driver,
    )  # fmt: skip
    plan.launch(2**40, 2**41 + 16)
    want = [struct.pack("<Q", 2**40), struct.pack("<Q", 2**41 + 16), struct.pack("<q", 1000)]
    assert driver.calls == [(3, (4, 1, 1, 256, 1, 1, 0), want)]
    # a caller's stream handle reaches the driver as is; without one the driver's current
    plan.launch(2**40, 2**41 + 16, stream=0x7F00)
    assert driver.calls[1] == driver.calls[0] and driver.streams == [None, 0x7F00]


def test_threads_sharing_a_plan_each_launch_their_own_pointers():
    """Ranks simulated in threads share plans, and a plan reuses one argument buffer: every
    launch must still hand the driver the bytes of its own pointers."""
    import threading

    params = loader.pack_params(**{n: 0 for n in loader.PARAMS_DTYPE.names})
    driver = RecordingDriver([params.itemsize])
    plan = launch_plans.PackedLaunch(
        (Function(1),), (1, 1, 1), (32,), 0, params, loader.pointer_offsets("fwd", FWD_POINTERS),
        driver=driver,
    )  # fmt: skip
    q_offset = loader.pointer_offsets("fwd", ("q",))[0]

    def launches(first):
        for i in range(1000):
            plan.launch(*[first + 16 * i] * len(FWD_POINTERS))

    threads = [threading.Thread(target=launches, args=(t << 32,)) for t in range(1, 5)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter can
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    seen = [struct.unpack_from("<Q", args[0], q_offset)[0] for _, _, args in driver.calls]
    assert sorted(seen) == sorted((t << 32) + 16 * i for t in range(1, 5) for i in range(1000))
    # and each launch's pointers are all of one call (no mix of two threads' pointers)
    for _, _, args in driver.calls:
        values = {struct.unpack_from("<Q", args[0], o)[0]
                  for o in loader.pointer_offsets("fwd", FWD_POINTERS)}  # fmt: skip
        assert len(values) == 1


def test_wrong_pointer_count_and_non_pointer_fields_are_refused():
    params = loader.pack_params(**{n: 0 for n in loader.PARAMS_DTYPE.names})
    plan = launch_plans.PackedLaunch(
        (Function(1),), (1, 1, 1), (32,), 0, params, loader.pointer_offsets("fwd", ("q",)),
        driver=RecordingDriver([params.itemsize]),
    )  # fmt: skip
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
