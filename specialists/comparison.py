"""Predictors of several runs compared on one split, over seeds: the attribution table.

Which part of the ensemble's gain is *specialisation*? The rivals live in runs of their own
(random class sets need a clusters.json of their own), so one seed is a *group* of run
directories evaluated on the same split with the same generalist. Their per-example answers
(``predictions-<split>.npz``) are joined by position, after checking that every run saw the
same labels and that the generalist answered identically in each: the pairing McNemar needs.

In a run whose clusters were drawn at random (``clustering.method: random``) the ensemble is
named ``ensemble (random sets)``; every other predictor keeps its name, and a name met in two
runs of a group must have the same answers (it is the same model evaluated twice).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import UserError
from .evaluation import BASELINE, mcnemar

MAIN = "ensemble"
RANDOM_ENSEMBLE = "ensemble (random sets)"


@dataclass(frozen=True)
class RunResult:
    """One evaluated run: its metrics and per-example answers on the split."""

    run_dir: str
    metrics: dict[str, Any]
    label: np.ndarray  # (N,)
    predicted: dict[str, np.ndarray]  # predictor → (N,) top-1


def predictor_names(run: RunResult) -> dict[str, str]:
    """The run's predictor names → their names in the comparison."""
    method = (run.metrics.get("clustering") or {}).get("method")
    return {name: RANDOM_ENSEMBLE if name == MAIN and method == "random" else name for name in run.predicted}


def join_group(runs: list[RunResult]) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, dict[str, Any]]]:
    """One seed's runs → labels (N,), predictor → (N,) answers, predictor → its cost entry (passes, steps, ms)."""
    first = runs[0]
    predicted: dict[str, np.ndarray] = {}
    cost: dict[str, dict[str, Any]] = {}
    where: dict[str, str] = {}
    for run in runs:
        if run.label.shape != first.label.shape or not np.array_equal(run.label, first.label):
            raise UserError(f"{run.run_dir}: its {run.metrics['split']} labels differ from {first.run_dir}'s "
                            "(another data set, or another split order); runs of one group must share the split")
        for name, shown in predictor_names(run).items():
            answers = run.predicted[name]
            if shown in predicted:
                if not np.array_equal(predicted[shown], answers):
                    raise UserError(f"{run.run_dir}: {shown!r} answers differently from the one of {where[shown]}; "
                                    "runs of one group must share the generalist (and name their rivals apart)")
                continue
            predicted[shown], where[shown] = answers, run.run_dir
            cost[shown] = (run.metrics.get("cost") or {}).get(name, {})
    return first.label, predicted, cost


def group_rows(label: np.ndarray, predicted: dict[str, np.ndarray],
               cost: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per predictor: correct, top-1, McNemar against the generalist and against the ensemble, cost."""
    correct = {name: answers == label for name, answers in predicted.items()}
    rows = {}
    for name, ok in correct.items():
        row: dict[str, Any] = {"correct": int(ok.sum()), "top1": float(ok.mean()) if len(ok) else None,
                               "forward_passes_per_image": cost[name].get("forward_passes_per_image"),
                               "ms_per_image": cost[name].get("ms_per_image"),
                               "training_steps": cost[name].get("training_steps")}
        for other in (BASELINE, MAIN):
            if other in correct and other != name:
                row[f"vs_{other}"] = {"change_correct": int(ok.sum() - correct[other].sum()),
                                      "mcnemar": mcnemar(correct[other], ok)}
        rows[name] = row
    return rows


def compare_groups(groups: list[list[RunResult]], labels: list[str]) -> dict[str, Any]:
    """Every group (seed) joined and its rows, and per predictor the summary over groups."""
    if not groups or any(not g for g in groups):
        raise UserError("compare: expected at least one group of run directories")
    split = groups[0][0].metrics["split"]
    per_group = {}
    for label, runs in zip(labels, groups, strict=True):
        for run in runs:
            if run.metrics["split"] != split:
                raise UserError(f"{run.run_dir}: evaluated on {run.metrics['split']!r}, the others on {split!r}")
        per_group[label] = group_rows(*join_group(runs))
    order = list(dict.fromkeys(name for rows in per_group.values() for name in rows))
    order.sort(key=lambda n: (n != BASELINE, n != MAIN, n != RANDOM_ENSEMBLE, n))
    summary = {name: _summary(name, per_group) for name in order}
    return {"split": split, "num_examples": len(groups[0][0].label), "groups": per_group, "summary": summary,
            "runs": {label: [r.run_dir for r in runs] for label, runs in zip(labels, groups, strict=True)}}


def _summary(name: str, per_group: dict[str, dict[str, Any]]) -> dict[str, Any]:
    rows = [rows[name] for rows in per_group.values() if name in rows]
    top1 = [r["top1"] for r in rows]
    out: dict[str, Any] = {"seeds": len(rows), "top1_mean": statistics.fmean(top1), "top1_min": min(top1),
                           "top1_max": max(top1), "correct_mean": statistics.fmean(r["correct"] for r in rows)}
    for key in ("forward_passes_per_image", "ms_per_image", "training_steps"):
        values = [r[key] for r in rows if r.get(key) is not None]
        out[key] = statistics.fmean(values) if values else None
    for other in (BASELINE, MAIN):
        vs = [r[f"vs_{other}"] for r in rows if f"vs_{other}" in r]
        if vs:
            out[f"vs_{other}"] = {"change_mean": statistics.fmean(v["change_correct"] for v in vs),
                                  "change_min": min(v["change_correct"] for v in vs),
                                  "change_max": max(v["change_correct"] for v in vs),
                                  "p_values": [v["mcnemar"]["p_value"] for v in vs],
                                  "b_c": [[v["mcnemar"]["b"], v["mcnemar"]["c"]] for v in vs]}
    return out


# ------------------------------------------------------------------------------------ tables
def _change(v: dict[str, Any] | None) -> str:
    if not v:
        return ""
    ps = ", ".join(f"{p:.2g}" for p in v["p_values"])
    return f"{v['change_mean']:+.1f} ({v['change_min']:+d}..{v['change_max']:+d}); p {ps}"


def _number(v: float | None, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


def markdown_table(result: dict[str, Any]) -> str:
    """The summary as a Markdown table: one row per predictor, the seeds' mean and range."""
    head = ["predictor", "seeds", "top-1 mean", "min–max", "vs generalist: mean (range); McNemar p per seed",
            "vs ensemble: mean (range); p per seed", "training steps", "forward passes / image", "ms / image"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, s in result["summary"].items():
        cells = [name, str(s["seeds"]), f"{100 * s['top1_mean']:.2f}%",
                 f"{100 * s['top1_min']:.2f}–{100 * s['top1_max']:.2f}%", _change(s.get(f"vs_{BASELINE}")),
                 _change(s.get(f"vs_{MAIN}")), _number(s["training_steps"], ",.0f"),
                 _number(s["forward_passes_per_image"], ".2f"), _number(s["ms_per_image"], ".3f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tsv_rows(result: dict[str, Any]) -> str:
    """Every group's rows, one line per (group, predictor)."""
    head = ["group", "predictor", "correct", "top1", "change_vs_generalist", "b_vs_generalist", "c_vs_generalist",
            "p_vs_generalist", "change_vs_ensemble", "b_vs_ensemble", "c_vs_ensemble", "p_vs_ensemble",
            "training_steps", "forward_passes_per_image", "ms_per_image"]
    lines = ["\t".join(head)]
    for group, rows in result["groups"].items():
        for name, r in rows.items():
            cells = [group, name, r["correct"], r["top1"]]
            for other in (BASELINE, MAIN):
                v = r.get(f"vs_{other}")
                cells += [v["change_correct"], v["mcnemar"]["b"], v["mcnemar"]["c"], v["mcnemar"]["p_value"]] if v \
                    else ["", "", "", ""]
            cells += [r["training_steps"], r["forward_passes_per_image"], r["ms_per_image"]]
            lines.append("\t".join("" if c is None else str(c) for c in cells))
    return "\n".join(lines) + "\n"
