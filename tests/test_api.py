"""The Python API (`specialists.load`): the same answers as `specialists predict` for every predictor,
from files, PIL images and raw pixel tensors; q against the engine run directly; one-line errors."""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import ROOT, tiny_overrides, write_clusters
from PIL import Image

import specialists
from specialists.artifacts.model_card import load_model, save_model
from specialists.config import config_to_yaml, load_config
from specialists.data import ShardIndex, load_split, normalize
from specialists.ensemble import load_ensemble
from specialists.errors import UserError
from specialists.layout import RunLayout
from specialists.stages.control import run as train_control
from specialists.stages.specialists import run as train_specialists

SETS = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]  # classes 10, 11 in no set
PREDICTORS = ["generalist", "ensemble", "control", "control-x2", "control-x2-mean", "student:born"]
_BUILT: dict[Path, tuple[Path, Path]] = {}


def build_api_run(shards: Path, generalist_run: Path, root: Path) -> tuple[Path, Path]:
    """A run with every kind of predictor: three briefly trained specialists, the one-copy control, a
    plain ensemble of two copies and a student (the generalist's weights, perturbed, as a student's card);
    its config.yaml as `specialists run` writes it; and the test split as PNG files. Returns (run, images)."""
    if generalist_run in _BUILT:  # test_export builds on the same run
        return _BUILT[generalist_run]
    run = root / "run"
    shutil.copytree(RunLayout(generalist_run).generalist.dir, RunLayout(run).generalist.dir)
    write_clusters(run, ShardIndex.load(shards).class_names, SETS)
    over = tiny_overrides(shards, run, "specialists.steps=12", "specialists.eval_every=6", "inference.control=true")
    cfg = load_config(ROOT / "configs/tiny.yaml", over)
    train_specialists(cfg)
    for k in (1, 2):
        train_control(load_config(ROOT / "configs/tiny.yaml", [*over, f"control.copies={k}"]))
    layout = RunLayout(run)
    model, card = load_model(layout.generalist)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    save_model(layout.student("born"), model, dataclasses.replace(card, role="student"))
    layout.config.write_text(config_to_yaml(cfg))
    images, _ = load_split(ShardIndex.load(shards), cfg.data, "test")
    folder = root / "images"
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image[0].numpy()).save(folder / f"{i:03d}.png")
    _BUILT[generalist_run] = run, folder
    return run, folder


@pytest.fixture(scope="module")
def api_run(tiny_shards, tiny_generalist, tmp_path_factory) -> tuple[Path, Path]:
    return build_api_run(tiny_shards, tiny_generalist, tmp_path_factory.mktemp("api"))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def cli_predict(cli, where: list, folder: Path, out: Path, predictor: str) -> list[dict]:
    code, _, err = cli("predict", *where, "--input", folder, "--output", out, "--predictor", predictor)
    assert code == 0, err
    return read_jsonl(out)


def pixels(folder: Path) -> torch.Tensor:
    """The PNGs of ``folder`` (sorted, as predict reads them) as one uint8 (B, 1, 16, 16) tensor."""
    import numpy as np

    return torch.stack([torch.from_numpy(np.array(Image.open(p)))[None] for p in sorted(folder.glob("*.png"))])


@pytest.mark.parametrize("name", PREDICTORS)
def test_api_equals_predict_for_every_predictor(api_run, cli, tmp_path, name):
    run, folder = api_run
    rows = cli_predict(cli, ["--config", RunLayout(run).config], folder, tmp_path / "p.jsonl", name)
    model = specialists.load(run, predictor=name)
    assert model.predictor == name and model.class_names == json.loads((run / "clusters.json").read_text())["class_names"]
    files = sorted(folder.glob("*.png"))
    by_path = model.predict([str(p) for p in files])
    assert [r["input"] for r in rows] == [str(p) for p in files]
    assert by_path.top1 == [r["class"] for r in rows] and by_path.prob == [r["prob"] for r in rows]  # bit for bit
    assert by_path.names == [r["name"] for r in rows]
    x = pixels(folder)
    assert model.predict(x) == by_path  # raw pixel tensor = files
    assert model.predict([Image.open(p) for p in files]) == by_path  # PIL images = files
    assert model.predict(files[3]).top1 == [by_path.top1[3]]  # a single path (Path object)
    # q, and top-k, from the same call
    full = model.predict(x, top_k=3, return_q=True)
    assert full.q.shape == (96, 12) and torch.allclose(full.q.sum(1), torch.ones(96), atol=1e-5)
    assert full.q.argmax(1).tolist() == by_path.top1
    assert [k[0] for k in full.topk_indices] == by_path.top1 and all(len(k) == 3 for k in full.topk_indices)
    assert all(p[0] >= p[1] >= p[2] for p in full.topk_probs)
    assert full.topk_probs == [full.q[i, k].tolist() for i, k in enumerate(full.topk_indices)]
    expected_active = {"generalist": 0, "ensemble": None, "control": 1, "control-x2": 2, "control-x2-mean": 2,
                       "student:born": 0}[name]
    if expected_active is not None:
        assert all(a == list(range(expected_active)) for a in full.active)


def test_ensemble_q_and_active_equal_the_engine(api_run, tiny_shards):
    run, folder = api_run
    cfg = load_config(RunLayout(run).config)
    loaded = load_ensemble(cfg)
    x = pixels(folder)
    direct = loaded.engine.predict(normalize(x, cfg.data), return_q=True)
    model = specialists.load(run)
    got = model.predict(x, return_q=True)
    assert torch.equal(got.q, direct.q)
    assert got.active == [[loaded.ids[m] for m in row.nonzero().flatten().tolist()] for row in direct.active]
    assert model.specialist_ids == [0, 1, 2] and sum(map(len, got.active)) == int(direct.active.sum()) > 0
    # images whose generalist top-1 is 10 or 11 (in no set) run no specialist
    assert all(not a for a, g in zip(got.active, direct.general_top1.tolist(), strict=True) if g in (10, 11))
    gen = specialists.load(run, predictor="generalist").predict(x, return_q=True)
    assert torch.equal(gen.q, direct.p_general) and gen.top1 == direct.general_top1.tolist()
    # predict_tensor on the preprocessed batch is predict
    assert torch.equal(model.preprocess(x), normalize(x, cfg.data))
    assert model.predict_tensor(model.preprocess(x)) == model.predict(x)


def test_attributes_and_public_names(api_run):
    run, _ = api_run
    model = specialists.load(run, predictor="student:born")
    assert model.predictor == "student:born"
    assert (model.image_size, model.channels, model.mean, model.std) == (16, 1, (0.5,), (0.25,))
    assert model.device == torch.device("cpu") and model.specialist_ids == [0, 1, 2]
    assert set(specialists.__all__) == {"dustbin_bias", "load", "Predictor", "Prediction", "__version__"}
    assert isinstance(model, specialists.Predictor) and specialists.__version__ == "0.1.0"
    # config= for a run directory without its own config
    bare = run.parent / "bare"
    shutil.copytree(run, bare)
    RunLayout(bare).config.unlink()
    with pytest.raises(UserError, match="no run config"):
        specialists.load(bare)
    assert specialists.load(bare, config=RunLayout(run).config).specialist_ids == [0, 1, 2]


@pytest.mark.parametrize(("images", "message"), [
    (torch.zeros(2, 1, 16, 16), "images: expected uint8 pixels 0..255, got torch.float32 (for a normalised"),
    (torch.zeros(2, 3, 16, 16, dtype=torch.uint8),
     "images: expected (B, 1, H, W) or (1, H, W) pixels, got shape (2, 3, 16, 16)"),
    (torch.zeros(16, 16, dtype=torch.uint8), "images: expected (B, 1, H, W) or (1, H, W) pixels, got shape (16, 16)"),
    (torch.zeros(1, 1, 1, 16, 16, dtype=torch.uint8), "images: expected (B, 1, H, W) or (1, H, W) pixels, got shape"),
    (torch.zeros(0, 1, 16, 16, dtype=torch.uint8), "images: an empty batch"),
    ([torch.zeros(1, 16, 16, dtype=torch.uint8), torch.zeros(3, 16, 16, dtype=torch.uint8)],
     "images[1]: expected (1, H, W) pixels, got shape (3, 16, 16)"),
    ([], "images: an empty batch"),
    (42, "images: expected a uint8 tensor, a PIL image, a file path or a list of them, got int"),
    ([torch.zeros(1, 16, 16, dtype=torch.uint8), 3.5], "images[1]: expected a uint8 tensor, a PIL image or a file path, got float"),
])
def test_bad_images_are_refused_in_one_line(api_run, images, message):
    model = specialists.load(api_run[0])
    with pytest.raises(ValueError) as err:
        model.predict(images)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_unreadable_files_are_named(api_run, tmp_path):
    model = specialists.load(api_run[0])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    good = sorted(api_run[1].glob("*.png"))[0]
    for bad in (broken, tmp_path / "nowhere.png"):
        with pytest.raises(ValueError) as err:
            model.predict([good, bad])
        assert str(err.value).startswith(f"{bad}: cannot read the image (") and "\n" not in str(err.value)
    x = model.preprocess(good)
    for call, message in [
        (lambda: model.predict(good, top_k=0), "top_k: expected an int in [1, 12], got 0"),
        (lambda: model.predict(good, top_k=13), "top_k: expected an int in [1, 12], got 13"),
        (lambda: model.predict_tensor(x.to(torch.uint8)), "x: expected a normalised float tensor (B, 1, 16, 16), got torch.uint8"),
        (lambda: model.predict_tensor(x[:, :, :8]), "x: expected shape (B, 1, 16, 16) with B ≥ 1, got (1, 1, 8, 16)"),
        (lambda: model.predict_tensor(x[:0]), "x: expected shape (B, 1, 16, 16) with B ≥ 1, got (0, 1, 16, 16)"),
    ]:
        with pytest.raises(ValueError) as err:
            call()
        assert str(err.value) == message


def test_other_image_sizes_go_through_the_eval_transform(api_run, tmp_path, cli):
    """A 32×32 RGB image: converted to greyscale and resized as `specialists predict` does."""
    run, folder = api_run
    big = tmp_path / "big"
    big.mkdir()
    Image.open(sorted(folder.glob("*.png"))[5]).convert("RGB").resize((32, 40)).save(big / "x.png")
    rows = cli_predict(cli, ["--config", RunLayout(run).config], big, tmp_path / "b.jsonl", "ensemble")
    model = specialists.load(run)
    got = model.predict(big / "x.png")
    assert got.top1 == [rows[0]["class"]] and got.prob == [rows[0]["prob"]]
    assert model.predict(Image.open(big / "x.png")) == got


def test_unknown_predictors_are_refused(api_run):
    run, _ = api_run
    with pytest.raises(UserError, match=r"--predictor 'best': expected generalist, ensemble, control"):
        specialists.load(run, predictor="best")
    with pytest.raises(UserError, match=r"no finished student 'wide' .*\(have: generalist, ensemble, control, "
                                        r"control-x2, control-x2-mean, student:born\)"):
        specialists.load(run, predictor="student:wide")
    with pytest.raises(UserError, match="no finished student 'ensemble'"):  # distill.name, else distill.teacher
        specialists.load(run, predictor="student")
    with pytest.raises(UserError, match="no finished control 'control-x3'"):
        specialists.load(run, predictor="control-x3")
