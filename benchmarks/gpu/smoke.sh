#!/usr/bin/env bash
# GPU check of every method (issue 24): isolated-from-data step time and peak CUDA memory of each
# method's ACDC reduced config (7 processes at once on one GPU), then three short real trainings
# through `semidiff train` (Lightning, loader workers, validation, final evaluation) on the GPU.
# Run from the repository root on the device machine; writes under ${OUT:-/tmp/out}.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source benchmarks/gpu/setup_device.sh || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, lightning, monai; print('torch', torch.__version__, 'lightning', lightning.__version__, 'monai', monai.__version__)" | tee -a "$OUT/gpu.txt"
nproc | tee -a "$OUT/gpu.txt"
t0=$(date +%s)
for m in supervised mean_teacher ua_mt cps bcp diffcl protodiff; do
  extra=""; [ $m = protodiff ] && extra="method.options.warmup=0"; [ $m = bcp ] && extra="method.options.pretrain_steps=0"
  python3 benchmarks/step_time.py configs/acdc/${m}_reduced.yaml train.accelerator=gpu $extra --steps 20 --device cuda \
    > "$OUT/step_$m.md" 2> "$OUT/step_$m.err" &
done
wait
echo "step times (7 at once): $(( $(date +%s) - t0 )) s"
cat "$OUT"/step_*.md | grep -v '^| config\|^|---' ; tail -n 3 "$OUT"/step_*.err
t0=$(date +%s)
common="train.accelerator=gpu data.num_workers=2 train.progress_bar=false experiment.output_dir=/tmp/runs"
semidiff_train() { python3 -m semidiff.cli train "$@" $common > "$OUT/train_$(basename $1 .yaml).log" 2>&1; }
semidiff_train configs/acdc/supervised_reduced.yaml train.max_steps=600 train.val_every=200 &
semidiff_train configs/acdc/diffcl_reduced.yaml train.max_steps=200 train.val_every=100 &
semidiff_train configs/acdc/protodiff_reduced.yaml train.max_steps=200 train.val_every=100 &
wait
echo "3 trainings at once: $(( $(date +%s) - t0 )) s"
for f in "$OUT"/train_*.log; do echo "== $f"; grep -E "trained|mean Dice|Error|error" "$f" | head -8; done
for r in /tmp/runs/*; do echo "$r $(cat $r/timing.json 2>/dev/null | tr -d '\n ')"; done
