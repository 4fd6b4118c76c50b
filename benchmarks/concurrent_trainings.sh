#!/usr/bin/env bash
# Two trainings started together against the same two one after the other (issue 24): each
# prints its s/step (timing.json: trainer wall time / steps) and the threads it ran with.
#   bash benchmarks/concurrent_trainings.sh [STEPS=300] [CONFIG=configs/acdc/supervised_reduced.yaml]
set -u
steps=${1:-300}; config=${2:-configs/acdc/supervised_reduced.yaml}
here=$(cd "$(dirname "$0")/.." && pwd); cd "$here"
export SEMIDIFF_REALDATA=${SEMIDIFF_REALDATA:-$(cd .. && pwd)/shared/realdata}
out=$(mktemp -d)
run() { .venv/bin/semidiff train "$config" experiment.output_dir="$out" experiment.name="$1" experiment.seed="$2" \
          train.max_steps="$steps" train.val_every="$steps" train.progress_bar=false > "$out/$1.log" 2>&1; }
report() { for name in "$@"; do python3 -c "import json,sys; t=json.load(open(sys.argv[1])); \
  print(f\"{sys.argv[2]:12s} {t['wall_seconds']/t['steps']:.3f} s/step, {t.get('threads')} thread(s), {t.get('precision')}\")" \
  "$out/$name/timing.json" "$name"; done; }
run alone_0 0; run alone_1 1
run together_0 0 & run together_1 1 & wait
report alone_0 alone_1 together_0 together_1
rm -rf "$out"
