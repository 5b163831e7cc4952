#!/usr/bin/env bash
# The README's fine-tuning / schedules table (issue #10) on the default model, CPU-budget protocol:
# every row fine-tunes 65,536 tokens (64 optimizer steps of 2 x 512) of C4 documents 1100+.
# Runs one job at a time (two cores); each run's results.json is copied to
# experiments/results/schedules/runs/<name>/. Usage: bash experiments/run_schedules_table.sh [name...]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${SCHEDULES_OUT:-/tmp/prunelab-schedules}
keep=experiments/results/schedules/runs
declare -A rows=(
  [magnitude_0.5_masked]="method=magnitude sparsity=0.5 finetune=masked"
  [lottery_magnitude_3x0.2]="method=magnitude schedule=lottery schedule.rounds=3 schedule.rate=0.2 schedule.controls=[random,oneshot] finetune=masked"
  [wanda_0.5_masked]="method=wanda sparsity=0.5 finetune=masked"
  [sparsegpt_0.5_masked]="method=sparsegpt sparsity=0.5 finetune=masked"
  [iterative_magnitude_0.6_cubic4]="method=magnitude sparsity=0.6 schedule=iterative schedule.steps=4 finetune=masked finetune.max_tokens=16384 finetune.warmup_steps=3"
  [magnitude_0.6_masked]="method=magnitude sparsity=0.6 finetune=masked"
)
order=(magnitude_0.5_masked lottery_magnitude_3x0.2 wanda_0.5_masked sparsegpt_0.5_masked iterative_magnitude_0.6_cubic4 magnitude_0.6_masked)
[ $# -gt 0 ] && order=("$@")
for name in "${order[@]}"; do
  echo "== $name: python -m prunelab experiment=cpu-budget ${rows[$name]}"
  python -m prunelab experiment=cpu-budget ${rows[$name]} hydra.run.dir="$out/$name"
  mkdir -p "$keep/$name" && cp "$out/$name/results.json" "$keep/$name/"
done
