# ruff: noqa: E501 (the kernel's source lines, quoted as they are)
"""Candidate for tools/ablate.py: a native head-dim-96 instantiation of the Hopper forward
(PERF.md, forward next step 3), instead of running head dims 72-96 in the 128 one with zero
columns. Same tiles as 128 (the smem layout keeps two 64-column boxes per row, the second half
used: TMA zero-fills it out of bounds, the cp.async copy grid now spans whole boxes and zero-fills
past the head dim); Q K^T takes 6 k-steps instead of 8 and P V an N of 96: a quarter fewer
products. Compiles spill-free (PTX: m64n176k16 for Q K^T, m64n96k16 for P V); not yet run on a
GPU. Applied, tests/test_kernel_compile.py's routing test still expects 72-96 in the 128
instantiation: update it with the variant if it is adopted.

    python tools/ablate.py tools/variants/fwd_native96.py --apply native96  # then the tests:
    #   test_gpu_attention.py -k matches_reference, test_gpu_nonfinite.py -k "forward or ring"
    python tools/ablate.py tools/variants/fwd_native96.py -- tools/bench_attention.py  # d=96 rows
"""

TRAITS = "cuparing/kernels/sm90/traits.cuh"
LOADER = "cuparing/kernels/loader.py"

VARIANTS = {
    "native96": [
        (
            TRAITS,
            "  static constexpr int kChunks = kHeadDim_ / 8;  // 16-byte chunks per row\n  static constexpr int kBoxes = (kHeadDim_ + 63) / 64;\n",
            "  // 16-byte chunks per row, over whole boxes: the copies zero-fill those past the head dim\n  static constexpr int kBoxes = (kHeadDim_ + 63) / 64;\n  static constexpr int kChunks = kBoxes * 8;\n",
        ),
        (
            TRAITS,
            '  static_assert(kHeadDim % 64 == 0 && kHeadDim <= 256, "head dims 64, 128, 192, 256");\n',
            '  static_assert(kHeadDim % 32 == 0 && kHeadDim <= 256, "head dims 64, 96, 128, ..., 256");\n',
        ),
        (
            LOADER,
            "    128: Sm90FwdConfig(block_n=176, stages=2, cp_async_block_n=128, softmax_chains=2),\n",
            "    96: Sm90FwdConfig(block_n=176, stages=2, cp_async_block_n=128, softmax_chains=2),\n    128: Sm90FwdConfig(block_n=176, stages=2, cp_async_block_n=128, softmax_chains=2),\n",
        ),
        (LOADER, "SM90_FWD_WIDER = {96: 128}\n", "SM90_FWD_WIDER: dict[int, int] = {}\n"),
    ],
}
