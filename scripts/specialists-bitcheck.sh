#!/bin/bash
# Do tiny specialists train to the same weights as at another commit? Trains them (tiny.yaml:
# 3 specialists) in five variants — plain; top-2 routing with the routed fit; full head with
# soft targets; 1,320 val images (two 1,000-image pieces); one data worker — with the code of
# REV and of the working tree, and compares every card: weights' sha256, fitted corrections,
# val accuracies and history. Prints IDENTICAL or the differences.
#   bash scripts/specialists-bitcheck.sh 196965f [PYTHON]
set -euo pipefail
REV=${1:?usage: specialists-bitcheck.sh REV [PYTHON]}
PY=${2:-$(pwd)/.venv/bin/python}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
git archive "$REV" | tar -x -C "$WORK" --one-top-level=base
HERE=$(pwd)

cards() {  # CODE_ROOT OUT → one line per specialist card
  local root=$1 out=$2
  local C=(--config configs/tiny.yaml --set "data.shards=$out/data")
  (cd "$root"
   export PYTHONPATH=$root OMP_NUM_THREADS=1
   "$PY" -m specialists.cli prepare "${C[@]}" >/dev/null 2>&1
   "$PY" -m specialists.cli prepare "${C[@]}" --set "data.shards=$out/data-bigval" \
       --set data.synthetic.val_per_class=110 >/dev/null 2>&1
   variant() {
     local name=$1; shift
     for stage in train-generalist cluster train-specialists; do
       "$PY" -m specialists.cli $stage "${C[@]}" --set "run_dir=$out/$name" "$@" >/dev/null 2>&1
     done
   }
   variant plain
   variant top2 --set inference.top_n=2 --set specialists.bias=routed
   variant full --set specialists.head=full --set specialists.soft_target_weight=0.5
   variant bigval --set "data.shards=$out/data-bigval" --set specialists.eval_every=5
   variant worker --set data.num_workers=1
   "$PY" - "$out" <<'PY'
import glob, json, sys
for path in sorted(glob.glob(sys.argv[1] + "/*/specialists/*/model.json")):
    card = json.load(open(path))
    head, training = card["specialist"], card["training"]
    fits = {k: head[k] for k in ("fitted_bias", "fitted_temperature", "routed_bias", "routed_temperature",
                                 "routed_val_images")}
    print(path.split("/")[-4], path.split("/")[-2], card["sha256"], fits, training["val_conditional_accuracy"],
          training["generalist_val_conditional_accuracy"], training["val_history"])
PY
  )
}

cards "$WORK/base" "$WORK/out-base" > "$WORK/base.txt"
cards "$HERE" "$WORK/out-here" > "$WORK/here.txt"
echo "$(wc -l < "$WORK/here.txt") specialist cards compared"
if diff "$WORK/base.txt" "$WORK/here.txt"; then echo IDENTICAL; else echo DIFFERENT; exit 1; fi
