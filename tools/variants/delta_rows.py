# ruff: noqa: E501 (the kernel's source lines, quoted as they are)
"""A candidate for tools/ablate.py: the backward's delta = rowsum(dO * O) kernel
(``cuparing_bwd_delta``, once per backward call: 0.07 ms at 8k tokens x 32 heads, d=128, whose
134 MB of reads take ~0.03 ms).

Today one warp takes one (batch, query, head) row: at d=128 half its lanes idle (16-byte chunks,
16 of them), rows go in (batch, query, head) order so a warp's one float lands ``Sq`` floats from
its neighbour's, and 32768 CTAs each do eight rows.

- ``delta-rows-per-warp``: a warp takes ``32 / lanes`` rows at once (``lanes``: the smallest
  power of two covering a row's 16-byte chunks: 16 at d=128, 8 at d=64), in delta's own
  (batch, head, query) order, so its results are adjacent floats; the launch takes as many CTAs
  fewer. The same sums (a zero's sign aside): each lane adds the same chunks as before and
  the shuffle tree is the old one without its additions of idle lanes' zeros. Predicted: 0.07 -> ~0.04 ms.

    python tools/ablate.py tools/variants/delta_rows.py --rounds 2 -- tools/profile_ring_steps.py \\
        --ranks 1 --layouts contiguous --backward
    python tools/ablate.py tools/variants/delta_rows.py --apply delta-rows-per-warp   # then:
    python -m pytest tests/test_gpu_attention.py -k "delta or backward_kernel or ring_backward"
"""

BWD = "cuparing/kernels/sm80/bwd.cuh"
BACKEND = "cuparing/backends/cupy_backend.py"

ROWS = """  const int lane = threadIdx.x & 31;
  const i64 warps = static_cast<i64>(gridDim.x) * (blockDim.x >> 5);
  const i64 n_rows = static_cast<i64>(batch) * seqlen * nheads;
  for (i64 r = static_cast<i64>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5); r < n_rows;
       r += warps) {
    const int h = static_cast<int>(r % nheads);
    const i64 bs = r / nheads;
    const int s = static_cast<int>(bs % seqlen);
    const int b = static_cast<int>(bs / seqlen);
    const u16* x = dout + b * do_bs + s * do_rs + h * do_hs;
    const u16* y = out + b * o_bs + s * o_rs + h * o_hs;
    float sum = 0.f;
    for (int c = lane * 8; c < headdim; c += 32 * 8) {
      sum = fma_chunk<kBf16>(*reinterpret_cast<const uint4*>(x + c),
                             *reinterpret_cast<const uint4*>(y + c), sum);
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    if (lane == 0) delta[(static_cast<i64>(b) * nheads + h) * seqlen + s] = sum;
  }
}"""

ROWS_PER_WARP = """  // lanes per row: the smallest power of two covering its 16-byte chunks (up to 32); a warp
  // takes 32 / lanes rows in delta's (batch, head, query) order, so its results are adjacent
  int lanes = 1;
  while (lanes < 32 && lanes * 8 < headdim) lanes <<= 1;
  const int rows_per_warp = 32 / lanes;
  const int lane = threadIdx.x & 31, sub = lane / lanes, part = lane % lanes;
  const i64 warps = static_cast<i64>(gridDim.x) * (blockDim.x >> 5);
  const i64 n_rows = static_cast<i64>(batch) * seqlen * nheads;
  for (i64 first = (static_cast<i64>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5)) *
                   rows_per_warp;
       first < n_rows; first += warps * rows_per_warp) {
    const i64 r = first + sub;  // = (b * nheads + h) * seqlen + s
    float sum = 0.f;
    if (r < n_rows) {
      const int s = static_cast<int>(r % seqlen);
      const i64 bh = r / seqlen;
      const int h = static_cast<int>(bh % nheads);
      const int b = static_cast<int>(bh / nheads);
      const u16* x = dout + b * do_bs + s * do_rs + h * do_hs;
      const u16* y = out + b * o_bs + s * o_rs + h * o_hs;
      for (int c = part * 8; c < headdim; c += lanes * 8) {
        sum = fma_chunk<kBf16>(*reinterpret_cast<const uint4*>(x + c),
                               *reinterpret_cast<const uint4*>(y + c), sum);
      }
    }
    // (every lane of the warp takes part: the loop's bounds are the warp's)
    for (int off = lanes >> 1; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    if (part == 0 && r < n_rows) delta[r] = sum;
  }
}"""

LAUNCH = """            threads = 256  # 8 warps, one row each
            blocks = min(math.ceil(batch * seqlen * nheads / (threads // 32)), 65536)"""

LAUNCH_ROWS = """            threads = 256  # 8 warps, each 32 / lanes rows (lanes: a power of two >= D / 8)
            lanes = min(32, 1 << max(0, math.ceil(headdim / 8) - 1).bit_length())
            rows = (threads // 32) * (32 // lanes)
            blocks = min(math.ceil(batch * seqlen * nheads / rows), 65536)"""

VARIANTS = {
    "delta-rows-per-warp": [(BWD, ROWS, ROWS_PER_WARP), (BACKEND, LAUNCH, LAUNCH_ROWS)],
}
