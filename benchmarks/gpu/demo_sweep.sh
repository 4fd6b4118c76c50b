#!/usr/bin/env bash
# Demo-protocol sweep on the GPU (issue 27): supervised and ProtoDiff variants, seeds 0-2, in parallel.
# Session 17 ran it with 100 s per cell and 15 cells at once: every supervised cell finished (36 s), every
# ProtoDiff cell was stopped before 500 steps. Give a cell 400 s, or run fewer at once.
set -u; OUT=${OUT:-/tmp/out}; mkdir -p $OUT; T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
# The data once, before the cells start at once (each would write it where it is missing).
python3 -c "from pathlib import Path; from semidiff.demo import write_demo_data; write_demo_data(Path('/tmp/sw/data'))" || exit 1
# cell DEADLINE NAME METHOD SEED STEPS [method option=value ...]
cell() { local deadline=$1 name=$2 method=$3 seed=$4 steps=$5; shift 5
  timeout $deadline python3 benchmarks/demo_cell.py /tmp/sw $name $method $seed $steps train.accelerator=gpu \
    $(for kv in "$@"; do echo method.options.$kv; done) > /tmp/log_$name.txt 2>&1; grep RESULT /tmp/log_$name.txt >> $OUT/sweep.jsonl || tail -3 /tmp/log_$name.txt >> $OUT/errors.txt; }
for s in 0 1 2; do
  cell 400 sup_s$s supervised $s 500 &
  cell 400 p0_s$s protodiff $s 500 confidence_threshold=0.8 lambda_u=0.5 warmup=0.1 &
  cell 400 p1_s$s protodiff $s 500 confidence_threshold=0.8 lambda_u=0.5 warmup=0.4 &
  cell 400 p2_s$s protodiff $s 500 confidence_threshold=0.9 lambda_u=1.0 warmup=0.4 &
  cell 400 p3_s$s protodiff $s 500 confidence_threshold=0.95 lambda_u=1.0 warmup=0.1 &
done
wait; echo "wave 1 done at $(( $(date +%s) - T0 )) s" | tee -a $OUT/sweep.log
left=$(( 560 - ($(date +%s) - T0) ))
if [ $left -gt 60 ]; then
  for s in 0 1 2; do
    cell $left sup1k_s$s supervised $s 1000 &
    cell $left p1k1_s$s protodiff $s 1000 confidence_threshold=0.8 lambda_u=0.5 warmup=0.4 &
    cell $left p1k2_s$s protodiff $s 1000 confidence_threshold=0.9 lambda_u=1.0 warmup=0.4 &
  done
  wait; echo "wave 2 done at $(( $(date +%s) - T0 )) s" | tee -a $OUT/sweep.log
fi
cat $OUT/sweep.jsonl | cut -c1-200
