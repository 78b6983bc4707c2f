# ruff: noqa: E501 (the kernel's source lines, quoted as they are)
"""Candidates for tools/ablate.py: a share of the softmax's exponentials on the FMA pipe instead
of MUFU (PERF.md, "Head dim 64 is bound by the exponentials").

At d=64 a forward tile's exponentials take as many SM clocks on MUFU (16 `ex2` per clock) as its
products on the tensor cores, so the two must overlap perfectly. Here every ``EVERY``-th n8 column
tile of a row's scores takes 2^x from ``exp2_fma``: x rounded to an integer j by adding 1.5 x 2^23
(FMA pipe, no conversion instruction), 2^(x - j) from a degree-4 polynomial on [-1/2, 1/2]
(relative error under 3e-6, against bf16's 2^-9 and fp16's 2^-12 rounding of P), and j added to
the result's exponent as an integer. Arguments are <= 0 (scores minus the running max), -inf
(masked) or NaN: below -125 (and -inf) the result is exactly 0, as ``ex2.approx.ftz`` gives, and
a NaN stays NaN. ``exp2_fma_model`` is the same arithmetic in NumPy float32
(tests/test_soft_exp2.py checks it). Predicted: +0-5% at d=64 if MUFU is the limit (about a
fifth of the exponentials balance the pipes); nothing at d=128. Not run. Every sm90 forward
instantiation compiles spill-free with either variant (the three-consumer d=64 tile too); the
sm80 d=32 one spills, so time the sm90 rows.

    python tools/ablate.py tools/variants/soft_exp2.py -- tools/bench_attention.py --families sm90 \\
        --shapes 64:16384:full,64:16384:causal,128:8192:causal
"""

import numpy as np

SOFTMAX = "cuparing/kernels/common/softmax.cuh"

# 2^f ~ 1 + f (C1 + f (C2 + f (C3 + f C4))) on [-1/2, 1/2], near-minimax relative error 2.9e-6
# in float32 Horner evaluation (fitted by reweighted least squares on Chebyshev nodes)
COEFFS = (0.6931241750717163, 0.24024099111557007, 0.05590642988681793, 0.009582851082086563)
ROUNDER = 12582912.0  # 1.5 * 2^23: x + ROUNDER holds round(x) in its low mantissa bits
FLOOR = -125.0  # below it the result is 0 (2^-125 and less: under every P's 16-bit rounding)


def exp2_fma_model(x: np.ndarray) -> np.ndarray:
    """``exp2_fma`` step by step in float32 (x <= 0, -inf or NaN)."""
    x = np.asarray(x, dtype=np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        clamped = np.fmax(x, np.float32(FLOOR))
        shifted = (clamped + np.float32(ROUNDER)).astype(np.float32)
        whole = (shifted - np.float32(ROUNDER)).astype(np.float32)
        frac = (clamped - whole).astype(np.float32)
        poly = np.full_like(frac, np.float32(COEFFS[-1]))
        for c in COEFFS[-2::-1]:
            poly = (poly * frac + np.float32(c)).astype(np.float32)
        poly = (poly * frac + np.float32(1.0)).astype(np.float32)
        bits = poly.view(np.uint32) + (shifted.view(np.uint32) << np.uint32(23))
        result = bits.astype(np.uint32).view(np.float32)
    return np.where(x >= np.float32(FLOOR), result, np.where(np.isnan(x), x, np.float32(0.0)))


def _variant(every: int) -> list:
    c1, c2, c3, c4 = (f"{c!r}f" for c in COEFFS)
    helper = f"""// 2^x on the FMA pipe (tools/variants/soft_exp2.py): x <= 0, -inf or NaN
__device__ __forceinline__ float exp2_fma(float x) {{
  const float clamped = fmaxf(x, {FLOOR!r}f);
  const float shifted = clamped + {ROUNDER!r}f;
  const float frac = clamped - (shifted - {ROUNDER!r}f);
  float poly = fmaf(fmaf(fmaf({c4}, frac, {c3}), frac, {c2}), frac, {c1});
  poly = fmaf(poly, frac, 1.0f);
  const float result = __int_as_float(__float_as_int(poly) + (__float_as_int(shifted) << 23));
  return x >= {FLOOR!r}f ? result : (x != x ? x : 0.f);
}}

// Fold one tile of scores into the running (row_max, row_sum)"""
    return [
        (SOFTMAX, "// Fold one tile of scores into the running (row_max, row_sum)", helper),
        (
            SOFTMAX,
            "          const float p = exp2_approx(fmaf(acc_s[mf][j][2 * r + e], scale_log2, -shift));\n",
            "          const float arg = fmaf(acc_s[mf][j][2 * r + e], scale_log2, -shift);\n"
            f"          const float p = j % {every} == {every - 1} ? exp2_fma(arg) : exp2_approx(arg);\n",
        ),
    ]


VARIANTS = {f"every{n}": _variant(n) for n in (4, 8)}
