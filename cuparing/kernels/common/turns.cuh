// Turn counters: the deterministic backward's fixed order of float additions.
//
// Float addition is not associative, so gradients accumulated with atomics change in their last
// bits with the order in which CTAs happen to add. In deterministic mode every group of adders
// into the same elements (the key-tile CTAs of one query tile's dQ, the query heads of one GQA
// group's dK / dV) shares a counter in global memory, zeroed before the launch: an adder waits
// until the counter shows that every adder before it has finished (`wait_turn`), adds, makes its
// adds visible, and counts itself (`end_turn`). Adders that have nothing to add still take their
// turn, or the ones after them would wait forever.
//
// Waits only ever point at CTAs earlier in launch order (a lower key tile, or a lower head of
// the same key tile), which are running or done by then: the wait ends.
#pragma once
#include "cta_profile.cuh"
#include "mask.cuh"
#include "ptx.cuh"

namespace cuparing {

__device__ __forceinline__ int ld_acquire_gpu(const int* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.s32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
  return v;
}

#ifdef CUPARING_CTA_PROFILE
// The profile build (common/cta_profile.cuh) also counts, per CTA, the cycles its warps spent
// waiting for turns.
}  // namespace cuparing
extern "C" __device__ unsigned long long cuparing_turn_wait_cycles[cuparing::kCtaProfileSlots];
namespace cuparing {
#endif

// Until *counter >= target (one thread; the others of its warp wait at a __syncwarp after it).
__device__ __forceinline__ void wait_turn(const int* counter, int target) {
#ifdef CUPARING_CTA_PROFILE
  const long long waited_from = clock64();
#endif
  while (ld_acquire_gpu(counter) < target) __nanosleep(64);
#ifdef CUPARING_CTA_PROFILE
  atomicAdd(&cuparing_turn_wait_cycles[cta_profile_slot()],
            static_cast<unsigned long long>(clock64() - waited_from));
#endif
}

// Count `adders` finished adders. Call after their adds are complete and visible to this thread
// (its own, or others' through a fence and a barrier or an mbarrier: release is cumulative over
// what this thread observed). The release is a memory barrier at GPU scope, which waits for this
// thread's outstanding memory operations: microseconds under heavy traffic.
__device__ __forceinline__ void end_turn(int* counter, int adders) {
  asm volatile("red.release.gpu.global.add.s32 [%0], %1;\n" ::"l"(counter), "r"(adders) : "memory");
}

// The first key tile (kKeyTile keys each) that shares a non-EMPTY endpoint classification with
// a query tile whose first position is q_min: the key tiles that do form one contiguous range
// (positions ascend), and it starts at the tile holding the first key at q_min + lo or later.
// Deterministic mode orders a query tile's dQ by key tile, so the adders before key tile n are
// tiles [first, n). Call with the whole warp converged (lower_bound_warp).
template <int kKeyTile>
__device__ __forceinline__ int first_key_tile_seen(const int* __restrict__ k_pos, int seqlen_k,
                                                   int q_min, int lo, int lane) {
  return lower_bound_warp(k_pos, seqlen_k, static_cast<i64>(q_min) + lo, lane) / kKeyTile;
}

}  // namespace cuparing
