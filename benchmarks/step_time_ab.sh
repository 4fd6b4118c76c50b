#!/usr/bin/env bash
# Before/after seconds per step of every method's ACDC reduced config, side by side on one machine:
# for each method, alternately `benchmarks/step_time.py` of an older checkout (BEFORE, e.g. a
# `git worktree add ../base 2b81749`) and of this one, REPS times (A B A B), THREADS torch threads
# pinned to the first THREADS cores. Prints one line per measurement. ALSO="key=value ..." adds a
# third measurement per method: this checkout with those overrides (e.g. a memory format).
#   bash benchmarks/step_time_ab.sh ../base [REPS=2] [THREADS=2]
set -u
before=$(cd "$1" && pwd); reps=${2:-2}; threads=${3:-2}
here=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$here/.venv/bin/python}
source "$here/benchmarks/steady_step.sh"
cores=$(seq -s, 0 $((threads - 1)))
export OMP_NUM_THREADS=$threads SEMIDIFF_REALDATA=${SEMIDIFF_REALDATA:-$(cd "$here/.." && pwd)/shared/realdata}
steps() { # checkout config overrides...: prints "precision s/step"
  local src=$1; shift
  (cd "$src" && PYTHONPATH="$src/src" taskset -c "$cores" "$py" benchmarks/step_time.py "$@" --steps 6 2>/dev/null \
    | tail -1 | awk -F'|' '{gsub(/ /, "", $7); gsub(/ /, "", $8); print $7, $8}')
}
for rep in $(seq "$reps"); do
  for m in supervised mean_teacher ua_mt cps bcp diffcl protodiff; do
    read -ra extra <<< "$(steady_step_overrides "$m")"
    line="$rep $m before $(steps "$before" "configs/acdc/${m}_reduced.yaml" "${extra[@]}")"
    line+=" after $(steps "$here" "configs/acdc/${m}_reduced.yaml" "${extra[@]}")"
    if [ -n "${ALSO:-}" ]; then
      read -ra also <<< "$ALSO"
      line+=" also $(steps "$here" "configs/acdc/${m}_reduced.yaml" "${extra[@]}" "${also[@]}")"
    fi
    echo "$line"
  done
done
