# ruff: noqa: E501 (the kernel's source lines, quoted as they are)
"""A candidate for tools/ablate.py: the sm90 backward's dq conversion (``cuparing_dq_from_tiles``,
once per backward call: 0.12 ms of a 2-GPU ring backward at 8k tokens, H=32, d=128; its bytes
alone would take ~0.04 ms).

Today each thread converts one float pair: a 64-bit division chain per pair to find its (batch,
head, row, column), and a warp's 4-byte writes land in 8 rows (16 bytes of each 32-byte sector).

- ``dq-chunk-ctas``: one CTA of 256 threads per 64 x 64 chunk (batch, head, query tile, box):
  the chunk read with 16-byte loads in the tiles' order into shared memory (a float4 is one
  row's four adjacent columns), then written out by rows, each warp one row's 64 columns (128
  contiguous bytes); the chunk's indices found once per CTA. Same values (one rounding per
  float, the same rows and columns dropped). Predicted: 0.12 -> ~0.05 ms at 8k x 32 heads,
  d=128 (a 2-GPU ring backward -1.2% causal, -0.6% full; one GPU's backward -1-1.5%).

    python tools/ablate.py tools/variants/dq_convert.py --rounds 2 -- tools/profile_ring_steps.py \\
        --ranks 1 --layouts contiguous --backward
    python tools/ablate.py tools/variants/dq_convert.py --apply dq-chunk-ctas   # then the tests:
    python -m pytest tests/test_gpu_attention.py -k "backward_kernel or ring_backward or deterministic"
"""

ENTRY = "cuparing/kernels/sm80/entry.cu"
BACKEND = "cuparing/backends/cupy_backend.py"

KERNEL = """// The sm90 backward's dq accumulator (dq tiles, common/dq_tiles.cuh) -> dq [B, Sq, H, D] as
// fp16/bf16 bits, contiguous (4-byte aligned), rounded to nearest even: one float pair per
// thread, read in the tiles' order (coalesced); pairs past Sq or D are dropped.
template <bool kBf16>
__global__ void cuparing_dq_from_tiles(const float2* __restrict__ tiles, unsigned* __restrict__ dq,
                                       int batch, int seqlen, int nheads, int headdim) {
  const cuparing::DqTiles layout(nheads, seqlen, headdim);
  const long long pairs = static_cast<long long>(batch) * nheads * layout.query_tiles *
                          layout.boxes * (cuparing::kDqChunkFloats / 2);
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < pairs;
       i += stride) {
    int b, h, row, col;
    layout.pair_position(i, b, h, row, col);
    if (row < seqlen && col < headdim) {
      const float2 x = tiles[i];
      dq[((static_cast<long long>(b) * seqlen + row) * nheads + h) * (headdim / 2) + col / 2] =
          cuparing::to_half_bits<kBf16>(x.x) |
          (static_cast<unsigned>(cuparing::to_half_bits<kBf16>(x.y)) << 16);
    }
  }
}
"""

CHUNK_KERNEL = """// The sm90 backward's dq accumulator (dq tiles, common/dq_tiles.cuh) -> dq [B, Sq, H, D] as
// fp16/bf16 bits, contiguous (4-byte aligned), rounded to nearest even; rows past Sq and pairs
// past D are dropped. One CTA of 256 threads per 64 x 64 chunk (grid-stride over chunks): the
// chunk is read in the tiles' order with 16-byte loads (each float4 is four adjacent columns of
// one row: two pairs of neighbouring lanes of one n8 tile) into shared memory, then written out
// by rows, a warp per row (its 32 pairs one 128-byte run of dq).
template <bool kBf16>
__global__ void __launch_bounds__(256)
    cuparing_dq_from_tiles(const float2* __restrict__ tiles, unsigned* __restrict__ dq, int batch,
                           int seqlen, int nheads, int headdim) {
  constexpr int kRows = cuparing::kDqTileRows, kCols = cuparing::kDqTileCols;
  constexpr int kStride = kCols + 4;  // floats per staged row: 16-byte aligned, banks spread
  __shared__ __align__(16) float staged[kRows * kStride];
  const cuparing::DqTiles layout(nheads, seqlen, headdim);
  const long long chunks = static_cast<long long>(batch) * nheads * layout.query_tiles *
                           layout.boxes;
  const float4* quads = reinterpret_cast<const float4*>(tiles);
  const int tid = threadIdx.x;
  for (long long c = blockIdx.x; c < chunks; c += gridDim.x) {
    const float4* chunk = quads + c * (cuparing::kDqChunkFloats / 4);
#pragma unroll
    for (int i = 0; i < cuparing::kDqChunkFloats / 4 / 256; ++i) {
      const int e = 4 * (tid + 256 * i);  // float index in the chunk, a multiple of 4
      const int piece = e / cuparing::kDqPieceFloats, pair = (e % cuparing::kDqPieceFloats) / 2;
      const int jr = pair >> 5, lane = pair & 31;  // (2 j + r) 32 + lane; lane even here
      const int row = piece * cuparing::kDqPieceRows + 8 * (jr & 1) + (lane >> 2);
      const int col = 8 * (jr >> 1) + 2 * (lane & 3);
      *reinterpret_cast<float4*>(staged + row * kStride + col) = chunk[tid + 256 * i];
    }
    __syncthreads();
    const int box = static_cast<int>(c % layout.boxes);
    long long rest = c / layout.boxes;
    const int m = static_cast<int>(rest % layout.query_tiles);
    rest /= layout.query_tiles;
    const int h = static_cast<int>(rest % nheads), b = static_cast<int>(rest / nheads);
    const int pair_col = tid & 31, col = box * kCols + 2 * pair_col;
    for (int r = tid >> 5; r < kRows; r += 8) {
      const int row = m * kRows + r;
      if (row < seqlen && col < headdim) {
        const float2 x = *reinterpret_cast<const float2*>(staged + r * kStride + 2 * pair_col);
        dq[((static_cast<long long>(b) * seqlen + row) * nheads + h) * (headdim / 2) + col / 2] =
            cuparing::to_half_bits<kBf16>(x.x) |
            (static_cast<unsigned>(cuparing::to_half_bits<kBf16>(x.y)) << 16);
      }
    }
    __syncthreads();  // (the next chunk's loads overwrite the staged rows)
  }
}
"""

LAUNCH = """        key = ("dq_tiles", self.xp.cuda.runtime.getDevice(), shape, dtype)
        # (one float pair of the accumulator per work item)
        return _PLANS.get(key) or _PLANS.put(key, _grid_stride_launch(
            loader.get_dq_from_tiles_kernel(dtype), dq_tile_floats(shape) // 2,
            _DQ_TILES_ARGS.pack(0, 0, *shape), (0, 8, 16, 20, 24, 28),
        ))  # fmt: skip"""

CHUNK_LAUNCH = """        key = ("dq_tiles", self.xp.cuda.runtime.getDevice(), shape, dtype)
        # (one 64 x 64 chunk of the accumulator per CTA of 256 threads: 256 work items each)
        return _PLANS.get(key) or _PLANS.put(key, _grid_stride_launch(
            loader.get_dq_from_tiles_kernel(dtype), dq_tile_floats(shape) // 4096 * 256,
            _DQ_TILES_ARGS.pack(0, 0, *shape), (0, 8, 16, 20, 24, 28),
        ))  # fmt: skip"""

VARIANTS = {
    "dq-chunk-ctas": [(ENTRY, KERNEL, CHUNK_KERNEL), (BACKEND, LAUNCH, CHUNK_LAUNCH)],
}
