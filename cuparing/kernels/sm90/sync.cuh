// Synchronisation between the warpgroups of an sm_90a CTA: mbarriers for the producer/consumer
// shared-memory pipeline, named barriers for taking turns on the tensor cores, and setmaxnreg for
// moving registers from the producer to the consumers.
#pragma once
#include "../common/params.cuh"

namespace cuparing {

// ---- mbarrier (a 64-bit shared-memory object counting arrivals per phase)

__device__ __forceinline__ void mbarrier_init(u32 bar, u32 count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}

// Make barrier initialisation visible to the other threads and to the async proxy (cp.async's
// arrivals); follow with a CTA barrier.
__device__ __forceinline__ void mbarrier_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

__device__ __forceinline__ void mbarrier_arrive(u32 bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}

// One arrival on `bar` once all of this thread's earlier cp.async copies have landed. `noinc`:
// the arrival counts against the count the barrier was initialised with.
__device__ __forceinline__ void cp_async_mbarrier_arrive(u32 bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}

// Whether the phase of parity `parity` has completed, after waiting for it a while (one
// try_wait, which the hardware suspends for a bounded time). A fresh barrier is in phase 0, and
// the phase "before" it (parity 1) counts as completed: a producer's first wait on an empty
// slot passes at once.
__device__ __forceinline__ bool mbarrier_try_wait(u32 bar, u32 parity) {
  u32 done;
  asm volatile(
      "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
      "selp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(done)
      : "r"(bar), "r"(parity)
      : "memory");
  return done != 0;
}

// Block until the phase of parity `parity` has completed.
__device__ __forceinline__ void mbarrier_wait(u32 bar, u32 parity) {
  while (!mbarrier_try_wait(bar, parity)) {
  }
}

// ---- named barriers (ids 1..15; 0 is __syncthreads)

__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// Named barrier that also ORs a predicate over its `threads` participants; each gets the result.
__device__ __forceinline__ bool named_barrier_or(int id, int threads, bool pred) {
  u32 any;
  asm volatile(
      "{\n.reg .pred p, q;\nsetp.ne.u32 p, %1, 0;\nbar.red.or.pred q, %2, %3, p;\n"
      "selp.u32 %0, 1, 0, q;\n}\n"
      : "=r"(any)
      : "r"(static_cast<u32>(pred)), "r"(id), "r"(threads)
      : "memory");
  return any != 0;
}

// ---- per-warpgroup register budget (takes effect under __launch_bounds__(threads, 1))

template <int kRegs>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}

template <int kRegs>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}

}  // namespace cuparing
