"""The cluster and report stages on tiny synthetic data (12 classes in 3 planted groups of 4)."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from specialists.artifacts.clusters import load_clusters
from specialists.artifacts.model_card import load_model, read_card, save_model
from specialists.cli import main
from specialists.config import load_config
from specialists.data import ShardIndex, eval_batches, normalize
from specialists.errors import UserError
from specialists.io import read_json
from specialists.layout import RunLayout

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
PLANTED = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]


@pytest.fixture(scope="module")
def trained(tiny_shards, tmp_path_factory) -> Path:
    """A run directory holding a tiny generalist (3 epochs, a few seconds)."""
    run = tmp_path_factory.mktemp("cluster") / "trained"
    code = main(["train-generalist", *tiny_args(tiny_shards, run, "--set", "generalist.epochs=3",
                                                "--set", "generalist.lr=0.4")])
    assert code == 0
    return run


def tiny_args(tiny_shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["--config", str(ROOT / "configs/tiny.yaml"), "--set", f"data.shards={tiny_shards}",
            "--set", f"run_dir={run_dir}", "--set", "data.shard_size=50", *extra]


def new_run(trained: Path, where: Path) -> Path:
    """A fresh run directory with a copy of the trained generalist."""
    shutil.copytree(trained / "generalist", where / "generalist")
    return where


def independent_outputs(run: Path, tiny_shards: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The generalist's softmax rows (N, C) float64, labels and top-1 on val, computed here without the stage."""
    cfg = load_config(ROOT / "configs/tiny.yaml", [f"data.shards={tiny_shards}"])
    model, _ = load_model(RunLayout(run).generalist)
    probs, labels = [], []
    with torch.no_grad():
        for images, y, valid in eval_batches(ShardIndex.load(tiny_shards), cfg.data, "val", batch_size=7):
            probs.append(model(normalize(images, cfg.data)).softmax(1).double()[valid])  # float32 softmax, as fed
            labels.append(y[valid])
    p = torch.cat(probs).numpy()
    return p, torch.cat(labels).numpy(), p.argmax(1)


@pytest.fixture(scope="module")
def clustered(trained, tiny_shards, tmp_path_factory) -> Path:
    run = new_run(trained, tmp_path_factory.mktemp("clustered"))
    assert main(["cluster", *tiny_args(tiny_shards, run)]) == 0
    return run


def test_clusters_json_format_and_sets(clustered, tiny_shards):
    data = json.loads(RunLayout(clustered).clusters.read_text())
    assert list(data) == ["num_classes", "class_names", "specialists", "method", "quality", "deciding"]
    assert data["num_classes"] == 12 and data["class_names"] == ShardIndex.load(tiny_shards).class_names
    assert [s["id"] for s in data["specialists"]] == [0, 1, 2]  # tiny.yaml: 3 specialists, disjoint
    sets = [s["classes"] for s in data["specialists"]]
    assert sorted(i for s in sets for i in s) == list(range(12))
    assert sorted(sets) == PLANTED  # the planted groups of confusable classes are found
    method = data["method"]
    assert method["generalist_sha256"] == read_card(RunLayout(clustered).generalist).sha256
    assert data["deciding"]["generalist"] == method["generalist_sha256"] and data["deciding"]["clustering.num_specialists"] == 3
    assert (method["split"], method["world_size"], method["num_images"], method["num_specialists"]) == ("val", 1, 96, 3)
    assert method["columns"] == "correlation" and method["classes_per_specialist"] is None
    clusters = load_clusters(RunLayout(clustered).clusters, data["class_names"])
    assert clusters.sets == sets and clusters.ids == [0, 1, 2]


def test_covariance_and_quality_match_an_independent_computation(clustered, tiny_shards):
    p, true, pred = independent_outputs(clustered, tiny_shards)
    assert p.shape == (96, 12)
    cov = np.load(RunLayout(clustered).covariance)
    assert cov.dtype == np.float64 and cov.shape == (12, 12)
    np.testing.assert_allclose(cov, np.cov(p, rowvar=False, bias=True), rtol=0, atol=1e-10)
    # quality: errors whose (true, predicted) pair lies inside one set, counted by hand
    data = read_json(RunLayout(clustered).clusters)
    sets = [set(s["classes"]) for s in data["specialists"]]
    errors = [(t, q) for t, q in zip(true, pred, strict=True) if t != q]
    inside = sum(any(t in s and q in s for s in sets) for t, q in errors)
    quality = data["quality"]
    assert quality["num_errors"] == len(errors) > 0
    assert quality["num_errors_inside"] == inside
    assert quality["error_share_inside"] == pytest.approx(inside / len(errors))
    assert quality["chance_share"] == pytest.approx(3 * 4 * 3 / (12 * 11))  # 3 sets of 4: 36 of 132 ordered pairs
    assert quality["generalist_top1"] == pytest.approx((true == pred).mean())
    # the sparse confusion counts
    with np.load(RunLayout(clustered).confusion) as z:
        dense = np.zeros((12, 12), dtype=np.int64)
        dense[z["true"], z["pred"]] = z["count"]
    expected = np.zeros((12, 12), dtype=np.int64)
    np.add.at(expected, (true, pred), 1)
    np.testing.assert_array_equal(dense, expected)


def test_rerun_is_skipped_and_other_options_need_force(trained, tiny_shards, tmp_path, cli):
    run = new_run(trained, tmp_path)
    assert cli("cluster", *tiny_args(tiny_shards, run))[0] == 0
    files = (RunLayout(run).clusters, RunLayout(run).covariance)
    stamps = [f.stat().st_mtime_ns for f in files]
    code, out, _ = cli("cluster", *tiny_args(tiny_shards, run))
    assert code == 0 and "(already there)" in out
    assert [f.stat().st_mtime_ns for f in files] == stamps
    code, _, err = cli("cluster", *tiny_args(tiny_shards, run, "--set", "clustering.num_specialists=2"))
    assert code == 2 and err.count("\n") == 1
    assert "made with clustering.num_specialists=3, the config now says 2; pass --force to redo it" in err
    code, out, err = cli("cluster", *tiny_args(tiny_shards, run, "--set", "clustering.num_specialists=2"), "--force")
    assert code == 0, err
    assert len(read_json(RunLayout(run).clusters)["specialists"]) == 2


def test_overlapping_sets(trained, tiny_shards, tmp_path, cli):
    run = new_run(trained, tmp_path)
    code, out, err = cli("cluster", *tiny_args(tiny_shards, run, "--set", "clustering.num_specialists=3",
                                               "--set", "clustering.classes_per_specialist=5"))
    assert code == 0, err
    data = read_json(RunLayout(run).clusters)
    sets = [s["classes"] for s in data["specialists"]]
    assert [len(s) for s in sets] == [5, 5, 5] and all(s == sorted(set(s)) for s in sets)
    assert data["method"]["classes_per_specialist"] == 5
    # each planted group lies inside one of the sets
    assert all(any(set(g) <= set(s) for s in sets) for g in PLANTED)


def test_report_pages_and_files(clustered, tmp_path, monkeypatch, cli):
    monkeypatch.chdir(tmp_path)  # `report --run DIR` needs nothing but DIR
    code, out, err = cli("report", "--run", clustered)
    assert code == 0, err
    index = RunLayout(clustered).report_index
    assert out.strip() == str(index)
    page = index.read_text()
    for m in range(3):
        assert f"specialist {m}</a>" in page
    pages = [index] + [RunLayout(clustered).report_dir / f"specialist-{m:03d}.html" for m in range(3)]
    referenced = {ref for p in pages for ref in re.findall(r'(?:src|href)="([^"]+)"', p.read_text())}
    assert {"covariance.png", "coverage.png", "specialist-002.html", "confusion-000.png"} <= referenced
    missing = [ref for ref in referenced if not (RunLayout(clustered).report_dir / ref).is_file()]
    assert not missing
    strips = sorted((RunLayout(clustered).report_dir / "strips").iterdir())
    assert len(strips) == 12  # every class has example images
    names = read_json(RunLayout(clustered).clusters)["class_names"]
    data = read_json(RunLayout(clustered).clusters)
    for m, spec in enumerate(data["specialists"]):
        text = (RunLayout(clustered).report_dir / f"specialist-{m:03d}.html").read_text()
        assert all(names[i] in text for i in spec["classes"])
        assert text.split("<h2>Classes</h2>")[1].count('class="strip"') == len(spec["classes"])
        assert f'src="sheet-{m:03d}.png"' in text


def test_read_examples_reads_only_what_it_needs(tiny_shards):
    from specialists.reports.clusters import read_examples

    index = ShardIndex.load(tiny_shards)
    examples = read_examples(index, [3, 7], per_class=4, size=16, channels=1)
    assert sorted(examples) == [3, 7]
    assert all(e.shape == (4, 16, 16) and e.dtype == np.uint8 for e in examples.values())
    assert not np.array_equal(examples[3][0], examples[7][0])


def test_too_many_specialists_is_a_one_line_error(trained, tiny_shards, tmp_path, cli):
    run = new_run(trained, tmp_path)
    code, _, err = cli("cluster", *tiny_args(tiny_shards, run, "--set", "clustering.num_specialists=7"))
    assert code == 2 and err.count("\n") == 1
    assert "clustering.num_specialists=7" in err and "tiny.yaml" in err and "at most 6 specialists" in err
    assert not RunLayout(run).clusters.exists()


def test_missing_generalist_is_a_one_line_error(tiny_shards, tmp_path, cli):
    code, _, err = cli("cluster", *tiny_args(tiny_shards, tmp_path / "run"))
    assert code == 2 and err.count("\n") == 1
    assert f"{RunLayout(tmp_path / 'run').generalist.weights}: no generalist; run `specialists train-generalist`" in err


def test_nan_outputs_are_a_one_line_error(trained, tiny_shards, tmp_path, cli):
    run = new_run(trained, tmp_path)
    model, card = load_model(RunLayout(run).generalist)
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    save_model(RunLayout(run).generalist, model, card)
    code, _, err = cli("cluster", *tiny_args(tiny_shards, run))
    assert code == 2 and err.count("\n") == 1
    assert "outputs on the val split contain NaN/Inf" in err
    assert not RunLayout(run).clusters.exists() and not RunLayout(run).covariance.exists()


def test_generalist_of_other_classes_is_a_one_line_error(trained, tiny_shards, tmp_path, cli):
    run = new_run(trained, tmp_path)
    sidecar = RunLayout(run).generalist.card
    meta = read_json(sidecar)
    meta["class_names"][2] = "zebra"
    sidecar.write_text(json.dumps(meta))
    code, _, err = cli("cluster", *tiny_args(tiny_shards, run))
    assert code == 2 and err.count("\n") == 1
    assert "class names differ from" in err and "'zebra'" in err


def write_clusters(path: Path, **changes) -> Path:
    data = {"num_classes": 4, "class_names": ["a", "b", "c", "d"],
            "specialists": [{"id": 0, "classes": [0, 1]}, {"id": 1, "classes": [2, 3]}], "method": {}}
    data.update(changes)
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("changes, message", [
    ({"class_names": ["a", "b", "x", "d"]}, "class_names differ from the shards' classes.json (class 2: 'x' here, 'c' there)"),
    ({"num_classes": 5}, "num_classes is 5 but the shards' classes.json has 4 classes"),
    ({"specialists": [{"id": 0, "classes": [0, 4]}]}, "specialist 0: class 4 outside 0..3"),
    ({"specialists": [{"id": 0, "classes": [1]}]}, "specialist 0: 1 class(es), a specialist needs at least 2"),
    ({"specialists": [{"id": 3, "classes": [1, 2, 1]}]}, "specialist 3: class 1 appears twice"),
    ({"specialists": [{"id": 0, "classes": [0, 1]}, {"id": 0, "classes": [2, 3]}]}, "specialist id 0 appears twice"),
    ({"specialists": []}, "specialists must be a non-empty list"),
])
def test_load_clusters_rejects_what_does_not_fit(tmp_path, changes, message):
    path = write_clusters(RunLayout(tmp_path).clusters, **changes)
    with pytest.raises(UserError) as info:
        load_clusters(path, ["a", "b", "c", "d"])
    assert str(info.value) == f"{path}: {message}"
    assert load_clusters(write_clusters(tmp_path / "ok.json"), ["a", "b", "c", "d"]).sets == [[0, 1], [2, 3]]


def test_report_on_mismatched_clusters_is_a_one_line_error(clustered, tmp_path, cli):
    run = tmp_path / "run"
    shutil.copytree(clustered, run, ignore=shutil.ignore_patterns("report"))
    data = read_json(RunLayout(run).clusters)
    data["class_names"][0] = "cat"
    RunLayout(run).clusters.write_text(json.dumps(data))
    code, _, err = cli("report", "--run", run)
    assert code == 2 and err.count("\n") == 1
    assert f"{RunLayout(run).clusters}: class_names differ" in err and "'cat'" in err


def free_port() -> int:
    """A port nobody listens on: a fixed one collides when two test runs share the machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_distributed_two_processes_give_the_same_covariance(clustered, trained, tiny_shards, tmp_path):
    """2 CPU processes (gloo) over the val split's 2 shards: the all-reduced covariance is the 1-process one."""
    run = new_run(trained, tmp_path)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           str(ROOT / "tests/_distributed_cli.py"), "cluster", *tiny_args(tiny_shards, run)]
    result = subprocess.run(cmd, env={**ENV, "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("3 specialists over 12 classes") == 1  # printed by the main process only
    data, single = read_json(RunLayout(run).clusters), read_json(RunLayout(clustered).clusters)
    assert data["method"]["world_size"] == 2 and data["method"]["num_images"] == 96
    np.testing.assert_allclose(np.load(RunLayout(run).covariance), np.load(RunLayout(clustered).covariance),
                               rtol=0, atol=1e-12)
    assert data["specialists"] == single["specialists"] and data["quality"] == single["quality"]


def test_report_without_a_clustered_run_is_a_one_line_error(trained, tmp_path, cli):
    code, _, err = cli("report", "--run", tmp_path / "nowhere")
    assert code == 2 and err.count("\n") == 1 and "no such run directory" in err
    run = new_run(trained, tmp_path / "run")  # a generalist's config, but no clusters.json yet
    code, _, err = cli("report", "--run", run)
    assert code == 2 and err.count("\n") == 1
    assert f"{RunLayout(run).clusters}: not found; run `specialists cluster` first" in err
