import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from specialists.artifacts.model_card import load_model, read_card
from specialists.config import load_config
from specialists.data import ShardIndex, eval_batches
from specialists.layout import DataLayout, RunLayout
from specialists.models import classifier, create_model, list_models

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def tiny_args(tiny_shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["--config", str(ROOT / "configs/tiny.yaml"), "--set", f"data.shards={tiny_shards}",
            "--set", f"run_dir={run_dir}", "--set", "data.shard_size=50", *extra]


def specialists_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "specialists.cli", *args]


def test_registry_and_unknown_name():
    assert {"compact_cnn", "glyph_cnn", "resnet18", "resnet50"} <= set(list_models())
    from specialists.errors import UserError

    with pytest.raises(UserError, match=r"unknown architecture 'vgg99' \(known: compact_cnn, glyph_cnn, resnet18"):
        create_model("vgg99", num_classes=3)


@pytest.mark.parametrize("arch", ["resnet18", "compact_cnn", "glyph_cnn"])
def test_small_input_models(arch):
    model = create_model(arch, num_classes=7, in_channels=1, image_size=28)
    assert classifier(model).out_features == 7
    out = model(torch.randn(2, 1, 28, 28))
    assert out.shape == (2, 7)
    if arch == "resnet18":
        assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
        assert isinstance(model.maxpool, torch.nn.Identity)
        big = create_model(arch, num_classes=7, in_channels=3, image_size=224)
        assert big.conv1.kernel_size == (7, 7) and isinstance(big.maxpool, torch.nn.MaxPool2d)
    if arch == "glyph_cnn":
        # Keeps where things are: a 4×4 map flattened, not globally pooled; any input ≥ 16 px.
        assert model(torch.randn(2, 1, 16, 16)).shape == (2, 7)
        small = create_model(arch, num_classes=7, in_channels=1, image_size=16, width=8, hidden=32)
        assert small.fc.in_features == 32 and small.features[-3].in_features == 4 * 8 * 16


def test_glyph_cnn_sees_position():
    """The flattened 4×4 map tells a pattern from the same pattern moved across the image."""
    torch.manual_seed(0)
    model = create_model("glyph_cnn", num_classes=3, in_channels=1, image_size=16, width=8, hidden=32).eval()
    x = torch.zeros(1, 1, 16, 16)
    x[..., 2:6, 2:6] = 1
    shifted = torch.roll(x, shifts=(8, 8), dims=(2, 3))
    assert not torch.allclose(model(x), model(shifted), atol=1e-4)


def test_train_generalist_in_process(tiny_shards, tmp_path, cli):
    args = tiny_args(tiny_shards, tmp_path / "run", "--set", "generalist.epochs=3", "--set", "generalist.lr=0.4")
    code, out, err = cli("train-generalist", *args)
    assert code == 0, err
    gen = RunLayout(tmp_path / "run").generalist
    lines = [json.loads(line) for line in gen.train_log.read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3]
    assert all(r["val_n"] == 96 for r in lines)
    assert lines[-1]["val_top1"] > 1 / 12 * 2  # learnt something (chance is 8.3%)
    model, card = load_model(RunLayout(tmp_path / "run").generalist)
    assert card.class_names == ShardIndex.load(tiny_shards).class_names
    assert card.arch == "compact_cnn" and card.num_outputs == 12 and card.arch_kwargs == {"width": 8, "dropout": 0.0}
    assert card.deciding["generalist.epochs"] == 3 and card.deciding["seed"] == 0
    # re-running a finished stage does nothing; under a changed deciding key it says so in one line
    stamp = gen.weights.stat().st_mtime_ns
    code, _, _ = cli("train-generalist", *args)
    assert code == 0 and gen.weights.stat().st_mtime_ns == stamp
    code, _, err = cli("train-generalist", *tiny_args(tiny_shards, tmp_path / "run", "--set", "generalist.lr=0.4"))
    assert code == 2 and err.count("\n") == 1
    assert "trained with generalist.epochs=3, the config now says 4; pass --force to retrain it" in err
    assert gen.weights.stat().st_mtime_ns == stamp


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def _newest_checkpoint_step(checkpoints: Path) -> int:
    steps = [json.loads(p.read_text())["step"] for p in checkpoints.glob("ckpt-*/state.json")]
    return max(steps, default=0)


def test_kill_and_resume_gives_the_same_weights(tiny_shards, tmp_path):
    """SIGKILL mid-run, then the same command: the final weights equal an uninterrupted run's.

    Augmentation and dropout are on, so the data and the model both draw random numbers."""
    extra = ("--set", "generalist.epochs=6", "--set", "generalist.checkpoint_every=4", "--set", "data.augment=crop",
             "--set", "generalist.dropout=0.3")
    ref = tmp_path / "ref"
    subprocess.run(specialists_cmd("train-generalist", *tiny_args(tiny_shards, ref, *extra)), check=True,
                   env=ENV, capture_output=True)
    run = tmp_path / "killed"
    proc = subprocess.Popen(specialists_cmd("train-generalist", *tiny_args(tiny_shards, run, *extra)), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = RunLayout(run).generalist.checkpoints
    deadline = time.time() + 120
    while time.time() < deadline and _newest_checkpoint_step(checkpoints) < 20:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not RunLayout(run).generalist.weights.exists(), "the run finished before it could be killed"
    killed_at = _newest_checkpoint_step(checkpoints)
    result = subprocess.run(specialists_cmd("train-generalist", *tiny_args(tiny_shards, run, *extra), "--resume"),
                            env=ENV, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"at step {killed_at}" in result.stderr and 20 <= killed_at < 72
    a, b = _weights(RunLayout(ref).generalist.weights), _weights(RunLayout(run).generalist.weights)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after resuming from step {killed_at}"
    assert read_card(RunLayout(run).generalist).training["steps"] == 72  # 6 epochs × ceil(360 / 32)
    ref_log = RunLayout(ref).generalist.train_log.read_text().splitlines()
    run_log = RunLayout(run).generalist.train_log.read_text().splitlines()
    assert [json.loads(x)["val_top1"] for x in ref_log] == [json.loads(x)["val_top1"] for x in run_log]


def test_resume_under_a_changed_deciding_key_is_one_line(tiny_shards, tmp_path, cli):
    """A checkpoint made with generalist.lr=0.4, resumed with 0.2: one line naming the key and both values."""
    run = tmp_path / "run"
    checkpoints = RunLayout(run).generalist.checkpoints
    extra = ("--set", "generalist.epochs=3", "--set", "generalist.checkpoint_every=4")
    proc = subprocess.Popen(specialists_cmd("train-generalist", *tiny_args(tiny_shards, run, *extra)), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and _newest_checkpoint_step(checkpoints) < 4:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    code, _, err = cli("train-generalist", *tiny_args(tiny_shards, run, *extra, "--set", "generalist.lr=0.2"),
                       "--resume")
    assert code == 2 and err.count("\n") == 1, err
    assert "checkpoints made with generalist.lr=0.4, the config now says 0.2; pass --force to start over" in err
    code, _, err = cli("train-generalist", *tiny_args(tiny_shards, run, *extra))
    assert code == 2 and "pass --resume to continue it or --force to start over" in err


def test_missing_shards_is_one_line_error(tmp_path, cli):
    code, _, err = cli("train-generalist", *tiny_args(tmp_path / "nope", tmp_path / "run"))
    assert code == 2 and "index.json missing" in err and err.count("\n") == 1


def test_import_generalist(tiny_shards, tmp_path, cli):
    model = create_model("resnet18", num_classes=12, in_channels=1, image_size=16)
    torch.save(model.state_dict(), tmp_path / "mine.pt")
    classes = DataLayout(tiny_shards).classes
    code, _, err = cli("import-generalist", *tiny_args(tiny_shards, tmp_path / "run"), "--arch", "resnet18",
                       "--weights", tmp_path / "mine.pt", "--classes", classes)
    assert code == 0, err
    loaded, card = load_model(RunLayout(tmp_path / "run").generalist)
    assert card.arch == "resnet18" and card.class_names == json.loads(classes.read_text())
    x = torch.randn(3, 1, 16, 16)
    model.eval()
    assert torch.allclose(loaded(x), model(x), atol=1e-6)
    # wrong class count: one line naming both files
    wrong = create_model("resnet18", num_classes=5, in_channels=1, image_size=16)
    torch.save(wrong.state_dict(), tmp_path / "wrong.pt")
    code, _, err = cli("import-generalist", *tiny_args(tiny_shards, tmp_path / "run2"), "--arch", "resnet18",
                       "--weights", tmp_path / "wrong.pt", "--classes", classes)
    assert code == 2 and "classifier fc has 5 outputs but" in err and "lists 12 classes" in err
    assert not RunLayout(tmp_path / "run2").generalist.weights.exists()


def test_distributed_two_processes(tiny_shards, tmp_path):
    """2 CPU processes (gloo): disjoint samples, identical weights, exact validation metrics."""
    run = tmp_path / "run"
    overrides = [f"data.shards={tiny_shards}", f"run_dir={run}", "generalist.epochs=2", "generalist.lr=0.4"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
           str(ROOT / "tests/_distributed_job.py"), str(ROOT / "configs/tiny.yaml"), str(tmp_path), *overrides]
    result = subprocess.run(cmd, env={**ENV, "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert not set(ranks[0]["samples"]) & set(ranks[1]["samples"])
    assert len(ranks[0]["samples"]) > 0 and len(ranks[1]["samples"]) > 0
    card = read_card(RunLayout(run).generalist)
    assert card.training["world_size"] == 2 and card.training["ranks_in_sync"] is True
    # validation metrics of the 2-process run equal a 1-process evaluation of the saved weights
    last = json.loads(RunLayout(run).generalist.train_log.read_text().splitlines()[-1])
    cfg = load_config(ROOT / "configs/tiny.yaml", overrides)
    model, _ = load_model(RunLayout(run).generalist)
    from accelerate import Accelerator

    from specialists.train.evaluate import evaluate

    metrics = evaluate(model, eval_batches(ShardIndex.load(tiny_shards), cfg.data, "val"), Accelerator(cpu=True), cfg.data)
    assert metrics["n"] == last["val_n"] == 96
    assert metrics["top1"] == pytest.approx(last["val_top1"], abs=1e-12)
    assert metrics["top5"] == pytest.approx(last["val_top5"], abs=1e-12)
