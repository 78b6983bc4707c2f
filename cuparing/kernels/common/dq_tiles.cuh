// The sm90 backward's float32 dq accumulator ("dq tiles"): per (batch, query head, 64-query
// tile, 64-column box of the head dim) one contiguous chunk of 64 x 64 floats, ordered so that
// each quarter of it (16 query rows, one consumer warp's wgmma fragment) is one 4 KB piece in the
// order the warp holds it: float pair (r, g, t) of n8 tile j at ((2 j + r) * 32 + 4 g + t) * 2,
// i.e. row 8 r + g, columns 8 j + 2 t and + 1. A warp then stages its piece in shared memory
// with conflict-free 256-byte stores and adds it with ONE bulk reduction (cp.reduce.async.bulk)
// instead of one per row: per-row reductions of 256 bytes were what limited the kernel (PERF.md
// "Hopper backward", v0.5). Chunks of one (batch, head) follow each other by query tile, then
// box; the tail tile's rows past Sq and a partial box's columns past D are added into (zeros or
// values nobody reads) and never read back. cuparing_dq_from_tiles (sm80/entry.cu) turns the
// accumulator into dq [B, Sq, H, D] once, at the end of a backward.
#pragma once
#include "params.cuh"

namespace cuparing {

constexpr int kDqTileRows = 64;     // queries per chunk (the sm90 backward's query tile)
constexpr int kDqTileCols = 64;     // head-dim columns per chunk (one 128-byte-swizzle box)
constexpr int kDqPieceRows = 16;    // rows of one warp's piece
constexpr int kDqPieceFloats = kDqPieceRows * kDqTileCols;  // 1024 floats: 4 KB
constexpr int kDqChunkFloats = kDqTileRows * kDqTileCols;   // 4096 floats: 16 KB

// The shape of one accumulator: Sq queries of H heads, head dim d.
struct DqTiles {
  int nheads, query_tiles, boxes;

  __device__ __forceinline__ DqTiles(int nheads_, int seqlen_q, int headdim)
      : nheads(nheads_),
        query_tiles((seqlen_q + kDqTileRows - 1) / kDqTileRows),
        boxes((headdim + kDqTileCols - 1) / kDqTileCols) {}
  __device__ __forceinline__ explicit DqTiles(const BwdParams& p)
      : DqTiles(p.nheads, p.seqlen_q, p.headdim) {}

  // float index of the chunk of (batch b, head h, query tile m, box)
  // (chunks count in an int: 2^31 of them would be 2^45 bytes)
  __device__ __forceinline__ i64 chunk(int b, int h, int m, int box) const {
    return static_cast<i64>(((b * nheads + h) * query_tiles + m) * boxes + box) * kDqChunkFloats;
  }

  // float index of element (query row, column col) of (b, h)
  __device__ __forceinline__ i64 element(int b, int h, int row, int col) const {
    const int r64 = row % kDqTileRows, c64 = col % kDqTileCols;
    const int in_piece = ((2 * (c64 >> 3) + ((r64 >> 3) & 1)) * 32 + 4 * (r64 & 7) +
                          ((c64 >> 1) & 3)) * 2 + (c64 & 1);
    // (the chunk in 64-bit arithmetic here: the same index, but as chunk() has it the sm80
    // redo pass at d = 128 spills)
    const i64 at_chunk =
        ((static_cast<i64>(b) * nheads + h) * query_tiles + row / kDqTileRows) * boxes *
            kDqChunkFloats +
        static_cast<i64>(col / kDqTileCols) * kDqChunkFloats;
    return at_chunk + (r64 / kDqPieceRows) * kDqPieceFloats + in_piece;
  }

  // the inverse for float pair `pair` (float index 2 pair): (b, h, row, col) of its first float
  __device__ __forceinline__ void pair_position(i64 pair, int& b, int& h, int& row,
                                                int& col) const {
    constexpr int kChunkPairs = kDqChunkFloats / 2, kPiecePairs = kDqPieceFloats / 2;
    i64 chunk_index = pair / kChunkPairs;
    const int in_chunk = static_cast<int>(pair % kChunkPairs);
    const int piece = in_chunk / kPiecePairs, k = in_chunk % kPiecePairs;  // (2 j + r) 32 + lane
    const int jr = k >> 5, lane = k & 31;
    const int box = static_cast<int>(chunk_index % boxes);
    chunk_index /= boxes;
    const int m = static_cast<int>(chunk_index % query_tiles);
    chunk_index /= query_tiles;
    h = static_cast<int>(chunk_index % nheads);
    b = static_cast<int>(chunk_index / nheads);
    row = m * kDqTileRows + piece * kDqPieceRows + 8 * (jr & 1) + (lane >> 2);
    col = box * kDqTileCols + 8 * (jr >> 1) + 2 * (lane & 3);
  }
};

}  // namespace cuparing
