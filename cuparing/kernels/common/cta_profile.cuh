// A timeline of a kernel's CTAs, for tools/cta_profile.py and tools/turn_profile.py, which
// compile the sm90 kernels with CUPARING_CTA_PROFILE: nothing of it exists in the library's own
// build. Per CTA, by linear block index (x fastest, then y, then z: the hardware's launch
// order): its SM, its start and end, and when its first consumer warp began its first tile and
// the consumers finished their last product (%globaltimer, ns), so a CTA's time splits into
// prologue, main loop and epilogue, and an SM's into CTAs and the gaps between them. Every field
// is a later launch's over an earlier one's (stores, or the maximum of times), so after several
// launches of one kernel (a ring call's steps) the slots the last launch used hold its timeline,
// except the first / last marks of a CTA that began no tile in it: an earlier launch's, older
// than its start (which is how a reader tells them).
#pragma once

#ifdef CUPARING_CTA_PROFILE
namespace cuparing {
constexpr int kCtaProfileSlots = 1 << 16;
}  // namespace cuparing
extern "C" {  // (unmangled: the host finds them by name)
__device__ unsigned long long cuparing_cta_start_ns[cuparing::kCtaProfileSlots];
__device__ unsigned long long cuparing_cta_first_ns[cuparing::kCtaProfileSlots];
__device__ unsigned long long cuparing_cta_last_ns[cuparing::kCtaProfileSlots];
__device__ unsigned long long cuparing_cta_end_ns[cuparing::kCtaProfileSlots];
__device__ unsigned int cuparing_cta_sm[cuparing::kCtaProfileSlots];
}
namespace cuparing {

__device__ __forceinline__ int cta_profile_slot() {
  return ((blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x) % kCtaProfileSlots;
}

__device__ __forceinline__ unsigned long long globaltimer_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// The CTA starts (one thread).
__device__ __forceinline__ void cta_profile_start() {
  unsigned sm;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
  cuparing_cta_start_ns[cta_profile_slot()] = globaltimer_ns();
  cuparing_cta_sm[cta_profile_slot()] = sm;
}

// The first consumer warp begins its first tile (one thread).
__device__ __forceinline__ void cta_profile_first() {
  cuparing_cta_first_ns[cta_profile_slot()] = globaltimer_ns();
}

// A consumer warp finished its last product (the latest counts).
__device__ __forceinline__ void cta_profile_last() {
  atomicMax(&cuparing_cta_last_ns[cta_profile_slot()], globaltimer_ns());
}

// A warp of the CTA is done (its last one gives the CTA's end).
__device__ __forceinline__ void cta_profile_end() {
  atomicMax(&cuparing_cta_end_ns[cta_profile_slot()], globaltimer_ns());
}

// cta_profile_last through a zeroed 8-byte shared-memory slot at `slot` (for a kernel whose
// consumers have no registers to spare for a global address there): the warp's mark, kept as
// the slot's maximum ...
__device__ __forceinline__ void cta_profile_last_shared(unsigned slot) {
  asm volatile("atom.shared.max.u64 _, [%0], %1;" ::"r"(slot), "l"(globaltimer_ns()) : "memory");
}

// ... and cta_profile_end, which also hands the slot on (each warp after its own mark: the
// CTA's maximum reaches the global record).
__device__ __forceinline__ void cta_profile_end_shared(unsigned slot) {
  unsigned long long last;
  asm volatile("ld.shared.u64 %0, [%1];" : "=l"(last) : "r"(slot) : "memory");
  atomicMax(&cuparing_cta_last_ns[cta_profile_slot()], last);
  cta_profile_end();
}

}  // namespace cuparing
#endif
