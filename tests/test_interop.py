"""cuparing.interop is the one place that knows frameworks: each helper on NumPy and PyTorch."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from cuparing import interop


@pytest.mark.parametrize(
    ("thing", "name"),
    [
        (np.zeros(2, np.float16), "float16"),
        (np.dtype(np.float32), "float32"),
        (np.float64, "float64"),
        (np.zeros(2, ml_dtypes.bfloat16), "bfloat16"),
        (ml_dtypes.bfloat16, "bfloat16"),
    ],
)
def test_dtype_name_of_arrays_dtypes_and_scalar_types(thing, name):
    assert interop.dtype_name(thing) == name


def test_element_strides_count_elements_not_bytes():
    x = np.zeros((2, 3, 4), np.float32).transpose(1, 0, 2)
    assert interop.element_strides(x) == (4, 12, 1)


def test_take_concatenate_and_to_host_keep_numpy_as_numpy():
    x = np.arange(12).reshape(3, 4)
    np.testing.assert_array_equal(interop.take(x, np.array([3, 0]), 1), x[:, [3, 0]])
    np.testing.assert_array_equal(interop.concatenate([x, x], 0), np.vstack([x, x]))
    assert interop.to_host(x) is x
    np.testing.assert_array_equal(interop.to_host([1.5, 2.5]), np.array([1.5, 2.5]))
    assert not interop.records_gradient(x)


def test_torch_helpers():
    torch = pytest.importorskip("torch")
    x = torch.arange(12.0).reshape(3, 4).to(torch.bfloat16)
    assert interop.dtype_name(x) == "bfloat16" and interop.dtype_name(torch.float16) == "float16"
    assert interop.element_strides(x.t()) == (1, 4)
    taken = interop.take(x, np.array([3, 0]), 1)
    assert isinstance(taken, torch.Tensor) and taken.tolist() == x[:, [3, 0]].tolist()
    joined = interop.concatenate([x, x], 1)
    assert isinstance(joined, torch.Tensor) and joined.shape == (3, 8)
    host = interop.to_host(x)
    assert host.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(host.astype(np.float32), x.float().numpy())
    tracked = torch.ones(2, requires_grad=True)
    assert interop.records_gradient(tracked)
    with torch.no_grad():
        assert not interop.records_gradient(tracked)
    assert not interop.records_gradient(tracked.detach())


def test_call_contexts_enter_and_exit_in_order():
    """Origin.stream enters the device, the caller's stream and the allocator with this helper;
    it runs only on GPUs, so its context-manager behaviour is checked here: order, every one
    left on an exception in the body (and when leaving one fails), and those entered left again
    when entering a later one fails."""
    import contextlib

    events = []

    @contextlib.contextmanager
    def context(name, fail_enter=False, fail_exit=False):
        if fail_enter:
            raise RuntimeError(f"cannot enter {name}")
        events.append(f"enter {name}")
        try:
            yield
        finally:
            events.append(f"exit {name}")
            if fail_exit:
                raise OSError(f"cannot leave {name}")

    with interop._Entered(context("device"), context("stream"), context("allocator")):
        events.append("body")
    assert events == ["enter device", "enter stream", "enter allocator", "body",
                      "exit allocator", "exit stream", "exit device"]  # fmt: skip
    events.clear()
    with pytest.raises(KeyError):
        with interop._Entered(context("device"), context("stream")):
            events.append("body")
            raise KeyError("in the body")
    assert events == ["enter device", "enter stream", "body", "exit stream", "exit device"]
    events.clear()
    with pytest.raises(RuntimeError, match="cannot enter allocator"):
        with interop._Entered(context("device"), context("stream"),
                              context("allocator", fail_enter=True)):  # fmt: skip
            events.append("body")
    assert events == ["enter device", "enter stream", "exit stream", "exit device"]
    events.clear()
    with pytest.raises(OSError, match="cannot leave stream"):
        with interop._Entered(context("device"), context("stream", fail_exit=True)):
            events.append("body")
    assert events == ["enter device", "enter stream", "body", "exit stream", "exit device"]


def test_external_streams_are_made_once_per_handle_and_device(monkeypatch):
    """Origin.stream, the kept launches and the JAX ops all view a foreign stream through
    external_cupy_stream, call after call: one CuPy object per (handle, device), made once
    (here against a stand-in for CuPy's stream import)."""
    import sys
    from types import SimpleNamespace

    made = []

    def from_external(obj):
        made.append(obj.__cuda_stream__())
        return object()

    stream_class = SimpleNamespace(from_external=from_external)
    fake = SimpleNamespace(cuda=SimpleNamespace(Stream=stream_class))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(interop, "_external_streams", {})
    first = interop.external_cupy_stream(0x1234, 0)
    assert interop.external_cupy_stream(0x1234, 0) is first
    other_device = interop.external_cupy_stream(0x1234, 1)
    assert other_device is not first and interop.external_cupy_stream(0x99, 0) is not first
    assert made == [(0, 0x1234), (0, 0x1234), (0, 0x99)]
