# ruff: noqa: E501 (the kernel's source lines, quoted as they are)
"""Variants for tools/ablate.py: what the Hopper backward's dK / dV epilogue costs. Each CTA adds
its 128 keys' float32 dK and dV (128 KB at d=128) into the accumulators with one
``red.global.v2.f32.add`` per column pair and lane, once per CTA: little against one GPU's long
CTAs, more against a packed ring step's short ones, which a rank pays once per step.

- ``no-dkdv-adds``: the adds skipped (results wrong; only the time counts): their cost.
- ``dkdv-v4``: lanes t and t ^ 1 swap column pairs so that each adds four adjacent floats with
  one ``red.global.v4.f32.add`` (half the atomic instructions, 16-byte aligned; results right):
  a candidate if the adds cost.

    python tools/ablate.py tools/variants/bwd_dkdv_cost.py -- tools/profile_ring_steps.py \\
        --documents --ranks 4 --layouts zigzag --backward
    python tools/ablate.py tools/variants/bwd_dkdv_cost.py -- tools/bench_backward.py --quick \\
        --families sm90
"""

BWD = "cuparing/kernels/sm90/bwd.cuh"
PTX = "cuparing/kernels/common/ptx.cuh"

ADDS = """      } else {
        red_add_f32x2(p.dv + row + col, dv0, dv1);
        red_add_f32x2(p.dk + row + col, dk0, dk1);
      }
"""

# Lane t holds columns 8j + 2t, +1. For even j the even lane of the pair (t, t ^ 1) adds
# columns 8j + 2t .. +3 (its pair, then its partner's); for odd j the odd lane adds 8j + 2t - 2
# .. +1 (its partner's pair, then its own). The two lanes share their key row (lane = 4g + t)
# and, with d a multiple of 8 (every head dim these kernels take), skip the same columns, so
# the shuffle names just the pair.
V4_ADDS = """      } else {
        const unsigned pair = 3u << (lane & ~1);
        const float pv0 = __shfl_xor_sync(pair, dv0, 1);
        const float pv1 = __shfl_xor_sync(pair, dv1, 1);
        const float pk0 = __shfl_xor_sync(pair, dk0, 1);
        const float pk1 = __shfl_xor_sync(pair, dk1, 1);
        if (((t ^ j) & 1) == 0) {
          if ((t & 1) == 0) {
            red_add_f32x4(p.dv + row + col, dv0, dv1, pv0, pv1);
            red_add_f32x4(p.dk + row + col, dk0, dk1, pk0, pk1);
          } else {
            red_add_f32x4(p.dv + row + col - 2, pv0, pv1, dv0, dv1);
            red_add_f32x4(p.dk + row + col - 2, pk0, pk1, dk0, dk1);
          }
        }
      }
"""

RED_V2 = """__device__ __forceinline__ void red_add_f32x2(float* p, float a, float b) {"""

RED_V4 = """__device__ __forceinline__ void red_add_f32x4(float* p, float a, float b, float c, float d) {
  asm volatile("red.global.v4.f32.add [%0], {%1, %2, %3, %4};\\n" ::"l"(p), "f"(a), "f"(b),
               "f"(c), "f"(d) : "memory");
}

__device__ __forceinline__ void red_add_f32x2(float* p, float a, float b) {"""

VARIANTS = {
    "no-dkdv-adds": [(BWD, ADDS, "      }\n")],
    "dkdv-v4": [(BWD, ADDS, V4_ADDS), (PTX, RED_V2, RED_V4)],
}
