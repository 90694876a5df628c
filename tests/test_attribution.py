"""Where the gain comes from: random class sets (the clustering's ablation), a plain ensemble of K
fine-tuned copies (the specialisation's), and `specialists compare` joining their runs."""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import ROOT, tiny_overrides, write_clusters

from clustering import cluster_classes, random_class_sets
from specialists.artifacts.model_card import read_card
from specialists.config import load_config
from specialists.data import ShardIndex
from specialists.ensemble import MeanEnsemble, load_control_engine, load_ensemble
from specialists.layout import RunLayout
from specialists.stages.control import copy_steps
from specialists.stages.control import run as train_control
from specialists.stages.specialists import run as train_specialists


def planted_cov(groups: int, size: int, seed: int = 0) -> np.ndarray:
    """A covariance whose classes are confused only inside planted groups of ``size``."""
    rng = np.random.default_rng(seed)
    c = groups * size
    cov = rng.normal(0, 0.01, (c, c))
    for g in range(groups):
        cov[g * size:(g + 1) * size, g * size:(g + 1) * size] += 1.0
    return (cov + cov.T) / 2 + np.eye(c)


def coverage_counts(sets: list[list[int]], c: int) -> np.ndarray:
    return np.bincount([i for s in sets for i in s], minlength=c)


@pytest.mark.parametrize("options", [{"coverage": 2}, {"coverage": 1}, {"classes_per_specialist": 7}, {}])
def test_random_sets_keep_the_sizes_and_coverage_of_kmeans(options):
    cov = planted_cov(6, 5)  # 30 classes in 6 groups of 5
    kmeans = cluster_classes(cov, 6, method="faiss", seed=0, **options)
    drawn = cluster_classes(cov, 6, method="random", seed=0, **options)
    if options:  # sizes and coverage are the options' own: the same as k-means's, set by set
        assert sorted(map(len, drawn)) == sorted(map(len, kmeans))
        # how many classes sit in 1, 2, … sets (which ones: data-dependent for classes_per_specialist)
        assert sorted(coverage_counts(drawn, 30)) == sorted(coverage_counts(kmeans, 30))
    else:  # disjoint k-means sizes depend on the covariance: random sets are then an even partition
        assert sorted(map(len, drawn)) == [5] * 6
        assert coverage_counts(drawn, 30).tolist() == [1] * 30
    assert all(s == sorted(set(s)) for s in drawn)
    assert drawn != kmeans


def test_random_sets_are_seeded_and_never_look_at_the_covariance():
    cov = planted_cov(6, 5)
    other = planted_cov(3, 10, seed=1)  # another covariance of the same size
    a = cluster_classes(cov, 6, method="random", seed=3, coverage=2)
    assert a == cluster_classes(other, 6, method="random", seed=3, coverage=2)
    assert a == random_class_sets(30, 6, seed=3, coverage=2)
    assert a != cluster_classes(cov, 6, method="random", seed=4, coverage=2)
    # k-means finds the planted groups; random sets hold about chance of a group's pairs
    groups = [list(range(g * 5, (g + 1) * 5)) for g in range(6)]
    assert sorted(cluster_classes(cov, 6, method="faiss", seed=0)) == groups
    inside = sum(len(set(s) & set(g)) ** 2 for s in random_class_sets(30, 6, seed=0) for g in groups)
    assert inside < 0.5 * 6 * 25  # k-means sets: 6 · 25 pairs inside groups


def test_config_takes_random_and_copies(tmp_path):
    cfg = load_config(ROOT / "configs/tiny.yaml", ["clustering.method=random", "control.copies=3"])
    assert cfg.clustering.method == "random" and cfg.control.copies == 3
    with pytest.raises(Exception, match="control.copies: expected a positive integer, got 0"):
        load_config(ROOT / "configs/tiny.yaml", ["control.copies=0"])
    assert copy_steps(300, 3) == [100, 100, 100] and copy_steps(301, 3) == [101, 100, 100]


SETS = [[0, 1, 2, 3], [4, 5, 6, 7]]
STEPS = 30


@pytest.fixture(scope="module")
def copies_run(tiny_shards, tiny_generalist, tmp_path_factory):
    """Two specialists of 30 steps, the one-copy control (60 steps) and a plain ensemble of 3 copies (20 each)."""
    run = tmp_path_factory.mktemp("attribution") / "run"
    shutil.copytree(RunLayout(tiny_generalist).generalist.dir, RunLayout(run).generalist.dir)
    write_clusters(run, ShardIndex.load(tiny_shards).class_names, SETS)
    over = tiny_overrides(tiny_shards, run, f"specialists.steps={STEPS}", "specialists.eval_every=10",
                          "data.augment=crop", "inference.control=true", "inference.top_n=2")
    train_specialists(load_config(ROOT / "configs/tiny.yaml", over))
    for k in (1, 3):
        train_control(load_config(ROOT / "configs/tiny.yaml", [*over, f"control.copies={k}"]))
    return run, over


def test_copies_train_with_distinct_seeds_and_split_the_steps(copies_run):
    run, _ = copies_run
    layout = RunLayout(run)
    cards = [read_card(p) for p in layout.control_copies(3)]
    assert [c.training["steps"] for c in cards] == [20, 20, 20]
    assert len({c.training["seed"] for c in cards}) == 3
    assert len({c.sha256 for c in cards}) == 3, "copies with their own seeds must differ"
    assert [c.deciding["copy"] for c in cards] == [0, 1, 2] and {c.deciding["copies"] for c in cards} == {3}
    assert read_card(layout.control).training["steps"] == 2 * STEPS and "copies" not in read_card(layout.control).deciding
    assert layout.control_counts() == [1, 3]


def test_mean_rule_equals_the_solver_for_copies(copies_run, tiny_shards):
    run, over = copies_run
    cfg = load_config(ROOT / "configs/tiny.yaml", [*over, "inference.tol=1.0e-10"])
    loaded = load_ensemble(cfg)
    solver = load_control_engine(cfg, loaded, 3)
    images = torch.randn(16, 1, 16, 16)
    a, b = solver.predict(images, return_q=True), MeanEnsemble(solver).predict(images, return_q=True)
    # with every member over every class, eq. 5's optimum is the plain mean (one EM step from anywhere)
    torch.testing.assert_close(a.q, b.q, atol=1e-6, rtol=0)
    assert torch.equal(a.top1, b.top1) and b.active.all() and b.active.shape == (16, 3)


def test_evaluate_reports_both_rules_and_compare_joins_a_random_run(copies_run, tiny_shards, cli, tmp_path):
    run, over = copies_run
    sets = sum((["--set", s] for s in over), [])
    code, out, _ = cli("evaluate", "--config", ROOT / "configs/tiny.yaml", *sets)
    assert code == 0
    metrics = json.loads(RunLayout(run).metrics("test").read_text())
    preds, cost = metrics["predictors"], metrics["cost"]
    assert {"ensemble", "control", "control-x3", "control-x3-mean"} <= set(preds)
    assert preds["control-x3"]["correct"] == preds["control-x3-mean"]["correct"]
    assert cost["control-x3"]["forward_passes_per_image"] == cost["control-x3-mean"]["forward_passes_per_image"] == 4.0
    assert cost["control"]["forward_passes_per_image"] == 2.0
    assert cost["control-x3"]["training_steps"] == cost["control"]["training_steps"] == cost["ensemble"]["training_steps"] \
        == 2 * STEPS and cost["generalist"]["training_steps"] == 0
    assert set(preds["control-x3"]["vs"]) == {"ensemble", "control", "control-x3-mean"}
    assert "control-x3-mean vs control-x3: +0 correct" in out and "training steps" in out

    # the random-set rival: its own run (its own clusters.json), the same generalist
    rand = tmp_path / "random"
    shutil.copytree(RunLayout(run).generalist.dir, RunLayout(rand).generalist.dir)
    rover = [*over[:1], f"run_dir={rand}", *over[2:], "clustering.method=random", "clustering.num_specialists=2",
             "inference.control=false"]
    rsets = sum((["--set", s] for s in rover), [])
    for stage in ("cluster", "train-specialists", "evaluate"):
        code, _, err = cli(stage, "--config", ROOT / "configs/tiny.yaml", *rsets)
        assert code == 0, err
    drawn = json.loads(RunLayout(rand).clusters.read_text())
    assert drawn["method"]["algorithm"] == "random" and sorted(map(len, (s["classes"] for s in drawn["specialists"]))) == [6, 6]

    code, out, _ = cli("compare", "--group", f"s0={run},{rand}", "--group", f"again={run}", "--out", tmp_path / "table")
    assert code == 0
    result = json.loads((tmp_path / "table.json").read_text())
    rows = result["groups"]["s0"]
    assert list(result["summary"])[:3] == ["generalist", "ensemble", "ensemble (random sets)"]
    random_metrics = json.loads(RunLayout(rand).metrics("test").read_text())
    assert rows["ensemble (random sets)"]["correct"] == random_metrics["predictors"]["ensemble"]["correct"]
    assert rows["ensemble"]["correct"] == preds["ensemble"]["correct"]
    mc = rows["control-x3"]["vs_ensemble"]["mcnemar"]
    assert mc == preds["control-x3"]["vs"]["ensemble"]["mcnemar"]  # the same pairs as evaluate's own
    assert result["summary"]["ensemble (random sets)"]["seeds"] == 1 and result["summary"]["ensemble"]["seeds"] == 2
    assert "| ensemble (random sets) | 1 |" in (tmp_path / "table.md").read_text()
    assert len((tmp_path / "table.tsv").read_text().splitlines()) == 1 + len(rows) + len(result["groups"]["again"])


def test_compare_refuses_runs_of_another_generalist(copies_run, tiny_run, cli, tmp_path):
    run, _ = copies_run
    code, _, err = cli("compare", "--group", f"{run},{tiny_run}", "--out", tmp_path / "t")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "answers differently" in err or "labels differ" in err
