// The order in which a grid's CTAs meet their work: (batch, head) pairs dealt in sections that
// share L2 (both sm90 kernels).
#pragma once

namespace cuparing {

// The hardware starts CTAs in linear block order (x fastest, then y, then z), and a wave (one CTA
// per SM) of a grid (heads, batch, tiles) with heads fastest holds a few tiles of every head: each
// head's shared operands (the forward's K and V, the backward's Q, dO and float32 dq tiles) are
// read by a few CTAs at a time, and every head's are in flight at once, far more than L2 holds.
// Dealt in sections of `section` (batch, head) pairs instead, a section's pairs fastest, then its
// tiles, a wave holds many tiles of few pairs whose operands fit in L2 (FlashAttention-3 orders
// its CTAs the same way). A section of every pair is the grid's own order.

// L2 the sections' shared operands may fill (H100 and H200 have 50 MB)
constexpr long long kL2SectionBytes = 32ll << 20;

struct CtaWork {
  int tile, b, h;  // the grid's z, y and x as the section order deals them
};

// This CTA's (tile, batch, head) in the section order of a grid (heads, batch, tiles).
__device__ __forceinline__ CtaWork sectioned_work(int section) {
  const int heads = gridDim.x, pairs = gridDim.x * gridDim.y;
  const int linear = blockIdx.x + heads * (blockIdx.y + gridDim.y * blockIdx.z);
  const int per_section = section * gridDim.z;
  const int first_pair = linear / per_section * section;  // the section's first pair
  const int in_section = min(section, pairs - first_pair);
  const int r = linear - first_pair * gridDim.z;
  const int pair = first_pair + r % in_section;
  return CtaWork{r / in_section, pair / heads, pair % heads};
}

// How many (batch, head) pairs a section holds when each pair's shared operands take
// `pair_bytes`: as many as fit in kL2SectionBytes (one at least), in whole groups of `group`
// pairs (a GQA group's query heads read the same K / V) where a group fits.
__device__ __forceinline__ int section_pairs(long long pair_bytes, int pairs, int group) {
  long long fit = kL2SectionBytes / max(pair_bytes, 1ll);
  int section = static_cast<int>(min(static_cast<long long>(pairs), max(fit, 1ll)));
  if (section >= group) section -= section % group;
  return section;
}

}  // namespace cuparing
