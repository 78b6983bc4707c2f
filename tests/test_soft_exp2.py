"""The software 2^x of tools/variants/soft_exp2.py, modelled in float32: within its stated error
of the exact power over the softmax's argument range, exactly 0 for masked (-inf) and
underflowing arguments, NaN for NaN, and the same text the variant puts in the kernel."""

from __future__ import annotations

import runpy
from pathlib import Path

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

VARIANT = runpy.run_path(str(Path(__file__).resolve().parents[1] / "tools" / "variants" /
                             "soft_exp2.py"))  # fmt: skip
model = VARIANT["exp2_fma_model"]
FLOOR = VARIANT["FLOOR"]
# the polynomial's 2.9e-6 (float32 Horner, measured when fitted) plus the rounding of the
# fraction x - round(x) and of the result: a few float32 units (2^-24 each); 4e-6 in all
RELATIVE_BOUND = 4e-6


def test_dense_grid_of_arguments():
    x = np.linspace(FLOOR, 0.0, 2_000_001, dtype=np.float32)
    got = model(x).astype(np.float64)
    want = np.exp2(x.astype(np.float64))
    assert np.max(np.abs(got / want - 1)) < RELATIVE_BOUND


@given(st.floats(min_value=FLOOR, max_value=0.0, width=32))
def test_any_float32_argument(x):
    got = float(model(np.float32(x)))
    assert abs(got / np.exp2(np.float64(x)) - 1) < RELATIVE_BOUND


def test_special_arguments():
    x = np.array([-np.inf, -1e30, -125.5, np.nextafter(np.float32(FLOOR), np.float32(-np.inf)),
                  np.nan, 0.0, -0.0], dtype=np.float32)  # fmt: skip
    got = model(x)
    assert np.all(got[:4] == 0.0)  # masked and underflowing: exactly 0, never a denormal
    assert np.isnan(got[4])
    assert np.all(got[5:] == 1.0)


def test_kernel_text_holds_the_modelled_constants():
    (_, _, helper), (_, _, use) = VARIANT["VARIANTS"]["every4"]
    for c in VARIANT["COEFFS"]:
        assert f"{c!r}f" in helper
    assert f"{VARIANT['ROUNDER']!r}f" in helper and f"{FLOOR!r}f" in helper
    assert "j % 4 == 3 ? exp2_fma(arg)" in use
