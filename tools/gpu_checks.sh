#!/usr/bin/env bash
# On a GPU machine: install, compile check, GPU tests, benchmarks. Logs go to the directory named
# by CUPARING_LOG_DIR if set, else ./out.
# Usage: bash tools/gpu_checks.sh
#            [single|multi|bench|bwd|ring|profile|epilogue|candidate|consumers|ringbwd|gather|dkdv|
#             convert|all]
#            [pytest -k expression]
#   candidate: a kernel change (a branch checked out here) against the tree in .snap/main (made
#        beside it: git archive main | tar -x -C .snap/main; carried): the compile check, the
#        sm90 kernel tests forward and backward in four shards and the NaN / inf tests, then
#        bench_attention --quick and bench_backward --quick of both trees, interleaved (~9.5 min)
#   profile: where the Hopper kernels' time goes around their main loops: the CTA timelines of
#        the forward, the backward and a packed batch's last ring step (cta_profile.py) and the
#        deterministic backward's turns (turn_profile.py); the backward calls' launches one by
#        one (profile_ring_steps.py --backward: one GPU, full and causal; a packed ring) (~7 min)
#   epilogue: the forward epilogue's ablations (variants/epilogue_cost.py) on a packed ring step
#        and the quick table, and the merge's L2 prefetch (variants/fwd_merge_prefetch.py) on the
#        ring step (~9 min)
#   consumers: head dim 64's three-consumer default (PERF.md v8): its kernel tests in four
#        shards and the NaN / inf forward tests, then its rows beside the two-consumer tile
#        and the two-stage variant, one process each (~6 min)
#   ringbwd: (2+ GPUs) a change of the ring backward's schedule (this tree) against the tree in
#        .snap/main (git archive main | tar -x -C .snap/main; carried): the ring and repeat
#        tests on one GPU, the multi-GPU reference and race tests, then bench_ring --backward
#        (8k tokens/GPU, H/Hkv 32/8) and bench_varlen --backward of both trees in turn, both
#        transports: compare bwd ms (the no-comm baseline pays the new clears and adds too)
#        (~9 min)
#   gather: the gathered ring (CUPARING_KV_GATHER=1: the other ranks' K/V at once, two
#        launches a rank): its GPU tests, the kernels of each simulated rank against the ring's (one GPU:
#        profile_ring_steps, packed documents, forward and backward, 4 ranks), and with 2+
#        GPUs its multi-GPU tests and bench_varlen with and without it (torch inputs, so repeats
#        run the kept plans; NCCL and the copy engines) (~8 min on 2 GPUs)
#   bwd: the backward kernel tests of both families (NaN / inf next to mask edges, the
#        deterministic mode, caller-owned gradients, torch and JAX autograd included) and
#        bench_backward (sm90, sm90 deterministic, sm80, SDPA; head dims 128 and 96)
#   ring: (2+ GPUs) ring calls at pointer level and as CUDA graphs: the repeat and ring tests
#        on one GPU, the multi-GPU suite (NCCL, IPC with device flags and with the host
#        handshake: killed rank included), the host cost per ring call on both transports with
#        and without graphs (a cProfile of the IPC ring's), and keff at 2k tokens/GPU on both
#   dkdv: what the Hopper backward's float32 dK / dV adds cost (variants/bwd_dkdv_cost.py, both
#        variants timed against this tree on packed ring steps of four and two ranks and on
#        bench_backward's quick table), then the `dkdv-v4` candidate applied to this copy of the
#        tree and its backward tests (GQA and ring steps take the adds; NaN / inf included) (~7 min)
#   convert: the backward's small kernels (variants/dq_convert.py: the dq conversion a CTA per
#        chunk; variants/delta_rows.py: delta with several rows per warp; variants/
#        elementwise_v4.py: the ring's adds, add-and-cast and copy on 16-byte accesses), each
#        timed against this tree on the backward launches of one GPU (full and causal) and of
#        a 2-rank ring (profile_ring_steps), then all three applied to this copy of the tree
#        and the backward tests run (~7 min)
set -uo pipefail
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
out="${CUPARING_LOG_DIR:-out}"
mkdir -p "$out"
what="${1:-single}"
filter="${2:-}"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv
pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v -i warning | tail -2
# (and importable without the install: worker processes import the package by name)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python -m cuparing
run() { echo "== $*"; "$@"; echo "== rc=$?"; }
if [[ $what == single || $what == all ]]; then
  run python tools/compile_check.py 2>&1 | tail -14
  # four processes at once: the tests' time goes mostly to host work (float64 references)
  run python tools/sharded_pytest.py --shards 4 --timeout 420 --log-dir "$out/gpu_tests" -- \
    --maxfail=8 tests/test_gpu_attention.py ${filter:+-k "$filter"} 2>&1 | tee "$out/gpu_tests.log"
fi
if [[ $what == multi || $what == all ]]; then
  run timeout 420 python -m pytest -q -rf --maxfail=4 tests/test_multigpu.py \
    ${filter:+-k "$filter"} 2>&1 | tee "$out/multigpu_tests.log" | tail -40
fi
if [[ $what == bwd || $what == all ]]; then
  run python tools/sharded_pytest.py --shards 4 --timeout 420 --log-dir "$out/bwd_tests" -- \
    --maxfail=4 tests/test_gpu_attention.py \
    -k "(backward_kernel or deterministic or caller or torch)${filter:+ and ($filter)}" 2>&1 \
    | tee "$out/bwd_tests.log"
  run timeout 200 python -m pytest -q -rf --maxfail=4 tests/test_jax.py -k gpu 2>&1 \
    | tee "$out/bwd_jax.log" | tail -8
  run timeout 200 python -m pytest -q -rf --maxfail=4 tests/test_gpu_nonfinite.py \
    -k "backward${filter:+ and ($filter)}" 2>&1 | tee "$out/bwd_nonfinite.log" | tail -20
  run timeout 200 python tools/bench_backward.py --quick --families sm90,sm90-det,sm80 \
    --json "$out/bench_backward.json" 2>&1 | tee "$out/bench_backward.log"
  run timeout 120 python tools/bench_backward.py --quick --headdim 96 --families sm90,sm90-det,sm80 \
    --json "$out/bench_backward96.json" 2>&1 | tee "$out/bench_backward96.log"
fi
if [[ $what == ring || $what == all ]]; then
  run timeout 420 python -m pytest -q -rf --maxfail=4 tests/test_gpu_attention.py \
    -k "(repeat or ring or caller)${filter:+ and ($filter)}" 2>&1 | tee "$out/ring_single.log" | tail -8
  run timeout 560 python -m pytest -q -rf --maxfail=4 tests/test_multigpu.py 2>&1 \
    | tee "$out/ring_multi.log" | tail -12
  # repeats replay CUDA graphs (NCCL, and the copy-engine ring's device flags); *-eager: the
  # same without (CUPARING_RING_GRAPHS=0); the ipc run also writes a cProfile of each call
  for transport in nccl nccl-eager ipc ipc-eager; do
    run env CUPARING_TRANSPORT=${transport%-eager} \
      CUPARING_RING_GRAPHS=$([[ $transport == *-eager ]] && echo 0 || echo 1) \
      timeout 150 python -m cuparing.launch --nproc-per-node 2 tools/bench_overhead.py \
      --ring-only --calls 300 $([[ $transport == ipc ]] && echo --profile "$out/prof_ipc") \
      2>&1 | tee "$out/ring_overhead_$transport.log" | grep -A3 "ring ("
  done
  # the ring forward at 2k tokens/GPU against its kernels back to back on one GPU (keff, keff5)
  for transport in nccl ipc; do
    run timeout 150 python -m cuparing.launch --nproc-per-node 2 tools/bench_ring.py \
      --tokens 2048 --heads 32/8 --no-torch --inputs torch --transport $transport 2>&1 \
      | tee "$out/ring_2k_$transport.log" | tail -6
  done
fi
if [[ $what == bench || $what == all ]]; then
  run timeout 300 python tools/bench_attention.py --quick --json "$out/bench_attention.json" \
    2>&1 | tee "$out/bench_attention.log"
fi
if [[ $what == profile || $what == all ]]; then
  run timeout 120 python tools/cta_profile.py 2>&1 | tee "$out/cta_profile_fwd.log"
  run timeout 120 python tools/cta_profile.py --backward 2>&1 | tee "$out/cta_profile_bwd.log"
  run timeout 120 python tools/cta_profile.py --ring 2 --documents 2>&1 \
    | tee "$out/cta_profile_ring.log"
  run timeout 120 python tools/turn_profile.py 2>&1 | tee "$out/turn_profile.log"
  # the one-GPU backward call's launches (bench_backward's shape) and a packed ring backward's
  for mask in --full ""; do
    run timeout 120 python tools/profile_ring_steps.py --backward --ranks 1 --heads 32/32 \
      --layouts contiguous $mask 2>&1 | grep -v -i warn | tee -a "$out/backward_launches.log"
  done
  run timeout 120 python tools/profile_ring_steps.py --backward --documents --ranks 2 \
    --layouts zigzag 2>&1 | grep -v -i warn | tee -a "$out/backward_launches.log"
fi
if [[ $what == candidate ]]; then
  # (no compile check: the CPU suite builds every instantiation; the steps fit one 600 s call)
  run python tools/sharded_pytest.py --shards 4 --timeout 250 --log-dir "$out/candidate_tests" \
    -- --maxfail=8 tests/test_gpu_attention.py \
    -k "${filter:-sm90 or direct or deterministic or caller or replays or packed_documents}" \
    2>&1 | tee "$out/candidate_tests.log"
  run python tools/sharded_pytest.py --shards 4 --timeout 90 \
    --log-dir "$out/candidate_nonfinite" -- --maxfail=8 tests/test_gpu_nonfinite.py -k "sm90 or direct or forward or ring" 2>&1 \
    | tee "$out/candidate_nonfinite.log"
  if [[ -d .snap/main/cuparing ]]; then
    run timeout 110 python tools/ablate.py --tree main=.snap/main --lines 6 --rounds 1 \
      --out "$out/candidate_fwd" -- tools/bench_attention.py --quick --families sm90 2>&1 \
      | tee "$out/candidate_fwd.log"
    run timeout 120 python tools/ablate.py --tree main=.snap/main --lines 4 \
      --out "$out/candidate_bwd" -- tools/bench_backward.py --quick --families sm90,sm90-det \
      2>&1 | tee "$out/candidate_bwd.log"
  fi
fi
if [[ $what == consumers ]]; then
  # head dim 64's default is the three-consumer tile (192x112, three stages: PERF.md v8); its
  # tests, then its rows beside the two-consumer tile it replaced and its two-stage variant
  run python tools/sharded_pytest.py --shards 4 --timeout 240 \
    --log-dir "$out/consumers_tests" -- --maxfail=8 tests/test_gpu_attention.py \
    -k "sm90 and (tile_edges or matches_reference or resources or ring_on_one_gpu or fully_masked or packed_documents)" \
    2>&1 | tee "$out/consumers_tests.log"
  run timeout 120 python -m pytest -q -rf --maxfail=4 \
    tests/test_gpu_nonfinite.py -k forward 2>&1 | tee "$out/consumers_nonfinite.log" | tail -4
  for tiles in "" "64:192,2,128,2" "64:112,2,112,2,192" ""; do
    echo "== CUPARING_SM90_TILES=$tiles"
    CUPARING_SM90_TILES=$tiles timeout 90 python tools/bench_attention.py --families sm90 \
      --shapes 64:16384:full,64:16384:causal,64:8192:causal 2>&1 | grep -v -i warn \
      | tee -a "$out/consumers_rows.log" | tail -3
  done
fi
if [[ $what == epilogue || $what == all ]]; then
  run timeout 200 python tools/ablate.py tools/variants/epilogue_cost.py --lines 4 \
    --out "$out/ablate_epilogue_ring" -- tools/profile_ring_steps.py --documents --ranks 2 \
    --layouts zigzag 2>&1 | grep -v -i warn | tee "$out/ablate_epilogue_ring.log"
  run timeout 150 python tools/ablate.py tools/variants/fwd_merge_prefetch.py --lines 4 \
    --out "$out/ablate_prefetch_ring" -- tools/profile_ring_steps.py --documents --ranks 2 \
    --layouts zigzag 2>&1 | grep -v -i warn | tee "$out/ablate_prefetch_ring.log"
  run timeout 240 python tools/ablate.py tools/variants/epilogue_cost.py --lines 6 --rounds 1 \
    --out "$out/ablate_epilogue_quick" -- tools/bench_attention.py --quick --families sm90 2>&1 \
    | tee "$out/ablate_epilogue_quick.log"
fi
if [[ $what == ringbwd ]]; then
  run timeout 200 python -m pytest -q -rf --maxfail=4 tests/test_gpu_attention.py \
    -k "(repeat or ring or caller or deterministic)${filter:+ and ($filter)}" 2>&1 \
    | tee "$out/ringbwd_single.log" | tail -4
  run timeout 200 python -m pytest -q -rf --maxfail=2 tests/test_multigpu.py \
    -k "matches or race" 2>&1 | tee "$out/ringbwd_multi.log" | tail -4
  for round in 1 2; do
    for tree in . .snap/main; do
      [[ -d $tree/cuparing ]] || continue
      for transport in nccl ipc; do
        echo "== round $round tree $tree $transport"
        (cd "$tree" && PYTHONPATH="$PWD" CUPARING_TRANSPORT=$transport timeout 120 \
          python -m cuparing.launch --nproc-per-node 2 tools/bench_ring.py --tokens 8192 \
          --heads 32/8 --backward --no-torch --inputs torch 2>&1 | grep -v -i warn | tail -5) \
          | tee -a "$out/ringbwd_bench.log"
      done
      echo "== round $round tree $tree varlen"
      (cd "$tree" && PYTHONPATH="$PWD" timeout 120 python -m cuparing.launch \
        --nproc-per-node 2 tools/bench_varlen.py --layouts zigzag --inputs torch --no-torch \
        --backward 2>&1 | grep -v -i warn | tail -3) | tee -a "$out/ringbwd_varlen.log"
    done
  done
fi
if [[ $what == gather ]]; then
  run python tools/compile_check.py 2>&1 | grep -E "gather|add_f32|FAIL" | head -6
  run timeout 300 python -m pytest -q -rf --maxfail=4 tests/test_gpu_attention.py \
    -k "gathered${filter:+ and ($filter)}" 2>&1 | tee "$out/gather_tests.log" | tail -6
  for switch in 0 1 0 1; do
    for direction in "" --backward; do
      echo "== CUPARING_KV_GATHER=$switch $direction"
      CUPARING_KV_GATHER=$switch timeout 120 python tools/profile_ring_steps.py --documents \
        --ranks 4 --layouts zigzag $direction 2>&1 | grep -v -i warn \
        | tee -a "$out/gather_profile_$switch.log" | tail -7
    done
  done
  if (( $(nvidia-smi -L | wc -l) >= 2 )); then
    run timeout 300 python -m pytest -q -rf --maxfail=2 tests/test_multigpu.py \
      -k gathered 2>&1 | tee "$out/gather_multigpu.log" | tail -6
    gpus=$(nvidia-smi -L | wc -l)
    for ranks in 2 $(( gpus >= 4 ? 4 : 2 )); do
      for transport in nccl ipc; do
        for switch in 0 1; do
          echo "== C=$ranks $transport CUPARING_KV_GATHER=$switch"
          CUPARING_KV_GATHER=$switch CUPARING_TRANSPORT=$transport timeout 150 \
            python -m cuparing.launch --nproc-per-node "$ranks" tools/bench_varlen.py \
            --layouts zigzag,packed --inputs torch --no-torch --backward 2>&1 | grep -v -i warn \
            | tee -a "$out/gather_varlen.log" | tail -6
        done
      done
    done
  fi
fi
if [[ $what == dkdv ]]; then
  for ranks in 4 2; do
    run timeout 200 python tools/ablate.py tools/variants/bwd_dkdv_cost.py --rounds 2 --lines 8 \
      --out "$out/dkdv_ring_$ranks" -- tools/profile_ring_steps.py --documents --ranks "$ranks" \
      --layouts zigzag --backward 2>&1 | grep -v -i warn | tee "$out/dkdv_ring_$ranks.log"
  done
  run timeout 200 python tools/ablate.py tools/variants/bwd_dkdv_cost.py --rounds 2 --lines 5 \
    --out "$out/dkdv_quick" -- tools/bench_backward.py --quick --families sm90 2>&1 \
    | tee "$out/dkdv_quick.log"
  # (this copy of the tree only: the candidate's text replacements written into it)
  run python tools/ablate.py tools/variants/bwd_dkdv_cost.py --apply dkdv-v4
  run python tools/sharded_pytest.py --shards 4 --timeout 240 --log-dir "$out/dkdv_tests" -- \
    --maxfail=4 tests/test_gpu_attention.py \
    -k "gqa or ring_on_one_gpu or packed_document or deterministic or backward_kernel" 2>&1 \
    | tee "$out/dkdv_tests.log"
  run timeout 200 python -m pytest -q -rf --maxfail=4 tests/test_gpu_nonfinite.py -k backward \
    2>&1 | tee "$out/dkdv_nonfinite.log" | tail -4
fi
if [[ $what == convert ]]; then
  for variant in dq_convert delta_rows elementwise_v4; do
    for shape in "--ranks 1 --layouts contiguous --full" "--ranks 1 --layouts contiguous" \
                 "--ranks 2 --layouts zigzag"; do
      run timeout 150 python tools/ablate.py "tools/variants/$variant.py" --rounds 2 --lines 5 \
        --out "$out/convert_$variant" -- tools/profile_ring_steps.py --backward $shape 2>&1 \
        | grep -v -i warn | tee -a "$out/convert_$variant.log"
    done
  done
  # (this copy of the tree only: the candidates written into it, then their tests)
  run python tools/ablate.py tools/variants/dq_convert.py --apply dq-chunk-ctas
  run python tools/ablate.py tools/variants/delta_rows.py --apply delta-rows-per-warp
  run python tools/ablate.py tools/variants/elementwise_v4.py --apply elementwise-v4
  run python tools/sharded_pytest.py --shards 4 --timeout 240 --log-dir "$out/convert_tests" -- \
    --maxfail=4 tests/test_gpu_attention.py \
    -k "delta or backward_kernel or ring_backward or deterministic or leave_for_home or repeat" \
    2>&1 | tee "$out/convert_tests.log"
fi
