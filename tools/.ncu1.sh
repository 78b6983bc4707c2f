export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
cat > /tmp/one.py <<'PY'
import cupy, ml_dtypes, cuparing as cr
rng = cupy.random.default_rng(0)
q, k, v = (rng.standard_normal((1, 8192, 32, 128), dtype=cupy.float32).astype(ml_dtypes.bfloat16) for _ in range(3))
for _ in range(2): cr.attention(q, k, v)
cupy.cuda.Device().synchronize()
PY
which ncu || ls /opt/nvidia/nsight-compute/*/ncu
NCU=$(which ncu || ls /opt/nvidia/nsight-compute/*/ncu | head -1)
timeout 400 $NCU --clock-control none -k regex:cuparing_fwd -c 1 --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section Occupancy --section SchedulerStats --section WarpStateStats --section InstructionStats --section LaunchStats python /tmp/one.py > $OUT/ncu128.txt 2>&1
grep -v "^==PROF==" $OUT/ncu128.txt | grep -E "Throughput|Pipe|Stall|Warp Cycles|Occupancy|Bank|Issue|Eligible|Active Warps|Registers|Shared Memory|Duration|Executed Ipc|No Eligible|One or More|L2 Hit|L1/TEX Hit|DRAM" | head -60
