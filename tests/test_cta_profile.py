"""tools/cta_profile.py, the Hopper kernels' CTA timeline: its summary of a known timeline, and
the profile build (``CUPARING_CTA_PROFILE``) of both sm90 kernels still compiles, spill-free
(NVRTC wheel; skipped without it)."""

from __future__ import annotations

import numpy as np
import pytest
from tool_modules import load_tool as _tool

from cuparing.kernels import loader


def test_summary_of_a_known_timeline():
    """Two SMs, three CTAs (ns): SM 0 runs CTA 0 over [0, 1000] and CTA 2 over [1100, 2000]; SM 1
    runs CTA 1 over [0, 1500]; each CTA's first tile 100 ns after its start, its last product
    200 ns before its end; a fourth slot never ran."""
    profile = _tool("cta_profile")
    got = {
        "cuparing_cta_start_ns": np.array([0, 0, 1100, 0], np.uint64),
        "cuparing_cta_first_ns": np.array([100, 100, 1200, 0], np.uint64),
        "cuparing_cta_last_ns": np.array([800, 1300, 1800, 0], np.uint64),
        "cuparing_cta_end_ns": np.array([1000, 1500, 2000, 0], np.uint64),
        "cuparing_cta_sm": np.array([0, 1, 0, 0], np.uint32),
    }
    r = profile.summarize(got, sms=2)
    assert r["ctas"] == 3
    assert r["span_ms"] == pytest.approx(2000 / 1e6)
    assert r["cta_us"] == pytest.approx((1000 + 1500 + 900) / 3 / 1e3)
    assert r["prologue_us"] == pytest.approx(0.1)
    assert r["epilogue_us"] == pytest.approx(0.2)
    assert r["main_us"] == pytest.approx((700 + 1200 + 600) / 3 / 1e3)
    assert r["gap_us"] == pytest.approx(0.1)  # SM 0's one gap, 1000 -> 1100
    assert r["tail_pct"] == pytest.approx(100 * 500 / (2 * 2000))  # SM 1 idle from 1500


def test_summary_counts_idle_sms_and_drops_an_earlier_launchs_marks():
    """One CTA on SM 0 of two over [1000, 2000], whose tile ran [1100, 1800]; slot 1 ran in this
    launch too but began no tile: its marks are an earlier launch's, before its start."""
    profile = _tool("cta_profile")
    got = {
        "cuparing_cta_start_ns": np.array([1000, 1000], np.uint64),
        "cuparing_cta_first_ns": np.array([1100, 50], np.uint64),
        "cuparing_cta_last_ns": np.array([1800, 90], np.uint64),
        "cuparing_cta_end_ns": np.array([2000, 1200], np.uint64),
        "cuparing_cta_sm": np.array([0, 0], np.uint32),
    }
    r = profile.summarize(got, sms=2)
    assert r["prologue_us"] == pytest.approx(0.1) and r["epilogue_us"] == pytest.approx(0.2)
    # SM 1 ran nothing: idle the whole span (1000 ns); SM 0 idle from 2000: none
    assert r["tail_pct"] == pytest.approx(100 * 1000 / (2 * 1000))


@pytest.mark.parametrize("kernel", ["forward", "backward ordered"])
def test_profile_build_compiles_without_spills(kernel):
    check = _tool("compile_check")
    nvrtc = check.get_nvrtc()
    if nvrtc is None:
        pytest.skip("NVRTC not importable: pip install nvidia-cuda-nvrtc")
    profile = _tool("cta_profile")
    if kernel == "forward":
        name, smem = loader.fwd_name(128, "bfloat16", "sm90", True), loader.sm90_smem_bytes(128)
    else:
        name = loader.sm90_bwd_name(128, "bfloat16", True)
        smem = loader.sm90_bwd_smem_bytes(128)
    source = f"#define {profile.PROFILE_DEFINE[2:]}\n" + loader.kernel_source("sm_90a", "sm90")
    report = check.compile_one(nvrtc, source, name, "sm_90a", True, smem)
    assert report.spill_stores == 0 and report.spill_loads == 0 and report.stack == 0, report
