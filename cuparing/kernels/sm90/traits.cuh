// Tile shapes and shared-memory layout of the Hopper (sm_90a) forward kernel, per head dim.
//
// The table lives in Python (loader.SM90_FWD_CONFIGS) and arrives as the X-macro
// CUPARING_SM90_FWD_CONFIGS(X), X(head_dim, tma, block_n, stages, chains, consumers, smem_bytes)
// (one row per producer: the TMA consumers have more registers, so wide head dims get wider key
// tiles), so the host's launch numbers and the device's layout are one table.
//
// CTA = 1 + kConsumers warpgroups (384 threads with two consumers, 512 with three): warpgroup 0
// produces (copies Q, K, V into shared memory), warpgroups 1 .. kConsumers consume a
// (64 kConsumers)-row query tile: consumer c owns rows [64c, 64c + 64), its warp i the 16 rows
// [16i, 16i + 16) (one m16 fragment in the accumulator layout mma.sync also uses, so kMFrags = 1
// and the shared mask/softmax/epilogue code applies). Three consumers share an SM's registers
// three ways (160 each instead of 240): for narrow head dims, whose softmax is long against its
// products, a third consumer keeps the tensor cores fed where two take turns.
//
// Shared memory holds every (rows, kHeadDim) tile as kHeadDim/64 "boxes" of (rows, 64) elements:
// one 128-byte row per tile row, 16-byte chunk c of row r stored at chunk c ^ (r % 8), each box
// 1024-byte aligned. That is exactly wgmma's 128-byte swizzle, which its descriptors then describe
// (K-major for Q and K, MN-major for V); it is also the layout a 64-column TMA box with
// CU_TENSOR_MAP_SWIZZLE_128B writes.
#pragma once
#include "../common/params.cuh"

#ifndef CUPARING_SM90_FWD_CONFIGS
#error "CUPARING_SM90_FWD_CONFIGS must be defined by the loader (cuparing/kernels/loader.py)"
#endif

namespace cuparing {

// The swizzled box layout of (rows, kHeadDim) tiles (above) and the cp.async copy grid of a
// 128-thread producer (copy.cuh), shared by the forward and backward kernels.
template <int kHeadDim_>
struct Sm90Boxes {
  static constexpr int kChunks = kHeadDim_ / 8;  // 16-byte chunks per row
  static constexpr int kBoxes = (kHeadDim_ + 63) / 64;
  static constexpr int kBoxRowBytes = 128;
  static constexpr int kProducerThreads = 128;  // warpgroup 0
  // Copy grid of load_tile_sm90: kLoadChunks threads per row (each copying kChunks / kLoadChunks
  // chunks), so rows step by kProducerThreads / kLoadChunks, a multiple of 8: a thread's swizzle
  // key stays fixed.
  static constexpr int kLoadChunks = kChunks < 16 ? kChunks : 16;
  static_assert(kChunks % kLoadChunks == 0 && (kProducerThreads / kLoadChunks) % 8 == 0,
                "load_tile_sm90 row step must keep each thread's swizzle key fixed");

  // Byte offset of 16-byte chunk `chunk` of row `row` in a tile of kRows rows.
  template <int kRows>
  static __device__ __forceinline__ int offset(int row, int chunk) {
    return (chunk >> 3) * kRows * kBoxRowBytes + row * kBoxRowBytes + (((chunk & 7) ^ (row & 7)) << 4);
  }
};

template <int kHeadDim_, bool kTma, int kBlockN_, int kStages_, int kSoftmaxChains_,
          int kConsumers_>
struct Sm90FwdTraitsBase : Sm90Boxes<kHeadDim_> {
  using Boxes = Sm90Boxes<kHeadDim_>;
  using Boxes::kBoxes;
  using Boxes::kBoxRowBytes;
  using Boxes::kChunks;
  using Boxes::kProducerThreads;
  static constexpr int kSoftmaxChains = kSoftmaxChains_;  // independent max/sum chains per row
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kConsumers = kConsumers_;   // consumer warpgroups (2 or 3)
  static constexpr int kBlockM = 64 * kConsumers;  // query rows per CTA, 64 per warpgroup
  static constexpr int kBlockN = kBlockN_;    // keys per pipeline stage (the N of S = Q K^T)
  static constexpr int kStages = kStages_;    // K/V tiles in flight (cp.async groups)
  static constexpr int kConsumerThreads = 128 * kConsumers;  // warpgroups 1 .. kConsumers
  static constexpr int kNThreads = kProducerThreads + kConsumerThreads;
  // setmaxnreg moves registers inside the CTA's allocation at launch (kLaunchRegs per thread,
  // the bound __launch_bounds__(kNThreads, 1) gives: 168 for 384 threads, 128 for 512), so the
  // consumers may take only what the producer gives up, or their setmaxnreg.inc waits forever.
  // The TMA producer is one issuing thread (24 registers); the cp.async one computes 128
  // threads' addresses (40); the consumers share the rest in multiples of 8, at most 240 (two
  // consumers: 240 with TMA, 232 with cp.async; three: 160, 152).
  static constexpr int kLaunchRegs = 65536 / kNThreads / 8 * 8;
  static constexpr int kProducerRegs = kTma ? 24 : 40;
  static constexpr int kConsumerShare =
      (kNThreads * kLaunchRegs - kProducerThreads * kProducerRegs) / kConsumerThreads / 8 * 8;
  static constexpr int kConsumerRegs = kConsumerShare < 240 ? kConsumerShare : 240;
  static_assert(kConsumers == 2 || kConsumers == 3, "two or three consumer warpgroups");
  static_assert(kProducerThreads * (kLaunchRegs - kProducerRegs) >=
                    kConsumerThreads * (kConsumerRegs - kLaunchRegs),
                "the consumers would wait for registers the producer does not release");
  static constexpr int kRowsPerWarp = 16;
  static constexpr int kMFrags = 1;
  static constexpr int kNTiles = kBlockN / 8;   // n8 tiles of S per thread
  static constexpr int kDTiles = kHeadDim / 8;  // n8 tiles of O per thread
  static constexpr int kKSteps = kHeadDim / 16; // k16 steps of Q K^T
  static constexpr int kPSteps = kBlockN / 16;  // k16 steps of P V

  static constexpr int kQBytes = kBoxes * kBlockM * kBoxRowBytes;
  static constexpr int kKVBytes = kBoxes * kBlockN * kBoxRowBytes;
  static constexpr int kStageBytes = 2 * kKVBytes;  // K then V
  // after the tiles: mbarriers full and empty for K and for V, and "V checked" per stage, Q's
  // full; then a 32-bit "V held NaN / inf" flag per stage
  static constexpr int kBarrierBytes = 256;
  // + 1024: the dynamic shared memory base is rounded up to the swizzle atom inside the kernel
  static constexpr int kSmemBytes = kQBytes + kStages * kStageBytes + kBarrierBytes + 1024;

  static_assert(kHeadDim % 64 == 0 && kHeadDim <= 256, "head dims 64, 128, 192, 256");
  static_assert(kBlockN % 16 == 0 && kBlockN >= 16 && kBlockN <= 256, "wgmma N and k16 steps");
  static_assert(kStages >= 2 && kStages <= 4, "2..4 stages");
  static_assert(kSmemBytes <= 227 * 1024, "more shared memory than an sm_90 CTA can have");
  static_assert(8 * (5 * kStages + 1) + 4 * kStages <= kBarrierBytes, "room for the mbarriers");
  // accumulators per thread: S (kBlockN / 2) + O (kHeadDim / 2) + P (kBlockN / 4 packed pairs),
  // at most five sixths of the consumer's registers (200 of 240)
  static_assert(6 * (kBlockN / 2 + kHeadDim / 2 + kBlockN / 4) <= 5 * kConsumerRegs,
                "accumulators exceed registers");
};

template <int kHeadDim, bool kTma>
struct Sm90FwdTraits;  // only the rows of CUPARING_SM90_FWD_CONFIGS exist

#define CUPARING_DEFINE_SM90_TRAITS(D, TMA, BN, ST, CHAINS, CONSUMERS, SMEM)             \
  template <>                                                                            \
  struct Sm90FwdTraits<D, TMA> : Sm90FwdTraitsBase<D, TMA, BN, ST, CHAINS, CONSUMERS> {}; \
  static_assert(Sm90FwdTraits<D, TMA>::kSmemBytes == (SMEM),                             \
                "loader smem formula disagrees (D=" #D ")");
CUPARING_SM90_FWD_CONFIGS(CUPARING_DEFINE_SM90_TRAITS)
#undef CUPARING_DEFINE_SM90_TRAITS

}  // namespace cuparing
