// The order in which a grid's CTAs meet their work: (batch, head) pairs dealt in sections that
// share L2 (both sm90 kernels).
#pragma once

namespace cuparing {

// The hardware starts CTAs in linear block order (x fastest, then y, then z), and a wave (one CTA
// per SM) of a grid (heads, batch, tiles) with heads fastest holds a few tiles of every head: each
// head's shared operands (the forward's K and V, the backward's Q, dO and float32 dq tiles) are
// read by a few CTAs at a time, and every head's are in flight at once, far more than L2 holds.
// Dealt in sections of (batch, head) pairs whose operands fit in L2 instead, a section's pairs
// fastest, then its tiles, a wave holds many tiles of few pairs (FlashAttention-3 orders its CTAs
// the same way). The host lays the grid out so (kernels/launch_order.py): x the pair within its
// section, y the tile, z the section. A section of every pair is the plain order (pairs fastest,
// then tiles), which the deterministic backward keeps. The tile is blockIdx.y, which the
// compiler re-reads for free where a value derived from it would hold a register.

struct CtaWork {
  int tile, b, h;
};

// This CTA's (batch, head) pair, b * heads + h.
__device__ __forceinline__ int cta_pair() { return blockIdx.z * gridDim.x + blockIdx.x; }

// This CTA's tile, and the launch's tiles per pair.
__device__ __forceinline__ int cta_tile() { return blockIdx.y; }
__device__ __forceinline__ int cta_tiles() { return gridDim.y; }

// This CTA's (tile, batch, head), for `nheads` heads per batch row.
__device__ __forceinline__ CtaWork cta_work(int nheads) {
  const int pair = cta_pair();
  const int b = pair / nheads;
  return CtaWork{cta_tile(), b, pair - b * nheads};
}

}  // namespace cuparing
