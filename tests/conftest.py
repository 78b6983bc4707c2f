"""Shared test configuration: Hypothesis profiles, the GPU marker, fresh seeds and the GPU kernel
family fixture."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=150,
    deadline=None,
    derandomize=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "heavy",
    max_examples=1000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "heavy")
)


def pytest_collection_modifyitems(config, items):
    """``CUPARING_TEST_SHARD=i/n`` keeps every n-th collected test from the i-th (0-based):
    tools/sharded_pytest.py runs n such processes at once, so GPU test runs, whose time goes
    mostly to the float64 references and first-call compiles on the host, take a fraction of
    the wall time. Dealt in collection order, neighbouring (similar) tests go to different
    shards."""
    shard = os.environ.get("CUPARING_TEST_SHARD")
    if not shard:
        return
    try:
        index, count = (int(part) for part in shard.split("/"))
        if not 0 <= index < count:
            raise ValueError
    except ValueError:
        raise pytest.UsageError(
            f"CUPARING_TEST_SHARD must be 'i/n' with 0 <= i < n, got {shard!r}"
        ) from None
    kept = items[index::count]
    dropped = [item for position, item in enumerate(items) if position % count != index]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = kept


def gpu_count() -> int:
    """Number of CUDA GPUs CuPy can see (0 without CuPy or a driver)."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount()
    except Exception:  # noqa: BLE001 - any failure means no usable GPU
        return 0


def requires_gpu(n: int = 1):
    """Mark a test as needing ``n`` CUDA GPUs; it is skipped when fewer are present."""
    found = gpu_count()
    return pytest.mark.skipif(found < n, reason=f"needs {n} GPU(s), found {found}")


def torch_on_gpu():
    """``torch``, for a GPU test on torch CUDA tensors; skips the test where torch is missing or
    was built without CUDA (the test extra pins a release whose CPU build may be what is
    installed)."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a torch build with CUDA")
    return torch


def torch_has_cuda() -> bool:
    """Whether torch is installed with CUDA and sees a GPU (for skip marks)."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def record_direct_grads(monkeypatch) -> list[tuple]:
    """Record the shape of every dK / dV the backward kernels are set to write straight
    (``backends.direct_grads.DirectGrad`` made); returns the list the shapes are appended to."""
    from cuparing.backends.direct_grads import DirectGrad

    shapes: list[tuple] = []
    original = DirectGrad.__init__

    def recording(self, out, scratch):
        shapes.append(tuple(out.shape))
        original(self, out, scratch)

    monkeypatch.setattr(DirectGrad, "__init__", recording)
    return shapes


def record_plan_runs(monkeypatch, kinds) -> list[bool]:
    """Make ``run`` of each plan class in ``kinds`` (``call_plans.CallPlan``,
    ``RingForwardPlan``, ...) record whether it ran the call (True) or left it to the full path
    (None returned: False); returns the list the answers are appended to."""
    answers: list[bool] = []
    for kind in kinds:

        def counted_run(self, *args, real_run=kind.run, **kwargs):
            result = real_run(self, *args, **kwargs)
            answers.append(result is not None)
            return result

        monkeypatch.setattr(kind, "run", counted_run)
    return answers


def record_plan_reuse(monkeypatch) -> list[bool]:
    """Make ``call_plans.CheckedCall.ready`` record each of its answers (True: a repeat reused
    what its first call decided); returns the list the answers are appended to."""
    from cuparing import call_plans

    answers: list[bool] = []
    ready = call_plans.CheckedCall.ready

    def recording_ready(self, *args):
        answers.append(ready(self, *args))
        return answers[-1]

    monkeypatch.setattr(call_plans.CheckedCall, "ready", recording_ready)
    return answers


def record_deterministic_flags(monkeypatch) -> list[bool]:
    """Make ``cuparing.api``'s backward entry points (one device and ring) record the
    ``deterministic`` they are called with; returns the list the flags are appended to."""
    from cuparing import api

    flags: list[bool] = []
    for name in ("attention_backward", "ring_attention_backward"):
        real = getattr(api, name)

        def recording(*args, real=real, **kwargs):
            flags.append(kwargs["deterministic"])
            return real(*args, **kwargs)

        monkeypatch.setattr(api, name, recording)
    return flags


@pytest.fixture
def fresh_rng():
    """A NumPy generator on a new seed for every test run (GPU tests compare against the float64
    reference on fresh data, never a fixed draw); the seed is printed, so pytest shows it with a
    failure and the draw can be replayed with ``np.random.default_rng(seed)``."""
    seed = int(np.random.SeedSequence().entropy % 2**63)
    print(f"seed {seed}")
    return np.random.default_rng(seed)


@pytest.fixture(params=["sm80", "sm90"])
def backward_family(request, monkeypatch):
    """The backward kernel family under test (``CUPARING_BWD``): sm80 (mma.sync) everywhere, the
    sm90 (wgmma) one, Hopper's default for head dims 64 and 128, on Hopper GPUs only."""
    if request.param == "sm90" and gpu_count() > 0:
        import cupy

        if not cupy.cuda.Device().compute_capability.startswith("9"):
            pytest.skip("the sm90 (wgmma) kernels need a Hopper GPU")
    monkeypatch.setenv("CUPARING_BWD", request.param)
    return request.param


@pytest.fixture(params=["sm80", "sm90", "sm90-cp.async"])
def kernel_family(request, monkeypatch):
    """The forward kernel family under test (sm90: its TMA producer, or the cp.async one that
    serves operands without tensor maps); sm90 is skipped on GPUs that are not Hopper."""
    if request.param.startswith("sm90") and gpu_count() > 0:
        import cupy

        if not cupy.cuda.Device().compute_capability.startswith("9"):
            pytest.skip("the sm90 (wgmma) kernels need a Hopper GPU")
    monkeypatch.setenv("CUPARING_KERNELS", request.param.split("-")[0])
    monkeypatch.setenv("CUPARING_TMA", "0" if request.param.endswith("cp.async") else "1")
    return request.param
