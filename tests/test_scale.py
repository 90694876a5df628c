"""The JFT shape (configs/jft-shape.yaml) at a reduced size, every stage; and memory that does not
grow with the val split."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, write_clusters

from specialists.artifacts.shard_index import ShardIndex
from specialists.config import load_config
from specialists.layout import RunLayout

CLASSES, SPECIALISTS, PER_SPECIALIST = 600, 12, 60
SMALL = [f"data.synthetic.num_classes={CLASSES}", "data.synthetic.train_per_class=6", "data.synthetic.test_per_class=2",
         "data.shard_size=2000", f"clustering.num_specialists={SPECIALISTS}",
         f"clustering.classes_per_specialist={PER_SPECIALIST}", "generalist.epochs=1", "specialists.steps=4",
         "specialists.eval_every=4", "specialists.warmup_steps=1"]


def _sets(*values: str) -> list[str]:
    return sum((["--set", v] for v in values), [])


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """Shards of the reduced JFT shape with 10 and 20 val images per class (same train and test)."""
    from specialists.stages.prepare import run as prepare

    root = tmp_path_factory.mktemp("jft")
    for per in (10, 20):
        prepare(load_config(ROOT / "configs/jft-shape.yaml",
                            [*SMALL, f"data.synthetic.val_per_class={per}", f"data.shards={root}/val{per}"]))
    return root


def test_jft_shape_pipeline_at_reduced_size(shapes, tmp_path, cli):
    """600 classes, 12 × 60 overlapping sets, top-k covariance: run (every stage), report, predict."""
    run = tmp_path / "run"
    args = ["--config", ROOT / "configs/jft-shape.yaml",
            *_sets(*SMALL, "data.synthetic.val_per_class=10", f"data.shards={shapes}/val10", f"run_dir={run}")]
    code, out, err = cli("run", *args)
    assert code == 0, err
    layout = RunLayout(run)
    memory = json.loads(layout.stage_memory.read_text())
    assert list(memory) == ["prepare", "train-generalist", "cluster", "train-specialists", "train-control", "evaluate"]
    assert all(0.05 < gib < 8 for gib in memory.values())
    clusters = json.loads(layout.clusters.read_text())
    assert [len(s["classes"]) for s in clusters["specialists"]] == [PER_SPECIALIST] * SPECIALISTS
    assert len({c for s in clusters["specialists"] for c in s["classes"]}) == CLASSES  # every class in a set
    assert clusters["method"]["top_k"] == 20 and clusters["quality"]["num_images"] == 6000
    metrics = json.loads(layout.metrics("test").read_text())
    assert metrics["num_examples"] == 1200 and metrics["num_classes"] == CLASSES
    assert metrics["num_specialists"] == SPECIALISTS and "control" in metrics["predictors"]
    assert 1.0 <= metrics["predictors"]["ensemble"]["mean_active_specialists"] <= 2.0  # top-1: 1 or 2 sets
    code, out, err = cli("report", "--run", run)
    assert code == 0, err
    summary = json.loads((layout.report_dir / "summary.json").read_text())
    assert summary["num_classes"] == CLASSES and summary["uncovered_classes"] == 0
    preds = tmp_path / "preds.jsonl"
    code, out, err = cli("predict", *args, "--input", f"shards:{shapes}/val10:test", "--output", preds)
    assert code == 0, err
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert len(rows) == 1200 and all(0 <= r["class"] < CLASSES for r in rows)
    assert rows[0]["input"].startswith("test/")


def _peak_kib(*args) -> int:
    """Peak RSS of a CLI command in a subprocess. glibc's allocator there gets a fixed mmap threshold:
    with its default, growing one, the same command's peak varies by ±15 MiB from run to run (freed
    large blocks stay in the heap in whatever order they came); fixed, by ±0.3 MiB."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    result = subprocess.run([sys.executable, str(ROOT / "tests/_peak_rss.py"), *map(str, args)], capture_output=True,
                            text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return int(result.stdout.strip().splitlines()[-1])


def test_specialists_stage_memory_does_not_grow_with_val(shapes, tmp_path):
    """6,000 then 12,000 val images of 600 classes, both beyond the in-memory sample (held_out.SAMPLE_ROWS,
    32,768 in use, lowered to 3,000 here): the peak resident memory of train-specialists grows by less
    than 3 MiB (what grows is N ints of labels). Holding the split as the stage did before (its images,
    the generalist's N × 600 logits and N × 64 features, the dustbin fit's N × 540 float64 gather) grew
    by 69 MiB for the 6,000 more images (measured at 196965f, docs/MEMORY.md)."""
    from specialists.stages.generalist import run as train_generalist

    config = ["--config", ROOT / "configs/jft-shape.yaml"]
    shared = [*SMALL, "specialists.steps=2", "specialists.eval_every=2"]
    base = tmp_path / "base"
    train_generalist(load_config(ROOT / "configs/jft-shape.yaml",
                                 [*shared, "data.synthetic.val_per_class=10", f"data.shards={shapes}/val10",
                                  f"run_dir={base}"]))
    names = ShardIndex.load(shapes / "val10").class_names
    write_clusters(base, names, [list(range(0, 60)), list(range(60, 120))])
    peaks = {}
    for per in (10, 20):
        run = tmp_path / f"val{per}"
        shutil.copytree(base, run)
        sets = _sets(*shared, f"data.synthetic.val_per_class={per}", f"data.shards={shapes}/val{per}", f"run_dir={run}")
        peaks[per] = _peak_kib("--limit", "specialists.held_out.SAMPLE_ROWS=3000", "train-specialists", *config, *sets)
        assert len(list((run / "specialists").glob("*/model.json"))) == 2
    grown_mib = (peaks[20] - peaks[10]) / 1024
    print(f"train-specialists peak: {peaks[10] / 1024:.1f} MiB with 6,000 val images, {peaks[20] / 1024:.1f} MiB with 12,000")
    assert grown_mib < 3.0, f"peak grew by {grown_mib:.1f} MiB with 6,000 more val images ({peaks})"
