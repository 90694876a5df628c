#!/usr/bin/env bash
# Distillation measured (docs/RESULTS.md, "Distillation"): on a run whose ensemble is final (its
# specialists, routing and correction chosen on val), students trained for the same steps from
#   ensemble    the ensemble's q (eq. 5), online on the very augmented view
#   generalist  the generalist's soft targets (born-again: does anything come from the specialists?)
#   none        hard labels only (the extra training alone)
# and a wider student from scratch on the ensemble's targets beside the same wide net on hard labels.
# Then the test evaluation with every student, the ensemble and the control.
#   bash scripts/distill-regime.sh configs/typefaces-iid-1000.yaml
# Settings: SET (extra --set overrides of the chosen ensemble, e.g. "--set inference.top_n=2"),
# EPOCHS, TEACHERS (the students of the generalist's size; default "ensemble generalist none", empty for
# none), WIDE_HIDDEN (the wide students' glyph_cnn hidden units), WIDE_TEACHERS (default "ensemble none"),
# CACHE_K (also a cached-teacher student with that k, to measure what the cache costs), CONTROL
# (default true: the final evaluation reports the control too; false for a run without one).
set -euo pipefail
CONFIG=${1:?usage: distill-regime.sh CONFIG}
S=${SPECIALISTS:-.venv/bin/specialists}
C="--config $CONFIG ${SET:-}"
EPOCHS=${EPOCHS:-4}
WIDE_HIDDEN=${WIDE_HIDDEN:-64}
D="--set distill.epochs=$EPOCHS"
timed() {  # LABEL COMMAND...: run it, then print its wall time
  local label=$1 start=$SECONDS; shift
  "$@"
  echo "$label: $((SECONDS - start)) s"
}
for teacher in ${TEACHERS-ensemble generalist none}; do
  timed "distill $teacher" $S distill $C $D --set distill.teacher=$teacher
done
if [ -n "${CACHE_K:-}" ]; then
  timed "distill cached-$CACHE_K" $S distill $C $D --set distill.teacher=ensemble \
    --set distill.teacher_cache=true --set distill.cache_top_k=$CACHE_K --set distill.name=ensemble-cached-$CACHE_K
fi
W="--set distill.init=scratch --set distill.hidden=$WIDE_HIDDEN --set distill.lr=0.05 --set distill.warmup_epochs=1"
for teacher in ${WIDE_TEACHERS-ensemble none}; do
  timed "distill wide $teacher" $S distill $C $D $W --set distill.teacher=$teacher \
    --set distill.name=wide-$WIDE_HIDDEN-$teacher
done
$S evaluate $C --set inference.control=${CONTROL:-true}
