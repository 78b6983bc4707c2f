// Kernel traits: tile shapes, warp layout, pipeline depth and shared-memory layout per head dim.
//
// The table itself lives in Python (loader.FWD_CONFIGS) and arrives as the X-macro
// CUPARING_FWD_CONFIGS(X), X(head_dim, block_m, block_n, warps, stages, q_in_regs, min_blocks,
// smem_bytes), so the host's launch numbers (threads, dynamic shared memory) and the device's
// layout are one table; the static_asserts below reject any row the kernel cannot run.
//
// Warps split the query rows only: warp w owns rows [w*kRowsPerWarp, (w+1)*kRowsPerWarp) of the
// (kBlockM, kHeadDim) query tile, kMFrags m16 fragments of them, and sweeps the whole
// (kBlockN, kHeadDim) key/value tile, so no cross-warp reduction is ever needed.
#pragma once
#include "../common/params.cuh"

#ifndef CUPARING_FWD_CONFIGS
#error "CUPARING_FWD_CONFIGS must be defined by the loader (cuparing/kernels/loader.py)"
#endif

namespace cuparing {

template <int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_, int kStages_, bool kQInRegs_,
          int kMinBlocks_>
struct FwdTraitsBase {
  static constexpr int kHeadDim = kHeadDim_;  // padded head dim this instantiation runs
  static constexpr int kBlockM = kBlockM_;    // query rows per CTA
  static constexpr int kBlockN = kBlockN_;    // keys per pipeline stage
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kNThreads = kNWarps * 32;
  static constexpr int kStages = kStages_;    // K/V tiles in flight (cp.async groups)
  static constexpr bool kQInRegs = kQInRegs_;  // Q A-fragments kept in registers for the CTA's life
  static constexpr int kMinBlocks = kMinBlocks_;  // __launch_bounds__ occupancy hint
  // one max/sum chain per row in the softmax: more chains push d=128 past 255 registers (PERF.md)
  static constexpr int kSoftmaxChains = 1;

  static constexpr int kRowsPerWarp = kBlockM / kNWarps;
  static constexpr int kMFrags = kRowsPerWarp / 16;  // m16 fragments per warp
  static constexpr int kNTiles = kBlockN / 8;        // n8 tiles of S = Q K^T per warp
  static constexpr int kDTiles = kHeadDim / 8;       // n8 tiles of O per warp
  static constexpr int kKSteps = kHeadDim / 16;      // k16 steps of Q K^T

  // Shared memory rows are kHeadDim/8 chunks of 16 bytes. The XOR swizzle permutes chunks within
  // each aligned group of 8 (128 bytes = all 32 banks), so 8 consecutive rows read by one
  // ldmatrix phase hit 8 different bank groups. Rows of 12/20/28 chunks are padded to a multiple
  // of 8 so the XOR never leaves the row; rows of 4 chunks (D=32) XOR with (row/2)%4 instead,
  // which spreads pairs of 64-byte rows over the 128-byte bank window.
  static constexpr int kChunks = kHeadDim / 8;
  static constexpr int kSmemChunks = kChunks == 4 ? 4 : (kChunks + 7) / 8 * 8;
  static constexpr int kRowBytes = kSmemChunks * 16;
  // Copy grid of load_tile: a power of two >= kChunks dividing the CTA, so each thread keeps one
  // chunk column and rows step by kNThreads / kLoadChunks (a multiple of 8, see load_tile).
  static constexpr int kLoadChunks = kChunks <= 4 ? 4 : kChunks <= 8 ? 8 : kChunks <= 16 ? 16 : 32;
  static constexpr int kQBytes = kBlockM * kRowBytes;   // (kBlockM, kHeadDim) Q tile
  static constexpr int kKVBytes = kBlockN * kRowBytes;  // (kBlockN, kHeadDim) K or V tile
  static constexpr int kStageBytes = 2 * kKVBytes;      // K then V
  static constexpr int kSmemBytes = kQBytes + kStages * kStageBytes;

  // XOR key of a row: depends on row % 8 only, so a lane's key is fixed for every tile.
  static __device__ __forceinline__ int swizzle_key(int row) {
    return kChunks == 4 ? ((row >> 1) & 3) : (row & 7);
  }
  // Byte offset of 16-byte chunk `chunk` of row `row` inside a tile.
  static __device__ __forceinline__ int offset(int row, int chunk) {
    return row * kRowBytes + ((chunk ^ swizzle_key(row)) << 4);
  }

  static_assert(kHeadDim % 32 == 0 && kHeadDim >= 32 && kHeadDim <= 256, "head dim 32..256");
  static_assert(kNWarps == 4 || kNWarps == 8, "4 or 8 warps");
  static_assert(kBlockM % (16 * kNWarps) == 0, "each warp owns whole m16 fragments");
  static_assert(kMFrags >= 1 && kMFrags <= 2, "at most 2 m16 fragments per warp (registers)");
  static_assert(kBlockN % 16 == 0 && kBlockN >= 16 && kBlockN <= 128, "k16 steps over keys");
  static_assert(kStages >= 2 && kStages <= 4, "2..4 cp.async stages");
  static_assert(kChunks == 4 || kSmemChunks % 8 == 0, "swizzle needs 8-chunk groups");
  static_assert(kNThreads % kLoadChunks == 0 && (kNThreads / kLoadChunks) % 8 == 0,
                "load_tile row step must keep each thread's swizzle key fixed");
  static_assert(kSmemBytes <= 227 * 1024, "more shared memory than any sm_80/sm_90 CTA can have");
  // Accumulator registers per thread: O + S (+ Q fragments). Above ~200 the kernel spills.
  static constexpr int kAccRegs =
      kMFrags * (kDTiles * 4 + kNTiles * 4 + (kQInRegs ? kKSteps * 4 : 0));
  static_assert(kAccRegs <= 224, "accumulators alone would exhaust the 255-register budget");
};

template <int kHeadDim>
struct FwdTraits;  // only the rows of CUPARING_FWD_CONFIGS exist

#define CUPARING_DEFINE_TRAITS(D, BM, BN, W, ST, QREG, MINB, SMEM)                         \
  template <>                                                                              \
  struct FwdTraits<D> : FwdTraitsBase<D, BM, BN, W, ST, (QREG) != 0, MINB> {};             \
  static_assert(FwdTraits<D>::kSmemBytes == (SMEM), "loader smem formula disagrees (D=" #D ")");
CUPARING_FWD_CONFIGS(CUPARING_DEFINE_TRAITS)
#undef CUPARING_DEFINE_TRAITS

}  // namespace cuparing
