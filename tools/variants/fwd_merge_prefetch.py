# ruff: noqa: E501 (the kernel's source lines, quoted as they are)
"""Candidate for tools/ablate.py: a ring step's merge epilogue finds the running result in L2.
Its reads of the float32 running result (64 KB per CTA, written by the previous step's kernel)
wait for DRAM with nothing else to do (one CTA per SM); the consumers now ask L2 for them a few
tiles before the end (`prefetch.global.L2`, one per 128-byte line by one lane per row). Time it
after `tools/variants/epilogue_cost.py` says the reads matter (its `no-old-partial`); compiles
spill-free; not yet run on a GPU.

    python tools/ablate.py tools/variants/fwd_merge_prefetch.py -- tools/profile_ring_steps.py \
        --documents --ranks 2 --layouts zigzag
"""

FWD = "cuparing/kernels/sm90/fwd.cuh"
PTX = "cuparing/kernels/common/ptx.cuh"

VARIANTS = {
    "merge-prefetch": [
        (
            PTX,
            "// Fire-and-forget fp32 atomic adds to global memory: *p += a (and p[1] += b). The two-element\n",
            "// Ask L2 for the 128-byte line holding p (no register waits for it).\n__device__ __forceinline__ void prefetch_l2(const void* p) {\n  asm volatile(\"prefetch.global.L2 [%0];\\n\" ::\"l\"(p));\n}\n\n// Fire-and-forget fp32 atomic adds to global memory: *p += a (and p[1] += b). The two-element\n",
        ),
        (
            FWD,
            "      u32 values_zeroed = 0;  // some P V of the CTA ran with V's NaN / inf zeroed (rare)\n",
            "      u32 values_zeroed = 0;  // some P V of the CTA ran with V's NaN / inf zeroed (rare)\n"
            "      // A merging ring step reads the running result of its rows in the epilogue: asked of L2\n"
            "      // a few tiles before, so the reads do not wait for DRAM there\n"
            "      const auto prefetch_running_result = [&]() {\n"
            "        if ((p.out_mode != kOutAccMerge && p.out_mode != kOutAccFinal) || (lane & 3) != 0) return;\n"
            "        const float* base = p.out_mode == kOutAccFinal ? p.acc : static_cast<const float*>(p.out);\n"
            "#pragma unroll\n"
            "        for (int r = 0; r < 2; ++r) {\n"
            "          const int row = warp_row0 + g + 8 * r;\n"
            "          if (row >= sq) continue;\n"
            "          const float* line = base + ((static_cast<i64>(b) * sq + row) * p.nheads + h) * p.headdim;\n"
            "          for (int col = 0; col < p.headdim; col += 32) prefetch_l2(line + col);\n"
            "        }\n"
            "      };\n"
            "      if (n_count <= 4) prefetch_running_result();\n",
        ),
        (
            FWD,
            "      for (int it = 1; it < n_count; ++it) {\n        const int s = it % Tr::kStages;\n        const int prev = (it - 1) % Tr::kStages;\n",
            "      for (int it = 1; it < n_count; ++it) {\n        const int s = it % Tr::kStages;\n        const int prev = (it - 1) % Tr::kStages;\n        if (n_count > 4 && it == n_count - 3) prefetch_running_result();\n",
        ),
    ],
}
