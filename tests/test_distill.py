"""Distillation (section 2): the loss against hand-computed values, the ensemble teacher against the
engine, the stage (resumable, in evaluate and predict as a predictor)."""

import json
import math
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, tiny_overrides, write_clusters

from specialists.artifacts.model_card import read_card
from specialists.artifacts.teacher_cache import CachedTargets, compress, read_targets, write_targets
from specialists.config import load_config
from specialists.data import ShardIndex, eval_batches, normalize
from specialists.ensemble import load_ensemble
from specialists.errors import DataError
from specialists.layout import RunLayout
from specialists.stages.distill import _teacher
from specialists.stages.specialists import run as train_specialists
from specialists.train.losses import distillation_loss

SETS = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]


def test_distillation_loss_hand_computed():
    z = torch.tensor([[2.0, 0.0, -1.0]])
    t = torch.tensor([[0.5, 0.3, 0.2]])
    y = torch.tensor([1])
    alpha, temp = 0.7, 2.0
    # soft target softmax(log t / T) ∝ t^(1/T); student softmax(z / T)
    p = [v ** 0.5 for v in (0.5, 0.3, 0.2)]
    p = [v / sum(p) for v in p]
    s = [math.exp(v / temp) for v in (2.0, 0.0, -1.0)]
    s = [v / sum(s) for v in s]
    kl = sum(pi * (math.log(pi) - math.log(si)) for pi, si in zip(p, s, strict=True))
    ce = -math.log(math.exp(0.0) / sum(math.exp(v) for v in (2.0, 0.0, -1.0)))
    expected = alpha * temp**2 * kl + (1 - alpha) * ce
    assert distillation_loss(z, t.log(), y, alpha=alpha, temperature=temp).item() == pytest.approx(expected, rel=1e-6)


def test_distillation_loss_without_the_soft_term_is_cross_entropy():
    torch.manual_seed(0)
    z, t, y = torch.randn(8, 5), torch.softmax(torch.randn(8, 5), 1), torch.randint(0, 5, (8,))
    ce = F.cross_entropy(z, y)
    assert torch.equal(distillation_loss(z, t.log(), y, alpha=0.0, temperature=1.0), ce)
    assert torch.equal(distillation_loss(z, None, y, alpha=0.9, temperature=3.0), ce)
    # alpha = 1, T = 1: KL to the teacher, zero (and flat) when the student is the teacher
    logits = t.log().clone().requires_grad_()
    loss = distillation_loss(logits, t.log(), y, alpha=1.0, temperature=1.0)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-6) and logits.grad.abs().max() < 1e-6


@pytest.fixture(scope="module")
def run(tiny_shards, tiny_generalist, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("distill") / "run"
    shutil.copytree(RunLayout(tiny_generalist).generalist.dir, RunLayout(run).generalist.dir)
    write_clusters(run, ShardIndex.load(tiny_shards).class_names, SETS)
    train_specialists(load_config(ROOT / "configs/tiny.yaml", tiny_overrides(tiny_shards, run, "specialists.steps=20")))
    return run


def _overrides(shards: Path, run: Path, *extra: str) -> list[str]:
    return tiny_overrides(shards, run, "specialists.steps=20", "distill.epochs=3", "distill.lr=0.05",
                          "distill.checkpoint_every=5", "data.augment=crop", *extra)


def test_ensemble_teacher_is_the_engine_on_the_same_view(tiny_shards, run):
    cfg = load_config(ROOT / "configs/tiny.yaml", _overrides(tiny_shards, run, "inference.top_n=2"))
    index = ShardIndex.load(tiny_shards)
    images, _, _ = next(iter(eval_batches(index, cfg.data, "val", batch_size=40)))
    x = normalize(images, cfg.data)
    teacher = _teacher(cfg, index, torch.device("cpu"))
    q = load_ensemble(cfg).engine.predict(x, return_q=True).q
    assert torch.equal(teacher(x), q.clamp_min(1e-30).log()) and torch.allclose(q.sum(1), torch.ones(40))
    generalist = _teacher(load_config(ROOT / "configs/tiny.yaml", _overrides(tiny_shards, run, "distill.teacher=generalist")),
                          index, torch.device("cpu"))
    assert torch.allclose(generalist(x).exp(), load_ensemble(cfg).engine.general_probs(x), atol=1e-6)


def _cmd(shards: Path, run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "specialists.cli", "distill", "--config", str(ROOT / "configs/tiny.yaml"),
            *sum((["--set", s] for s in _overrides(shards, run, *extra)), [])]


def _newest_step(checkpoints: Path) -> int:
    return max((json.loads(p.read_text())["step"] for p in checkpoints.glob("ckpt-*/state.json")), default=0)


def test_kill_and_resume_the_student(tiny_shards, run, tmp_path):
    runs = {label: tmp_path / label for label in ("ref", "killed")}
    for r in runs.values():
        shutil.copytree(run, r)
    subprocess.run(_cmd(tiny_shards, runs["ref"]), check=True, capture_output=True)
    student = RunLayout(runs["killed"]).student("ensemble")
    proc = subprocess.Popen(_cmd(tiny_shards, runs["killed"]), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and _newest_step(student.checkpoints) < 15 and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = _newest_step(student.checkpoints)
    assert not student.weights.exists() and 15 <= saved < 36, "finished before it could be killed"
    result = subprocess.run(_cmd(tiny_shards, runs["killed"], "distill.alpha=0.5"), capture_output=True, text=True)
    assert result.returncode == 2 and "checkpoints made with distill.alpha=0.3, the config now says 0.5" in result.stderr
    result = subprocess.run(_cmd(tiny_shards, runs["killed"]), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"at step {saved}" in result.stderr
    a, b = (read_card(RunLayout(r).student("ensemble")) for r in runs.values())
    assert a.sha256 == b.sha256, "the resumed student's weights differ from the uninterrupted one's"
    assert b.training["steps"] == 36 and b.training["teacher"] == "ensemble" and b.role == "student"


def test_students_in_evaluate_and_predict(tiny_shards, run, tmp_path, cli):
    run = shutil.copytree(run, tmp_path / "run")
    args = ["--config", ROOT / "configs/tiny.yaml"]
    for teacher in ("ensemble", "generalist", "none"):
        code, _, err = cli("distill", *args, *sum((["--set", s] for s in _overrides(tiny_shards, run,
                                                                                    f"distill.teacher={teacher}")), []))
        assert code == 0, err
    sets = sum((["--set", s] for s in _overrides(tiny_shards, run)), [])
    code, out, err = cli("evaluate", *args, *sets)
    assert code == 0, err
    metrics = json.loads(RunLayout(run).metrics("test").read_text())
    names = ["student:ensemble", "student:generalist", "student:none"]
    assert list(metrics["predictors"]) == ["generalist", "ensemble", *names]
    for name in names:
        p = metrics["predictors"][name]
        assert set(p["vs"]) == {"ensemble", *names} - {name}
        mc = p["vs"]["ensemble"]["mcnemar"]
        assert mc["c"] - mc["b"] == p["correct"] - metrics["predictors"]["ensemble"]["correct"]
        assert metrics["cost"][name]["forward_passes_per_image"] == 1.0 and metrics["cost"][name]["ms_per_image"] > 0
    ens = metrics["predictors"]["ensemble"]
    assert metrics["cost"]["ensemble"]["forward_passes_per_image"] == pytest.approx(1 + ens["mean_active_specialists"])
    assert "student:none vs ensemble" in out and "Cost per image" in out
    # predict serves a student: the same top-1 as evaluate's records, no generalist column
    code, _, err = cli("predict", *args, *sets, "--input", f"shards:{tiny_shards}:test", "--output", tmp_path / "p.jsonl",
                       "--predictor", "student:none")
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(rows) == 96 and set(rows[0]) == {"input", "class", "name", "prob"}
    correct = sum(int(r["class"]) == int(y) for r, (_, y) in zip(rows, _test_labels(tiny_shards), strict=True))
    assert correct == metrics["predictors"]["student:none"]["correct"]
    code, _, err = cli("predict", *args, *sets, "--input", f"shards:{tiny_shards}:test", "--output", tmp_path / "q.jsonl",
                       "--predictor", "student:wide")
    assert code == 2 and "no finished student 'wide'" in err and err.count("\n") == 1


def _test_labels(shards: Path) -> list[tuple[int, int]]:
    cfg = load_config(ROOT / "configs/tiny.yaml", [f"data.shards={shards}"])
    out = []
    for _, labels, valid in eval_batches(ShardIndex.load(shards), cfg.data, "test"):
        out += [(0, int(y)) for y in labels[valid]]
    return out


def _cached(q: torch.Tensor, k: int, temperatures: tuple[float, ...] = (1.0,)) -> CachedTargets:
    return CachedTargets(*compress(q.log(), k, temperatures), np.zeros(len(q), dtype=np.uint32),
                         np.asarray(temperatures, dtype=np.float32))


def test_cached_top_k_rebuilds_within_its_stored_mass():
    torch.manual_seed(0)
    q = torch.softmax(torch.randn(50, 30) * 3, dim=1)
    rest = _cached(q, 5).rest
    rebuilt = _cached(q, 5).log_targets(0, 50, 30).exp()
    assert torch.allclose(rebuilt.sum(1), torch.ones(50), atol=1e-6)
    top = q.topk(5, dim=1)
    assert torch.allclose(rebuilt.gather(1, top.indices), top.values, rtol=1e-6)  # the top-k
    l1 = (rebuilt - q).abs().sum(1)
    assert (l1 <= 2 * torch.from_numpy(rest) + 1e-6).all() and l1.max() > 0
    full = _cached(q, 30).log_targets(0, 50, 30).exp()
    assert torch.allclose(full, q, rtol=1e-6, atol=0)  # k = C: the teacher itself


def test_cached_targets_soften_like_the_teacher():
    """At T > 1 the rebuilt target, softened, equals the softened teacher on its top-k and on the
    rest's total; spreading the T = 1 rest evenly and softening after would inflate the rest."""
    torch.manual_seed(1)
    c, k = 200, 5
    logits = torch.randn(40, c) * 5
    logits[:, 0] += 15  # a confident teacher: 4% of the mass off its top-k
    q = torch.softmax(logits, dim=1).double()
    cached = _cached(q, k, (1.0, 2.0, 4.0))
    top = q.topk(k, dim=1).indices
    for temp in (2.0, 4.0):
        exact = torch.softmax(q.log() / temp, dim=1)
        rebuilt = torch.softmax(cached.log_targets(0, 40, c, temp).double() / temp, dim=1)
        assert torch.allclose(rebuilt.gather(1, top), exact.gather(1, top), rtol=1e-5)
        rest = 1 - exact.gather(1, top).sum(1)
        assert torch.allclose(1 - rebuilt.gather(1, top).sum(1), rest, rtol=1e-4)
        # the even T = 1 tail softened after: more mass off the top-k than the teacher puts there
        naive = torch.softmax(cached.log_targets(0, 40, c, 1.0).double() / temp, dim=1)
        assert ((1 - naive.gather(1, top).sum(1)) > 1.05 * rest).all()
    with pytest.raises(DataError, match="no cached tail for temperature 3"):
        cached.log_targets(0, 40, c, 3.0)


def test_teacher_cache_with_every_class_trains_the_online_student(tiny_shards, run, tmp_path, cli):
    """A cache that keeps all 12 classes holds the teacher's q itself: the student is bit-identical to the
    online one; a second student on the same views reads the cache instead of running the teacher."""
    run = shutil.copytree(run, tmp_path / "run")
    args = ["--config", ROOT / "configs/tiny.yaml"]

    def distill(*extra: str):
        return cli("distill", *args, *sum((["--set", s] for s in _overrides(tiny_shards, run, *extra)), []))

    assert distill("distill.name=online")[0] == 0
    code, _, err = distill("distill.name=cached", "distill.teacher_cache=true", "distill.cache_top_k=12")
    assert code == 0, err
    layout = RunLayout(run)
    assert read_card(layout.student("online")).sha256 == read_card(layout.student("cached")).sha256
    files = sorted((run / "teacher-cache").rglob("*.npz"))
    assert len(files) == 3  # one per epoch, one process
    stamps = [f.stat().st_mtime_ns for f in files]
    code, _, err = distill("distill.name=cached-alpha", "distill.teacher_cache=true", "distill.cache_top_k=12",
                           "distill.alpha=0.5")
    assert code == 0 and [f.stat().st_mtime_ns for f in files] == stamps  # reused, not rebuilt

    # A cache made for other views (here: one view's fingerprint changed) stops the student with a
    # one-line error naming the file, not a student trained on another image's targets.
    cached = read_targets(files[1])
    cached.views[5] ^= 1
    write_targets(files[1], cached)
    code, _, err = distill("distill.name=cached-stale", "distill.teacher_cache=true", "distill.cache_top_k=12")
    assert code == 2 and str(files[1]) in err and len(err.strip().splitlines()) == 1, err
    first, last = map(int, re.search(r"cached for other training views \(images (\d+)\.\.(\d+) differ\)", err).groups())
    assert first <= 5 <= last  # the batch that holds the changed view
    assert not layout.student("cached-stale").card.exists()


def test_two_process_student_is_in_sync_and_evaluated_exactly(tiny_shards, run, tmp_path):
    """accelerate launch, 2 CPU processes: DDP keeps both ranks' weights identical; the validation
    logged during training equals a 1-process evaluation of the saved student. (Two processes are not
    bit-identical to one: each process takes its own half of the batch, so float sums differ.)"""
    from accelerate import Accelerator

    from specialists.artifacts.model_card import load_model
    from specialists.train.evaluate import evaluate

    run = shutil.copytree(run, tmp_path / "run")
    sets = _overrides(tiny_shards, run, "distill.teacher=ensemble", "distill.epochs=2")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "-m", "specialists.cli", "distill", "--config", str(ROOT / "configs/tiny.yaml"),
           *sum((["--set", s] for s in sets), [])]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    student = RunLayout(run).student("ensemble")
    card = read_card(student)
    cfg = load_config(ROOT / "configs/tiny.yaml", sets)
    assert card.training["world_size"] == 2 and card.training["ranks_in_sync"] is True
    from specialists.data import train_batches

    per_epoch = len(train_batches(ShardIndex.load(tiny_shards), cfg.data, epoch=0, seed=0, rank=0, world_size=2))
    assert per_epoch == 5 and card.training["steps"] == 2 * per_epoch  # each rank: 4 of the 8 shards, 5 batches
    last = json.loads(student.train_log.read_text().splitlines()[-1])
    model, _ = load_model(student)
    figures = evaluate(model, eval_batches(ShardIndex.load(tiny_shards), cfg.data, "val"), Accelerator(cpu=True), cfg.data)
    assert figures["n"] == last["val_n"] == 96 and figures["top1"] == pytest.approx(last["val_top1"], abs=1e-12)
