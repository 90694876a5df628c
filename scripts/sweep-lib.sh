# Shared by the val-sweep scripts (source it): OUT/sweep.tsv, one line per variant.
# sweep_init OUT: create OUT and the TSV with its header (kept if present; sets TSV).
# sweep_done NAME: true if NAME already has a line (finished variants are skipped on rerun).
# sweep_row NAME SETTINGS METRICS_JSON [PREDICTOR]: append one predictor's figures against the generalist
#   (default: the ensemble) from one evaluation.
# run_path RUN NAME: where file NAME of run directory RUN is (`specialists paths`; needs S and C).
# start_from SRC DST: run DST starts from SRC's generalist and clusters.json.
sweep_init() {
  mkdir -p "$1"
  TSV="$1/sweep.tsv"
  [ -e "$TSV" ] || printf 'variant\tsettings\tval_generalist\tval_predictor\tchange\tb\tc\tp\n' > "$TSV"
}

sweep_done() {
  grep -q "^$1	" "$TSV"
}

sweep_row() {
  python3 - "$1" "$2" "$3" "${4:-ensemble}" >> "$TSV" <<'PY'
import json, sys
name, settings, path, predictor = sys.argv[1:]
m = json.load(open(path))["predictors"]
g, e = m["generalist"], m[predictor]
mc = e["vs_generalist"]["mcnemar"]
print(f"{name}\t{settings}\t{g['correct']}\t{e['correct']}\t{e['correct'] - g['correct']:+d}\t{mc['b']}\t{mc['c']}\t{mc['p_value']:.3g}")
PY
}

run_path() {
  $S paths $C --set run_dir="$1" "$2"
}

start_from() {
  local gdst
  gdst=$(run_path "$2" generalist_dir)
  [ -e "$gdst" ] || { mkdir -p "$(dirname "$gdst")"; cp -r "$(run_path "$1" generalist_dir)" "$gdst"; }
  cp "$(run_path "$1" clusters)" "$(run_path "$2" clusters)"
}
