"""`specialists evaluate` and `specialists predict`: numbers recomputed independently, identity ensemble,
unreadable images, output formats, bad runs, and 2-process runs that match 1 process."""

import csv
import json
import logging
import math
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from conftest import ROOT, tiny_overrides, write_clusters
from PIL import Image
from scipy.stats import binomtest

from specialists.artifacts.model_card import (
    SpecialistHead,
    build_card,
    load_model,
    read_card,
    save_model,
)
from specialists.artifacts.predictions import read_predictions
from specialists.config import load_config
from specialists.data import ShardIndex, eval_batches, load_split, normalize
from specialists.ensemble import load_ensemble
from specialists.evaluation import compute_metrics, evaluate_engines, mcnemar
from specialists.layout import RunLayout

# Overlapping sets: classes 2, 3 in two sets; 6, 7, 10, 11 in none (table 4 rows 0, 1, 2).
SETS = [[0, 1, 2, 3], [2, 3, 4, 5], [8, 9]]


def _args(shards: Path, run: Path, *extra: str) -> list:
    return ["--config", ROOT / "configs/tiny.yaml", *sum((["--set", o] for o in tiny_overrides(shards, run, *extra)), [])]


def _cfg(shards: Path, run: Path):
    return load_config(ROOT / "configs/tiny.yaml", tiny_overrides(shards, run))


@pytest.fixture(scope="module")
def run(tiny_shards, tiny_generalist, tmp_path_factory) -> Path:
    """A run with the tiny generalist and three briefly trained specialists over SETS."""
    from specialists.stages.specialists import run as train_specialists

    run = tmp_path_factory.mktemp("evalrun") / "run"
    shutil.copytree(tiny_generalist / "generalist", run / "generalist")
    write_clusters(run, ShardIndex.load(tiny_shards).class_names, SETS)
    cfg = load_config(ROOT / "configs/tiny.yaml", tiny_overrides(tiny_shards, run, "specialists.steps=12",
                                                                  "specialists.eval_every=6"))
    train_specialists(cfg)
    return run


@pytest.fixture
def run_copy(run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    RunLayout(copy).metrics("test").unlink(missing_ok=True)
    return copy


def _independent(shards: Path, run: Path):
    """Per-example predictions of the test split, computed without evaluate: one dense pass."""
    cfg = _cfg(shards, run)
    loaded = load_ensemble(cfg)
    images, labels = load_split(ShardIndex.load(shards), cfg.data, "test")
    x = normalize(images, cfg.data)
    pred = loaded.engine.predict(x, return_q=True)
    return cfg, loaded, images, labels, x, pred


# --- evaluate -----------------------------------------------------------------------------------


def test_evaluate_numbers_recomputed(tiny_shards, run, cli):
    code, out, err = cli("evaluate", *_args(tiny_shards, run))
    assert code == 0, err
    metrics = json.loads(RunLayout(run).metrics("test").read_text())
    cfg, loaded, _, labels, x, pred = _independent(tiny_shards, run)
    y = labels.numpy()
    gen, ens = pred.p_general.argmax(1).numpy(), pred.q.argmax(1).numpy()
    assert metrics["format"] == "specialists-metrics/2" and metrics["split"] == "test"
    assert metrics["num_examples"] == len(y) == 96 and metrics["world_size"] == 1
    assert metrics["num_classes"] == 12 and metrics["num_specialists"] == 3 and metrics["baseline"] == "generalist"
    g, e = metrics["predictors"]["generalist"], metrics["predictors"]["ensemble"]
    assert g["correct"] == (gen == y).sum() and g["top1"] == pytest.approx((gen == y).mean())
    assert e["correct"] == (ens == y).sum() and e["top1"] == pytest.approx((ens == y).mean())
    assert e["mean_active_specialists"] == pytest.approx(pred.active.sum(1).float().mean().item())
    # table 3: true class in some set; argmax over the union {0..5, 8, 9}
    union = np.array(sorted({c for s in SETS for c in s}))
    covering = np.array([sum(c in s for s in SETS) for c in y])
    cov = covering > 0
    g_u = union[pred.p_general[:, union].argmax(1).numpy()]
    e_u = union[pred.q[:, union].argmax(1).numpy()]
    assert metrics["conditional_subset"] == {"num_examples": int(cov.sum()), "union_classes": 8}
    assert cov.sum() == 64
    assert g["conditional"]["correct"] == (g_u == y)[cov].sum()
    assert e["conditional"]["correct"] == (e_u == y)[cov].sum()
    assert e["conditional"]["accuracy"] == pytest.approx((e_u == y)[cov].mean())
    # table 4
    rows = e["vs_generalist"]["by_coverage"]
    assert [r["covering"] for r in rows] == [0, 1, 2]
    assert [r["num_examples"] for r in rows] == [32, 48, 16]
    for r in rows:
        sel = covering == r["covering"]
        assert r["generalist_correct"] == (gen == y)[sel].sum() and r["correct"] == (ens == y)[sel].sum()
        assert r["change_correct"] == r["correct"] - r["generalist_correct"]
        if r["generalist_correct"]:
            assert r["relative_change"] == pytest.approx(r["change_correct"] / r["generalist_correct"])
    # McNemar on the discordant pairs
    b = int(((gen == y) & (ens != y)).sum())
    c = int(((gen != y) & (ens == y)).sum())
    mc = e["vs_generalist"]["mcnemar"]
    assert (mc["b"], mc["c"]) == (b, c)
    assert mc["p_value"] == pytest.approx(binomtest(c, b + c, 0.5).pvalue if b + c else 1.0)
    assert e["vs_generalist"]["change_correct"] == c - b
    # each specialist alone, prediction among its classes (dustbin excluded), vs the generalist on them
    for s, spec, model in zip(metrics["specialists"], SETS, loaded.engine.specialists, strict=True):
        mask = np.isin(y, spec)
        with torch.no_grad():
            alone = np.array(spec)[model(x[torch.from_numpy(mask)])[:, : len(spec)].argmax(1).numpy()]
        gen_s = np.array(spec)[pred.p_general[torch.from_numpy(mask)][:, spec].argmax(1).numpy()]
        assert s["classes"] == spec and s["num_examples"] == mask.sum() == 8 * len(spec)
        assert s["specialist_correct"] == (alone == y[mask]).sum()
        assert s["generalist_correct"] == (gen_s == y[mask]).sum()
    # the per-example answers saved beside the metrics, and each specialist's routed images
    saved = read_predictions(RunLayout(run).predictions("test"))
    active = pred.active.numpy()
    routed_saved = [tuple(saved.routed_ids[a:b]) for a, b in zip(saved.routed_indptr[:-1], saved.routed_indptr[1:],
                                                                  strict=True)]
    assert Counter(zip(saved.label, saved.predicted["generalist"], saved.predicted["ensemble"], routed_saved,
                       strict=True)) == Counter(zip(y, gen, ens, [tuple(np.flatnonzero(a)) for a in active],
                                                    strict=True))
    for m, s in enumerate(metrics["specialists"]):
        routed = active[:, m]
        assert s["routed"] == routed.sum() > 0
        assert (s["routed_generalist_correct"], s["routed_correct"]) == ((gen == y)[routed].sum(), (ens == y)[routed].sum())
        assert s["routed_change_correct"] == s["routed_correct"] - s["routed_generalist_correct"]
    assert f"evaluation report: {RunLayout(run).evaluation_report('test').resolve()}" in out
    # the printed tables carry the same numbers
    top1_line = next(line for line in out.splitlines() if line.strip().startswith("ensemble"))
    assert top1_line.split()[:4] == ["ensemble", str(e["correct"]), f"{100 * e['top1']:.2f}%", f"{c - b:+d}"]
    assert "table 3" in out and "table 4" in out and f"{mc['p_value']:.3g}" in out


def test_mcnemar_hand_computed():
    # b = 1, c = 5: p = 2 · P(X ≤ 1), X ~ Bin(6, ½) = 2 · (1 + 6) / 64
    base = np.array([True, False, False, False, False, False, True])
    other = np.array([False, True, True, True, True, True, True])
    assert mcnemar(base, other) == {"b": 1, "c": 5, "p_value": pytest.approx(14 / 64)}
    # b = 3, c = 0: 2 · (1/8)
    assert mcnemar(np.array([True] * 3), np.array([False] * 3))["p_value"] == pytest.approx(0.25)
    assert mcnemar(np.array([True, False]), np.array([True, False])) == {"b": 0, "c": 0, "p_value": 1.0}


def test_compute_metrics_on_hand_made_records():
    from specialists.evaluation import Records

    label = np.array([0, 1, 2, 3, 3])
    cols = {"label": label, "covering": np.array([1, 1, 2, 0, 0]),
            "generalist.pred": np.array([0, 2, 2, 1, 3]), "generalist.union_pred": np.array([0, 2, 2, 1, 1]),
            "ensemble.pred": np.array([0, 1, 2, 1, 0]), "ensemble.union_pred": np.array([0, 1, 2, 1, 0]),
            "ensemble.active": np.array([1, 1, 2, 0, 1])}
    m = compute_metrics(Records(cols, np.array([[3, 2, 1], [2, 2, 2]]), ["ensemble"]), [[0, 1, 2], [1, 2]])
    g, e = m["predictors"]["generalist"], m["predictors"]["ensemble"]
    assert (g["correct"], e["correct"]) == (3, 3)
    assert m["conditional_subset"] == {"num_examples": 3, "union_classes": 3}
    assert (g["conditional"]["correct"], e["conditional"]["correct"]) == (2, 3)
    assert e["vs_generalist"]["conditional_relative_change"] == pytest.approx(0.5)
    assert e["vs_generalist"]["mcnemar"] == {"b": 1, "c": 1, "p_value": 1.0}
    assert [(r["covering"], r["num_examples"], r["change_correct"]) for r in e["vs_generalist"]["by_coverage"]] == \
        [(0, 2, -1), (1, 2, 1), (2, 1, 0)]
    assert e["mean_active_specialists"] == pytest.approx(1.0)
    assert m["specialists"][1] == {"id": 1, "classes": [1, 2], "num_examples": 2, "specialist_correct": 2,
                                   "specialist_accuracy": 1.0, "generalist_correct": 2, "generalist_accuracy": 1.0}


def _identity_specialists(run: Path) -> None:
    """Replace every specialist by a full-head copy of the generalist, bias 0, T = 1: pᵐ = collapsed pᵍ."""
    model, gen = load_model(RunLayout(run).generalist)
    for m, classes in enumerate(SETS):
        head = SpecialistHead(id=m, classes=classes, head="full", special_fraction=0.5, special_fraction_in_data=0.5,
                              prior_bias=0.0, fitted_bias=0.0, fitted_temperature=1.0, routed_bias=0.0,
                              routed_temperature=1.0, routed_top_n=1, routed_val_images=0)
        card = build_card("specialist", arch=gen.arch, arch_kwargs=gen.arch_kwargs, num_outputs=gen.num_outputs,
                          class_names=gen.class_names, data_cfg=_cfg(Path(gen.data), run).data, data=gen.data,
                          deciding=None, source_generalist=gen.sha256, specialist=head)
        save_model(RunLayout(run).specialist(m), model, card)


def test_identity_specialists_give_the_generalist(tiny_shards, run_copy, cli):
    _identity_specialists(run_copy)
    *_, pred = _independent(tiny_shards, run_copy)
    assert pred.active.any(1).float().mean() > 0.5
    torch.testing.assert_close(pred.q, pred.p_general, atol=1e-5, rtol=0)
    code, _, err = cli("evaluate", *_args(tiny_shards, run_copy))
    assert code == 0, err
    metrics = json.loads(RunLayout(run_copy).metrics("test").read_text())
    g, e = metrics["predictors"]["generalist"], metrics["predictors"]["ensemble"]
    assert e["correct"] == g["correct"] and e["conditional"] == g["conditional"]
    assert e["vs_generalist"]["change_correct"] == 0
    assert e["vs_generalist"]["mcnemar"] == {"b": 0, "c": 0, "p_value": 1.0}
    assert all(r["change_correct"] == 0 for r in e["vs_generalist"]["by_coverage"])
    assert all(s["specialist_correct"] == s["generalist_correct"] for s in metrics["specialists"])


def test_control_is_a_third_column(tiny_shards, run_copy, cli, caplog):
    """inference.control: the generalist with a (here: unchanged) copy of itself, compared the same way."""
    args = _args(tiny_shards, run_copy, "inference.control=true")
    with caplog.at_level(logging.WARNING, logger="specialists"):
        code, _, err = cli("evaluate", *args)
    assert code == 0, err
    assert any("train-control" in r.getMessage() for r in caplog.records)
    assert list(json.loads(RunLayout(run_copy).metrics("test").read_text())["predictors"]) == ["generalist", "ensemble"]
    model, gen = load_model(RunLayout(run_copy).generalist)
    card = build_card("control", arch=gen.arch, arch_kwargs=gen.arch_kwargs, num_outputs=gen.num_outputs,
                      class_names=gen.class_names, data_cfg=_cfg(tiny_shards, run_copy).data, data=gen.data,
                      deciding=None, source_generalist=gen.sha256)
    save_model(RunLayout(run_copy).control, model, card)
    code, out, err = cli("evaluate", *args)
    assert code == 0, err
    metrics = json.loads(RunLayout(run_copy).metrics("test").read_text())
    assert list(metrics["predictors"]) == ["generalist", "ensemble", "control"]
    g, ctl = metrics["predictors"]["generalist"], metrics["predictors"]["control"]
    assert ctl["correct"] == g["correct"] and ctl["conditional"] == g["conditional"]  # q = average of p and p
    assert ctl["vs_generalist"]["mcnemar"] == {"b": 0, "c": 0, "p_value": 1.0}
    assert ctl["mean_active_specialists"] == 1.0
    assert "table 4): control vs generalist" in out
    # ensemble vs control: the control equals the generalist here, so it is ensemble vs generalist again
    ens = metrics["predictors"]["ensemble"]
    assert ens["vs_control"]["mcnemar"] == ens["vs_generalist"]["mcnemar"]
    assert ens["vs_control"]["change_correct"] == ens["vs_generalist"]["change_correct"]
    assert "ensemble vs control:" in out


# --- predict ------------------------------------------------------------------------------------


def _image_folder(shards: Path, root: Path, *, corrupt: bool = True) -> tuple[Path, list[str], torch.Tensor]:
    """The test split as PNG files in two sub-folders (+ one corrupt file); returns (folder, names, labels)."""
    cfg = load_config(ROOT / "configs/tiny.yaml", [f"data.shards={shards}"])
    images, labels = load_split(ShardIndex.load(shards), cfg.data, "test")
    names = []
    for i, image in enumerate(images):
        path = root / ("a" if i % 2 else "b") / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[0].numpy()).save(path)
        names.append(str(path))
    if corrupt:
        (root / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "notes.txt").write_text("not an image")
    return root, names, labels


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_predict_folder_with_a_corrupt_image(tiny_shards, run, tmp_path, cli, caplog):
    folder, names, _ = _image_folder(tiny_shards, tmp_path / "images")
    out = tmp_path / "preds.jsonl"
    with caplog.at_level(logging.WARNING, logger="specialists"):
        code, stdout, err = cli("predict", *_args(tiny_shards, run), "--input", folder, "--output", out)
    assert code == 0, err
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(folder / "a" / "broken.png") in warnings[0]
    assert "96 predictions" in stdout and "1 unreadable image(s) skipped" in stdout
    rows = _read_jsonl(out)
    assert [r["input"] for r in rows] == sorted(names)  # every readable image once, sorted
    class_names = ShardIndex.load(tiny_shards).class_names
    for r in rows:
        assert set(r) == {"input", "class", "name", "prob", "generalist_class"}
        assert 0 <= r["class"] < 12 and r["name"] == class_names[r["class"]] and 0 < r["prob"] <= 1
    # CSV: same predictions, header input,class,name,prob
    out_csv = tmp_path / "preds.csv"
    code, _, err = cli("predict", *_args(tiny_shards, run), "--input", folder, "--output", out_csv)
    assert code == 0, err
    with open(out_csv, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["input", "class", "name", "prob"]
        csv_rows = list(reader)
    assert [(r["input"], int(r["class"]), r["name"]) for r in csv_rows] == \
        [(r["input"], r["class"], r["name"]) for r in rows]
    assert all(math.isclose(float(c["prob"]), r["prob"], rel_tol=1e-6) for c, r in zip(csv_rows, rows, strict=True))
    assert not list(tmp_path.glob(".*"))  # no temporary files or parts left behind


def test_predict_equals_evaluate_predictions(tiny_shards, run, tmp_path, cli):
    cfg, loaded, _, _, _, pred = _independent(tiny_shards, run)
    # evaluate's per-example records (one process, shard order)
    batches = eval_batches(ShardIndex.load(tiny_shards), cfg.data, "test", batch_size=cfg.inference.batch_size)
    records = evaluate_engines({"ensemble": loaded.engine}, batches, data_cfg=cfg.data, accelerator=Accelerator(mixed_precision="no"))
    assert records.columns["ensemble.pred"].tolist() == pred.top1.tolist()
    # predict over the shards, over the same images as files, and over a list of them
    out = tmp_path / "shards.jsonl"
    code, _, err = cli("predict", *_args(tiny_shards, run), "--input", f"shards:{tiny_shards}:test", "--output", out)
    assert code == 0, err
    rows = _read_jsonl(out)
    assert [r["class"] for r in rows] == records.columns["ensemble.pred"].tolist()
    assert [r["generalist_class"] for r in rows] == records.columns["generalist.pred"].tolist()
    assert all(r["input"].startswith("test/") for r in rows) and len({r["input"] for r in rows}) == 96
    folder, names, _ = _image_folder(tiny_shards, tmp_path / "images", corrupt=False)
    listing = tmp_path / "list.txt"
    listing.write_text("# test images, last first\n" + "\n".join(os.path.relpath(n, tmp_path) for n in names[::-1]))
    code, _, err = cli("predict", *_args(tiny_shards, run), "--input", f"list:{listing}", "--output", tmp_path / "l.jsonl")
    assert code == 0, err
    listed = _read_jsonl(tmp_path / "l.jsonl")
    assert [r["input"] for r in listed] == [os.path.relpath(n, tmp_path) for n in names[::-1]]  # list order kept
    assert [r["class"] for r in listed][::-1] == pred.top1.tolist()


def test_predict_bad_input(tiny_shards, run, tmp_path, cli):
    code, _, err = cli("predict", *_args(tiny_shards, run), "--input", tmp_path / "nowhere", "--output", tmp_path / "x")
    assert code == 2 and "nowhere: not a directory" in err and err.count("\n") == 1
    code, _, err = cli("predict", *_args(tiny_shards, run), "--input", f"shards:{tiny_shards}:holdout",
                       "--output", tmp_path / "x")
    assert code == 2 and "no 'holdout' split" in err
    assert not (tmp_path / "x").exists()


# --- a run that does not fit together -----------------------------------------------------------


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


PROBLEMS = {
    "missing": "001/model.safetensors: specialist 1 of",
    "class_count": "clusters.json: num_classes is 10 but the generalist",
    "specialist_classes": "specialist 2's classes [8, 9] differ from",
    "specialist_count": "specialist 0 was trained on 11 classes but the generalist",
    "other_generalist": "specialist 1 was made from another generalist",
}


@pytest.mark.parametrize("command, problem", [*[("evaluate", p) for p in PROBLEMS],
                                              ("predict", "missing"), ("predict", "class_count")])
def test_run_that_does_not_fit(tiny_shards, run_copy, tmp_path, cli, command, problem):
    message = PROBLEMS[problem]
    layout = RunLayout(run_copy)
    if problem == "missing":
        layout.specialist(1).weights.unlink()
    elif problem == "class_count":
        _edit_json(layout.clusters, lambda d: d.update(num_classes=10, class_names=d["class_names"][:10]))
    elif problem == "specialist_classes":
        _edit_json(layout.clusters, lambda d: d["specialists"][2].update(classes=[8, 10]))
    elif problem == "specialist_count":
        _edit_json(layout.specialist(0).card, lambda d: d.update(class_names=d["class_names"][:11]))
    else:
        _edit_json(layout.specialist(1).card, lambda d: d.update(source_generalist="0" * 64))
    extra = ["--input", f"shards:{tiny_shards}:test", "--output", tmp_path / "p.jsonl"] if command == "predict" else []
    code, out, err = cli(command, *_args(tiny_shards, run_copy), *extra)
    assert code == 2 and message in err and err.count("\n") == 1, err
    if problem == "missing":
        assert "run `specialists train-specialists`" in err
    assert not layout.metrics("test").exists() and not (tmp_path / "p.jsonl").exists()


# --- two processes --------------------------------------------------------------------------------


def _launch(port: int, *args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           str(ROOT / "tests/_distributed_cli.py"), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"})


def test_distributed_predict_and_evaluate_two_processes(tiny_shards, run_copy, tmp_path, cli):
    """2 CPU processes: predict gives every input exactly once, as 1 process does; evaluate is exact."""
    folder, names, _ = _image_folder(tiny_shards, tmp_path / "images")
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    code, _, err = cli("predict", *_args(tiny_shards, run_copy), "--input", folder, "--output", one)
    assert code == 0, err
    result = _launch(29563, "predict", *_args(tiny_shards, run_copy), "--input", folder, "--output", two)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "96 predictions written" in result.stdout and "(2 process(es))" in result.stdout
    assert "1 unreadable image(s) skipped" in result.stdout and "broken.png" in result.stderr
    rows_one, rows_two = _read_jsonl(one), _read_jsonl(two)
    assert [r["input"] for r in rows_two] == sorted(names)  # each exactly once, in order
    assert [(r["input"], r["class"], r["generalist_class"]) for r in rows_two] == \
        [(r["input"], r["class"], r["generalist_class"]) for r in rows_one]
    assert all(math.isclose(a["prob"], b["prob"], rel_tol=1e-5) for a, b in zip(rows_one, rows_two, strict=True))

    # shards: rank r reads every 2nd shard of all splits; merged back in shard order
    code, _, err = cli("predict", *_args(tiny_shards, run_copy), "--input", f"shards:{tiny_shards}", "--output", one)
    assert code == 0, err
    result = _launch(29565, "predict", *_args(tiny_shards, run_copy), "--input", f"shards:{tiny_shards}",
                     "--output", two)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "552 predictions written" in result.stdout and "(2 process(es))" in result.stdout
    rows_one, rows_two = _read_jsonl(one), _read_jsonl(two)
    assert len({r["input"] for r in rows_two}) == 552
    assert [(r["input"], r["class"]) for r in rows_two] == [(r["input"], r["class"]) for r in rows_one]

    code, _, err = cli("evaluate", *_args(tiny_shards, run_copy))
    assert code == 0, err
    single = json.loads(RunLayout(run_copy).metrics("test").read_text())
    result = _launch(29564, "evaluate", *_args(tiny_shards, run_copy))
    assert result.returncode == 0, result.stderr[-3000:]
    double = json.loads(RunLayout(run_copy).metrics("test").read_text())
    assert double["world_size"] == 2 and double["num_examples"] == 96
    for key in ("predictors", "conditional_subset", "specialists"):
        assert json.dumps(double[key], sort_keys=True) == json.dumps(single[key], sort_keys=True), key


def test_metrics_record_the_correction_the_engine_applied(tiny_shards, run_copy, cli):
    """inference.bias other than the trained one: the metrics name the values applied, per specialist."""
    cards = [read_card(RunLayout(run_copy).specialist(m)) for m in range(len(SETS))]
    for choice, expected in [("trained", [(c.specialist.prior_bias, 1.0) for c in cards]),  # tiny.yaml: bias prior
                             ("fit", [(c.specialist.fitted_bias, c.specialist.fitted_temperature) for c in cards]),
                             ("none", [(0.0, 1.0)] * len(cards))]:
        code, _, err = cli("evaluate", *_args(tiny_shards, run_copy, f"inference.bias={choice}"), "--split", "val")
        assert code == 0, err
        metrics = json.loads(RunLayout(run_copy).metrics("val").read_text())
        applied = [(s["applied"]["dustbin_bias"], s["applied"]["temperature"]) for s in metrics["models"]["specialists"]]
        assert np.allclose(applied, expected, rtol=0, atol=1e-12)
        assert metrics["inference"]["correction"] == ("prior" if choice == "trained" else choice)
        assert metrics["split"] == "val" and metrics["num_examples"] == 96
    assert cards[0].specialist.fitted_bias != cards[0].specialist.prior_bias  # the choices really differ
    assert not RunLayout(run_copy).metrics("test").exists()  # one file per split
