"""``import cuparing`` works with no CuPy, PyTorch or JAX installed."""

from __future__ import annotations

import subprocess
import sys


def test_import_without_gpu_frameworks():
    code = (
        "import sys\n"
        "for name in ('cupy', 'torch', 'jax', 'ml_dtypes'):\n"
        "    sys.modules[name] = None\n"
        "import numpy as np, cuparing as cr\n"
        "x = np.ones((1, 4, 1, 2))\n"
        "print(cr.attention(x, x, x).shape)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(1, 4, 1, 2)"
