"""The evaluation's figures (section 5, tables 3–4): per-example records of named predictors over
a split, exact under any number of processes, and what is computed from them.

Every rank runs the predictors on its share of the split; the per-example records are gathered
with ``gather_for_metrics`` and the padding rows dropped, so the figures are exact over the
split for any number of processes. Predictors are *named engines* (:func:`evaluate_engines`):
"ensemble" is the generalist with its specialists; the compute-matched control (the generalist
with a fine-tuned copy of itself) is one more engine, compared with the generalist the same way.

The figures (``metrics-<split>.json``, written by :mod:`specialists.artifacts.metrics`)::

    format, split, num_examples, num_classes, num_specialists, world_size
    inference: {top_n, solver, bias, correction, tol, max_iter}
    models: {generalist: {path, sha256},
             specialists: [{id, path, sha256, applied: {correction, dustbin_bias, temperature}}]}
    baseline: "generalist"
    conditional_subset: {num_examples, union_classes}   # true class in some specialist's set (table 3)
    predictors:
      generalist: {correct, top1, conditional: {correct, accuracy}}
      ensemble:   {correct, top1, conditional: {correct, accuracy}, mean_active_specialists,
                   vs_generalist: {change_correct, relative_change,
                                   conditional_change_correct, conditional_relative_change,
                                   mcnemar: {b, c, p_value},
                                   by_coverage: [{covering, num_examples, generalist_correct,
                                                  correct, change_correct, relative_change}]}}
      control:    (with inference.control and a trained control) the same keys as ensemble
    specialists: [{id, classes, num_examples, specialist_correct, specialist_accuracy,
                   generalist_correct, generalist_accuracy,
                   routed, routed_generalist_correct, routed_correct, routed_change_correct}]

* top1 = correct / num_examples, over all C classes.
* conditional: examples whose true class is in some specialist's set, prediction = argmax
  over the union of the sets (of pᵍ for the generalist, of q for an ensemble) — table 3.
* by_coverage: examples grouped by how many specialists' sets hold the true class, unrestricted
  top-1 — table 4; relative_change = change_correct / generalist_correct (null when 0).
* mcnemar: b = generalist right and predictor wrong, c = the reverse; p_value = two-sided exact
  binomial test of c successes in b + c trials at ½ (1.0 when b + c = 0).
* specialists: the split's images of each specialist's classes; the specialist alone (argmax over its
  classes, dustbin excluded) and the generalist restricted to the same classes.
* routed*: the images the ensemble ran the specialist on (whatever their class), and how many of
  them the generalist and the ensemble got right (change = ensemble − generalist; an image routed
  to several specialists counts for each).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from scipy.stats import binomtest

from inference import EnsembleEngine

from .config import DataConfig
from .data.pipeline import normalize
from .progress import progress

BASELINE = "generalist"


@dataclass(frozen=True)
class Records:
    """Per-example results over a whole split (N examples, padding dropped), the same on every rank.

    columns: "label", "covering" (number of sets holding the true class), and for the generalist
    and each engine name X: "X.pred", "X.union_pred" (argmax over the union of the sets); for
    engines also "X.active" (specialists run). specialist_counts: (M, 3) int64 rows of
    (examples of Sᵐ, specialist correct, generalist correct), see :func:`evaluate_engines`.
    """

    columns: dict[str, np.ndarray]
    specialist_counts: np.ndarray
    names: list[str]  # engine names, in order
    routed: np.ndarray | None = None  # (N, M) bool: the specialists the main engine ran on each example
    seconds: dict[str, float] = field(default_factory=dict)  # wall time of each predictor (and "generalist") per image

    @property
    def num_examples(self) -> int:
        return len(self.columns["label"])


# ------------------------------------------------------------------------ running the engines
@torch.inference_mode()
def evaluate_engines(engines: dict[str, EnsembleEngine], batches, *, data_cfg: DataConfig,
                     accelerator: Accelerator, main: str = "ensemble", desc: str = "evaluate") -> Records:
    """Run named engines over uint8 ``(images, labels, valid)`` batches and gather per-example records.

    The generalist's predictions are those of ``engines[main]``; coverage, the union of the
    sets (table 3) and the per-specialist figures use ``engines[main]``'s class sets and models.
    Every rank must call this with the same number of batches.
    """
    if main not in engines:
        raise ValueError(f"main={main!r} is not among the engines ({', '.join(engines)})")
    names = [main, *[n for n in engines if n != main]]
    ref = engines[main]
    device = ref.device
    sets = [torch.as_tensor(s, dtype=torch.long, device=device) for s in ref.class_sets]
    union = torch.unique(torch.cat(sets))  # (|U|,) sorted
    counts = torch.zeros((len(sets), 3), dtype=torch.long, device=device)
    timers = Timers([BASELINE, *names], device)
    rows = []
    bar = progress(batches, main_process=accelerator.is_main_process, total=len(batches), desc=desc,
                   unit="batch", leave=False, count_images=lambda batch: int(batch[2].sum()))
    timed = [BASELINE, *names]
    for i, (images, labels, valid) in enumerate(bar):
        x = normalize(images.to(device, non_blocking=True), data_cfg)
        labels, valid = labels.to(device), valid.to(device)
        covering = torch.zeros_like(labels)
        for s in sets:
            covering += torch.isin(labels, s).long()
        cols = [labels, covering]
        # Each batch starts with another predictor: whichever runs first shares the cores with the data
        # workers decoding the next batch (measured: the generalist always first, 0.36 against 0.17 ms
        # / image for the same net timed later, on 2 cores), so the order rotates to spread that evenly.
        preds, images_here = {}, int(valid.sum())
        for n in timed[i % len(timed):] + timed[:i % len(timed)]:
            with timers(n, images_here):
                if n == BASELINE:
                    ref.general_probs(x)  # the generalist alone: what one forward pass costs here
                else:
                    preds[n] = engines[n].predict(x, return_q=True)
        for n in names:
            pred = preds[n]
            if n == main:
                p_general = pred.p_general  # (B, C)
                cols += [pred.general_top1, union[p_general[:, union].argmax(1)]]
                routed = pred.active.long()  # (B, M)
            cols += [pred.top1, union[pred.q[:, union].argmax(1)], pred.active.sum(1)]
        rows.append(torch.cat([torch.stack(cols, dim=1), routed, valid.long()[:, None]], dim=1))  # (B, 4+3E+M+1)
        for m, s in enumerate(sets):
            mask = valid & torch.isin(labels, s)
            if not mask.any():
                continue
            spec = s[ref.specialist_probs(m, x[mask])[:, :-1].argmax(1)]  # dustbin excluded
            gen = s[p_general[mask][:, s].argmax(1)]
            counts[m] += torch.stack([mask.sum(), (spec == labels[mask]).sum(), (gen == labels[mask]).sum()])
    width = 5 + 3 * len(names) + len(sets)
    local = torch.cat(rows) if rows else torch.zeros((0, width), dtype=torch.long, device=device)
    gathered = accelerator.gather_for_metrics(local)
    gathered = gathered[gathered[:, -1] > 0, :-1].cpu().numpy()
    counts = accelerator.reduce(counts, reduction="sum").cpu().numpy()
    keys = ["label", "covering", f"{BASELINE}.pred", f"{BASELINE}.union_pred"]
    for n in names:
        keys += [f"{n}.pred", f"{n}.union_pred", f"{n}.active"]
    return Records({k: gathered[:, i] for i, k in enumerate(keys)}, counts, names,
                   routed=gathered[:, len(keys):] > 0, seconds=timers.per_image(accelerator))


class Timers:
    """Wall time of each predictor over the images it classified (CUDA synchronised), per process."""

    def __init__(self, names: list[str], device: torch.device) -> None:
        self.names, self.device = names, device
        self.totals = torch.zeros((len(names), 2), dtype=torch.float64)  # seconds, images

    @contextlib.contextmanager
    def __call__(self, name: str, images: int) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        yield
        self._sync()
        self.totals[self.names.index(name)] += torch.tensor([time.perf_counter() - start, images], dtype=torch.float64)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def per_image(self, accelerator: Accelerator) -> dict[str, float]:
        """Seconds per image, each process's time over its images, summed over processes."""
        totals = accelerator.reduce(self.totals.to(accelerator.device), reduction="sum").cpu()
        return {n: float(t[0] / t[1]) if t[1] else None for n, t in zip(self.names, totals, strict=True)}


# ------------------------------------------------------------------------------- the figures
def mcnemar(baseline_correct: np.ndarray, other_correct: np.ndarray) -> dict[str, Any]:
    """McNemar's exact test: b = baseline right / other wrong, c = the reverse; two-sided binomial p."""
    b = int((baseline_correct & ~other_correct).sum())
    c = int((~baseline_correct & other_correct).sum())
    p = binomtest(c, b + c, 0.5, alternative="two-sided").pvalue if b + c else 1.0
    return {"b": b, "c": c, "p_value": float(p)}


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den else None


def compute_metrics(records: Records, sets: list[list[int]], *, ids: list[int] | None = None,
                    training_steps: dict[str, int] | None = None) -> dict[str, Any]:
    """The figures of metrics.json ("predictors", "conditional_subset", "specialists", "cost") from the records.

    ``sets`` are the class sets that ``records`` were made with; ``ids`` their specialist ids (default 0..M-1);
    ``training_steps``: predictor → optimiser steps trained after the generalist (the cost table's column).
    """
    col = records.columns
    label, covering = col["label"], col["covering"]
    n = len(label)
    covered = covering > 0
    union = sorted({c for s in sets for c in s})
    max_cover = int(np.bincount([c for s in sets for c in s]).max()) if sets else 0
    g_ok = col[f"{BASELINE}.pred"] == label
    g_cond_ok = (col[f"{BASELINE}.union_pred"] == label) & covered
    predictors: dict[str, Any] = {BASELINE: {
        "correct": int(g_ok.sum()), "top1": _ratio(g_ok.sum(), n),
        "conditional": {"correct": int(g_cond_ok.sum()), "accuracy": _ratio(g_cond_ok.sum(), covered.sum())},
    }}
    for name in records.names:
        ok = col[f"{name}.pred"] == label
        cond_ok = (col[f"{name}.union_pred"] == label) & covered
        by_cover = []
        for k in range(max_cover + 1):
            sel = covering == k
            gk, ek = int(g_ok[sel].sum()), int(ok[sel].sum())
            by_cover.append({"covering": k, "num_examples": int(sel.sum()), "generalist_correct": gk, "correct": ek,
                             "change_correct": ek - gk, "relative_change": _ratio(ek - gk, gk)})
        change, cond_change = int(ok.sum() - g_ok.sum()), int(cond_ok.sum() - g_cond_ok.sum())
        predictors[name] = {
            "correct": int(ok.sum()), "top1": _ratio(ok.sum(), n),
            "conditional": {"correct": int(cond_ok.sum()), "accuracy": _ratio(cond_ok.sum(), covered.sum())},
            "mean_active_specialists": _ratio(col[f"{name}.active"].sum(), n),
            "vs_generalist": {
                "change_correct": change, "relative_change": _ratio(change, g_ok.sum()),
                "conditional_change_correct": cond_change,
                "conditional_relative_change": _ratio(cond_change, g_cond_ok.sum()),
                "mcnemar": mcnemar(g_ok, ok),
                "by_coverage": by_cover,
            },
        }
    if "ensemble" in records.names and "control" in records.names:
        # Does specialising beat spending the same steps on plain fine-tuning? (b: control right only)
        e_ok, c_ok = col["ensemble.pred"] == label, col["control.pred"] == label
        predictors["ensemble"]["vs_control"] = {"change_correct": int(e_ok.sum() - c_ok.sum()),
                                                "mcnemar": mcnemar(c_ok, e_ok)}
    for name in records.names:  # every predictor against every other: ensemble, controls, students
        ok = col[f"{name}.pred"] == label
        predictors[name]["vs"] = {
            other: {"change_correct": int(ok.sum() - (col[f"{other}.pred"] == label).sum()),
                    "mcnemar": mcnemar(col[f"{other}.pred"] == label, ok)}
            for other in records.names if other != name}
    specialists = []
    ids = list(range(len(sets))) if ids is None else ids
    for m, s, (num, spec_ok, gen_ok) in zip(ids, sets, records.specialist_counts.tolist(), strict=True):
        specialists.append({"id": m, "classes": list(s), "num_examples": num, "specialist_correct": spec_ok,
                            "specialist_accuracy": _ratio(spec_ok, num), "generalist_correct": gen_ok,
                            "generalist_accuracy": _ratio(gen_ok, num)})
    if records.routed is not None and records.names:
        main_ok = col[f"{records.names[0]}.pred"] == label
        for entry, routed in zip(specialists, records.routed.T, strict=True):
            entry.update(_routed_figures(routed, g_ok, main_ok))
    steps = training_steps or {}
    cost = {name: {"forward_passes_per_image": 1.0 if name == BASELINE or name.startswith("student:")
                   else 1.0 + (predictors[name]["mean_active_specialists"] or 0.0),
                   "ms_per_image": None if records.seconds.get(name) is None else 1000 * records.seconds[name],
                   "training_steps": steps.get(name)}
            for name in [BASELINE, *records.names]}
    return {"conditional_subset": {"num_examples": int(covered.sum()), "union_classes": len(union)},
            "predictors": predictors, "specialists": specialists, "cost": cost}


def _routed_figures(routed: np.ndarray, g_ok: np.ndarray, ok: np.ndarray) -> dict[str, int]:
    """Images routed to one specialist, and the generalist's and the ensemble's hits among them."""
    g, e = int(g_ok[routed].sum()), int(ok[routed].sum())
    return {"routed": int(routed.sum()), "routed_generalist_correct": g, "routed_correct": e,
            "routed_change_correct": e - g}


# --------------------------------------------------------------------------------- the tables
def _table(header: list[str], rows: list[list[Any]]) -> str:
    cells = [header, *[[_cell(v) for v in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def _pct(v: float | None, signed: bool = False) -> str | None:
    return None if v is None else (f"{100 * v:+.2f}%" if signed else f"{100 * v:.2f}%")


def format_tables(metrics: dict[str, Any]) -> str:
    """The plain-text tables printed by ``specialists evaluate``."""
    preds = metrics["predictors"]
    n, sub = metrics["num_examples"], metrics["conditional_subset"]
    others = [k for k in preds if k != BASELINE]
    out = [f"Top-1 on {metrics['split']} ({n} examples)"]
    rows = [[BASELINE, preds[BASELINE]["correct"], _pct(preds[BASELINE]["top1"]), None, None, None, None]]
    for k in others:
        v = preds[k]["vs_generalist"]
        rows.append([k, preds[k]["correct"], _pct(preds[k]["top1"]), f"{v['change_correct']:+d}",
                     v["mcnemar"]["b"], v["mcnemar"]["c"], f"{v['mcnemar']['p_value']:.3g}"])
    out.append(_table(["predictor", "correct", "top-1", "change", "b", "c", "McNemar p"], rows))
    vs_control = preds.get("ensemble", {}).get("vs_control")
    if vs_control is not None:
        mc = vs_control["mcnemar"]
        out.append(f"ensemble vs control: {vs_control['change_correct']:+d} correct, McNemar b={mc['b']} "
                   f"(control right only), c={mc['c']} (ensemble right only), p={mc['p_value']:.3g}")
    for i, k in enumerate(others):  # each pair once, the later predictor against the earlier
        for other, v in preds[k].get("vs", {}).items():
            if other not in others[:i] or (vs_control is not None and (k, other) == ("control", "ensemble")):
                continue
            mc = v["mcnemar"]
            out.append(f"{k} vs {other}: {v['change_correct']:+d} correct, McNemar b={mc['b']} ({other} right only), "
                       f"c={mc['c']} ({k} right only), p={mc['p_value']:.3g}")
    if metrics.get("cost"):
        out += ["", "Cost per image (this machine, the same batches and threads)"]
        rows = [[k, v["forward_passes_per_image"], None if v["ms_per_image"] is None else round(v["ms_per_image"], 3),
                 v.get("training_steps")] for k, v in metrics["cost"].items()]
        out.append(_table(["predictor", "forward passes", "ms / image", "training steps"], rows))
    out += ["", f"Conditional accuracy (table 3): {sub['num_examples']} examples whose class is in some "
                f"specialist's set, predictions among the {sub['union_classes']} classes of the sets"]
    rows = [[BASELINE, preds[BASELINE]["conditional"]["correct"], _pct(preds[BASELINE]["conditional"]["accuracy"]), None]]
    rows += [[k, preds[k]["conditional"]["correct"], _pct(preds[k]["conditional"]["accuracy"]),
              _pct(preds[k]["vs_generalist"]["conditional_relative_change"], signed=True)] for k in others]
    out.append(_table(["predictor", "correct", "accuracy", "relative change"], rows))
    for k in others:
        out += ["", f"By number of specialists covering the true class (table 4): {k} vs {BASELINE}"]
        rows = [[r["covering"], r["num_examples"], r["generalist_correct"], r["correct"], f"{r['change_correct']:+d}",
                 _pct(r["relative_change"], signed=True)] for r in preds[k]["vs_generalist"]["by_coverage"]]
        out.append(_table(["covering", "examples", f"{BASELINE} correct", f"{k} correct", "change", "relative change"],
                          rows))
    out += ["", f"Specialists alone on {metrics['split']} images of their classes (prediction among their classes)"]
    rows = [[s["id"], len(s["classes"]), s["num_examples"], _pct(s["specialist_accuracy"]),
             _pct(s["generalist_accuracy"]),
             None if s["specialist_accuracy"] is None else f"{s['specialist_correct'] - s['generalist_correct']:+d}"]
            for s in metrics["specialists"]]
    out.append(_table(["id", "classes", "examples", "specialist", BASELINE, "change"], rows))
    return "\n".join(out)


