#pragma once
// Rows of up to kGatherMaxParts (K, V) pairs, each [B, n_t, Hkv, D] with its own byte strides,
// copied into one [B, L, Hkv, D] contiguous pair in the order a (part, row) map gives. A gathered
// ring call (schedule.gathered_forward / gathered_backward) puts the K/V shards received from
// the other ranks in ascending order of global position, so that one launch sees every key of
// theirs a query may see as one sorted run; its backward takes the float32 dK / dV rows
// of each shard back out of that order (one part, one launch per shard). Elements of any size:
// a row's heads are whole 16-byte words.

namespace cuparing {

constexpr int kGatherMaxParts = 8;  // other ranks' shards a gathered call holds (rings of 9)
constexpr int kGatherRowsPerCta = 4;  // one warp per gathered row
constexpr int kGatherThreads = 32 * kGatherRowsPerCta;

struct GatherRowsParams {
  void* k_dst;  // [B, L, Hkv, D] contiguous
  void* v_dst;
  const void* k_src[kGatherMaxParts];  // part t's K / V (unused slots 0)
  const void* v_src[kGatherMaxParts];
  const int* sources;  // [L][2]: (part, row within the part) of every gathered row
  long long k_strides[kGatherMaxParts][3];  // bytes: batch, row, head (multiples of 16)
  long long v_strides[kGatherMaxParts][3];
  int batch;
  int length;      // L
  int heads;       // Hkv
  int head_words;  // 16-byte words per head: D * sizeof(element) / 16
};
// loader.py packs these fields at the offsets they take without padding (every field before the
// ints is 8 bytes): k_dst 0, v_dst 8, k_src 16, v_src 80, sources 144, k_strides 152, v_strides
// 344, the ints from 536 (loader.GATHER_ROWS_LAYOUT). NVRTC has no offsetof; the size holds them.
static_assert(sizeof(GatherRowsParams) == 552, "loader.GATHER_ROWS_LAYOUT");

// Grid (ceil(L / kGatherRowsPerCta), B), kGatherThreads threads: warp w of a CTA copies gathered
// row blockIdx.x * kGatherRowsPerCta + w of batch blockIdx.y, K and V, 16 bytes a lane at a time.
// The parameters are read in place (__grid_constant__): the part index picks a pointer and its
// strides at run time, which would otherwise copy the whole struct to local memory.
__device__ __forceinline__ void gather_rows(const GatherRowsParams& p) {
  const int row = blockIdx.x * kGatherRowsPerCta + threadIdx.x / 32;
  if (row >= p.length) {
    return;
  }
  const int lane = threadIdx.x % 32;
  const long long b = blockIdx.y;
  const int part = p.sources[2 * row];
  const long long src_row = p.sources[2 * row + 1];
  const long long* ks = p.k_strides[part];
  const long long* vs = p.v_strides[part];
  const char* k_row = static_cast<const char*>(p.k_src[part]) + b * ks[0] + src_row * ks[1];
  const char* v_row = static_cast<const char*>(p.v_src[part]) + b * vs[0] + src_row * vs[1];
  const int words = p.heads * p.head_words;
  const long long first = (b * p.length + row) * words;
  uint4* k_out = static_cast<uint4*>(p.k_dst) + first;
  uint4* v_out = static_cast<uint4*>(p.v_dst) + first;
  for (int w = lane; w < words; w += 32) {
    const int head = w / p.head_words;
    const int at = (w - head * p.head_words) * 16;
    k_out[w] = *reinterpret_cast<const uint4*>(k_row + head * ks[2] + at);
    v_out[w] = *reinterpret_cast<const uint4*>(v_row + head * vs[2] + at);
  }
}

}  // namespace cuparing
