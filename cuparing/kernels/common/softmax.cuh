// Online softmax in the log2 domain (FlashAttention-2 style), per thread-owned row halves.
//
// Scores are kept raw; scale * log2(e) is folded into one FMA before ex2, so
// p = 2^(s * scale_log2 - m) with m the running row max in scaled units. A row that has seen
// only masked (-inf) scores keeps m = -inf; it is shifted by 0 instead, so every exponent is
// ex2(-inf) = 0 and nothing becomes NaN. Maxima propagate NaN (max_nan): a NaN among a row's
// visible scores makes its max, sums and output NaN, as in dense attention. Row sums stay per-thread partials until the epilogue
// (reduce_row_sums): only the max needs the quad reduction inside the loop.
#pragma once
#include "ptx.cuh"

namespace cuparing {

__device__ __forceinline__ float quad_max(float x) {
  x = max_nan(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return max_nan(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// Fold one tile of scores into the running (row_max, row_sum) and overwrite the scores with
// unnormalised probabilities p (still float; converted to 16-bit as the P.V A operand). Returns,
// per row, the factor the running output must be multiplied by before this tile's P.V is added
// (exactly 1 once the row max has settled; 0 while the row has seen nothing).
template <class Tr>
__device__ __forceinline__ void softmax_tile(float (&acc_s)[Tr::kMFrags][Tr::kNTiles][4],
                                             float (&row_max)[Tr::kMFrags][2],
                                             float (&row_sum)[Tr::kMFrags][2], float scale_log2,
                                             float (&corrections)[Tr::kMFrags][2]) {
  // kSoftmaxChains independent partial maxima and sums per row, combined at the end: a single
  // chain of kNTiles dependent max (and 2 kNTiles dependent adds) is latency-bound; several
  // chains overlap, for a few registers each.
  constexpr int kChains = Tr::kSoftmaxChains;
#pragma unroll
  for (int mf = 0; mf < Tr::kMFrags; ++mf) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float maxima[kChains];
#pragma unroll
      for (int c = 0; c < kChains; ++c) maxima[c] = neg_inf();
#pragma unroll
      for (int j = 0; j < Tr::kNTiles; ++j) {
        maxima[j % kChains] = max_nan(
            maxima[j % kChains], max_nan(acc_s[mf][j][2 * r], acc_s[mf][j][2 * r + 1]));
      }
      float tile_max = maxima[0];
#pragma unroll
      for (int c = 1; c < kChains; ++c) tile_max = max_nan(tile_max, maxima[c]);
      tile_max = quad_max(tile_max);
      // scale_log2 > 0, so max commutes with the scaling; -inf * scale stays -inf
      const float new_max = max_nan(row_max[mf][r], tile_max * scale_log2);
      const float shift = new_max == neg_inf() ? 0.f : new_max;
      const float correction = exp2_approx(row_max[mf][r] - shift);  // 0 while nothing seen
      row_max[mf][r] = new_max;
      float sums[kChains];
#pragma unroll
      for (int c = 0; c < kChains; ++c) sums[c] = 0.f;
#pragma unroll
      for (int j = 0; j < Tr::kNTiles; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float p = exp2_approx(fmaf(acc_s[mf][j][2 * r + e], scale_log2, -shift));
          acc_s[mf][j][2 * r + e] = p;
          sums[j % kChains] += p;
        }
      }
      float sum = sums[0];
#pragma unroll
      for (int c = 1; c < kChains; ++c) sum += sums[c];
      row_sum[mf][r] = row_sum[mf][r] * correction + sum;
      corrections[mf][r] = correction;
    }
  }
}

// Multiply the running output by the per-row corrections of softmax_tile. Once the running max
// has settled (most tiles after the first few), every correction is exactly 1: a warp vote skips
// the kHeadDim/2 multiplies per row that rescaling O costs.
template <class Tr>
__device__ __forceinline__ void rescale_output(float (&acc_o)[Tr::kMFrags][Tr::kDTiles][4],
                                               const float (&corrections)[Tr::kMFrags][2]) {
  bool any_change = false;
#pragma unroll
  for (int mf = 0; mf < Tr::kMFrags; ++mf) {
    any_change |= corrections[mf][0] != 1.f || corrections[mf][1] != 1.f;
  }
  if (__any_sync(0xffffffffu, any_change)) {
#pragma unroll
    for (int mf = 0; mf < Tr::kMFrags; ++mf) {
#pragma unroll
      for (int j = 0; j < Tr::kDTiles; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_o[mf][j][e] *= corrections[mf][e >> 1];
      }
    }
  }
}

// softmax_tile, then rescale_output at once (kernels whose P.V of the tile follows directly).
template <class Tr>
__device__ __forceinline__ void online_softmax(float (&acc_s)[Tr::kMFrags][Tr::kNTiles][4],
                                               float (&row_max)[Tr::kMFrags][2],
                                               float (&row_sum)[Tr::kMFrags][2],
                                               float (&acc_o)[Tr::kMFrags][Tr::kDTiles][4],
                                               float scale_log2) {
  float corrections[Tr::kMFrags][2];
  softmax_tile<Tr>(acc_s, row_max, row_sum, scale_log2, corrections);
  rescale_output<Tr>(acc_o, corrections);
}

// Quad-reduce the per-thread partial row sums (once, after the last tile).
template <class Tr>
__device__ __forceinline__ void reduce_row_sums(float (&row_sum)[Tr::kMFrags][2]) {
#pragma unroll
  for (int mf = 0; mf < Tr::kMFrags; ++mf) {
#pragma unroll
    for (int r = 0; r < 2; ++r) row_sum[mf][r] = quad_sum(row_sum[mf][r]);
  }
}

}  // namespace cuparing
