"""The CUDA kernels compile for sm_80 and sm_90a without spills; no GPU needed.

NVRTC comes from the ``nvidia-cuda-nvrtc`` wheel (``pip install nvidia-cuda-nvrtc``); without it
the compile test is skipped, the pure-Python checks of the loader still run.
"""

from __future__ import annotations

import numpy as np
import pytest
from tool_modules import load_tool

from cuparing.kernels import loader


def _compile_check():
    return load_tool("compile_check")


def test_params_layout_matches_params_cuh():
    # sizeof(FwdParams) is static_asserted in params.cuh (NVRTC 13.0 has no offsetof, so the
    # offsets are checked only here, against the hand-computed PARAMS_OFFSETS)
    assert loader.PARAMS_DTYPE.itemsize == loader.PARAMS_SIZE
    for name, offset in loader.PARAMS_OFFSETS.items():
        assert loader.PARAMS_DTYPE.fields[name][1] == offset, name
    packed = loader.pack_params(**{n: 0 for n in loader.PARAMS_DTYPE.names})
    assert packed.shape == (1,) and packed.dtype == loader.PARAMS_DTYPE
    with pytest.raises(TypeError):
        loader.pack_params(q=0)


def test_the_gather_params_struct_has_the_python_layout():
    """GatherRowsParams' field offsets as the CUDA compiler lays them out (NVRTC has no
    offsetof: a probe kernel stores each field's offset, which the PTX shows as a constant)
    are loader.GATHER_ROWS_LAYOUT's, and its size GATHER_ROWS_SIZE."""
    import re

    check = _compile_check()
    nvrtc = check.get_nvrtc()
    if nvrtc is None:
        pytest.skip("NVRTC not importable: pip install nvidia-cuda-nvrtc")
    header = (loader.KERNEL_DIR / "common" / "gather_rows.cuh").read_text()
    layout = loader.GATHER_ROWS_LAYOUT
    fields = [(name, count) for name, _, count, _ in layout[:-1]]
    fields += [("batch", 1), ("length", 1), ("heads", 1), ("head_words", 1)]  # (the ints)
    stores = "".join(
        f"  out[{i}] = ((const char*)&p.{name} - (const char*)&p) * 1000 + {i};\n"
        for i, (name, _) in enumerate(fields)
    )  # (each constant unique: offset * 1000 + the field's index)
    probe = (f"{header}\nextern \"C\" __global__ void probe(const __grid_constant__ "
             f"cuparing::GatherRowsParams p, long long* out) {{\n{stores}  out[{len(fields)}] = "
             f"sizeof(p) * 1000 + {len(fields)};\n}}\n")  # fmt: skip
    _, _, _, ptx = nvrtc.compile(probe, [], ["--gpu-architecture=compute_80", "-std=c++17"])
    # (the constants are stored directly or moved into a register first)
    stored = [int(x) for x in re.findall(r"(?:st\.global|mov)\.u64\s+[^,]+,\s*(\d+);", ptx)]
    offsets = {value % 1000: value // 1000 for value in stored}
    assert len(offsets) == len(fields) + 1, ptx[-2000:]
    assert offsets[len(fields)] == loader.GATHER_ROWS_SIZE
    for (name, offset, _, _), i in zip(layout[:-1], range(len(fields)), strict=False):
        assert offsets[i] == offset, name
    ints_at = layout[-1][1]
    assert [offsets[len(fields) - 4 + j] for j in range(4)] == [ints_at + 4 * j for j in range(4)]


def test_bwd_params_layout():
    # sizeof(BwdParams) is static_asserted in params.cuh (NVRTC 13.0 has no offsetof)
    assert loader.BWD_PARAMS_DTYPE.itemsize == loader.BWD_PARAMS_SIZE
    packed = loader.pack_bwd_params(**{n: 0 for n in loader.BWD_PARAMS_DTYPE.names})
    assert packed.shape == (1,) and packed.dtype == loader.BWD_PARAMS_DTYPE
    with pytest.raises(TypeError):
        loader.pack_bwd_params(q=0)


def test_bwd_table():
    assert sorted(loader.BWD_CONFIGS) == list(loader.HEAD_DIMS)
    for arch, limit in (("sm_80", 163 * 1024), ("sm_90a", 227 * 1024)):
        for d in loader.HEAD_DIMS:
            cfg = loader.bwd_configs(arch)[d]
            assert loader.bwd_smem_bytes(d, arch) <= limit, (arch, d)
            assert cfg.block_n % (16 * cfg.warps) == 0 and cfg.block_n // (16 * cfg.warps) in (1, 2)
            assert loader.bwd_modes(d, arch) == ((1, 2) if cfg.split else (0,))
    assert "CUPARING_BWD_CONFIGS" in loader.kernel_source("sm_80")
    assert loader.bwd_name(128, "bfloat16", 0) == "cuparing_bwd<128, true, 0>"


def test_padded_head_dim():
    assert [loader.padded_head_dim(d) for d in (8, 32, 40, 64, 72, 96, 128, 136, 256)] == [
        32, 32, 64, 64, 96, 96, 128, 160, 256,
    ]  # fmt: skip
    for bad in (0, 4, 12, 264):
        with pytest.raises(ValueError):
            loader.padded_head_dim(bad)


def test_forward_family_choice(monkeypatch):
    monkeypatch.delenv("CUPARING_KERNELS", raising=False)
    assert loader.forward_family(128, "sm_90") == "sm90"
    assert loader.forward_family(96, "sm_90") == "sm80"  # no sm90 tiles for this head dim
    assert loader.forward_family(128, "sm_80") == "sm80"
    monkeypatch.setenv("CUPARING_KERNELS", "sm80")
    assert loader.forward_family(128, "sm_90") == "sm80"
    monkeypatch.setenv("CUPARING_KERNELS", "sm90")
    assert loader.forward_family(128, "sm_89") == "sm80"  # wgmma needs Hopper
    monkeypatch.setenv("CUPARING_KERNELS", "fast")
    with pytest.raises(ValueError, match="CUPARING_KERNELS"):
        loader.forward_family(128, "sm_90")
    assert loader.fwd_name(128, "bfloat16", "sm90") == "cuparing_fwd_sm90<128, true, false>"
    assert loader.fwd_name(64, "float16", "sm90", tma=True) == "cuparing_fwd_sm90<64, false, true>"
    with pytest.raises(ValueError):
        loader.fwd_name(96, "bfloat16", "sm90")


def test_redo_pass_instantiations():
    """The sm80 kernel's redo pass for the sm90 backward: one instantiation per sm90 head dim and
    dtype, compiled for Hopper only, on the same 128-key CTAs in one launch."""
    names = loader.all_bwd_names("sm_90a")
    redo = [n for n in names if n.endswith(f", {loader.BWD_REDO}>")]
    assert len(redo) == len(loader.SM90_BWD_HEAD_DIMS) * len(loader.DTYPES)
    assert not [n for n in loader.all_bwd_names("sm_80") if n.endswith(f", {loader.BWD_REDO}>")]
    for d in loader.SM90_BWD_HEAD_DIMS:
        cfg = loader.bwd_configs("sm_90a")[d]
        assert cfg.block_n == loader.SM90_BWD_CONFIG.block_n and not cfg.split
        assert 64 % cfg.block_m == 0  # the sm90 kernel's 64-row tiles start on its tiles
    with pytest.raises(ValueError, match="redo"):
        loader.get_bwd_redo_kernel(96, "bfloat16")


@pytest.mark.parametrize(
    "routing, family, switch",
    [("forward_head_dim", "forward_family", "CUPARING_KERNELS"),
     ("backward_head_dim", "backward_family", "CUPARING_BWD")],
)  # fmt: skip
def test_head_dims_that_pad_to_96_run_the_sm90_128_instantiation(
    routing, family, switch, monkeypatch
):
    """The sm90 forward and backward run head dims that pad to 96 in their 128 instantiation
    (zero columns); the mma.sync family (other GPUs, or switched to) in its own 96 one; other
    head dims pad as always."""
    route, family_of = getattr(loader, routing), getattr(loader, family)
    monkeypatch.delenv("CUPARING_BWD", raising=False)
    monkeypatch.delenv("CUPARING_KERNELS", raising=False)
    dims = (8, 40, 64, 72, 96, 104, 128, 136, 256)
    assert [route(d, "sm_90") for d in dims] == [32, 64, 64, 128, 128, 128, 128, 160, 256]
    assert [route(d, "sm_80") for d in dims] == [loader.padded_head_dim(d) for d in dims]
    assert all(family_of(route(d, "sm_90"), "sm_90") == "sm90" for d in (40, 72, 96, 104, 128))
    monkeypatch.setenv(switch, "sm80")
    assert route(96, "sm_90") == 96


def test_backward_family_choice(monkeypatch):
    monkeypatch.delenv("CUPARING_KERNELS", raising=False)
    monkeypatch.delenv("CUPARING_BWD", raising=False)
    assert loader.backward_family(128, "sm_90") == "sm90"  # Hopper's own family by default
    monkeypatch.setenv("CUPARING_BWD", "sm80")
    assert loader.backward_family(128, "sm_90") == "sm80"
    monkeypatch.setenv("CUPARING_BWD", "sm90")
    assert loader.backward_family(128, "sm_90") == "sm90"
    assert loader.backward_family(64, "sm_90") == "sm90"
    assert loader.backward_family(96, "sm_90") == "sm80"  # no sm90 backward for this head dim
    assert loader.backward_family(128, "sm_80") == "sm80"  # wgmma needs Hopper
    monkeypatch.setenv("CUPARING_KERNELS", "sm80")  # forces the mma.sync family everywhere
    assert loader.backward_family(128, "sm_90") == "sm80"
    monkeypatch.setenv("CUPARING_BWD", "fast")
    with pytest.raises(ValueError, match="CUPARING_BWD"):
        loader.backward_family(128, "sm_90")
    assert loader.sm90_bwd_name(128, "bfloat16") == "cuparing_bwd_sm90<128, true, false>"
    assert loader.sm90_bwd_name(64, "float16", True) == "cuparing_bwd_sm90<64, false, true>"
    with pytest.raises(ValueError):
        loader.sm90_bwd_name(256, "bfloat16")


def test_wgmma_wrappers():
    from cuparing.kernels import wgmma

    text = wgmma.wrappers_source([64, 128])
    assert text.count("struct Wgmma<") == 4  # 2 widths x 2 dtypes
    assert "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, " in text
    assert "%63}, %64, %65, p, 1, 1, 0, 0;" in text  # 64 accumulators, then the descriptors
    assert "%63}, %64, %65, p, 1, 1, 1, 1;" in text  # ss_trans_ab: both operands MN-major
    with pytest.raises(ValueError):
        wgmma.wrappers_source([60])


def test_source_is_self_contained():
    source = loader.kernel_source("sm_90a") + loader.kernel_source("sm_90a", "sm90")
    assert '#include "' not in source  # our headers are inlined (CuPy's cache hashes the text)
    assert "#include <" not in source  # header-free: NVRTC needs nothing but libnvrtc
    assert "CUPARING_FWD_CONFIGS" in source
    for arch, limit in (("sm_80", 163 * 1024), ("sm_90a", 227 * 1024)):  # per-CTA maximum
        for d in loader.HEAD_DIMS:
            assert loader.smem_bytes(d, arch) <= limit, (arch, d)
            cfg = loader.fwd_configs(arch)[d]
            assert cfg.block_m % (16 * cfg.warps) == 0
    assert all(loader.sm90_smem_bytes(d) <= 227 * 1024 for d in loader.SM90_FWD_CONFIGS)
    assert all(loader.sm90_bwd_smem_bytes(d) <= 227 * 1024 for d in loader.SM90_BWD_HEAD_DIMS)


def test_every_kernel_compiles_without_spills():
    check = _compile_check()
    nvrtc = check.get_nvrtc()
    if nvrtc is None:
        pytest.skip("NVRTC not importable: pip install nvidia-cuda-nvrtc")
    reports = check.check_all(nvrtc=nvrtc)
    print("\n" + check.format_table(reports))
    expected = sum(
        len(loader.HEAD_DIMS) * len(loader.DTYPES)  # forward
        + len(loader.all_bwd_names(arch))  # backward (split head dims: two modes)
        # casts both ways, delta, dq tiles -> dq, direct rows, the ring backward's last add
        # and cast (dK / dV as they travel home)
        + 6 * len(loader.DTYPES)
        + 1  # the pair copy (a replayed ring call's K/V into its graph)
        + 3  # a gathered ring call's row copies; the float32 add (dK / dV into those that
        # arrived: the ring backward's steps, a gathered call's returned rows); the 2-byte
        # copy (dK / dV that came home, into the caller's gradients)
        # wgmma forward (TMA and cp.async producers) and backward (plain and ordered)
        + (2 * len(loader.SM90_FWD_CONFIGS) * len(loader.DTYPES) if arch == "sm_90a" else 0)
        + (2 * len(loader.SM90_BWD_HEAD_DIMS) * len(loader.DTYPES) if arch == "sm_90a" else 0)
        for arch in check.ARCHS
    )
    assert len(reports) == expected
    assert any("sm90" in r.kernel and not r.missing_ptx for r in reports)
    bad = [r for r in reports if not r.ok]
    assert not bad, "spills, stack or missing instructions:\n" + check.format_table(bad)
    assert all(0 < r.regs <= 255 for r in reports)


def test_ptxas_log_parser():
    log = (
        "ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90a'\n"
        "ptxas info    : Function properties for _Z3fooPf\n"
        "ptxas         .     8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n"
        "ptxas info    : Used 96 registers, used 1 barriers, 1024 bytes smem\n"
    )
    info = _compile_check().parse_ptxas(log)["_Z3fooPf"]
    assert info == {"stack": 8, "spill_stores": 4, "spill_loads": 12, "regs": 96, "smem": 1024}
    assert np.int32(info["regs"]) == 96


def test_serialised_wgmma_fails_the_check():
    check = _compile_check()
    note = (
        "ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are "
        "serialized due to non wgmma instructions defining accumulator registers of a wgmma "
        "between start and end of the pipeline stage in the function '_Z3fooPf'\n"
    )
    assert check.wgmma_serialized(note)
    assert not check.wgmma_serialized("ptxas info    : Used 96 registers, 1024 bytes smem\n")
    fields = dict(kernel="k", arch="sm_90a", regs=168, smem=0, static_smem=0, spill_stores=0,
                  spill_loads=0, stack=0, compile_s=0.0, hot=True)  # fmt: skip
    assert check.KernelReport(**fields).ok
    assert not check.KernelReport(**fields, serialized_wgmma=True).ok


def test_tensor_map_rules():
    from cuparing.kernels import tensor_maps

    # the copy engine needs a 16-byte aligned base and 16-byte strides (extent-1 dims excepted)
    assert tensor_maps.addressable(256, (2, 100, 4, 128), (51200, 512, 128))
    assert not tensor_maps.addressable(258, (2, 100, 4, 128), (51200, 512, 128))
    assert not tensor_maps.addressable(256, (2, 100, 4, 128), (51200, 516, 129))
    assert tensor_maps.addressable(256, (1, 100, 4, 128), (3, 512, 128))
    maps = tensor_maps.pack_maps(k=bytes(range(128)))
    assert maps.dtype.itemsize == 384 and maps["q"].sum() == 0
    assert bytes(maps["k"][0]) == bytes(range(128))


def test_packed_params_equal_field_by_field_assignment():
    for dtype, pack in ((loader.PARAMS_DTYPE, loader.pack_params),
                        (loader.BWD_PARAMS_DTYPE, loader.pack_bwd_params)):  # fmt: skip
        values = {name: (i + 1) * 3 for i, name in enumerate(dtype.names)}
        values[dtype.names[0]] = 2**63 + 5  # a device pointer uses all 64 bits
        values["scale_log2"] = np.float32(-0.375)
        want = np.zeros(1, dtype=dtype)
        for name, value in values.items():
            want[name] = value
        assert pack(**values).tobytes() == want.tobytes()
