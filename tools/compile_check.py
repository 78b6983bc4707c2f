"""Compile every cuparing kernel instantiation with NVRTC, without a GPU, and report resources.

For each forward and backward instantiation (head dims x fp16/bf16, and the backward's modes),
the delta and cast kernels, for sm_80 and sm_90a:
NVRTC -> CUBIN with ptxas verbose output, parsed into registers, spill stores/loads and stack
frame (local memory); shared memory is the dynamic size from the traits table (the kernels
use no static shared memory). A forward or backward kernel with any spill or stack frame fails:
local memory in the hot loop costs far more than the tile choice it would buy.

NVRTC comes from the ``nvidia-cuda-nvrtc`` wheel (``libnvrtc.so.*`` under site-packages
``nvidia/*/lib``), loaded with ctypes; CuPy's own NVRTC binding is the fallback.

Usage:
    python tools/compile_check.py [--arch sm_80 --arch sm_90a] [--json PATH] [--jobs N]

Exit status 0 when everything compiles without spills, 1 otherwise.
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import json
import os
import re
import site
import sys
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cuparing.kernels import loader  # noqa: E402

ARCHS = ("sm_80", "sm_90a")


def find_nvrtc_library() -> str | None:
    """Path of libnvrtc from the pip wheel (newest CUDA major first), or None."""
    roots = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    roots.update(site.getsitepackages() if hasattr(site, "getsitepackages") else [])
    roots.add(site.getusersitepackages())
    found = []
    for root in roots:
        found += glob.glob(os.path.join(root, "nvidia", "*", "lib", "libnvrtc.so.*"))
    # libnvrtc.so.13 (not libnvrtc-builtins); prefer the highest major
    found = [p for p in found if re.search(r"libnvrtc\.so\.\d+$", p)]
    found.sort(key=lambda p: int(p.rsplit(".", 1)[-1]), reverse=True)
    return found[0] if found else None


class NvrtcError(RuntimeError):
    pass


class CtypesNvrtc:
    """Minimal NVRTC binding: program -> (cubin, log, lowered names)."""

    def __init__(self, path: str):
        self.path = path
        # libnvrtc dlopens its builtins by bare name; some wheels carry no rpath to find them
        # beside it, so load them first, globally
        for builtins in glob.glob(os.path.join(os.path.dirname(path), "libnvrtc-builtins.so.*")):
            ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
        self.lib = ctypes.CDLL(path)
        self.lib.nvrtcGetErrorString.restype = ctypes.c_char_p

    def version(self) -> str:
        major, minor = ctypes.c_int(), ctypes.c_int()
        self._check(self.lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "version")
        return f"{major.value}.{minor.value}"

    def _check(self, status: int, what: str, log: str = "") -> None:
        if status:
            message = self.lib.nvrtcGetErrorString(status).decode()
            raise NvrtcError(f"nvrtc {what} failed: {message}\n{log}")

    def compile(self, source: str, names: list[str], options: list[str]):
        lib = self.lib
        prog = ctypes.c_void_p()
        self._check(
            lib.nvrtcCreateProgram(
                ctypes.byref(prog), source.encode(), b"attention.cu", 0, None, None
            ),
            "create",
        )
        try:
            for name in names:
                self._check(lib.nvrtcAddNameExpression(prog, name.encode()), "name expression")
            opts = [o.encode() for o in options]
            status = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            buf = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(prog, buf)
            log = buf.value.decode(errors="replace")
            self._check(status, "compile", log)
            lowered = {}
            for name in names:
                ptr = ctypes.c_char_p()
                self._check(lib.nvrtcGetLoweredName(prog, name.encode(), ctypes.byref(ptr)), "name")
                lowered[name] = ptr.value.decode()
            self._check(lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "cubin size")
            cubin = ctypes.create_string_buffer(size.value)
            self._check(lib.nvrtcGetCUBIN(prog, cubin), "cubin")
            self._check(lib.nvrtcGetPTXSize(prog, ctypes.byref(size)), "ptx size")
            ptx = ctypes.create_string_buffer(size.value)
            self._check(lib.nvrtcGetPTX(prog, ptx), "ptx")
            return cubin.raw, log, lowered, ptx.value.decode(errors="replace")
        finally:
            lib.nvrtcDestroyProgram(ctypes.byref(prog))


class CupyNvrtc:
    """The same interface over ``cupy_backends.cuda.libs.nvrtc`` (when CuPy is installed)."""

    def __init__(self):
        from cupy_backends.cuda.libs import nvrtc

        self.nvrtc = nvrtc
        self.path = "cupy_backends.cuda.libs.nvrtc"

    def version(self) -> str:
        return ".".join(map(str, self.nvrtc.getVersion()))

    def compile(self, source: str, names: list[str], options: list[str]):
        nv = self.nvrtc
        prog = nv.createProgram(source, "attention.cu", (), ())
        try:
            for name in names:
                nv.addNameExpression(prog, name)
            try:
                nv.compileProgram(prog, list(options))
            except nv.NVRTCError as exc:
                raise NvrtcError(f"nvrtc compile failed: {exc}\n{nv.getProgramLog(prog)}") from exc
            log = nv.getProgramLog(prog)
            lowered = {name: nv.getLoweredName(prog, name) for name in names}
            return nv.getCUBIN(prog), log, lowered, nv.getPTX(prog).decode(errors="replace")
        finally:
            nv.destroyProgram(prog)


def get_nvrtc():
    """The NVRTC to use: the pip wheel's through ctypes, else CuPy's; None if neither exists."""
    path = find_nvrtc_library()
    if path:
        return CtypesNvrtc(path)
    try:
        return CupyNvrtc()
    except ImportError:
        return None


@dataclass
class KernelReport:
    kernel: str
    arch: str
    regs: int
    smem: int  # dynamic shared memory bytes (the kernels have no static shared memory)
    static_smem: int
    spill_stores: int
    spill_loads: int
    stack: int
    compile_s: float
    hot: bool  # a forward/backward kernel: any local memory fails the check
    missing_ptx: tuple[str, ...] = ()  # required instructions absent from the PTX
    # ptxas serialised the kernel's wgmma (its "Potential Performance Loss" note: e.g. a wgmma
    # under a data-dependent branch, or too few registers for the pipeline)
    serialized_wgmma: bool = False

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads + self.stack

    @property
    def ok(self) -> bool:
        return not (self.hot and self.spills) and not self.missing_ptx and not self.serialized_wgmma


_FUNC = re.compile(r"Function properties for (\S+)")
_SERIALIZED_WGMMA = re.compile(r"wgmma\.mma_async instructions are serialized")


def wgmma_serialized(log: str) -> bool:
    """Did ptxas serialise the wgmma of the kernel it compiled (its C75xx "Potential Performance
    Loss" notes)? Then the kernel is correct but runs each wgmma to completion alone."""
    return bool(_SERIALIZED_WGMMA.search(log))
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_ptxas(log: str) -> dict[str, dict]:
    """ptxas -v output -> {mangled name: {regs, spill_stores, spill_loads, stack, smem}}."""
    info: dict[str, dict] = {}
    current = None
    for line in log.splitlines():
        match = _FUNC.search(line)
        if match:
            current = info.setdefault(match.group(1), {})
            continue
        match = re.search(r"Compiling entry function '([^']+)'", line)
        if match:
            current = info.setdefault(match.group(1), {})
            continue
        if current is None:
            continue
        match = _FRAME.search(line)
        if match:
            current["stack"], current["spill_stores"], current["spill_loads"] = map(
                int, match.groups()
            )
        match = re.search(r"Used (\d+) registers", line)
        if match:
            current["regs"] = int(match.group(1))
            smem = re.search(r"(\d+) bytes smem", line)
            current["smem"] = int(smem.group(1)) if smem else 0
    return info


# Instructions the PTX of a kernel family must hold: without them the kernel compiled, but not
# into what the family exists for (e.g. the sm90 forward without warpgroup MMA).
REQUIRED_PTX = {
    "sm80": (),
    "sm90": ("wgmma.mma_async", "setmaxnreg", "mbarrier.try_wait"),
    "sm90_tma": ("wgmma.mma_async", "setmaxnreg", "cp.async.bulk.tensor"),
    # the backward adds dQ by bulk reductions of the copy engine
    "sm90_bwd": ("wgmma.mma_async", "setmaxnreg", "mbarrier.try_wait", "cp.reduce.async.bulk"),
}


def compile_one(
    nvrtc, source: str, name: str, arch: str, hot: bool, smem: int, required: tuple = ()
) -> KernelReport:
    options = [*loader.BASE_OPTIONS, f"-arch={arch}", "-Xptxas=-v"]
    start = time.perf_counter()
    _, log, lowered, ptx = nvrtc.compile(source, [name], options)
    elapsed = time.perf_counter() - start
    stats = parse_ptxas(log).get(lowered[name])
    if stats is None or "regs" not in stats:
        raise NvrtcError(f"no ptxas statistics for {name} ({lowered[name]}) in log:\n{log}")
    return KernelReport(
        kernel=name, arch=arch, regs=stats["regs"], smem=smem, static_smem=stats.get("smem", 0),
        spill_stores=stats.get("spill_stores", 0), spill_loads=stats.get("spill_loads", 0),
        stack=stats.get("stack", 0), compile_s=round(elapsed, 2), hot=hot,
        missing_ptx=tuple(i for i in required if i not in ptx),
        serialized_wgmma=wgmma_serialized(log),
    )  # fmt: skip


def check_all(archs=ARCHS, jobs: int | None = None, nvrtc=None) -> list[KernelReport]:
    """Compile every instantiation for every arch; one NVRTC program per kernel and arch."""
    nvrtc = nvrtc or get_nvrtc()
    if nvrtc is None:
        raise NvrtcError("no NVRTC found: pip install nvidia-cuda-nvrtc")
    work = []
    for arch in archs:
        source = loader.kernel_source(arch)
        for d in loader.HEAD_DIMS:
            for dtype in loader.DTYPES:
                smem = loader.smem_bytes(d, arch)
                work.append((source, loader.fwd_name(d, dtype), arch, True, smem))
        for name in loader.all_bwd_names(arch):
            d = int(name.split("<")[1].split(",")[0])
            work.append((source, name, arch, True, loader.bwd_smem_bytes(d, arch)))
        for dtype in loader.DTYPES:
            for name in (*loader.cast_names(dtype), loader.bwd_delta_name(dtype),
                         loader.dq_from_tiles_name(dtype), loader.direct_rows_name(dtype),
                         loader.add_cast_name(dtype)):
                work.append((source, name, arch, False, 0))
        work.append((source, loader.COPY_PAIR_NAME, arch, False, 0))
        work.append((source, loader.GATHER_ROWS_NAME, arch, False, 0))
        work.append((source, loader.ADD_F32_NAME, arch, False, 0))
        work.append((source, loader.COPY_U16_NAME, arch, False, 0))
        if arch.startswith("sm_9"):  # the wgmma family exists for the sm_90a target only
            sm90_source = loader.kernel_source(arch, "sm90")
            for d in loader.SM90_FWD_CONFIGS:
                for dtype in loader.DTYPES:
                    for tma in (False, True):
                        name = loader.fwd_name(d, dtype, "sm90", tma)
                        smem = loader.sm90_smem_bytes(d, tma)
                        required = REQUIRED_PTX["sm90_tma" if tma else "sm90"]
                        work.append((sm90_source, name, arch, True, smem, required))
            for d in loader.SM90_BWD_HEAD_DIMS:
                for dtype in loader.DTYPES:
                    for ordered in (False, True):
                        name = loader.sm90_bwd_name(d, dtype, ordered)
                        smem = loader.sm90_bwd_smem_bytes(d)
                        required = REQUIRED_PTX["sm90_bwd"]
                        work.append((sm90_source, name, arch, True, smem, required))
    jobs = jobs or max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(jobs) as pool:  # ctypes releases the GIL while NVRTC runs
        futures = [pool.submit(compile_one, nvrtc, *item) for item in work]
        return [f.result() for f in futures]


def format_table(reports: list[KernelReport]) -> str:
    header = (
        f"{'kernel':<42} {'arch':<7} {'regs':>4} {'smem':>7} {'spill':>5} {'stack':>5} {'s':>5}"
    )
    lines = [header, "-" * len(header)]
    for r in reports:
        if r.missing_ptx:
            flag = f"  <-- PTX lacks {', '.join(r.missing_ptx)}"
        elif r.serialized_wgmma:
            flag = "  <-- ptxas serialised its wgmma"
        else:
            flag = "" if r.ok else "  <-- local memory in a hot kernel"

        lines.append(
            f"{r.kernel:<42} {r.arch:<7} {r.regs:>4} {r.smem:>7} "
            f"{r.spill_stores + r.spill_loads:>5} {r.stack:>5} {r.compile_s:>5.1f}{flag}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", action="append", help="target(s), default sm_80 and sm_90a")
    parser.add_argument("--json", help="write the reports as JSON to this path")
    parser.add_argument("--jobs", type=int, default=None, help="parallel NVRTC compiles")
    args = parser.parse_args(argv)
    nvrtc = get_nvrtc()
    if nvrtc is None:
        print("no NVRTC found: pip install nvidia-cuda-nvrtc", file=sys.stderr)
        return 1
    print(f"NVRTC {nvrtc.version()} from {nvrtc.path}")
    reports = check_all(tuple(args.arch or ARCHS), args.jobs, nvrtc)
    print(format_table(reports))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in reports], indent=1))
    bad = [r for r in reports if not r.ok]
    if bad:
        print(f"{len(bad)} kernel(s) fail: local memory in a hot kernel, a required PTX "
              "instruction missing, or serialised wgmma", file=sys.stderr)  # fmt: skip
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
