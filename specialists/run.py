"""``specialists run``: every stage in order, each skipped when its output is complete.

prepare → train-generalist → cluster (+ report) → train-specialists → [control] → evaluate.
A crash at any point loses at most the work since the stage's last checkpoint: run the
same command again. ``--seeds 0,1,2`` repeats the seed-dependent stages (everything but
prepare) in ``<run_dir>/seed-<s>`` and reports each seed's figures with their mean ± std.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from pathlib import Path
from typing import Any

from accelerate import PartialState

from .config import RunConfig, config_to_yaml
from .io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)


def run_pipeline(cfg: RunConfig, *, config_label: str = "the config") -> dict[str, Any] | None:
    """All stages for one seed; returns the evaluation metrics (main process) with stage times."""
    from .cluster import describe, run_cluster
    from .control import train_control
    from .evaluate import format_tables, run_evaluate
    from .generalist import train_generalist
    from .prepare import prepare
    from .specialist_training import train_specialists

    state = PartialState()
    times: dict[str, float] = {}
    memory: dict[str, float] = {}

    def stage(name: str, fn, *args, **kwargs):
        start = time.perf_counter()
        log.info("stage %s", name)
        _reset_peak_memory()
        result = fn(*args, **kwargs)
        times[name] = round(time.perf_counter() - start, 1)
        memory[name] = round(peak_memory_gib(), 2)
        return result

    if state.is_main_process:
        d = cfg.data
        stage("prepare", prepare, d.source, d.shards, seed=d.split_seed, shard_size=d.shard_size,
              synthetic_cfg=d.synthetic, typefaces_cfg=d.typefaces, val_fraction=d.val_fraction, test_fraction=d.test_fraction)
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(cfg.run_dir) / "config.yaml", config_to_yaml(cfg))
    state.wait_for_everyone()
    stage("train-generalist", train_generalist, cfg, resume=True)
    result = stage("cluster", run_cluster, cfg, config_label=config_label)
    if result is not None:
        print(describe(result))
    stage("train-specialists", train_specialists, cfg)
    if cfg.inference.control:
        stage("control", train_control, cfg)
    metrics = stage("evaluate", run_evaluate, cfg, split="test")
    if metrics is not None and state.is_main_process:
        print(format_tables(metrics))
        metrics["stage_seconds"] = times
        atomic_write_json(Path(cfg.run_dir) / "stage_times.json", times)
        atomic_write_json(Path(cfg.run_dir) / "stage_memory.json", memory)
        report = Path(cfg.run_dir) / "report" / "index.html"
        print(f"\nstage wall times (s): {times}")
        print(f"stage peak memory of the main process (GiB): {memory}")
        print(f"inspection report: {report.resolve()}")
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
    return dataclasses.replace(cfg, seed=seed, run_dir=str(Path(cfg.run_dir) / f"seed-{seed}"))


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
    atomic_write_json(Path(cfg.run_dir) / "seeds.json", {"seeds": seeds, "summary": rows})
    print("\nacross seeds (mean ± std):")
    print(format_seed_summary(rows))
    return rows
