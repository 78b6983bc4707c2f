// The tensor-memory accelerator (TMA) on sm_90: tensor maps passed as kernel parameters, bulk
// tensor loads into shared memory that complete on an mbarrier, and bulk reductions from shared
// into global memory.
//
// No <cuda.h> under NVRTC: CUtensorMap is declared here as what it is to the kernel, 128 opaque,
// 64-byte aligned bytes. The host encodes them (cuparing/kernels/tensor_maps.py); the kernel takes
// them as a `const __grid_constant__` parameter so their address stays in parameter space, which
// is where cp.async.bulk.tensor may read a map from.
#pragma once
#include "../common/params.cuh"

namespace cuparing {

struct __align__(64) TensorMap {
  u64 bits[16];
};

// The maps of one forward launch (tensor_maps.MAPS_DTYPE): [B, S, H, D] operands, dims innermost
// first (D, S, H, B), boxes of (rows, 64 columns), 128-byte swizzle.
struct Sm90Maps {
  TensorMap q, k, v;
};

static_assert(sizeof(Sm90Maps) == 384, "Sm90Maps layout changed: update tensor_maps.MAPS_DTYPE");

// Expect `bytes` more bytes on `bar` in its current phase, and arrive once.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(u32 bar, u32 bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
}

// Load the box at coordinates (c0 = column, c1 = row, c2 = head, c3 = batch) of `map` into shared
// memory at `dst`; its bytes count against `bar`'s expected transaction bytes.
__device__ __forceinline__ void tma_load_4d(u32 dst, const TensorMap* map, u32 bar, int c0, int c1,
                                            int c2, int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes "
      "[%0], [%1, {%3, %4, %5, %6}], [%2];\n" ::"r"(dst),
      "l"(reinterpret_cast<u64>(map)), "r"(bar), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
      : "memory");
}

// Add `bytes` (a multiple of 16) of float32 from shared memory at `src` into global memory at
// `dst` (both 16-byte aligned) as one bulk reduction: the copy engine reads the row and the L2
// adds it, instead of one atomic instruction per element pair from the warps. Asynchronous: it
// joins this thread's current bulk group (bulk_commit), and `src` may be rewritten only after
// bulk_wait_read says the group has read it.
__device__ __forceinline__ void bulk_reduce_add_f32(float* dst, u32 src, u32 bytes) {
  asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n"
               ::"l"(dst), "r"(src), "r"(bytes)
               : "memory");
}

__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::); }

// Until at most kPending of this thread's bulk groups still read their shared memory.
template <int kPending>
__device__ __forceinline__ void bulk_wait_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(kPending) : "memory");
}

// Until at most kPending of this thread's bulk groups are incomplete (writes done).
template <int kPending>
__device__ __forceinline__ void bulk_wait() {
  asm volatile("cp.async.bulk.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// Orders this thread's global accesses through the async proxy (bulk copies and reductions)
// against its generic ones (the loads and atomics of a turn counter).
__device__ __forceinline__ void fence_proxy_async_global() {
  asm volatile("fence.proxy.async.global;\n" ::: "memory");
}

}  // namespace cuparing
