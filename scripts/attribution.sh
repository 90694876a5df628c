#!/usr/bin/env bash
# Where the gain comes from (docs/RESULTS.md, "Attribution"): per seed, on one shared generalist,
#   OUT/seed-S          clustered specialists (the ensemble), the one-copy control, K copies (control-x<K>)
#   OUT/seed-S-random   specialists on random class sets of the same sizes (clustering.method: random)
# then `specialists compare` over the seeds. Settings are the config's (chosen on val, RESULTS says where);
# the copies' lr is COPIES_LR (chosen on val with the `copies-val` step). Every step skips finished work.
#   bash scripts/attribution.sh STEP SEED [ARG]
# Steps:
#   base                      the generalist (CONFIG_BASE's run, trained once) and the data
#   specialists S             OUT/seed-S: clusters (seed S) and its specialists
#   random S                  OUT/seed-S-random: random sets (seed S) and their specialists
#   control S                 the one-copy control, in OUT/seed-S-control (one job per run directory), moved in
#   copies S LR               K = COPIES copies at lr LR in OUT/seed-S-copies-LR, moved in when LR = COPIES_LR
#   copies-val S LR           the copies' val figures at LR (needs `specialists S` and `copies S LR`)
#   copies-choice S LR...     the LR whose copies (by the solver) are right on the most val images (first on a tie)
#   test S                    both runs on test, once
#   table [SEEDS]             `specialists compare` over the seeds (default "0 1 2") → OUT/attribution-test.*
# Two steps of different run directories may run side by side (OMP_NUM_THREADS=1 each on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
STEP=${1:?usage: attribution.sh STEP [SEED] [ARG]}
SEED=${2:-0}
CONFIG=${CONFIG:-configs/typefaces-iid-1000-attribution.yaml}
CONFIG_BASE=${CONFIG_BASE:-configs/typefaces-iid-1000.yaml}
COPIES=${COPIES:-3}
S=${SPECIALISTS:-.venv/bin/specialists}
C="--config $CONFIG"
OUT=$($S paths $C run_dir)
BASE=$($S paths --config "$CONFIG_BASE" run_dir)
A=$OUT/seed-$SEED
B=$OUT/seed-$SEED-random

with_generalist() {  # DIR: a run directory holding a copy of the base run's generalist
  mkdir -p "$1"
  local dst
  dst=$($S paths $C --set run_dir="$1" generalist_dir)
  [ -e "$dst" ] || { cp -r "$($S paths --config "$CONFIG_BASE" generalist_dir)" "$dst.tmp" && mv "$dst.tmp" "$dst"; }
}

move_in() {  # SRC DST: a finished model folder moved into a run (a folder there already is kept)
  [ -e "$2" ] || { cp -r "$1" "$2.tmp" && mv "$2.tmp" "$2"; }
}

rival_dir() {  # NAME: a run directory of its own for a control that trains beside the specialists
  local dir=$OUT/seed-$SEED-$1
  with_generalist "$dir"
  $S cluster $C --set run_dir="$dir" --set seed="$SEED" > /dev/null
  echo "$dir"
}

case $STEP in
  base)
    $S prepare --config "$CONFIG_BASE" > /dev/null
    $S train-generalist --config "$CONFIG_BASE" --resume
    ;;
  specialists)
    with_generalist "$A"
    $S cluster $C --set run_dir="$A" --set seed="$SEED"
    $S train-specialists $C --set run_dir="$A" --set seed="$SEED"
    ;;
  random)
    with_generalist "$B"
    $S cluster $C --set run_dir="$B" --set seed="$SEED" --set clustering.method=random
    $S train-specialists $C --set run_dir="$B" --set seed="$SEED" --set clustering.method=random
    ;;
  control)
    dir=$(rival_dir control)
    $S train-control $C --set run_dir="$dir" --set seed="$SEED" --planned
    move_in "$dir/control" "$A/control"
    ;;
  copies | copies-val)
    LR=${3:?copies S LR}
    dir=$(rival_dir "copies-$LR")
    o="--set run_dir=$dir --set seed=$SEED --set control.copies=$COPIES --set control.lr=$LR"
    if [ "$STEP" = copies ]; then
      $S train-control $C $o --planned
      [ "$LR" != "${COPIES_LR:-}" ] || move_in "$dir/control-x$COPIES" "$A/control-x$COPIES"
    else  # the ensemble's specialists (for the evaluation's routing) copied in, then val
      move_in "$A/specialists" "$dir/specialists"
      $S evaluate $C $o --split val --set inference.control=true > "$dir/val.txt"
      grep -E "^ *(generalist|ensemble|control-x$COPIES|control-x$COPIES-mean) " "$dir/val.txt" | head -4
    fi
    ;;
  copies-choice)
    shift 2
    for lr in "$@"; do
      printf '%s\t' "$lr"
      .venv/bin/python -c "import sys; from specialists.artifacts.metrics import read_metrics as r; \
print(r(sys.argv[1])['predictors'][sys.argv[2]]['correct'])" "$OUT/seed-$SEED-copies-$lr/metrics-val.json" "control-x$COPIES"
    done | sort -t$'\t' -k2,2nr -s | head -1 | cut -f1
    ;;
  test)
    $S evaluate $C --set run_dir="$A" --set seed="$SEED" > "$A/test.txt"
    $S evaluate $C --set run_dir="$B" --set seed="$SEED" --set clustering.method=random \
      --set inference.control=false > "$B/test.txt"
    ;;
  table)
    groups=()
    for s in ${2:-0 1 2}; do groups+=(--group "seed-$s=$OUT/seed-$s,$OUT/seed-$s-random"); done
    $S compare "${groups[@]}" --split test --out "$OUT/attribution-test"
    ;;
  *) echo "attribution.sh: unknown step $STEP" >&2; exit 2 ;;
esac
