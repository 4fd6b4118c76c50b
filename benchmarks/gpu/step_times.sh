#!/usr/bin/env bash
# Every method's step time and peak CUDA memory on the GPU (issue 24): benchmarks/step_time.py on
# each ACDC reduced config, all at once (one CPU thread each), 20 timed steps; BCP in self-training,
# ProtoDiff after warm-up. Run after `source benchmarks/gpu/setup_device.sh`; writes $OUT/steps.md.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source benchmarks/steady_step.sh
t0=$(date +%s)
for m in supervised mean_teacher ua_mt cps bcp diffcl protodiff protodiff_unet; do
  OMP_NUM_THREADS=1 timeout 100 python3 benchmarks/step_time.py configs/acdc/${m}_reduced.yaml train.accelerator=gpu $(steady_step_overrides $m) \
    --steps 20 --device cuda > "/tmp/step_$m.md" 2> "/tmp/step_$m.err" &
done
wait
echo "step times (8 at once): $(( $(date +%s) - t0 )) s"
{ cat /tmp/step_*.md; for f in /tmp/step_*.err; do echo "== $f"; tail -n 3 "$f"; done; } > "$OUT/steps.md"
