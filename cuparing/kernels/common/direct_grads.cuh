// Direct gradients (params.cuh BwdParams::dk_out): when one backward launch computes the whole
// dK / dV (one block, a query head per kv head), each CTA owns its key rows outright, so it
// writes them in the gradients' dtype instead of adding float32 into zeroed accumulators that a
// cast then converts: no clearing, no atomics, no cast. A CTA whose keys no query sees writes
// zeros (its accumulators' starting values); a CTA the sm90 kernel stops for the redo pass stores
// its float32 part into scratch, where the redo pass adds the rest; a launch after the redo pass
// converts those rows (direct_rows_after_redo).
#pragma once
#include "params.cuh"
#include "ptx.cuh"

namespace cuparing {

// Store two floats (8-byte aligned p); the row is this CTA's alone: a plain store.
__device__ __forceinline__ void st_global_f32x2(float* p, float a, float b) {
  *reinterpret_cast<float2*>(p) = make_float2(a, b);
}

// Store two packed fp16/bf16 values (4-byte aligned p).
__device__ __forceinline__ void st_global_u32(u16* p, u32 value) {
  *reinterpret_cast<u32*>(p) = value;
}

// After the redo pass, with direct gradients: the key rows of a CTA the sm90 kernel stopped
// (its float32 part stored into the scratch, the redo pass's adds on top: complete, since this
// runs as the next launch) converted into dK / dV. One CTA per sm90 CTA, on its grid (H, B,
// ceil(Sk / kKeyTile)); CTAs the sm90 kernel did not mark (BwdParams::redo) exit at once. All
// arrays [B, Sk, Hkv, D] contiguous, D even.
template <bool kBf16, int kKeyTile>
__device__ __forceinline__ void direct_rows_after_redo(const BwdParams& p) {
  const int h = blockIdx.x, b = blockIdx.y;
  if (p.redo[(static_cast<i64>(blockIdx.z) * gridDim.y + b) * gridDim.x + h] == 0) return;
  const int key0 = blockIdx.z * kKeyTile;
  const int rows = min(kKeyTile, p.seqlen_k - key0);
  const int kv_head = h / (p.nheads / p.nheads_kv);
  const int d = p.headdim, pairs = d >> 1;
  const i64 first = ((static_cast<i64>(b) * p.seqlen_k + key0) * p.nheads_kv + kv_head) * d;
  const i64 row_stride = static_cast<i64>(p.nheads_kv) * d;
  for (int i = threadIdx.x; i < rows * pairs; i += blockDim.x) {
    const i64 at = first + (i / pairs) * row_stride + (i % pairs) * 2;
    const float2 k2 = *reinterpret_cast<const float2*>(p.dk + at);
    const float2 v2 = *reinterpret_cast<const float2*>(p.dv + at);
    st_global_u32(p.dk_out + at, pack2<kBf16>(k2.x, k2.y));
    st_global_u32(p.dv_out + at, pack2<kBf16>(v2.x, v2.y));
  }
}

}  // namespace cuparing
