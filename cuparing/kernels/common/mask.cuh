// Visibility by global position: key j is visible to query i iff lo <= k_pos[j] - q_pos[i] <= hi
// (cuparing/masks.py: lo = -left_bound, hi = right_bound with causality folded in).
//
// Positions are sorted ascending, so a tile's extreme positions are its first and last entries,
// and the keys some query of a tile can see form one contiguous index range: found with a
// 32-way warp search, the CTA only walks those key tiles (EMPTY tiles are never loaded).
#pragma once
#include "ptx.cuh"

namespace cuparing {

enum TileKind : int { kTileEmpty = 0, kTilePartial = 1, kTileFull = 2 };  // == masks.BlockKind

// Classify queries spanning positions [q_min, q_max] against keys spanning [k_min, k_max].
// Conservative like MaskSpec.classify: FULL / EMPTY only when true for every pair.
__device__ __forceinline__ int classify_tile(int q_min, int q_max, int k_min, int k_max, int lo,
                                             int hi) {
  // |positions| < 2^30 and |lo|, |hi| <= 2^30, so differences and comparisons fit in int32.
  if (k_min - q_max > hi || k_max - q_min < lo) return kTileEmpty;
  if (k_max - q_min <= hi && k_min - q_max >= lo) return kTileFull;
  return kTilePartial;
}

// First index i in [0, n) with pos[i] >= value (n if none), for a sorted int array.
// All 32 lanes probe 32 evenly spaced indices per round, so n = 32k takes 3 dependent loads
// instead of 15. Every lane returns the same answer; call with the whole warp converged.
__device__ __forceinline__ int lower_bound_warp(const int* __restrict__ pos, int n, i64 value,
                                                int lane) {
  int lo = 0, hi = n;  // the answer lies in [lo, hi]
  while (lo < hi) {
    const int step = (hi - lo + 31) >> 5;
    const int probe = lo + (lane + 1) * step - 1;
    // true exactly for probes before the answer: monotone over lanes
    const bool before = probe < hi && static_cast<i64>(__ldg(pos + probe)) < value;
    const int count = __popc(__ballot_sync(0xffffffffu, before));
    const int new_lo = lo + count * step;
    hi = min(hi, lo + (count + 1) * step - 1);
    lo = new_lo;
  }
  return lo;
}

// lower_bound_warp's answer for `value` when the positions run without gaps from `base` ==
// pos[0] (pos[i] == base + i: one device's positions, a contiguous layout's blocks): the index
// value - base, clamped to [0, n], is checked (pos[g - 1] < value <= pos[g] defines the lower
// bound of any sorted array, so a passed check is exact whatever the positions); -1 where the
// check fails. Its two loads depend only on `base`, not on a chain of search rounds.
__device__ __forceinline__ int guessed_lower_bound(const int* __restrict__ pos, int n,
                                                   i64 value, i64 base) {
  const int g = static_cast<int>(min(max(value - base, 0ll), static_cast<i64>(n)));
  const bool above_previous = g == 0 || static_cast<i64>(__ldg(pos + g - 1)) < value;
  const bool at_or_past = g == n || static_cast<i64>(__ldg(pos + g)) >= value;
  return above_previous && at_or_past ? g : -1;
}

// The tiles (kTile entries each) of a sorted position array holding some value in
// [begin_value, end_value) (kFrom: at an index >= from, a multiple of kTile): one contiguous
// range [first, first + count); count 0 if none. kEndpoints: the tiles whose first and last
// positions bracket part of the range instead, which adds the one tile (if any) that straddles
// a range holding no position: the set classify_tile on tile endpoints finds non-EMPTY, the
// same seen from either side (deterministic mode counts on that). Call with the whole warp
// converged (lower_bound_warp).
template <int kTile, bool kFrom = false, bool kEndpoints = false, bool kGuess = false>
__device__ __forceinline__ void tiles_in_range(const int* __restrict__ pos, int n,
                                               i64 begin_value, i64 end_value, int lane,
                                               int& first, int& count, int from = 0) {
  // kGuess: positions without gaps take two checked guesses (two dependent loads), the others
  // the searches (six dependent loads at 8k positions)
  int begin = -1, end = -1;
  if constexpr (kGuess) {
    const i64 base = n > 0 ? __ldg(pos) : 0;
    begin = guessed_lower_bound(pos, n, begin_value, base);
    end = guessed_lower_bound(pos, n, end_value, base);
  }
  if (begin < 0) begin = lower_bound_warp(pos, n, begin_value, lane);
  if (end < 0) end = lower_bound_warp(pos, n, end_value, lane);
  if constexpr (kFrom) begin = max(begin, from);
  if (end <= begin) {
    // (end == begin here: begin_value <= end_value) a tile straddles the gap iff the first
    // position past it is not its tile's first
    const bool straddles = kEndpoints && !kFrom && begin < n && begin % kTile != 0;
    first = straddles ? begin / kTile : 0;
    count = straddles ? 1 : 0;
  } else {
    first = begin / kTile;
    count = (end - 1) / kTile - first + 1;
  }
}

// The key tiles that any query at positions [q_min, q_max] can see (keys at q + [lo, hi]).
// With the checked guesses first: a forward CTA's search delays its first K/V load, which
// weighs on short (causal) CTAs; the backward's kernels keep the plain searches (the guesses'
// registers spill the Hopper one at head dim 128, and its CTAs are three times longer).
template <int kTile>
__device__ __forceinline__ void visible_key_tiles(const int* __restrict__ k_pos, int seqlen_k,
                                                  int q_min, int q_max, int lo, int hi, int lane,
                                                  int& first, int& count) {
  tiles_in_range<kTile, false, false, true>(k_pos, seqlen_k, static_cast<i64>(q_min) + lo,
                        static_cast<i64>(q_max) + hi + 1, lane, first, count);
}

// The query tiles that any key at positions [k_min, k_max] is seen by (queries at k - [lo, hi]);
// kFrom: only from query index `from` (a multiple of kTile) on; kEndpoints: as tiles_in_range.
template <int kTile, bool kFrom = false, bool kEndpoints = false>
__device__ __forceinline__ void seeing_query_tiles(const int* __restrict__ q_pos, int seqlen_q,
                                                   int k_min, int k_max, int lo, int hi, int lane,
                                                   int& first, int& count, int from = 0) {
  tiles_in_range<kTile, kFrom, kEndpoints>(q_pos, seqlen_q, static_cast<i64>(k_min) - hi,
                                           static_cast<i64>(k_max) - lo + 1, lane, first, count,
                                           from);
}

// Set S to -inf where the key is hidden or past the end (column >= seqlen_k).
// acc_s holds this warp's (16 * kMFrags, kBlockN) scores in the m16n8 accumulator layout: lane
// (g = lane/4, t = lane%4) has rows g and g+8 of each fragment, columns 8j + 2t + {0, 1}.
template <class Tr>
__device__ __forceinline__ void apply_mask(float (&acc_s)[Tr::kMFrags][Tr::kNTiles][4],
                                           const int (&q_pos_row)[Tr::kMFrags][2],
                                           const int* __restrict__ k_pos, int n0, int seqlen_k,
                                           int lo, int hi, int lane) {
  const int t = lane & 3;
#pragma unroll
  for (int j = 0; j < Tr::kNTiles; ++j) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int col = n0 + 8 * j + 2 * t + e;
      const bool in_range = col < seqlen_k;
      const int kp = in_range ? __ldg(k_pos + col) : 0;
#pragma unroll
      for (int mf = 0; mf < Tr::kMFrags; ++mf) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int delta = kp - q_pos_row[mf][r];
          const bool visible = in_range && delta >= lo && delta <= hi;
          if (!visible) acc_s[mf][j][2 * r + e] = neg_inf();
        }
      }
    }
  }
}

// apply_mask for a tile whose keys hold consecutive positions from k_min (k_pos[n0 + c] ==
// k_min + c for every column c < keys, which sorted distinct positions show by their ends:
// k_max - k_min == keys - 1; every key position array the kernels get is strictly increasing,
// padding included). Key c is then visible to query q iff lo <= k_min + c - q <= hi, i.e.
// c in [q - k_min + lo, q - k_min + hi], and c < keys: one shift per row, no position loads
// (one per column and lane in apply_mask, on the softmax's critical path).
template <class Tr>
__device__ __forceinline__ void apply_mask_run(float (&acc_s)[Tr::kMFrags][Tr::kNTiles][4],
                                               const int (&q_pos_row)[Tr::kMFrags][2], int k_min,
                                               int keys, int lo, int hi, int lane) {
  const int t = lane & 3;
  // one value per row (k_min - q: key c sits c + this from the query), so the consumers of
  // head dim 64, three warpgroups at 128 registers, hold no more than apply_mask's loads do
  int shift[Tr::kMFrags][2];
#pragma unroll
  for (int mf = 0; mf < Tr::kMFrags; ++mf) {
#pragma unroll
    for (int r = 0; r < 2; ++r) shift[mf][r] = k_min - q_pos_row[mf][r];
  }
#pragma unroll
  for (int j = 0; j < Tr::kNTiles; ++j) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int col = 8 * j + 2 * t + e;
      const bool in_range = col < keys;
#pragma unroll
      for (int mf = 0; mf < Tr::kMFrags; ++mf) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          // |positions| < 2^30: the difference fits in int32 (classify_tile)
          const int delta = col + shift[mf][r];
          const bool visible = in_range && delta >= lo && delta <= hi;
          if (!visible) acc_s[mf][j][2 * r + e] = neg_inf();
        }
      }
    }
  }
}

}  // namespace cuparing
