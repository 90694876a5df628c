"""``specialists run``: every stage of the table in order, each skipped when its output is complete.

prepare → train-generalist → cluster (+ report) → train-specialists → [train-control] → evaluate.
A crash at any point loses at most the work since the stage's last checkpoint: run the
same command again. ``--seeds 0,1,2`` repeats the seed-dependent stages (everything but
prepare) in ``<run_dir>/seed-<s>`` and reports each seed's figures with their mean ± std.
A finished stage whose deciding config values differ from the config stops the run with one
line naming the value (``--force`` on that stage's own command redoes it).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
import time
from pathlib import Path
from typing import Any

from .config import RunConfig, config_to_yaml
from .context import make_accelerator
from .errors import UserError
from .io import atomic_write_json, atomic_write_text
from .layout import RunLayout
from .stages import PIPELINE, Stage
from .stages import cluster as cluster_stage
from .stages import evaluate as evaluate_stage

log = logging.getLogger(__name__)

NAME = "run"
HELP = "every stage in order, skipping finished ones (resumable)"
DESCRIPTION = ("prepare → train-generalist → cluster (+ report) → train-specialists → [train-control] → evaluate. "
               "Re-run the same command after a crash.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2: one run per seed in <run_dir>/seed-<s>, "
                                   "then each seed's figures and their mean ± std")


def command(cfg: RunConfig, args: argparse.Namespace) -> int:
    if args.seeds:
        try:
            seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        except ValueError:
            raise UserError(f"--seeds {args.seeds!r}: expected comma-separated integers, e.g. 0,1,2") from None
        run_seeds(cfg, seeds, config_label=args.config)
    else:
        run_pipeline(cfg, config_label=args.config)
    return 0


def _run_stage(stage: Stage, cfg: RunConfig, config_label: str) -> Any:
    if stage.is_done(cfg):
        log.info("stage %s: done already", stage.name)
        return None
    if stage.module is cluster_stage:
        result = cluster_stage.run(cfg, config_label=config_label)
        if result is not None:
            print(cluster_stage.describe(result))
        return result
    return stage.module.run(cfg)


def run_pipeline(cfg: RunConfig, *, config_label: str = "the config") -> dict[str, Any] | None:
    """All stages for one seed; returns the evaluation metrics (main process) with stage times."""
    accelerator = make_accelerator(cfg)
    layout = RunLayout(cfg.run_dir)
    times: dict[str, float] = {}
    memory: dict[str, float] = {}
    metrics = None
    log.info("run %s in %s", cfg.name, layout.root)
    for stage in PIPELINE:
        if not stage.enabled(cfg):
            continue
        start = time.perf_counter()
        log.info("stage %s", stage.name)
        _reset_peak_memory()
        result = _run_stage(stage, cfg, config_label)
        times[stage.name] = round(time.perf_counter() - start, 1)
        memory[stage.name] = round(peak_memory_gib(), 2)
        if stage.name == "prepare" and accelerator.is_main_process:
            atomic_write_text(layout.config, config_to_yaml(cfg))
        if stage.module is evaluate_stage:
            metrics = result
        accelerator.wait_for_everyone()
    if metrics is not None and accelerator.is_main_process:
        print(evaluate_stage.describe(metrics))
        metrics["stage_seconds"] = times
        atomic_write_json(layout.stage_times, times)
        atomic_write_json(layout.stage_memory, memory)
        print(f"\nstage wall times (s): {times}")
        print(f"stage peak memory of the main process (GiB): {memory}")
        print(f"inspection report: {layout.report_index.resolve()}")
    return metrics


def _reset_peak_memory() -> None:
    """Start a new peak-RSS measurement (Linux: writing 5 to clear_refs resets VmHWM)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory_gib() -> float:
    """Peak resident memory of this process since the last reset (VmHWM), else since it started."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB → GiB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def seed_config(cfg: RunConfig, seed: int) -> RunConfig:
    return dataclasses.replace(cfg, seed=seed, run_dir=str(RunLayout(cfg.run_dir).seed_run(seed).root))


def _lookup(metrics: dict[str, Any], path: str) -> float | None:
    node: Any = metrics
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node if isinstance(node, (int, float)) else None


SUMMARY_KEYS = {
    "generalist top-1": "predictors.generalist.top1",
    "ensemble top-1": "predictors.ensemble.top1",
    "control top-1": "predictors.control.top1",
    "generalist conditional": "predictors.generalist.conditional.accuracy",
    "ensemble conditional": "predictors.ensemble.conditional.accuracy",
    "control conditional": "predictors.control.conditional.accuracy",
    "McNemar p, ensemble vs generalist": "predictors.ensemble.vs_generalist.mcnemar.p_value",
    "McNemar p, ensemble vs control": "predictors.ensemble.vs_control.mcnemar.p_value",
}


def summarize_seeds(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Each seed's headline figures and their mean ± std (sample std over seeds)."""
    rows: dict[str, Any] = {}
    for label, path in SUMMARY_KEYS.items():
        values = {s: _lookup(m, path) for s, m in per_seed.items()}
        present = [v for v in values.values() if v is not None]
        if not present:
            continue
        rows[label] = {"per_seed": values, "mean": statistics.fmean(present),
                       "std": statistics.stdev(present) if len(present) > 1 else 0.0}
    return rows


def format_seed_summary(rows: dict[str, Any]) -> str:
    lines = []
    for label, row in rows.items():
        seeds = ", ".join(f"{s}: {v:.4f}" if v is not None else f"{s}: -" for s, v in row["per_seed"].items())
        lines.append(f"{label:36s} {row['mean']:.4f} ± {row['std']:.4f}   ({seeds})")
    return "\n".join(lines)


def run_seeds(cfg: RunConfig, seeds: list[int], *, config_label: str = "the config") -> dict[str, Any] | None:
    per_seed = {}
    for seed in seeds:
        log.info("=== seed %d ===", seed)
        metrics = run_pipeline(seed_config(cfg, seed), config_label=config_label)
        if metrics is not None:
            per_seed[seed] = metrics
    if not per_seed:
        return None
    rows = summarize_seeds(per_seed)
    atomic_write_json(RunLayout(cfg.run_dir).seeds, {"seeds": seeds, "summary": rows})
    print("\nacross seeds (mean ± std):")
    print(format_seed_summary(rows))
    return rows
