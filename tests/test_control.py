"""The compute-matched control: as many steps as all specialists, resumable to the same weights."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, error_lines, tiny_overrides, write_clusters

from specialists.artifacts.model_card import read_card
from specialists.config import load_config
from specialists.data import ShardIndex
from specialists.layout import RunLayout
from specialists.stages.specialists import run as train_specialists

SETS = [[0, 1, 2, 3], [4, 5, 6, 7]]
SPECIALIST_STEPS = 150


@pytest.fixture(scope="module")
def with_specialists(tiny_shards, tiny_generalist, tmp_path_factory) -> Path:
    """A run with the tiny generalist and two specialists of 150 steps each (the control then takes 300)."""
    run = tmp_path_factory.mktemp("control") / "run"
    shutil.copytree(RunLayout(tiny_generalist).generalist.dir, RunLayout(run).generalist.dir)
    write_clusters(run, ShardIndex.load(tiny_shards).class_names, SETS)
    train_specialists(load_config(ROOT / "configs/tiny.yaml", tiny_overrides(
        tiny_shards, run, f"specialists.steps={SPECIALIST_STEPS}", "specialists.eval_every=50")))
    return run


def _cmd(tiny_shards: Path, run: Path, *extra: str) -> list[str]:
    sets = tiny_overrides(tiny_shards, run, f"specialists.steps={SPECIALIST_STEPS}", "specialists.eval_every=50",
                          "specialists.checkpoint_every=10", "data.augment=crop", *extra)
    return [sys.executable, "-m", "specialists.cli", "train-control", "--config", str(ROOT / "configs/tiny.yaml"),
            *sum((["--set", s] for s in sets), [])]


def _newest_step(checkpoints: Path) -> int:
    return max((json.loads(p.read_text())["step"] for p in checkpoints.glob("ckpt-*/state.json")), default=0)


def test_kill_and_resume_the_control(with_specialists, tiny_shards, tmp_path):
    runs = {}
    for label in ("ref", "killed"):
        runs[label] = tmp_path / label
        shutil.copytree(with_specialists, runs[label])
    subprocess.run(_cmd(tiny_shards, runs["ref"]), check=True, capture_output=True)
    control = RunLayout(runs["killed"]).control
    proc = subprocess.Popen(_cmd(tiny_shards, runs["killed"]), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and _newest_step(control.checkpoints) < 30 and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = _newest_step(control.checkpoints)
    assert not control.weights.exists() and 30 <= saved < 2 * SPECIALIST_STEPS, "finished before it could be killed"
    result = subprocess.run(_cmd(tiny_shards, runs["killed"], "specialists.weight_decay=0.001"), capture_output=True,
                            text=True)
    assert result.returncode == 2 and len(error_lines(result.stderr)) == 1, result.stderr
    assert "checkpoints made with specialists.weight_decay=0.0005, the config now says 0.001" in result.stderr
    result = subprocess.run(_cmd(tiny_shards, runs["killed"]), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"at step {saved}" in result.stderr
    a, b = (read_card(RunLayout(r).control) for r in (runs["ref"], runs["killed"]))
    assert a.sha256 == b.sha256, "the resumed control's weights differ from the uninterrupted one's"
    assert b.training["steps"] == 2 * SPECIALIST_STEPS and not control.checkpoints.exists()


def test_planned_control_trains_beside_the_specialists(tiny_shards, tiny_generalist, tmp_path):
    """Before the specialists exist the control refuses; --planned counts them at the configured steps, and
    a finished control made for another count is refused, not reused."""
    run = tmp_path / "run"
    shutil.copytree(RunLayout(tiny_generalist).generalist.dir, RunLayout(run).generalist.dir)
    write_clusters(run, ShardIndex.load(tiny_shards).class_names, SETS)
    steps = ["specialists.steps=20", "specialists.checkpoint_every=0"]
    result = subprocess.run(_cmd(tiny_shards, run, *steps), capture_output=True, text=True)
    assert result.returncode == 2 and len(error_lines(result.stderr)) == 1, result.stderr
    assert "specialist 0 missing" in result.stderr
    result = subprocess.run([*_cmd(tiny_shards, run, *steps), "--planned"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert read_card(RunLayout(run).control).training["steps"] == 2 * 20
    result = subprocess.run([*_cmd(tiny_shards, run, "specialists.steps=30"), "--planned"], capture_output=True,
                            text=True)
    assert result.returncode == 2 and len(error_lines(result.stderr)) == 1, result.stderr
    assert "steps" in result.stderr and "retrain it with `specialists train-control --force`" in result.stderr
