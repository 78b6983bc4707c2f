// Plain-old-data launch parameters of the forward kernel, passed by value.
//
// The host side (loader.py, PARAMS_DTYPE) builds the same layout as a NumPy structured dtype with
// C alignment (every field naturally aligned, no packing); the size assert below turns a field
// added on one side only into a compile error (checked on CI by tests/test_kernel_compile.py).
// NVRTC 13.0 has no __builtin_offsetof, so offsets are not asserted one by one.
#pragma once

namespace cuparing {

typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;
typedef unsigned long long u64;

// How the epilogue writes a block's (out, lse).
enum OutMode : int {
  kOutDirect = 0,    // out in the input dtype with its own strides; lse float32 [B, H, Sq]
  kOutAccWrite = 1,  // out float32 [B, Sq, H, D] contiguous and lse overwritten (first block)
  kOutAccMerge = 2,  // read the running float32 (out, lse), merge this block in, write back
  kOutAccFinal = 3,  // the ring's last block: read the running float32 (acc, lse), merge this
                     // block in, write out in the input dtype with its own strides, and lse
};

struct FwdParams {
  const u16* q;     // [B, Sq, H, D]   fp16/bf16 bits, element strides below, last axis contiguous
  const u16* k;     // [B, Sk, Hkv, D]
  const u16* v;     // [B, Sk, Hkv, D]
  void* out;        // kOutDirect, kOutAccFinal: u16 [B, Sq, H, D] strided; else float
                    // [B, Sq, H, D] contiguous (the running accumulator)
  float* lse;       // [B, H, Sq] contiguous, natural log
  const int* q_pos;  // [Sq] global positions, ascending
  const int* k_pos;  // [Sk] global positions, ascending
  const float* acc;  // kOutAccFinal: the running float32 [B, Sq, H, D] contiguous; else unused
  i64 q_batch_stride, q_row_stride, q_head_stride;  // in elements
  i64 k_batch_stride, k_row_stride, k_head_stride;
  i64 v_batch_stride, v_row_stride, v_head_stride;
  i64 o_batch_stride, o_row_stride, o_head_stride;  // kOutDirect, kOutAccFinal
  int batch, seqlen_q, seqlen_k, nheads, nheads_kv, headdim;  // headdim: the actual D
  int lo, hi;        // key j visible to query i iff lo <= k_pos[j] - q_pos[i] <= hi
  int out_mode;      // OutMode
  int block_full;    // 1: the host proved every pair visible (only the Sk tail needs masking)
  float scale_log2;  // softmax scale * log2(e)
};

static_assert(sizeof(FwdParams) == 208, "FwdParams layout changed: update loader.PARAMS_DTYPE");

// Launch parameters of the backward kernel (one ring block; loader.BWD_PARAMS_DTYPE).
// The kernel ADDS this block's contributions into the float32 accumulators dq, dk, dv.
struct BwdParams {
  const u16* q;       // [B, Sq, H, D]   fp16/bf16 bits, element strides below, last axis contiguous
  const u16* k;       // [B, Sk, Hkv, D]
  const u16* v;       // [B, Sk, Hkv, D]
  const u16* dout;    // [B, Sq, H, D]
  const float* lse;   // [B, H, Sq] contiguous: the final (merged) natural-log lse; -inf: no key
  const float* delta; // [B, H, Sq] contiguous: rowsum(dO * O)
  float* dq;          // [B, Sq, H, D] contiguous (actual D), accumulated with atomics; the sm90
                      // backward and its redo pass: dq tiles (common/dq_tiles.cuh)
  float* dk;          // [B, Sk, Hkv, D] contiguous, accumulated with atomics (but dk_out below)
  float* dv;          // [B, Sk, Hkv, D] contiguous, accumulated with atomics (but dv_out below)
  const int* q_pos;   // [Sq] global positions, ascending
  const int* k_pos;   // [Sk] global positions, ascending
  // The sm90 backward's hand-over to the sm80 one, one int per CTA (h fastest, then b, then the
  // key tile: both families' grids): the sm90 kernel writes 1 + the first query row it left
  // undone (a non-finite operand where its tile is partly masked, sm90/bwd.cuh) and adds only
  // the rows before it; the sm80 kernel launched after it with the same parameters runs only
  // the CTAs so marked, from that row on. Null: the sm80 kernel runs every CTA whole.
  int* redo;
  // Deterministic mode's turn counters (common/turns.cuh), zeroed before the launch; null in
  // the other instantiations. dq_turns: one per (batch, query head, 64-query tile), [B, H,
  // ceil(Sq / 64)]; dkv_turns: one per (batch, kv head, 128-key tile), [B, Hkv, ceil(Sk / 128)]
  // (read with GQA only).
  int* dq_turns;
  int* dkv_turns;
  // Direct gradients (the sm90 backward with its redo pass; null elsewhere): when this launch's
  // dK / dV are the whole gradients (one block, a query head per kv head), each CTA writes its
  // rows' dK / dV straight into these fp16/bf16 [B, Sk, Hkv, D] contiguous arrays, and dk / dv
  // above are uninitialised float32 scratch: a CTA that stops for the redo pass stores its part
  // there, the redo pass adds the rest, and cuparing_direct_rows (launched after it) writes
  // those CTAs' rows here.
  u16* dk_out;
  u16* dv_out;
  i64 q_batch_stride, q_row_stride, q_head_stride;  // in elements
  i64 k_batch_stride, k_row_stride, k_head_stride;
  i64 v_batch_stride, v_row_stride, v_head_stride;
  i64 do_batch_stride, do_row_stride, do_head_stride;
  int batch, seqlen_q, seqlen_k, nheads, nheads_kv, headdim;  // headdim: the actual D
  int lo, hi;         // key j visible to query i iff lo <= k_pos[j] - q_pos[i] <= hi
  int block_full;     // 1: the host proved every pair visible (only the Sk tail needs masking)
  float scale_log2;   // softmax scale * log2(e): P = 2^(s * scale_log2 - lse * log2(e))
  float scale;        // softmax scale: dq, dk = scale * (dS K, dS^T Q)
};

static_assert(sizeof(BwdParams) == 272, "BwdParams layout changed: update loader.BWD_PARAMS_DTYPE");

}  // namespace cuparing
