"""Shared fixtures: tiny synthetic shards, and a helper to run the CLI in-process."""

from __future__ import annotations

import os
import re
from pathlib import Path

# Tests run many tiny models, often beside DataLoader workers and subprocesses: one
# intra-op thread each avoids OpenMP spin-waiting on an oversubscribed 2-core machine
# (measured: a 16×16 conv went from 48 ms to under 1 ms per call).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

from specialists.config import SyntheticConfig
from specialists.data.prepare import prepare

torch.set_num_threads(1)

TINY = SyntheticConfig(num_classes=12, group_size=4, train_per_class=30, val_per_class=8, test_per_class=8, image_size=16)


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """Synthetic data: 12 classes in 3 groups; 360 train / 96 val / 96 test; 50 samples per shard."""
    out = tmp_path_factory.mktemp("data") / "tiny"
    return prepare("synthetic", out, seed=0, shard_size=50, synthetic_cfg=TINY)


@pytest.fixture
def cli(capsys):
    """Run ``specialists ARGS...`` in-process; return (exit code, stdout, stderr)."""
    from specialists.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    return run


ROOT = Path(__file__).resolve().parents[1]
LOG_RECORD = re.compile(r"^\d\d:\d\d:\d\d (INFO|DEBUG) [\w.]+: ")  # the CLI's log format (specialists/cli.py)


def error_lines(stderr: str) -> list[str]:
    """A subprocess's stderr less its INFO/DEBUG log records (a stage logs e.g. its thread count at
    start): what is left of a refused command must be its one-line error."""
    return [line for line in stderr.splitlines() if not LOG_RECORD.match(line)]


def tiny_overrides(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return [f"data.shards={shards}", f"run_dir={run_dir}", *extra]


@pytest.fixture(scope="session")
def tiny_generalist(tiny_shards, tmp_path_factory) -> Path:
    """A run directory holding a tiny trained generalist (12 synthetic classes); returns run_dir."""
    from specialists.config import load_config
    from specialists.stages.generalist import run as train_generalist

    run_dir = tmp_path_factory.mktemp("run") / "tiny"
    cfg = load_config(ROOT / "configs/tiny.yaml", tiny_overrides(tiny_shards, run_dir))
    train_generalist(cfg)
    return run_dir


def write_clusters(run_dir: Path, class_names: list[str], sets: list[list[int]]) -> Path:
    """A hand-made clusters.json, not validated (bad ones too); no deciding values: any config may use it."""
    from specialists.artifacts.clusters import format_clusters
    from specialists.layout import RunLayout

    path = RunLayout(run_dir).clusters
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(format_clusters({"num_classes": len(class_names), "class_names": class_names,
                                     "specialists": [{"id": m, "classes": s} for m, s in enumerate(sets)],
                                     "method": {"hand-made": True}}))
    return path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A whole tiny run (`specialists run`, with the control) tracked with TensorBoard; returns run_dir.

    Its reports (clustering and evaluation on test) and tracker files are what the report and
    tracking tests read.
    """
    from specialists.cli import main

    root = tmp_path_factory.mktemp("tinyrun")
    code = main(["run", "--config", str(ROOT / "configs/tiny.yaml"), "--set", f"data.shards={root / 'data'}",
                 "--set", f"run_dir={root / 'run'}", "--set", "inference.control=true", "--set", "tracking.every=5",
                 "--log-with", "tensorboard"])
    assert code == 0, "the tiny run failed (tensorboard is in the dev extra: pip install -e .[dev])"
    return root / "run"
