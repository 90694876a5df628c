#!/usr/bin/env bash
# Val-only comparison of inference and specialist settings on a finished typefaces run
# (docs/RESULTS.md, typefaces section). Inference variants reuse RUN's specialists (the routed
# ones rewrite their cards' routed fit); training
# variants retrain them in OUT/<name> from RUN's generalist and clusters.
#   bash scripts/typefaces-sweep.sh configs/typefaces-1000.yaml runs/typefaces-1000 runs/tf1000-sweep
set -euo pipefail
CONFIG=${1:-configs/typefaces-1000.yaml}
RUN=${2:-runs/typefaces-1000}
OUT=${3:-runs/tf1000-sweep}
S=${SPECIALISTS:-.venv/bin/specialists}
C="--config $CONFIG"
. "$(dirname "$0")/sweep-lib.sh"
sweep_init "$OUT"

evaluate() {  # name, dir, overrides...
  local name=$1 dir=$2; shift 2
  sweep_done "$name" && return 0
  $S evaluate $C --set run_dir="$dir" --set inference.control=false --split val "$@" > "$OUT/$name.txt"
  cp "$(run_path "$dir" metrics_val)" "$OUT/$name.json"
  sweep_row "$name" "$*" "$OUT/$name.json"
}

train() {  # name, overrides...: retrain the specialists with the overrides, then evaluate on val
  local name=$1; shift
  local dir="$OUT/$name"
  sweep_done "$name" && return 0
  mkdir -p "$dir"
  start_from "$RUN" "$dir"
  $S train-specialists $C --set run_dir="$dir" "$@"
  evaluate "$name" "$dir" "$@"
}

for bias in fit prior none; do
  for n in 1 2 3; do
    evaluate "bias-$bias-top-$n" "$RUN" --set inference.bias=$bias --set inference.top_n=$n
  done
done
# The correction fitted on the val images routed to each specialist depends on top-n: refit the
# cards of RUN's specialists for each n (weights untouched), then evaluate.
for n in 1 2 3; do
  sweep_done "bias-routed-top-$n" && continue
  $S train-specialists $C --set run_dir="$RUN" --refit-bias --set inference.top_n=$n > /dev/null
  evaluate "bias-routed-top-$n" "$RUN" --set inference.bias=routed --set inference.top_n=$n
done
for v in ${TRAIN_VARIANTS:-soft-0.5}; do
  case $v in
    soft-0.5) train soft-0.5 --set specialists.soft_target_weight=0.5 ;;
    steps-800) train steps-800 --set specialists.steps=800 ;;
    lr-0.03) train lr-0.03 --set specialists.lr=0.03 ;;
    full) train full --set specialists.head=full ;;
  esac
done
column -t -s $'\t' "$TSV"
