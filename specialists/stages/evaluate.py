"""``specialists evaluate``: the generalist against the ensemble (and the control) on a held-out split
(section 5, tables 3–4), exact under any number of processes.

Prints plain-text tables and writes the run's ``metrics-<split>.json`` (see
:mod:`specialists.evaluation` for its figures), recording per specialist the dustbin correction
the engine applied, every predictor's answers per example (``predictions-<split>.npz``) and the
evaluation report (``report/evaluation-<split>.html``); the tables' numbers also go to the
experiment trackers (``tracking.log_with``).
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from ..artifacts.metrics import write_metrics
from ..artifacts.model_card import read_card
from ..artifacts.predictions import write_predictions
from ..config import RunConfig
from ..context import make_accelerator, open_shards
from ..data.pipeline import eval_batches
from ..ensemble import LoadedEnsemble, control_name, load_ensemble, load_predictors
from ..errors import UserError
from ..evaluation import BASELINE, Records, compute_metrics, evaluate_engines, format_tables
from ..layout import RunLayout
from ..reports.evaluation import write_evaluation_report
from ..tracking import log_values, numeric_leaves, tracked

log = logging.getLogger(__name__)

NAME = "evaluate"
HELP = "generalist vs ensemble on the test split (works under accelerate launch)"
DESCRIPTION = ("Top-1 of the generalist and of the ensemble (routing inference.top_n, solver inference.solver), "
               "the conditional accuracy on classes covered by specialists (paper's table 3), the change by number "
               "of covering specialists (table 4), McNemar's exact test and each specialist alone. Prints tables "
               "and writes <run_dir>/metrics-<split>.json, predictions-<split>.npz and the evaluation report "
               "report/evaluation-<split>.html.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--split", default="test", help="split to evaluate on (default: test)")


def is_done(cfg: RunConfig) -> bool:
    """Never: evaluation is cheap and reflects the inference settings of the moment."""
    return False


def command(cfg: RunConfig, args: argparse.Namespace) -> int:
    metrics = run(cfg, split=args.split)
    if metrics is not None:  # the main process
        print(describe(metrics))
    return 0


def describe(metrics: dict[str, Any]) -> str:
    layout, split = RunLayout(metrics["run_dir"]), metrics["split"]
    text = f"{format_tables(metrics)}\n\nmetrics written to {layout.metrics(split)}"
    if layout.evaluation_report(split).is_file():
        text += f"\nevaluation report: {layout.evaluation_report(split).resolve()}"
    return text


def applied_corrections(loaded: LoadedEnsemble) -> list[dict[str, Any]]:
    """Per specialist: the dustbin bias and temperature the engine applies (not merely those fitted)."""
    engine = loaded.engine
    return [{"id": m, "path": str(p), "sha256": card.sha256,
             "applied": {"correction": loaded.correction, "dustbin_bias": engine.dustbin_biases[i],
                         "temperature": engine.temperatures[i]}}
            for i, (m, p, card) in enumerate(zip(loaded.ids, loaded.specialist_paths, loaded.specialist_cards,
                                                 strict=True))]


def run(cfg: RunConfig, *, split: str = "test") -> dict[str, Any] | None:
    """Evaluate the run's ensemble on ``split``; the main process returns the metrics (others: None)."""
    index = open_shards(cfg)
    if split not in index.splits:
        raise UserError(f"{index.root}: no {split!r} split (have: {', '.join(index.splits)})")
    accelerator = make_accelerator(cfg)
    loaded = load_ensemble(cfg, accelerator.device)
    if loaded.class_names != index.class_names:
        raise UserError(f"{loaded.generalist_path}: the generalist's {loaded.num_classes} classes differ from "
                        f"{index.root}/classes.json ({index.num_classes} classes)")
    engines = load_predictors(cfg, loaded)
    if cfg.inference.control and not any(name.startswith("control") for name in engines):
        log.warning("inference.control is set but %s is missing (run `specialists train-control`); "
                    "evaluating without the control", RunLayout(cfg.run_dir).control.weights)
    rank, world = accelerator.process_index, accelerator.num_processes
    batches = eval_batches(index, cfg.data, split, rank=rank, world_size=world, batch_size=cfg.inference.batch_size)
    records = evaluate_engines(engines, batches, data_cfg=cfg.data, accelerator=accelerator,
                               desc=f"evaluate on {split}")
    metrics = None
    if accelerator.is_main_process:
        icfg = cfg.inference
        metrics = {
            "run": cfg.name, "split": split, "run_dir": str(cfg.run_dir), "num_examples": records.num_examples,
            "num_classes": loaded.num_classes, "num_specialists": len(loaded.sets), "world_size": world,
            "inference": {"top_n": icfg.top_n, "solver": icfg.solver, "bias": icfg.bias, "correction": loaded.correction,
                          "tol": icfg.tol, "max_iter": icfg.max_iter},
            "models": {"generalist": {"path": str(loaded.generalist_path), "sha256": loaded.generalist_card.sha256},
                       "specialists": applied_corrections(loaded)},
            "clustering": loaded.clusters.method,
            "baseline": BASELINE,
            **compute_metrics(records, loaded.sets, ids=loaded.ids, training_steps=training_steps(cfg, loaded, engines)),
        }
        write_metrics(RunLayout(cfg.run_dir).metrics(split), metrics)
        log.info("metrics written to %s", RunLayout(cfg.run_dir).metrics(split))
        write_records(cfg, split, records, loaded)
        with tracked(accelerator, cfg, f"{NAME}-{split}"):
            log_values(accelerator, tracked_figures(metrics), step=0)
        write_evaluation_report(cfg.run_dir, split, cfg=cfg)
    accelerator.wait_for_everyone()
    return metrics


def training_steps(cfg: RunConfig, loaded: LoadedEnsemble, predictors: dict[str, Any]) -> dict[str, int]:
    """Optimiser steps each predictor's models trained after the generalist, from their cards."""
    layout = RunLayout(cfg.run_dir)
    steps = {BASELINE: 0, "ensemble": sum(int(c.training.get("steps", 0)) for c in loaded.specialist_cards)}
    for copies in layout.control_counts():
        total = sum(int(read_card(p).training.get("steps", 0)) for p in layout.control_copies(copies))
        steps[control_name(copies)] = steps[control_name(copies, "mean")] = total
    for name in layout.student_names():
        steps[f"student:{name}"] = int(read_card(layout.student(name)).training.get("steps", 0))
    return {name: n for name, n in steps.items() if name == BASELINE or name in predictors}


def write_records(cfg: RunConfig, split: str, records: Records, loaded: LoadedEnsemble) -> None:
    """Every predictor's answer per example (``predictions-<split>.npz``), for the evaluation report."""
    col = records.columns
    predicted = {k.removesuffix(".pred"): v for k, v in col.items() if k.endswith(".pred")}  # every predictor
    write_predictions(RunLayout(cfg.run_dir).predictions(split), split=split, num_classes=loaded.num_classes,
                      label=col["label"], predicted=predicted, covering=col["covering"], specialist_ids=loaded.ids,
                      routed=records.routed)


def tracked_figures(metrics: dict[str, Any]) -> dict[str, float]:
    """The numbers of the evaluation's tables, for the experiment trackers (specialists by id)."""
    return {**numeric_leaves(metrics["predictors"], "predictors"),
            **numeric_leaves(metrics["conditional_subset"], "conditional_subset"),
            **{k: v for s in metrics["specialists"] for k, v in numeric_leaves(s, f"specialists/{s['id']:03d}").items()
               if not k.endswith("/id")}}
