#!/usr/bin/env bash
# The Fashion-MNIST specialist variants compared in docs/RESULTS.md, all from one trained
# generalist and one clusters.json (RUN holds both), each in its own run directory.
# Settings are compared on val; the chosen one is then evaluated on test.
#   bash scripts/fashion-mnist-variants.sh runs/fashion-mnist
set -euo pipefail
RUN=${1:-runs/fashion-mnist}
OUT=${2:-$RUN-variants}
C="--config configs/fashion-mnist.yaml"
S=${SPECIALISTS:-.venv/bin/specialists}
. "$(dirname "$0")/sweep-lib.sh"
mkdir -p "$OUT"
variant() {  # name, overrides...
  local name=$1; shift
  local dir="$OUT/$name"
  mkdir -p "$dir"
  start_from "$RUN" "$dir"
  $S train-specialists $C --set run_dir="$dir" "$@"
  for bias in prior fit none; do
    $S evaluate $C --set run_dir="$dir" --set inference.bias=$bias --split val "$@" > "$dir/val-$bias.txt"
    cp "$(run_path "$dir" metrics_val)" "$dir/val-$bias.json"
  done
}
variant dustbin                --set specialists.head=dustbin --set specialists.soft_target_weight=0
variant dustbin-soft           --set specialists.head=dustbin --set specialists.soft_target_weight=0.5
variant full                   --set specialists.head=full    --set specialists.soft_target_weight=0
