#!/usr/bin/env bash
# The paper's regime, measured (docs/RESULTS.md, "The paper's regime"): every choice on val, then
# test once. For a typefaces i.i.d. config (configs/typefaces-iid-1000.yaml, configs/typefaces-iid.yaml):
#   bash scripts/paper-regime.sh configs/typefaces-iid-1000.yaml [STEP...]
# Steps (default: all, in order; each skips what is finished, so the script resumes):
#   base      prepare, generalist, clusters (the run directory of the config)
#   sweep     specialists' steps × lr on val, on the first SUBSET sets (OUT/spec-*)
#   control   the control's lr on val, at the matched steps of that subset (OUT/control-*)
#   full      every specialist with the chosen steps/lr (SPEC_STEPS, SPEC_LR), and the control (CONTROL_LR)
#             (full-specialists and full-control: one each, as two jobs side by side; the control trains in
#             OUT/full-control, counting the specialists still training at SPEC_STEPS (`train-control
#             --planned`), and is copied into the run when finished)
#   infer     dustbin correction × top-n on val (the run's specialists; routed fits refitted per n)
#   test      the chosen settings (BIAS, TOP_N) on test: generalist, ensemble, control (routed fits refitted
#             for TOP_N when BIAS=routed)
#   coverage  table 4 with every class in exactly r = 1, 2, 3 sets (OUT/coverage-r), on test
# Settings: SWEEP ("steps:lr ..."), CONTROL_LRS, SUBSET, COVERAGES (default "1 2 3", in that order),
# COVERAGE_SPECIALISTS (sets per coverage run, default the config's; OUT/coverage-r-of-N when set),
# TRAIN (the command that trains the generalist and the specialists, default S; e.g. `.venv/bin/accelerate
# launch --multi_gpu --num_processes 2 -m specialists.cli` for one process per core: the generalist data-parallel,
# each process training every 2nd specialist; a resumed generalist needs the process count it started with).
# The chosen SPEC_STEPS, SPEC_LR, CONTROL_LR, BIAS, TOP_N are taken from the environment when set,
# otherwise from the val rows of OUT/sweep.tsv: the variant with the largest gain over the generalist
# (the first listed on a tie). Writes OUT/sweep.tsv (one line per val variant; OUT defaults to
# RUN-sweep) and OUT/chosen.txt. One job at a time on a small machine (OMP_NUM_THREADS=1 beside other work).
set -euo pipefail
CONFIG=${1:?usage: paper-regime.sh CONFIG [STEP...]}
shift
STEPS=${*:-base sweep control full infer test coverage}
S=${SPECIALISTS:-.venv/bin/specialists}
T=${TRAIN:-$S}
C="--config $CONFIG"
. "$(dirname "$0")/sweep-lib.sh"
RUN=$($S paths $C run_dir)
OUT=${OUT:-$RUN-sweep}
SUBSET=${SUBSET:-5}
sweep_init "$OUT"

best() {  # PREFIX: the val variant named PREFIX* with the largest change (first on a tie)
  awk -F'\t' -v p="$1" 'NR > 1 && index($1, p) == 1 { c = $5 + 0; if (!n || c > m) { m = c; v = $1; n = 1 } }
    END { if (!n) exit 1; print v }' "$TSV"
}

choose() {  # VAR VALUE-FROM-VAL...: keep VAR from the environment, else set it from val
  local var=$1; shift
  if [ -z "${!var:-}" ]; then
    local value
    value=$("$@") || { echo "paper-regime: no val rows in $TSV to choose $var from; run the earlier steps or set $var" >&2; exit 2; }
    printf -v "$var" '%s' "$value"
    echo "$var=$value (chosen on val, $TSV)" | tee -a "$OUT/chosen.txt"
  fi
}

spec_choice() { choose SPEC_STEPS spec_field 2; choose SPEC_LR spec_field 3; }
spec_field() { best spec- | cut -d- -f"$1"; }
control_choice() { spec_choice; choose CONTROL_LR control_field; }
control_field() { best control- | cut -d- -f2; }
infer_choice() { choose BIAS infer_field 2; choose TOP_N infer_field 4; }
infer_field() { best bias- | cut -d- -f"$1"; }

subset_clusters() {  # DST: the run's clusters.json cut to its first SUBSET sets
  python3 - "$(run_path "$RUN" clusters)" "$(run_path "$1" clusters)" "$SUBSET" <<'PY'
import json, sys
src, dst, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
data = json.load(open(src))
data["specialists"] = data["specialists"][:n]
data["deciding"] = None  # a hand-cut subset: not what the cluster stage decided
json.dump(data, open(dst, "w"), ensure_ascii=False)
PY
}

val_variant() {  # NAME DIR PREDICTOR overrides...: evaluate DIR on val and add PREDICTOR's row
  local name=$1 dir=$2 predictor=$3; shift 3
  sweep_done "$name" && return 0
  $S evaluate $C --set run_dir="$dir" --split val "$@" > "$OUT/$name.txt"
  sweep_row "$name" "$*" "$(run_path "$dir" metrics_val)" "$predictor"
}

for step in $STEPS; do
  case $step in
  base)
    $S prepare $C > /dev/null
    $T train-generalist $C --resume
    $S cluster $C
    ;;
  sweep)
    for v in ${SWEEP:-400:0.01 1500:0.03 1500:0.1 3000:0.03}; do
      set -- ${v/:/ }
      dir="$OUT/spec-$1-$2"
      mkdir -p "$dir"
      start_from "$RUN" "$dir"
      subset_clusters "$dir"
      $T train-specialists $C --set run_dir="$dir" --set specialists.steps=$1 --set specialists.lr=$2
      val_variant "spec-$1-$2" "$dir" ensemble --set specialists.steps=$1 --set specialists.lr=$2 --set inference.control=false
    done
    ;;
  control)
    spec_choice
    for lr in ${CONTROL_LRS:-0.003 0.01 0.03 0.1}; do
      dir="$OUT/spec-$SPEC_STEPS-$SPEC_LR"  # its specialists fix the matched steps
      cdir="$OUT/control-$lr"
      mkdir -p "$cdir"
      [ -e "$(run_path "$cdir" specialists)" ] || cp -r "$(run_path "$dir" specialists)" "$(run_path "$cdir" specialists)"
      start_from "$dir" "$cdir"
      $S train-control $C --set run_dir="$cdir" --set specialists.steps=$SPEC_STEPS --set specialists.lr=$SPEC_LR \
        --set control.lr=$lr
      val_variant "control-$lr" "$cdir" control --set specialists.steps=$SPEC_STEPS --set specialists.lr=$SPEC_LR \
        --set control.lr=$lr --set inference.control=true
    done
    ;;
  full | full-specialists)
    if [ "$step" = full ]; then control_choice; else spec_choice; fi
    $T train-specialists $C --set specialists.steps=$SPEC_STEPS --set specialists.lr=$SPEC_LR
    [ "$step" = full-specialists ] || $S train-control $C --set specialists.steps=$SPEC_STEPS --set specialists.lr=$SPEC_LR \
      --set control.lr=$CONTROL_LR
    ;;
  full-control)  # beside full-specialists: in a run directory of its own (one job per run_dir), then moved in
    control_choice
    cdir="$OUT/full-control"
    mkdir -p "$cdir"
    start_from "$RUN" "$cdir"
    $S train-control $C --set run_dir="$cdir" --set specialists.steps=$SPEC_STEPS --set specialists.lr=$SPEC_LR \
      --set control.lr=$CONTROL_LR --planned
    dst=$(dirname "$(run_path "$RUN" control)")
    [ -e "$dst" ] || { cp -r "$(dirname "$(run_path "$cdir" control)")" "$dst.tmp" && mv "$dst.tmp" "$dst"; }
    ;;
  infer)
    control_choice
    for n in 1 2 3; do
      $S train-specialists $C --set specialists.steps=$SPEC_STEPS --set specialists.lr=$SPEC_LR \
        --refit-bias --set inference.top_n=$n > /dev/null
      for bias in none prior fit routed; do
        val_variant "bias-$bias-top-$n" "$RUN" ensemble --set specialists.steps=$SPEC_STEPS --set specialists.lr=$SPEC_LR \
          --set control.lr=$CONTROL_LR --set inference.bias=$bias --set inference.top_n=$n --set inference.control=false
      done
    done
    ;;
  test)
    control_choice
    infer_choice
    if [ "$BIAS" = routed ]; then  # only the routed fit depends on top-n
      $S train-specialists $C --set specialists.steps=$SPEC_STEPS --set specialists.lr=$SPEC_LR \
        --refit-bias --set inference.top_n=$TOP_N > /dev/null
    fi
    $S evaluate $C --set specialists.steps=$SPEC_STEPS --set specialists.lr=$SPEC_LR --set control.lr=$CONTROL_LR \
      --set inference.bias=$BIAS --set inference.top_n=$TOP_N --set inference.control=true | tee "$OUT/test.txt"
    ;;
  coverage)
    spec_choice
    infer_choice
    n=${COVERAGE_SPECIALISTS:+-of-$COVERAGE_SPECIALISTS}
    for r in ${COVERAGES:-1 2 3}; do
      dir="$OUT/coverage-$r$n"
      mkdir -p "$dir"
      gdst=$(run_path "$dir" generalist_dir)
      [ -e "$gdst" ] || cp -r "$(run_path "$RUN" generalist_dir)" "$gdst"
      o="--set run_dir=$dir --set clustering.coverage=$r --set specialists.steps=$SPEC_STEPS --set specialists.lr=$SPEC_LR
        ${COVERAGE_SPECIALISTS:+--set clustering.num_specialists=$COVERAGE_SPECIALISTS}"
      $S cluster $C $o > /dev/null
      $T train-specialists $C $o --set inference.top_n=$TOP_N
      $S evaluate $C $o --set inference.bias=$BIAS --set inference.top_n=$TOP_N --set inference.control=false \
        > "$OUT/coverage-$r$n.txt"
    done
    ;;
  *) echo "unknown step $step" >&2; exit 2 ;;
  esac
done
column -t -s $'\t' "$TSV"
