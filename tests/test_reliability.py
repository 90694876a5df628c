"""Nothing lost, nothing silent: every crash resumable, every bad input one line (issue 18's items).

Items 3 (resume under a changed key, resume = uninterrupted) are covered per stage in
test_generalist.py, test_specialists.py and test_control.py.
"""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, tiny_overrides, write_clusters
from PIL import Image
from safetensors.torch import load_file

from specialists.artifacts.model_card import read_card
from specialists.config import load_config
from specialists.context import check_process_group
from specialists.data import ShardIndex
from specialists.errors import UserError
from specialists.io import exclusive_lock
from specialists.layout import DataLayout, RunLayout
from specialists.stages.specialists import run as train_specialists

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
GEN = ("generalist.epochs=3", "generalist.checkpoint_every=5", "data.augment=crop")


def _sets(shards: Path, run: Path, *extra: str) -> list[str]:
    return sum((["--set", s] for s in tiny_overrides(shards, run, *extra)), [])


def _cmd(command: str, shards: Path, run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "specialists.cli", command, "--config", str(ROOT / "configs/tiny.yaml"),
            *_sets(shards, run, *extra)]


def _one_line_error(result, *needles: str) -> None:
    err = result.stderr if hasattr(result, "stderr") else result[2]
    code = result.returncode if hasattr(result, "returncode") else result[0]
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err and "Warning" not in err, err
    assert err.rstrip("\n").endswith(errors[0])  # the last thing said
    for needle in needles:
        assert needle in errors[0], err


def _steps(checkpoints: Path) -> list[int]:
    return sorted(json.loads(p.read_text())["step"] for p in checkpoints.glob("ckpt-*/state.json"))


@pytest.fixture(scope="module")
def reference(tiny_shards, tmp_path_factory) -> Path:
    """An uninterrupted generalist run (3 epochs, checkpoints every 5 steps)."""
    run = tmp_path_factory.mktemp("reliability") / "ref"
    subprocess.run(_cmd("train-generalist", tiny_shards, run, *GEN), check=True, env=ENV, capture_output=True)
    return run


def _same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


# 1. a crash after the final checkpoint, before the weights were written
def test_1_crash_after_the_last_checkpoint_finishes_on_resume(reference, tiny_shards, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    gen = RunLayout(run).generalist
    gen.weights.unlink()
    gen.card.unlink()
    assert _steps(gen.checkpoints)[-1] == 36  # the final checkpoint is there
    result = subprocess.run(_cmd("train-generalist", tiny_shards, run, *GEN) + ["--resume"], env=ENV,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert _same_weights(gen.weights, RunLayout(reference).generalist.weights)
    assert read_card(gen).training["val_top1"] == read_card(RunLayout(reference).generalist).training["val_top1"]


# 2. a damaged newest checkpoint: the one before it serves
def test_2_damaged_newest_checkpoint_falls_back_to_the_previous(reference, tiny_shards, tmp_path):
    run = tmp_path / "run"
    gen = RunLayout(run).generalist
    proc = subprocess.Popen(_cmd("train-generalist", tiny_shards, run, *GEN), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(_steps(gen.checkpoints)) < 2 and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps = _steps(gen.checkpoints)
    assert len(steps) == 2 and not gen.weights.exists()
    newest = next(p for p in gen.checkpoints.glob("ckpt-*") if json.loads((p / "state.json").read_text())["step"] == steps[-1])
    weights = next(newest.glob("weights.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    result = subprocess.run(_cmd("train-generalist", tiny_shards, run, *GEN) + ["--resume"], env=ENV,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "cannot be read" in result.stderr and f"at step {steps[0]}" in result.stderr
    assert _same_weights(gen.weights, RunLayout(reference).generalist.weights)


# 4. weights written but no card: not "finished"; readers say how to get out
def test_4_weights_without_a_card(tiny_shards, tiny_generalist, tmp_path, cli):
    run = tmp_path / "run"
    shutil.copytree(RunLayout(tiny_generalist).generalist.dir, RunLayout(run).generalist.dir)
    write_clusters(run, ShardIndex.load(tiny_shards).class_names, [[0, 1, 2, 3]])
    cfg = load_config(ROOT / "configs/tiny.yaml", tiny_overrides(tiny_shards, run))
    train_specialists(cfg)
    spec = RunLayout(run).specialist(0)
    sha = read_card(spec).sha256
    spec.card.unlink()
    code, out, err = cli("train-specialists", "--config", ROOT / "configs/tiny.yaml", *_sets(tiny_shards, run))
    assert code == 0, err
    assert read_card(spec).sha256 == sha  # trained again, to the same weights
    RunLayout(run).generalist.card.unlink()
    _one_line_error(cli("cluster", "--config", ROOT / "configs/tiny.yaml", *_sets(tiny_shards, run)),
                    "model.json: model card missing next to model.safetensors", "run the stage again to finish it")


# 5. two commands in one run directory
def test_5_one_command_per_run_directory(tiny_shards, tmp_path):
    run = tmp_path / "run"
    with exclusive_lock(RunLayout(run).lock, what="test"):
        result = subprocess.run(_cmd("train-generalist", tiny_shards, run), env=ENV, capture_output=True, text=True)
    _one_line_error(result, f"run directory {run} is in use by pid {os.getpid()}")
    assert not RunLayout(run).generalist.dir.exists()


# 6. a killed prepare leaves no hidden temporary folder behind once run again
def test_6_killed_prepare_leaves_nothing(tmp_path):
    out = tmp_path / "data"
    cmd = [sys.executable, "-m", "specialists.cli", "prepare", "--source", "synthetic", "--out", str(out),
           "--num-classes", "400", "--samples-per-class", "40"]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not any(p.name.endswith(".tmp") for p in tmp_path.iterdir()):
        time.sleep(0.01)
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")], "killed before it wrote anything"
    assert not DataLayout(out).index.exists()
    subprocess.run(cmd, env=ENV, check=True, capture_output=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    assert ShardIndex.load(out).count("train") == 400 * 40


# 7. the README's multi-process command, as written, forms one group of 2
def test_7_readme_launch_forms_one_group(tiny_shards, tiny_generalist, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(RunLayout(tiny_generalist).generalist.dir, RunLayout(run).generalist.dir)
    write_clusters(run, ShardIndex.load(tiny_shards).class_names, [[0, 1, 2, 3], [4, 5, 6, 7]])
    train_specialists(load_config(ROOT / "configs/tiny.yaml", tiny_overrides(tiny_shards, run, "specialists.steps=4")))
    env = {k: v for k, v in ENV.items() if k != "ACCELERATE_USE_CPU"}
    result = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                             "-m", "specialists.cli", "evaluate", "--config", str(ROOT / "configs/tiny.yaml"),
                             *_sets(tiny_shards, run, "specialists.steps=4")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(RunLayout(run).metrics("test").read_text())["world_size"] == 2
    assert result.stdout.count("Top-1 on test") == 1  # printed by the main process only
    with pytest.raises(UserError, match="launched as 2 processes .* formed a group of 1"):
        check_process_group(2, 1)


# 8, 9. bad config values: exit 2, one line naming the key and the value
@pytest.mark.parametrize("override, needle", [
    ("specialists.steps=0", "specialists.steps: expected a positive integer, got 0"),
    ("specialists.lr=0", "specialists.lr: expected > 0, got 0.0"),
    ("specialists.lr=-0.1", "specialists.lr: expected > 0, got -0.1"),
    ("specialists.checkpoint_every=-1", "specialists.checkpoint_every: expected ≥ 0, got -1"),
    ("specialists.eval_every=0", "specialists.eval_every: expected a positive integer, got 0"),
    ("data.std=[0]", "data.std: expected positive values (each image is divided by them), got [0.0]"),
    ("generalist.mixed_precision=fp16", "fp16 needs a GPU"),
])
def test_8_9_bad_config_values(tiny_shards, tmp_path, cli, override, needle):
    _one_line_error(cli("train-generalist", "--config", ROOT / "configs/tiny.yaml",
                        *_sets(tiny_shards, tmp_path / "run", override)), needle)
    assert not (tmp_path / "run").exists() or not RunLayout(tmp_path / "run").generalist.dir.exists()


def test_8_top_n_beyond_the_classes(tiny_shards, tiny_generalist, tmp_path, cli):
    run = tmp_path / "run"
    shutil.copytree(RunLayout(tiny_generalist).generalist.dir, RunLayout(run).generalist.dir)
    write_clusters(run, ShardIndex.load(tiny_shards).class_names, [[0, 1, 2, 3]])
    train_specialists(load_config(ROOT / "configs/tiny.yaml", tiny_overrides(tiny_shards, run, "specialists.steps=2")))
    _one_line_error(cli("evaluate", "--config", ROOT / "configs/tiny.yaml",
                        *_sets(tiny_shards, run, "specialists.steps=2", "inference.top_n=13")),
                    "inference.top_n=13 but the generalist has 12 classes")
    assert not RunLayout(run).metrics("test").exists()


# 10. an edited index.json
def test_10_edited_index_is_refused(tiny_shards, tmp_path, cli):
    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    index = json.loads(DataLayout(shards).index.read_text())
    index["splits"]["train"]["shards"][0]["count"] += 20
    DataLayout(shards).index.write_text(json.dumps(index))
    _one_line_error(cli("train-generalist", "--config", ROOT / "configs/tiny.yaml",
                        "--set", f"data.shards={shards}", "--set", f"run_dir={tmp_path / 'run'}"),
                    "index.json: its content does not match its checksum")


# 11. a garbage state_dict; an output that is a directory
def test_11_garbage_weights_and_output_directory(tiny_shards, tiny_generalist, tmp_path, cli):
    garbage = tmp_path / "model.pt"
    garbage.write_bytes(b"\x80\x04this is not a pickle of tensors")
    args = ["--config", ROOT / "configs/tiny.yaml", *_sets(tiny_shards, tmp_path / "run")]
    code, out, err = cli("import-generalist", *args, "--arch", "compact_cnn", "--weights", garbage,
                         "--classes", DataLayout(tiny_shards).classes)
    _one_line_error((code, out, err), f"{garbage}: not a")
    assert "weights_only" not in err
    run = tmp_path / "run2"
    shutil.copytree(RunLayout(tiny_generalist).generalist.dir, RunLayout(run).generalist.dir)
    write_clusters(run, ShardIndex.load(tiny_shards).class_names, [[0, 1, 2, 3]])
    train_specialists(load_config(ROOT / "configs/tiny.yaml", tiny_overrides(tiny_shards, run, "specialists.steps=2")))
    (tmp_path / "out").mkdir()
    _one_line_error(cli("predict", "--config", ROOT / "configs/tiny.yaml", *_sets(tiny_shards, run, "specialists.steps=2"),
                        "--input", f"shards:{tiny_shards}:test", "--output", tmp_path / "out"),
                    f"--output {tmp_path / 'out'}: is a directory")


# 12. a full file system (the file-size limit makes every write past it fail as a full disk would)
def test_12_full_disk_is_one_line_and_leaves_no_partial_checkpoint(tiny_shards, reference, tmp_path):
    run = tmp_path / "run"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))  # the weights (≈ 45 KB) cannot be written

    result = subprocess.run(_cmd("train-generalist", tiny_shards, run, *GEN), env=ENV, capture_output=True, text=True,
                            preexec_fn=limit)
    _one_line_error(result, "cannot write", "File too large")
    gen = RunLayout(run).generalist
    assert not list(gen.checkpoints.glob(".*")) and not _steps(gen.checkpoints) and not gen.weights.exists()
    result = subprocess.run(_cmd("train-generalist", tiny_shards, run, *GEN), env=ENV, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert _same_weights(gen.weights, RunLayout(reference).generalist.weights)


def test_12_read_only_run_directory(tiny_shards, tmp_path):
    """A run directory the process may not write: one line, nothing written. (Root ignores file modes;
    as root the command runs without the capabilities that let it, through util-linux's setpriv.)"""
    run = tmp_path / "run"
    run.mkdir()
    os.chmod(run, 0o555)
    cmd = _cmd("train-generalist", tiny_shards, run)
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        assert setpriv, "util-linux's setpriv is needed to test a read-only directory as root"
        cmd = [setpriv, "--bounding-set=-dac_override,-dac_read_search", *cmd]
    result = subprocess.run(cmd, env={**ENV, "PYTHONDONTWRITEBYTECODE": "1"}, capture_output=True, text=True)
    _one_line_error(result, "cannot write", str(run), "Permission denied")
    assert list(run.iterdir()) == []


# 13. a specialist's weights replaced behind its card
def test_13_replaced_weights_are_refused(tiny_shards, tiny_generalist, tmp_path, cli):
    run = tmp_path / "run"
    shutil.copytree(RunLayout(tiny_generalist).generalist.dir, RunLayout(run).generalist.dir)
    write_clusters(run, ShardIndex.load(tiny_shards).class_names, [[0, 1, 2, 3], [4, 5, 6, 7]])
    train_specialists(load_config(ROOT / "configs/tiny.yaml", tiny_overrides(tiny_shards, run, "specialists.steps=3")))
    layout = RunLayout(run)
    shutil.copy(layout.specialist(1).weights, layout.specialist(0).weights)  # same shape, other weights
    _one_line_error(cli("evaluate", "--config", ROOT / "configs/tiny.yaml", *_sets(tiny_shards, run, "specialists.steps=3")),
                    f"{layout.specialist(0).weights}: the weights are not those its card model.json describes")
    assert not layout.metrics("test").exists()


# 14. an empty class folder
def test_14_empty_class_folder(tmp_path, cli):
    root = tmp_path / "images"
    for name, n in (("cat", 3), ("dog", 3), ("eel", 0)):
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.new("L", (8, 8), 40 * i).save(root / name / f"{i}.png")
    _one_line_error(cli("prepare", "--source", f"imagefolder:{root}", "--out", tmp_path / "out"),
                    f"{root / 'eel'}: class folder holds no .jpg/.jpeg/.png images")
    assert not (tmp_path / "out").exists()
