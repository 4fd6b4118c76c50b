#!/usr/bin/env bash
# One device call for issue 23 (and 24's GPU check): the acdc_gpu_5k bench, its 12 cells at once on
# one GPU (under CUDA MPS when it starts, so the cells' small kernels share the GPU instead of
# time-slicing it) until a deadline, then every method's step time and peak memory on the GPU.
# Run from the repository root on the device machine, with .whl and .gpudata carried
# (setup_device.sh says how they are made):  bash benchmarks/gpu/acdc_grid.sh [DEADLINE_S [BENCH_CONFIG]]
# (BENCH_CONFIG: default configs/bench/acdc_gpu_5k.yaml; STEP_TIMES=0 skips the step-time check)
# Back under $OUT: gpu.txt (machine, MPS, wall times), bench.log, dmon.txt (GPU load every 5 s),
# runs.tgz (every cell's run folder and record without checkpoints, finished or not), steps.md.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
DEADLINE=${1:-420}
BENCH=${2:-configs/bench/acdc_gpu_5k.yaml}
NAME=$(basename "$BENCH" .yaml)
source benchmarks/gpu/setup_device.sh || exit 1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, lightning, monai; print('torch', torch.__version__, 'lightning', lightning.__version__, 'monai', monai.__version__)"
  echo "cores $(nproc)"; } 2>&1 | tee "$OUT/gpu.txt"
if command -v nvidia-cuda-mps-control >/dev/null && nvidia-cuda-mps-control -d; then
  if timeout 60 python3 -c "import torch; print('MPS client ok', float(torch.ones(8, device='cuda').sum()))" >> "$OUT/gpu.txt" 2>&1; then
    echo "MPS on" | tee -a "$OUT/gpu.txt"
  else echo quit | nvidia-cuda-mps-control; echo "MPS off: its client failed" | tee -a "$OUT/gpu.txt"; fi
else echo "MPS not available" | tee -a "$OUT/gpu.txt"; fi
export OMP_NUM_THREADS=1
nvidia-smi dmon -s um -d 5 > "$OUT/dmon.txt" 2>&1 &
dmon=$!
t0=$(date +%s)
# timeout signals its whole process group: the bench and the cells it started.
timeout "$DEADLINE" python3 -m semidiff.cli bench "$BENCH" > "$OUT/bench.log" 2>&1
echo "bench: exit $? after $(( $(date +%s) - t0 )) s (deadline $DEADLINE s)" | tee -a "$OUT/gpu.txt"
kill $dmon 2>/dev/null
sleep 2
tar czf "$OUT/runs.tgz" --exclude=checkpoints --exclude=tensorboard --exclude='*.npz' \
  "benches/$NAME" benchmarks/results/acdc_gpu_5k 2>> "$OUT/gpu.txt"
[ "${STEP_TIMES:-1}" = 0 ] || bash benchmarks/gpu/step_times.sh | tee -a "$OUT/gpu.txt"
