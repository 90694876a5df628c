#!/usr/bin/env bash
# Val-only comparison of inference and specialist settings on a finished typefaces run
# (docs/RESULTS.md, typefaces section). Inference variants reuse RUN's specialists; training
# variants retrain them in OUT/<name> from RUN's generalist and clusters.
#   bash scripts/typefaces-sweep.sh configs/typefaces-1000.yaml runs/typefaces-1000 runs/tf1000-sweep
set -euo pipefail
CONFIG=${1:-configs/typefaces-1000.yaml}
RUN=${2:-runs/typefaces-1000}
OUT=${3:-runs/tf1000-sweep}
S=${SPECIALISTS:-.venv/bin/specialists}
C="--config $CONFIG"
mkdir -p "$OUT"
TSV="$OUT/sweep.tsv"
[ -e "$TSV" ] || printf 'variant\tsettings\tval_generalist\tval_ensemble\tchange\tb\tc\tp\n' > "$TSV"

row() {  # name, settings, metrics.json
  python3 - "$1" "$2" "$3" >> "$TSV" <<'PY'
import json, sys
name, settings, path = sys.argv[1:]
m = json.load(open(path))["predictors"]
g, e = m["generalist"], m["ensemble"]
mc = e["vs_generalist"]["mcnemar"]
print(f"{name}\t{settings}\t{g['correct']}\t{e['correct']}\t{e['correct'] - g['correct']:+d}\t{mc['b']}\t{mc['c']}\t{mc['p_value']:.3g}")
PY
}

evaluate() {  # name, dir, overrides...
  local name=$1 dir=$2; shift 2
  grep -q "^$name	" "$TSV" && return 0
  $S evaluate $C --set run_dir="$dir" --set inference.control=false --split val "$@" > "$OUT/$name.txt"
  cp "$dir/metrics.json" "$OUT/$name.json"
  row "$name" "$*" "$OUT/$name.json"
}

train() {  # name, overrides...: retrain the specialists with the overrides, then evaluate on val
  local name=$1; shift
  local dir="$OUT/$name"
  grep -q "^$name	" "$TSV" && return 0
  mkdir -p "$dir"
  [ -e "$dir/generalist" ] || cp -r "$RUN/generalist" "$dir/generalist"
  cp "$RUN/clusters.json" "$dir/clusters.json"
  $S train-specialists $C --set run_dir="$dir" "$@"
  evaluate "$name" "$dir" "$@"
}

for bias in fit prior none; do
  for n in 1 2 3; do
    evaluate "bias-$bias-top-$n" "$RUN" --set inference.bias=$bias --set inference.top_n=$n
  done
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
