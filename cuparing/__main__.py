"""``python -m cuparing``: the environment report; ``python -m cuparing demo``: the ring demo."""

from __future__ import annotations

import platform
import sys

import numpy as np


def environment_report() -> list[str]:
    """Lines describing cuparing's version and each backend: found, or why not."""
    import cuparing

    lines = [
        f"cuparing {cuparing.__version__} (Python {platform.python_version()}, "
        f"{platform.machine()})",
        f"numpy backend: available (NumPy {np.__version__})",
    ]
    try:
        import ml_dtypes

        lines.append(f"bfloat16 on the CPU: ml_dtypes {ml_dtypes.__version__}")
    except ImportError:
        lines.append("bfloat16 on the CPU: unavailable (pip install ml_dtypes)")
    lines.extend(_cupy_report())
    return lines


def _cupy_report() -> list[str]:
    try:
        import cupy
    except ImportError as exc:
        return [f"cupy backend: unavailable ({exc}; pip install 'cuparing[cuda13]')"]
    lines = [f"cupy backend: CuPy {cupy.__version__}"]
    try:
        runtime = cupy.cuda.runtime
        count = runtime.getDeviceCount()
        lines.append(
            f"  CUDA runtime {runtime.runtimeGetVersion()}, driver {runtime.driverGetVersion()}, "
            f"{count} GPU(s)"
        )
        for index in range(count):
            props = runtime.getDeviceProperties(index)
            name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
            lines.append(
                f"  GPU {index}: {name}, sm_{props['major']}{props['minor']}, "
                f"{props['multiProcessorCount']} SMs, {props['totalGlobalMem'] / 2**30:.0f} GiB"
            )
    except Exception as exc:  # noqa: BLE001 - report, do not fail
        lines.append(f"  no usable GPU: {exc}")
    try:
        from cupy.cuda import nccl

        if getattr(nccl, "available", True):
            lines.append(f"  NCCL {nccl.get_version()}")
        else:
            lines.append("  NCCL: unavailable (pip install nvidia-nccl-cu13)")
    except Exception as exc:  # noqa: BLE001
        lines.append(f"  NCCL: unavailable ({exc})")
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "demo":
        from .demo import main as demo_main

        return demo_main(argv[1:])
    if argv:
        print("usage: python -m cuparing [demo [--help]]", file=sys.stderr)
        return 2
    print("\n".join(environment_report()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
