"""Experiment trackers (``--log-with tensorboard``): what a tiny run logged, read back from the event
files, equals what it wrote to its own files; bad tracker names stop in one line."""

import json

import pytest
from conftest import ROOT

from specialists.artifacts.model_card import read_card
from specialists.layout import RunLayout
from specialists.stages import control, evaluate, generalist, specialists
from specialists.train.log import read_jsonl


def _scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_training_losses_logged_equal_metrics_jsonl(tiny_run):
    layout = RunLayout(tiny_run)
    scalars = _scalars(layout.tracking / generalist.NAME)
    epochs = read_jsonl(layout.generalist.train_log)
    assert len(epochs) == 4
    for key in ("train_loss", "train_top1", "val_top1", "val_loss", "lr", "images_per_s"):
        logged = scalars[f"generalist/epoch/{key}"]
        assert [step for step, _ in logged] == [r["step"] for r in epochs]
        assert [v for _, v in logged] == pytest.approx([r[key] for r in epochs], rel=1e-6)  # float32 in the file
    # every 5 optimiser steps (tracking.every): the mean loss of those steps, the lr and the throughput
    steps = [step for step, _ in scalars["generalist/train/loss"]]
    assert steps == list(range(5, epochs[-1]["step"] + 1, 5))
    assert all(0 < v < 5 for _, v in scalars["generalist/train/loss"])
    assert all(v > 0 for _, v in scalars["generalist/train/images_per_s"])
    assert [s for s, _ in scalars["generalist/train/lr"]] == steps


def test_specialists_control_and_evaluation_logged(tiny_run):
    layout = RunLayout(tiny_run)
    scalars = _scalars(layout.tracking / specialists.NAME)
    for m in range(3):
        history = read_card(layout.specialist(m)).training["val_history"]
        logged = scalars[f"{specialists.tracker_name(m)}/val/conditional_accuracy"]
        assert [s for s, _ in logged] == [s for s, _ in history]
        assert [v for _, v in logged] == pytest.approx([a for _, a in history], rel=1e-6)
        assert [s for s, _ in scalars[f"{specialists.tracker_name(m)}/train/loss"]] == [5, 10, 15, 20]
    assert "control/train/loss" in _scalars(layout.tracking / control.NAME)
    metrics = json.loads(layout.metrics("test").read_text())
    scalars = _scalars(layout.tracking / f"{evaluate.NAME}-test")
    for name, p in metrics["predictors"].items():
        assert scalars[f"predictors/{name}/correct"] == [(0, p["correct"])]
        assert scalars[f"predictors/{name}/top1"][0][1] == pytest.approx(p["top1"], rel=1e-6)
    mc = metrics["predictors"]["ensemble"]["vs_generalist"]["mcnemar"]
    assert scalars["predictors/ensemble/vs_generalist/mcnemar/b"] == [(0, mc["b"])]
    assert scalars["predictors/ensemble/vs_generalist/mcnemar/c"] == [(0, mc["c"])]
    s = metrics["specialists"][1]
    assert scalars[f"specialists/{s['id']:03d}/routed_change_correct"] == [(0, s["routed_change_correct"])]


@pytest.mark.parametrize("names, message", [
    ("tensorbored", "tracking.log_with: unknown tracker 'tensorbored' (accelerate knows: "),
    ("wandb", "tracking.log_with: wandb is not installed; install the wandb package"),
])
def test_bad_tracker_is_one_line(tiny_shards, tmp_path, cli, names, message, monkeypatch):
    import accelerate.tracking

    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: ["tensorboard"])
    code, _, err = cli("train-generalist", "--config", ROOT / "configs/tiny.yaml", "--set",
                       f"data.shards={tiny_shards}", "--set", f"run_dir={tmp_path / 'run'}", "--log-with", names)
    assert code == 2 and err.count("\n") == 1 and message in err
    assert not (tmp_path / "run" / "generalist").exists()
