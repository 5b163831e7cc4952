#!/usr/bin/env bash
# The README's fine-tuning / schedules table (issue #10) on the default model, CPU-budget protocol:
# every training gets 131,072 tokens (128 optimizer steps of 2 x 512, about 10 min on the idle 2-core
# CPU) of C4 documents 1100+; the iterative run splits them over its 4 steps.
# Runs one job at a time (two cores); each run's results.json is copied to
# experiments/results/schedules/runs/<name>/. While the file $SCHEDULES_OUT/pause exists the script
# waits before starting its next row (to free the machine for a timing). A row interrupted midway
# resumes from its checkpoint when the script runs again.
# Usage: bash experiments/run_schedules_table.sh [name...]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${SCHEDULES_OUT:-/tmp/prunelab-schedules}
keep=experiments/results/schedules/runs
budget="finetune=masked finetune.max_tokens=131072"
declare -A rows=(
  [magnitude_0.5_masked]="method=magnitude sparsity=0.5 $budget"
  [lottery_magnitude_3x0.2]="method=magnitude schedule=lottery schedule.rounds=3 schedule.rate=0.2 schedule.controls=[random,oneshot] $budget"
  [wanda_0.5_masked]="method=wanda sparsity=0.5 $budget"
  [sparsegpt_0.5_masked]="method=sparsegpt sparsity=0.5 $budget"
  [iterative_magnitude_0.6_cubic4]="method=magnitude sparsity=0.6 schedule=iterative schedule.steps=4 finetune=masked finetune.max_tokens=32768 finetune.warmup_steps=3"
  [magnitude_0.6_masked]="method=magnitude sparsity=0.6 $budget"
)
order=(lottery_magnitude_3x0.2 magnitude_0.5_masked wanda_0.5_masked sparsegpt_0.5_masked iterative_magnitude_0.6_cubic4 magnitude_0.6_masked)
[ $# -gt 0 ] && order=("$@")
mkdir -p "$out"
for name in "${order[@]}"; do
  while [ -e "$out/pause" ]; do sleep 20; done
  echo "== $(date -u +%H:%M:%S) $name: python -m prunelab experiment=cpu-budget ${rows[$name]}"
  python -m prunelab experiment=cpu-budget ${rows[$name]} hydra.run.dir="$out/$name"
  mkdir -p "$keep/$name" && cp "$out/$name/results.json" "$keep/$name/"
done
