# ruff: noqa: E501 (the kernel's source lines, quoted as they are)
"""A candidate for tools/ablate.py: the ring backward's elementwise kernels, one element a thread
today, on 16-byte accesses. At 8k tokens x 8 K/V heads, d=128, a 2-GPU ring backward runs two
``cuparing_add_f32`` per later step (0.04 ms each, ~0.02 by their bytes) and, on the trip home
that nothing hides, two ``cuparing_add_cast_f32`` and two ``cuparing_copy_u16``.

- ``elementwise-v4``: where every pointer is 16-byte aligned (8 for the add-and-cast's output),
  a thread takes four floats (eight 2-byte elements for the copy) a step, the rest one at a
  time. The same values (elementwise arithmetic, one rounding per element). Predicted: each
  kernel at ~its bytes (the adds 0.04 -> ~0.025 ms), ~0.05 ms off a 2-GPU ring backward.

    python tools/ablate.py tools/variants/elementwise_v4.py --rounds 2 -- \\
        tools/profile_ring_steps.py --ranks 2 --layouts zigzag --backward
"""

ENTRY = "cuparing/kernels/sm80/entry.cu"

ADD = """__global__ void __launch_bounds__(256) cuparing_add_f32(const float* __restrict__ x, float* __restrict__ acc,
                                 long long n) {
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    acc[i] += x[i];
  }
}"""

ADD_V4 = """__global__ void __launch_bounds__(256) cuparing_add_f32(const float* __restrict__ x, float* __restrict__ acc,
                                 long long n) {
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  const long long first = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool wide = ((reinterpret_cast<unsigned long long>(x) |
                      reinterpret_cast<unsigned long long>(acc)) & 15) == 0;
  const long long quads = wide ? n / 4 : 0;
  for (long long i = first; i < quads; i += stride) {
    const float4 a = reinterpret_cast<const float4*>(x)[i];
    float4 b = reinterpret_cast<float4*>(acc)[i];
    b.x += a.x;
    b.y += a.y;
    b.z += a.z;
    b.w += a.w;
    reinterpret_cast<float4*>(acc)[i] = b;
  }
  for (long long i = 4 * quads + first; i < n; i += stride) {
    acc[i] += x[i];
  }
}"""

ADD_CAST = """  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    y[i] = cuparing::to_half_bits<kBf16>(acc[i] + x[i]);
  }
}"""

ADD_CAST_V4 = """  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  const long long first = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool wide = (((reinterpret_cast<unsigned long long>(x) |
                       reinterpret_cast<unsigned long long>(acc)) & 15) |
                     (reinterpret_cast<unsigned long long>(y) & 7)) == 0;
  const long long quads = wide ? n / 4 : 0;
  for (long long i = first; i < quads; i += stride) {
    const float4 a = reinterpret_cast<const float4*>(x)[i];
    const float4 b = reinterpret_cast<const float4*>(acc)[i];
    uint2 out;
    out.x = cuparing::to_half_bits<kBf16>(b.x + a.x) |
            (static_cast<unsigned>(cuparing::to_half_bits<kBf16>(b.y + a.y)) << 16);
    out.y = cuparing::to_half_bits<kBf16>(b.z + a.z) |
            (static_cast<unsigned>(cuparing::to_half_bits<kBf16>(b.w + a.w)) << 16);
    reinterpret_cast<uint2*>(y)[i] = out;
  }
  for (long long i = 4 * quads + first; i < n; i += stride) {
    y[i] = cuparing::to_half_bits<kBf16>(acc[i] + x[i]);
  }
}"""

COPY = """  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    y[i] = x[i];
  }
}"""

COPY_V4 = """  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  const long long first = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool wide = ((reinterpret_cast<unsigned long long>(x) |
                      reinterpret_cast<unsigned long long>(y)) & 15) == 0;
  const long long octets = wide ? n / 8 : 0;
  for (long long i = first; i < octets; i += stride) {
    reinterpret_cast<uint4*>(y)[i] = reinterpret_cast<const uint4*>(x)[i];
  }
  for (long long i = 8 * octets + first; i < n; i += stride) {
    y[i] = x[i];
  }
}"""

VARIANTS = {
    "elementwise-v4": [(ENTRY, ADD, ADD_V4), (ENTRY, ADD_CAST, ADD_CAST_V4),
                       (ENTRY, COPY, COPY_V4)],
}
