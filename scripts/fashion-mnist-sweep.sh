#!/usr/bin/env bash
# The val sweep behind the Fashion-MNIST settings in docs/RESULTS.md (issue: end to end).
# One trained generalist (RUN holds it and its clusters.json); each variant changes one setting of
# the default and is judged on the val split only: ensemble minus generalist correct on val, McNemar p.
#   bash scripts/fashion-mnist-sweep.sh runs/fashion-mnist/seed-1 runs/fm-sweep
# Writes OUT/sweep.tsv (one line per variant). Finished variants are skipped when rerun.
set -euo pipefail
RUN=${1:-runs/fashion-mnist/seed-1}
OUT=${2:-runs/fm-sweep}
C="--config configs/fashion-mnist.yaml"
S=${SPECIALISTS:-.venv/bin/specialists}
. "$(dirname "$0")/sweep-lib.sh"
sweep_init "$OUT"

variant() {  # name, overrides... (clustering.* overrides recluster in the variant's directory)
  local name=$1; shift
  local dir="$OUT/$name"
  sweep_done "$name" && return 0
  mkdir -p "$dir"
  start_from "$RUN" "$dir"
  if [[ "$*" == *clustering.* ]]; then
    $S cluster $C --set run_dir="$dir" --force "$@"
  fi
  $S train-specialists $C --set run_dir="$dir" "$@"
  $S evaluate $C --set run_dir="$dir" --set inference.control=false --split val "$@" > "$dir/val.txt"
  sweep_row "$name" "$*" "$(run_path "$dir" metrics_val)"
}

variant default
variant f-0.3           --set specialists.special_fraction=0.3
variant f-0.7           --set specialists.special_fraction=0.7
variant lr-0.003        --set specialists.lr=0.003
variant lr-0.03         --set specialists.lr=0.03
variant steps-250       --set specialists.steps=250
variant steps-1000      --set specialists.steps=1000
variant soft-0.5        --set specialists.soft_target_weight=0.5
variant m3              --set clustering.num_specialists=3
variant m4-overlap-k4   --set clustering.num_specialists=4 --set clustering.classes_per_specialist=4
# top-n routing only changes inference: reuse the default specialists.
for n in 2 3; do
  name=top-$n
  sweep_done "$name" && continue
  $S evaluate $C --set run_dir="$OUT/default" --set inference.control=false --set inference.top_n=$n \
     --split val > "$OUT/default/val-top-$n.txt"
  cp "$(run_path "$OUT/default" metrics_val)" "$OUT/default/val-top-$n.json"
  sweep_row "$name" "--set inference.top_n=$n" "$OUT/default/val-top-$n.json"
done
column -t -s $'\t' "$TSV"
