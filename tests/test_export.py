"""`specialists export`: a package that loads and predicts as its run did, with no config and no shards,
and that is refused in one line, naming the file, once damaged or edited."""

import hashlib
import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from conftest import error_lines
from test_api import PREDICTORS, build_api_run, cli_predict, pixels

import specialists
from specialists.artifacts.package import read_package
from specialists.config import load_config
from specialists.ensemble import load_ensemble
from specialists.errors import UserError
from specialists.layout import PackageLayout, RunLayout
from specialists.stages.evaluate import applied_corrections


@pytest.fixture(scope="module")
def api_run(tiny_shards, tiny_generalist, tmp_path_factory) -> tuple[Path, Path]:
    return build_api_run(tiny_shards, tiny_generalist, tmp_path_factory.mktemp("api"))


@pytest.fixture(scope="module")
def package(api_run, tmp_path_factory) -> Path:
    """The run exported with `specialists export --tar`, then moved away from where it was written."""
    from specialists.cli import main

    out = tmp_path_factory.mktemp("export") / "pkg"
    assert main(["export", "--run", str(api_run[0]), "--out", str(out), "--tar"]) == 0
    moved = out.parent / "moved" / "tiny-package"
    moved.parent.mkdir()
    out.rename(moved)
    return moved


@pytest.fixture
def package_copy(package, tmp_path) -> Path:
    copy = tmp_path / "pkg"
    shutil.copytree(package, copy)
    return copy


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", PREDICTORS)
def test_package_predicts_as_the_run(api_run, package, cli, tmp_path, name):
    run, folder = api_run
    x = pixels(folder)
    from_run = specialists.load(run, predictor=name).predict(x, top_k=2, return_q=True)
    from_package = specialists.load(package, predictor=name)
    assert from_package.predictor == name
    got = from_package.predict(x, top_k=2, return_q=True)
    assert torch.equal(got.q, from_run.q)
    assert got == from_run  # top-1, names, probabilities, top-k, active specialists: exactly
    # the CLI: predict --package writes what predict --config does, row for row
    rows_run = cli_predict(cli, ["--config", RunLayout(run).config], folder, tmp_path / "r.jsonl", name)
    rows_pkg = cli_predict(cli, ["--package", package], folder, tmp_path / "p.jsonl", name)
    assert rows_pkg == rows_run and [r["class"] for r in rows_pkg] == specialists.load(package, predictor=name).predict(
        [Path(r["input"]) for r in rows_pkg]).top1


def test_package_holds_every_model_and_setting(api_run, package):
    run, _ = api_run
    layout = PackageLayout(package)
    manifest = json.loads(layout.manifest.read_text())
    files = sorted(p.relative_to(package).as_posix() for p in package.rglob("*") if p.is_file())
    assert sorted(manifest["files"]) == [f for f in files if f != "manifest.json"]
    assert manifest["format"] == "specialists-package/1" and manifest["version"] == specialists.__version__
    for name, entry in manifest["files"].items():
        assert entry == {"sha256": sha256(package / name), "size": (package / name).stat().st_size}
    models = {"generalist", "specialists/000", "specialists/001", "specialists/002", "control", "control-x2/000",
              "control-x2/001", "students/born"}
    assert set(files) == {"clusters.json", "package.json", "manifest.json",
                          *(f"{m}/{f}" for m in models for f in ("model.safetensors", "model.json"))}
    for m in models:  # the run's own files, unchanged
        assert sha256(package / m / "model.safetensors") == sha256(run / m / "model.safetensors")
    cfg = load_config(RunLayout(run).config)
    loaded = load_ensemble(cfg)
    s = json.loads(layout.settings.read_text())
    assert s["class_names"] == loaded.class_names and len(s["class_names"]) == 12
    assert s["preprocessing"] == {"image_size": 16, "channels": 1, "mean": [0.5], "std": [0.25]}
    assert s["inference"] == {"top_n": 1, "solver": "em", "tol": 1e-7, "max_iter": 100, "batch_size": 512,
                              "mixed_precision": "auto", "channels_last": False}
    assert s["correction"] == "prior" and s["controls"] == [1, 2] and s["students"] == ["born"]
    # the corrections evaluate records as applied, specialist by specialist
    applied = [(a["id"], a["applied"]["dustbin_bias"], a["applied"]["temperature"]) for a in applied_corrections(loaded)]
    assert [(r["id"], r["dustbin_bias"], r["temperature"]) for r in s["specialists"]] == applied
    assert [r["classes"] for r in s["specialists"]] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert all(b != 0 for _, b, _ in applied)  # the prior correction is applied, not zeros
    assert read_package(package).config().run_dir == str(package)


def test_tar_and_force(api_run, package, cli, tmp_path):
    tar = PackageLayout(package.parent.parent / "pkg").tar  # written beside where the package was written
    with tarfile.open(tar) as archive:
        names = sorted(m.name for m in archive.getmembers() if m.isfile())
        assert names == sorted(f"pkg/{p.relative_to(package).as_posix()}" for p in package.rglob("*") if p.is_file())
        assert {m.mtime for m in archive.getmembers()} == {0}
        archive.extractall(tmp_path / "untarred", filter="data")
    x = pixels(api_run[1])
    assert specialists.load(tmp_path / "untarred" / "pkg").predict(x) == specialists.load(package).predict(x)
    code, _, err = cli("export", "--run", api_run[0], "--out", package)
    assert code == 2 and err == f"error: {package}: already exists; choose another --out or pass --force to replace it\n"
    out = tmp_path / "again"
    assert cli("export", "--run", api_run[0], "--out", out)[0] == 0
    (out / "students" / "stray.txt").write_text("left over")
    code, stdout, err = cli("export", "--run", api_run[0], "--out", out, "--force", "--tar")
    assert code == 0, err
    assert stdout == f"package written to {out} and {out}.tar\n"
    assert not (out / "students" / "stray.txt").exists() and read_package(out).version == specialists.__version__
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


def _flip_byte(pkg: Path) -> str:
    path = pkg / "specialists" / "001" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    return f"{path}: its sha256 differs from {pkg / 'manifest.json'}; the package is damaged or was edited"


def _edit_manifest_sha(pkg: Path) -> str:
    manifest = json.loads((pkg / "manifest.json").read_text())
    manifest["files"]["control/model.json"]["sha256"] = "0" * 64
    (pkg / "manifest.json").write_text(json.dumps(manifest))
    return f"{pkg / 'control' / 'model.json'}: its sha256 differs from {pkg / 'manifest.json'}"


def _edit_format(pkg: Path) -> str:
    manifest = json.loads((pkg / "manifest.json").read_text())
    manifest["format"] = "specialists-package/9"
    (pkg / "manifest.json").write_text(json.dumps(manifest))
    return (f"{pkg / 'manifest.json'}: unknown package format 'specialists-package/9' "
            "(this version reads 'specialists-package/1')")


def _garble_manifest(pkg: Path) -> str:
    (pkg / "manifest.json").write_text('{"format": "specialists-package/1", "files": ')
    return f"{pkg / 'manifest.json'}: unreadable (JSONDecodeError); the package is damaged"


def _delete_card(pkg: Path) -> str:
    (pkg / "control-x2" / "001" / "model.json").unlink()
    return f"{pkg / 'control-x2' / '001' / 'model.json'}: missing from the package (listed in {pkg / 'manifest.json'})"


def _add_student(pkg: Path) -> str:
    shutil.copytree(pkg / "students" / "born", pkg / "students" / "extra")
    return f"{pkg / 'students' / 'extra' / 'model.json'}: not in {pkg / 'manifest.json'}; the package was edited"


def _escape_manifest(pkg: Path) -> str:
    manifest = json.loads((pkg / "manifest.json").read_text())
    manifest["files"]["../outside.json"] = {"sha256": "0" * 64, "size": 1}
    (pkg / "manifest.json").write_text(json.dumps(manifest))
    return f"{pkg / 'manifest.json'}: malformed manifest"


def _edit_bias_consistently(pkg: Path) -> str:
    """package.json edited and its manifest entry updated to match: caught by the engine's own corrections."""
    settings = json.loads((pkg / "package.json").read_text())
    settings["specialists"][1]["dustbin_bias"] += 1.0
    (pkg / "package.json").write_text(json.dumps(settings))
    manifest = json.loads((pkg / "manifest.json").read_text())
    manifest["files"]["package.json"] = {"sha256": sha256(pkg / "package.json"), "size": (pkg / "package.json").stat().st_size}
    (pkg / "manifest.json").write_text(json.dumps(manifest))
    return f"{pkg / 'package.json'}: the dustbin corrections recorded at export"


TAMPERING = [_flip_byte, _edit_manifest_sha, _edit_format, _garble_manifest, _delete_card, _add_student,
             _escape_manifest, _edit_bias_consistently]


@pytest.mark.parametrize("tamper", TAMPERING, ids=[t.__name__.strip("_") for t in TAMPERING])
def test_a_tampered_package_is_refused_naming_the_file(package_copy, api_run, cli, tmp_path, tamper):
    expected = tamper(package_copy)
    with pytest.raises(UserError) as err:
        specialists.load(package_copy)
    assert str(err.value).startswith(expected) and "\n" not in str(err.value)
    code, _, stderr = cli("predict", "--package", package_copy, "--input", api_run[1], "--output", tmp_path / "p.jsonl")
    assert code == 2 and error_lines(stderr) == [f"error: {err.value}"]
    assert not (tmp_path / "p.jsonl").exists()


def test_predict_package_and_config_are_exclusive(package, api_run, cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run, folder = api_run
    code, _, err = cli("predict", "--package", package, "--config", RunLayout(run).config, "--input", folder,
                       "--output", "p.jsonl")
    assert code == 2 and err == "error: --package PKG holds every setting: give it without --config or --set\n"
    code, _, err = cli("predict", "--input", folder, "--output", "p.jsonl")
    assert code == 2 and err.endswith(
        "error: predict needs --config (a run's config) or --package PKG (from `specialists export`)\n")
    with pytest.raises(UserError, match="a package holds its settings; load it without config="):
        specialists.load(package, config=RunLayout(run).config)
    with pytest.raises(UserError, match="nowhere: not a directory"):
        specialists.load(tmp_path / "nowhere")
