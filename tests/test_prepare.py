import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY
from PIL import Image

from specialists.data import ShardIndex
from specialists.data.prepare import prepare, stratified_split
from specialists.data.prepare.idx import FILES
from specialists.errors import DataError, UserError
from specialists.layout import DataLayout


def read_tar_samples(path: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def test_synthetic_layout_and_counts(tiny_shards):
    index = ShardIndex.load(tiny_shards)
    assert index.num_classes == 12
    assert json.loads(DataLayout(tiny_shards).classes.read_text()) == index.class_names
    expected = {"train": 360, "val": 96, "test": 96}
    for split, n in expected.items():
        shards = index.shards(split)
        assert sum(c for _, c in shards) == n == index.count(split)
        assert [c for _, c in shards][:-1] == [50] * (len(shards) - 1)
        seen = 0
        for url, count in shards:
            samples = read_tar_samples(Path(url))
            assert len(samples) == count
            assert all(set(s) == {"png", "cls"} for s in samples.values())
            seen += count
        assert seen == n
        per = n // 12
        assert index.class_counts(split).tolist() == [per] * 12


def test_byclass_index_matches_shard_contents(tiny_shards):
    index = ShardIndex.load(tiny_shards)
    train_keys = set()
    for url, _ in index.shards("train"):
        train_keys |= set(read_tar_samples(Path(url)))
    byclass_keys = set()
    for c in range(index.num_classes):
        for url, count in index.byclass_shards([c]):
            labels = [int(s["cls"]) for s in read_tar_samples(Path(url)).values()]
            assert labels.count(c) == count
    for shard in index.meta["byclass"]["shards"]:
        samples = read_tar_samples(tiny_shards / shard["name"])
        labels = [int(s["cls"]) for s in samples.values()]
        assert labels == sorted(labels)
        byclass_keys |= set(samples)
    assert byclass_keys == train_keys
    # Reading classes {0, 1} touches one shard of 50, not the 360-sample split.
    assert sum(n for _, n in index.byclass_shards([0, 1])) == 60


def test_deterministic_given_seed(tmp_path):
    def digest(root: Path) -> str:
        h = hashlib.sha256()
        index = ShardIndex.load(root)
        for split in index.splits:
            for url, _ in index.shards(split):
                for key, sample in sorted(read_tar_samples(Path(url)).items()):
                    h.update(key.encode() + sample["png"] + sample["cls"])
        return h.hexdigest()

    a = prepare("synthetic", tmp_path / "a", seed=3, shard_size=64, synthetic_cfg=TINY)
    b = prepare("synthetic", tmp_path / "b", seed=3, shard_size=64, synthetic_cfg=TINY)
    c = prepare("synthetic", tmp_path / "c", seed=4, shard_size=64, synthetic_cfg=TINY)
    assert digest(a) == digest(b) != digest(c)


def test_rerun_is_noop_and_force_redoes(tmp_path, cli):
    out = tmp_path / "d"
    code, stdout, _ = cli("prepare", "--source", "synthetic", "--out", out, "--num-classes", "6", "--samples-per-class", "5")
    assert code == 0 and "6 classes" in stdout
    index = DataLayout(out).index
    stamp = index.stat().st_mtime_ns
    code, _, _ = cli("prepare", "--source", "synthetic", "--out", out, "--num-classes", "6", "--samples-per-class", "5")
    assert code == 0 and index.stat().st_mtime_ns == stamp
    code, _, err = cli("prepare", "--source", "synthetic", "--out", out, "--num-classes", "6")
    assert code == 2 and err.count("\n") == 1 and index.stat().st_mtime_ns == stamp
    assert "prepared with data.synthetic.train_per_class=5, the config now says 100; pass --force" in err
    code, stdout, _ = cli("prepare", "--source", "synthetic", "--out", out, "--num-classes", "8", "--force")
    assert code == 0 and ShardIndex.load(out).num_classes == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no temp directories left


def test_stratified_split_is_exact_and_seeded():
    labels = np.repeat(np.arange(10), 600)
    kept, held = stratified_split(labels, 5000 / 60000, seed=0)
    assert len(held) == 500 and len(kept) == 5500
    assert np.bincount(labels[held]).tolist() == [50] * 10
    assert not set(kept) & set(held)
    assert np.array_equal(held, stratified_split(labels, 5000 / 60000, seed=0)[1])
    assert not np.array_equal(held, stratified_split(labels, 5000 / 60000, seed=1)[1])


# --- bad input: one-line error, exit 2, no partial output -------------------------------


def _write_idx(path: Path, array: np.ndarray, *, truncate: int = 0) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    with gzip.open(path, "wb") as f:
        f.write(data[: len(data) - truncate] if truncate else data)


def _fake_fashion(tmp_path: Path) -> Path:
    d = tmp_path / "fm"
    d.mkdir()
    rng = np.random.default_rng(0)
    _write_idx(d / FILES["train_images"], rng.integers(0, 255, (120, 28, 28)))
    _write_idx(d / FILES["train_labels"], np.repeat(np.arange(10), 12))
    _write_idx(d / FILES["test_images"], rng.integers(0, 255, (20, 28, 28)))
    _write_idx(d / FILES["test_labels"], np.repeat(np.arange(10), 2))
    return d


def _assert_one_line_failure(cli, out: Path, *args, match: str) -> None:
    code, _, err = cli("prepare", "--out", out, *args)
    assert code == 2, err
    assert err.startswith("error: ") and err.strip().count("\n") == 0, err
    assert match in err, err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_fake_fashion_ok(tmp_path, cli):
    d = _fake_fashion(tmp_path)
    code, stdout, err = cli("prepare", "--source", f"fashion-mnist:{d}", "--out", tmp_path / "out")
    assert code == 0, err
    index = ShardIndex.load(tmp_path / "out")
    assert (index.count("train"), index.count("val"), index.count("test")) == (110, 10, 20)


def test_missing_source_directory(tmp_path, cli):
    _assert_one_line_failure(cli, tmp_path / "out", "--source", f"fashion-mnist:{tmp_path}/nope",
                             match="Fashion-MNIST directory not found")


def test_truncated_gzip(tmp_path, cli):
    d = _fake_fashion(tmp_path)
    blob = (d / FILES["train_images"]).read_bytes()
    (d / FILES["train_images"]).write_bytes(blob[: len(blob) // 2])
    _assert_one_line_failure(cli, tmp_path / "out", "--source", f"fashion-mnist:{d}",
                             match="train-images-idx3-ubyte.gz: not a complete gzip file")


def test_truncated_idx(tmp_path, cli):
    d = _fake_fashion(tmp_path)
    _write_idx(d / FILES["test_images"], np.zeros((20, 28, 28)), truncate=100)
    _assert_one_line_failure(cli, tmp_path / "out", "--source", f"fashion-mnist:{d}",
                             match="t10k-images-idx3-ubyte.gz: truncated or padded idx data: expected 15696 bytes")


def test_label_outside_classes_in_idx(tmp_path, cli):
    d = _fake_fashion(tmp_path)
    labels = np.repeat(np.arange(10), 12)
    labels[7] = 12
    _write_idx(d / FILES["train_labels"], labels)
    _assert_one_line_failure(cli, tmp_path / "out", "--source", f"fashion-mnist:{d}",
                             match="label 12 at index 7 is outside 0..9")


def _image_folder(tmp_path: Path) -> Path:
    root = tmp_path / "folder"
    for c, name in enumerate(["cat", "dog", "eel"]):
        (root / name).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(np.full((10, 12, 3), 40 * c + i, np.uint8)).save(root / name / f"{i}.png")
    return root


def test_imagefolder_ok_and_bytes_kept(tmp_path, cli):
    root = _image_folder(tmp_path)
    code, _, err = cli("prepare", "--source", f"imagefolder:{root}", "--out", tmp_path / "out",
                       "--set", "data.val_fraction=0.34", "--set", "data.test_fraction=0.17")
    assert code == 0, err
    index = ShardIndex.load(tmp_path / "out")
    assert index.class_names == ["cat", "dog", "eel"]
    assert (index.count("train"), index.count("val"), index.count("test")) == (9, 6, 3)
    originals = {(root / n / f"{i}.png").read_bytes() for n in index.class_names for i in range(6)}
    written = set()
    for split in index.splits:
        for url, _ in index.shards(split):
            written |= {s["png"] for s in read_tar_samples(Path(url)).values()}
    assert written == originals


def test_imagefolder_undecodable_image(tmp_path, cli):
    root = _image_folder(tmp_path)
    (root / "dog" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    _assert_one_line_failure(cli, tmp_path / "out", "--source", f"imagefolder:{root}", match="dog/3.png: cannot decode image")


def test_unknown_source(tmp_path, cli):
    _assert_one_line_failure(cli, tmp_path / "out", "--source", "mnist", match="unknown source")


def test_console_script_no_traceback(tmp_path):
    """The installed entry point itself: exit code 2, one line, no traceback."""
    exe = Path(sys.executable).with_name("specialists")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "specialists.cli"]
    proc = subprocess.run([*cmd, "prepare", "--source", f"fashion-mnist:{tmp_path}/none", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error: ") and proc.stderr.strip().count("\n") == 0


def test_prepare_api_rejects_bad_shard_size(tmp_path):
    with pytest.raises(UserError, match="--shard-size 0"):
        prepare("synthetic", tmp_path / "x", shard_size=0, synthetic_cfg=TINY)
    with pytest.raises(DataError, match="image folder not found"):
        prepare(f"imagefolder:{tmp_path}/missing", tmp_path / "y")


def test_png_roundtrip_is_lossless(tiny_shards):
    url, _ = ShardIndex.load(tiny_shards).shards("test")[0]
    sample = next(iter(read_tar_samples(Path(url)).values()))
    image = np.asarray(Image.open(io.BytesIO(sample["png"])))
    assert image.shape == (16, 16) and image.dtype == np.uint8
