// Forward epilogue shared by every kernel family: normalise a CTA's rows and write them.
//
// Each thread owns rows (g, g + 8) of kMFrags m16 fragments starting at warp_row0, in the m16n8
// accumulator layout (columns 8j + 2t + {0, 1}) that mma.sync and wgmma's m64 accumulators share.
// OutMode decides what is written: the output in the input dtype and the float32 LSE (kOutDirect),
// or the ring's float32 running (out, lse), written (kOutAccWrite) or merged in with
// lse = max + log(exp(a - max) + exp(b - max)) (kOutAccMerge), or for the ring's last block
// merged in and written as the output in the input dtype (kOutAccFinal: no separate cast).
#pragma once
#include "params.cuh"
#include "ptx.cuh"
#include "softmax.cuh"

namespace cuparing {

// The ring's float32 running result for one row: written (first block, lse_old = -inf) or
// merged with the block's (lse = max + log(exp(a - max) + exp(b - max))); for the last block the
// merged row goes to the output in the input dtype instead (kOutAccFinal), rounded once as the
// cast kernel would have. The previous partial's loads for a chunk of columns are issued
// together before any store: interleaved one load, one store per column pair, each load waited
// for its full latency, and with one CTA per SM nothing hid it (a ring step of short blocks spent
// a third of its time here).
template <class Tr, bool kBf16>
__device__ __forceinline__ void merge_row_into_accumulator(const FwdParams& p,
                                                           const float (&acc)[Tr::kDTiles][4],
                                                           int r, int row, float inv,
                                                           float lse_blk, float lse_old,
                                                           i64 lse_idx, int b, int h, int t) {
  const int d = p.headdim;
  const bool final_out = p.out_mode == kOutAccFinal;
  const i64 acc_offset = ((static_cast<i64>(b) * p.seqlen_q + row) * p.nheads + h) * d;
  float* acc_row = static_cast<float*>(p.out) + acc_offset;  // (the modes but kOutAccFinal)
  const float* old_row = final_out ? p.acc + acc_offset : acc_row;
  float w_old = 0.f, w_blk = inv, lse_new = lse_blk;
  bool keep_old = false;
  if (p.out_mode != kOutAccWrite) {
    const float a = lse_old;
    const float mx = max_nan(a, lse_blk);  // a NaN on either side stays NaN
    if (mx == neg_inf()) {  // neither side saw a key: (0, -inf)
      if (!final_out) return;  // the accumulator row holds it already
      w_blk = 0.f;  // (the output row is written: 0)
    } else {
      const float ea = expf(a - mx);  // exactly 0 when a == -inf
      const float eb = expf(lse_blk - mx);
      const float total = ea + eb;
      lse_new = mx + logf(total);
      w_old = ea / total;
      w_blk = eb / total * inv;
      keep_old = a != neg_inf();  // never read an accumulator row with weight 0 (NaN-safe)
    }
  }
  // up to 8 column pairs (16 registers) of loads in flight; a chunk size that divides kDTiles
  constexpr int kChunk = Tr::kDTiles % 8 == 0 ? 8 : Tr::kDTiles % 4 == 0 ? 4 : 1;
#pragma unroll
  for (int j0 = 0; j0 < Tr::kDTiles; j0 += kChunk) {
    float2 prev[kChunk];
#pragma unroll
    for (int j = 0; j < kChunk; ++j) {
      const int col = 8 * (j0 + j) + 2 * t;
      prev[j] = keep_old && col < d ? *reinterpret_cast<const float2*>(old_row + col)
                                    : make_float2(0.f, 0.f);
    }
#pragma unroll
    for (int j = 0; j < kChunk; ++j) {
      const int col = 8 * (j0 + j) + 2 * t;
      if (col < d) {
        float2 o = make_float2(acc[j0 + j][2 * r] * w_blk, acc[j0 + j][2 * r + 1] * w_blk);
        if (keep_old) {
          o.x = fmaf(prev[j].x, w_old, o.x);
          o.y = fmaf(prev[j].y, w_old, o.y);
        }
        if (final_out) {
          u16* out_row = static_cast<u16*>(p.out) + b * p.o_batch_stride +
                         row * p.o_row_stride + h * p.o_head_stride;
          *reinterpret_cast<u32*>(out_row + col) = pack2<kBf16>(o.x, o.y);
        } else {
          *reinterpret_cast<float2*>(acc_row + col) = o;
        }
      }
    }
  }
  if (t == 0) p.lse[lse_idx] = lse_new;
}

template <class Tr, bool kBf16>
__device__ __forceinline__ void write_block_output(const FwdParams& p,
                                                   const float (&acc_o)[Tr::kMFrags][Tr::kDTiles][4],
                                                   const float (&row_max)[Tr::kMFrags][2],
                                                   float (&row_sum)[Tr::kMFrags][2],
                                                   int warp_row0, int b, int h, int lane) {
  const int g = lane >> 2;
  const int t = lane & 3;
  const int sq = p.seqlen_q;
  reduce_row_sums<Tr>(row_sum);
  constexpr float kLn2 = 0.6931471805599453f;
  const int nheads = p.nheads;
  const int d = p.headdim;

  float lse_old[Tr::kMFrags][2];
  const bool merges = p.out_mode == kOutAccMerge || p.out_mode == kOutAccFinal;
  if (merges) {
    // every lane of a quad reads the row's running lse before lane t==0 overwrites it
#pragma unroll
    for (int mf = 0; mf < Tr::kMFrags; ++mf) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = warp_row0 + mf * 16 + g + 8 * r;
        lse_old[mf][r] = row < sq ? p.lse[(static_cast<i64>(b) * nheads + h) * sq + row] : 0.f;
      }
    }
    __syncwarp();
  }

#pragma unroll
  for (int mf = 0; mf < Tr::kMFrags; ++mf) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = warp_row0 + mf * 16 + g + 8 * r;
      if (row >= sq) continue;
      const float sum = row_sum[mf][r];
      // a row saw a key iff its max left -inf; a NaN max (NaN logits) gives NaN out and lse
      const bool seen = row_max[mf][r] != neg_inf();
      const float inv = seen ? 1.f / sum : 0.f;
      const float lse_blk = seen ? (row_max[mf][r] + __log2f(sum)) * kLn2 : neg_inf();
      const i64 lse_idx = (static_cast<i64>(b) * nheads + h) * sq + row;

      if (p.out_mode == kOutDirect) {
        u16* out_row = static_cast<u16*>(p.out) + b * p.o_batch_stride + row * p.o_row_stride +
                       h * p.o_head_stride;
#pragma unroll
        for (int j = 0; j < Tr::kDTiles; ++j) {
          const int col = 8 * j + 2 * t;
          if (col < d) {
            *reinterpret_cast<u32*>(out_row + col) =
                pack2<kBf16>(acc_o[mf][j][2 * r] * inv, acc_o[mf][j][2 * r + 1] * inv);
          }
        }
        if (t == 0) p.lse[lse_idx] = lse_blk;
      } else {
        merge_row_into_accumulator<Tr, kBf16>(p, acc_o[mf], r, row, inv, lse_blk,
                                              merges ? lse_old[mf][r] : neg_inf(), lse_idx, b, h,
                                              t);
      }
    }
  }
}

}  // namespace cuparing
