# ruff: noqa: E501 (the kernel's source lines, quoted as they are)
"""Candidate changes for tools/ablate.py: the deterministic backward counting its dQ turns
two tiles late (PERF.md, "Where the deterministic mode's time goes"; not yet run on a GPU).

    python tools/ablate.py tools/variants/det_lag2.py -- tools/bench_backward.py --quick \
        --families sm90-det
    python tools/ablate.py tools/variants/det_lag2.py --apply det-lag2  # then the GPU tests
"""

BWD = "cuparing/kernels/sm90/bwd.cuh"

VARIANTS = {
    "det-lag2": [
        (
            BWD,
            (
                '// waits for its turn before it stages its dQ rows, and counts itself once its reductions are\n'
                "// complete, a tile later, so the wait for completion overlaps the next tile's products.\n"
            ),
            (
                '// waits for its turn before it stages its dQ rows, and counts itself once its reductions are\n'
                '// complete, two tiles later: the newest reduction stays in flight while the warp waits for the\n'
                '// one before it (a tile later, the completion wait cost ~0.9 us per tile: PERF.md).\n'
            ),
        ),
        (
            BWD,
            (
                '\n'
                "// Counts the warp's turn on a tile a tile late: by then its reductions are complete, rarely with\n"
                '// a wait.\n'
            ),
            (
                '\n'
                "// Counts the warp's turn on a tile once that tile's reduction is complete: kInFlight of the\n"
                "// warp's newer reductions (1: the last tile's, counted two tiles late; 0: none) may still run.\n"
                'template <int kInFlight>\n'
            ),
        ),
        (
            BWD,
            (
                '__device__ __forceinline__ void end_dq_turn(int* turn, int lane) {\n'
                '  if (lane == 0) bulk_wait<0>();\n'
            ),
            (
                '__device__ __forceinline__ void end_dq_turn(int* turn, int lane) {\n'
                '  if (lane == 0) bulk_wait<kInFlight>();\n'
            ),
        ),
        (
            BWD,
            (
                '    wgmma_commit();\n'
                "    if constexpr (kOrdered) {  // the last tile's turn: its adds have long been complete\n"
                '      if (it > 0) end_dq_turn(dq_turn<Tr>(p, m_first + it - 1), lane);\n'
            ),
            (
                '    wgmma_commit();\n'
                "    if constexpr (kOrdered) {  // the turn of the tile before last (the last one's may still add)\n"
                '      if (it > 1) end_dq_turn<1>(dq_turn<Tr>(p, m_first + it - 2), lane);\n'
            ),
        ),
        (
            BWD,
            (
                '      const u32 dq_stage = s_dq0 + (4 * c + wq) * Tr::kDqWarpBytes;\n'
                '      if (!kOrdered && lane == 0) bulk_wait_read<0>();  // ordered: complete since end_dq_turn\n'
            ),
            (
                '      const u32 dq_stage = s_dq0 + (4 * c + wq) * Tr::kDqWarpBytes;\n'
                '      if (lane == 0) bulk_wait_read<0>();  // the last reduction has read the staging\n'
            ),
        ),
        (
            BWD,
            (
                '  if constexpr (kOrdered) {\n'
                '    if (it > 0) end_dq_turn(dq_turn<Tr>(p, m_first + it - 1), lane);\n'
            ),
            (
                '  if constexpr (kOrdered) {\n'
                '    if (it > 1) end_dq_turn<0>(dq_turn<Tr>(p, m_first + it - 2), lane);\n'
                '    if (it > 0) end_dq_turn<0>(dq_turn<Tr>(p, m_first + it - 1), lane);\n'
            ),
        ),
    ],
}
