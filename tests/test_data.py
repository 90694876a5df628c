import hashlib
import io
import tarfile
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from specialists.config import DataConfig
from specialists.data.pipeline import (
    RandomShiftFlip,
    ShardIndex,
    eval_batches,
    normalize,
    train_batches,
)
from specialists.errors import DataError

CFG = DataConfig(image_size=16, channels=1, mean=(0.0,), std=(1.0,), augment="none", batch_size=32,
                 eval_batch_size=40, num_workers=2, shuffle_buffer=64)


def image_digest(image: torch.Tensor) -> str:
    assert image.dtype == torch.uint8 and image.shape == (1, 16, 16)
    return hashlib.sha1(image.numpy().tobytes()).hexdigest()


def shard_digests(index: ShardIndex, split: str) -> Counter:
    """Independent reference: every (image, label) of the split read with tarfile + PIL."""
    out: Counter = Counter()
    for url, _ in index.shards(split):
        with tarfile.open(url) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, data in files.items():
            if name.endswith(".png"):
                array = np.asarray(Image.open(io.BytesIO(data)))
                label = int(files[name[:-4] + ".cls"])
                out[(hashlib.sha1(array.tobytes()).hexdigest(), label)] += 1
    return out


def collect(batches) -> Counter:
    out: Counter = Counter()
    for batch in batches:
        images, labels = batch[0], batch[1]
        valid = batch[2] if len(batch) == 3 else torch.ones(len(labels), dtype=torch.bool)
        for image, label in zip(images[valid], labels[valid], strict=True):
            out[(image_digest(image), int(label))] += 1
    return out


def test_train_epoch_with_two_workers_is_an_exact_pass(tiny_shards):
    index = ShardIndex.load(tiny_shards)
    batches = train_batches(index, CFG, epoch=0, seed=0)
    assert len(batches) == 12  # ceil(360 / 32)
    got = collect(batches)
    assert got == shard_digests(index, "train")
    assert sum(got.values()) == 360 and max(got.values()) == 1
    sizes = [len(b[1]) for b in batches]
    assert sizes == [32] * 11 + [8]


def test_train_order_depends_on_epoch_and_is_reproducible(tiny_shards):
    index = ShardIndex.load(tiny_shards)
    def labels(epoch):
        return torch.cat([b[1] for b in train_batches(index, CFG, epoch=epoch, seed=0)])
    assert torch.equal(labels(0), labels(0))
    assert not torch.equal(labels(0), labels(1))


def test_ranks_read_disjoint_samples_and_equal_batch_counts(tiny_shards):
    index = ShardIndex.load(tiny_shards)
    parts = [train_batches(index, CFG, epoch=2, seed=1, rank=r, world_size=2) for r in range(2)]
    assert len(parts[0]) == len(parts[1])
    got = [collect(p) for p in parts]
    assert [sum(len(b[1]) for b in p) for p in parts] == [sum(g.values()) for g in got]
    assert not set(got[0]) & set(got[1])
    assert set(got[0]) | set(got[1]) <= set(shard_digests(index, "train"))
    # 8 shards (7×50 + 10), 4 per rank, 2 per worker: each worker batches its own ≤100 samples.
    # The rank with the 10-sample shard has workers of 100 and 60 → 4 + 2 = 6 batches; the other 8.
    assert len(parts[0]) == 6
    assert sum(len(b[1]) for b in parts[0]) + sum(len(b[1]) for b in parts[1]) < 360  # the longer rank stops early


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_eval_is_exact_over_ranks(tiny_shards, world_size):
    index = ShardIndex.load(tiny_shards)
    parts = [eval_batches(index, CFG, "val", rank=r, world_size=world_size) for r in range(world_size)]
    assert len({len(p) for p in parts}) == 1
    total: Counter = Counter()
    for p in parts:
        batches = list(p)
        assert len(batches) == len(p)
        assert all(b[0].shape[0] == 40 and b[2].shape == (40,) for b in batches)
        total += collect(batches)
    assert total == shard_digests(index, "val")


def _copy_shards(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_truncated_tar_is_a_data_error(tiny_shards, tmp_path, cli):
    root = _copy_shards(tiny_shards, tmp_path / "d")
    shard = root / "val-000000.tar"
    blob = shard.read_bytes()
    shard.write_bytes(blob[: len(blob) // 2 + 100])
    with pytest.raises(DataError, match=r"val-000000\.tar"):
        list(eval_batches(ShardIndex.load(root), replace(CFG, num_workers=0), "val"))
    code, _, err = cli("summary", root, "--verify")
    assert code == 2 and err.startswith("error: ") and err.strip().count("\n") == 0
    assert "val-000000.tar" in err


def _rewrite_first_sample(root: Path, split: str, **fields: bytes) -> None:
    shard = root / f"{split}-000000.tar"
    with tarfile.open(shard) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    samples: dict = {}
    for name, data in files.items():
        key, ext = name.split(".", 1)
        samples.setdefault(key, {"__key__": key})[ext] = data
    first = sorted(samples)[0]
    samples[first].update(fields)
    with wds.TarWriter(str(shard)) as sink:
        for key in sorted(samples):
            sink.write(samples[key])


def test_label_outside_classes_is_a_data_error(tiny_shards, tmp_path, cli):
    root = _copy_shards(tiny_shards, tmp_path / "d")
    _rewrite_first_sample(root, "test", cls=b"99")
    code, _, err = cli("summary", root, "--verify")
    assert code == 2 and err.strip().count("\n") == 0
    assert "label 99 outside classes.json (expected 0..11)" in err and "test-000000.tar" in err


def test_undecodable_image_is_a_data_error(tiny_shards, tmp_path, cli):
    root = _copy_shards(tiny_shards, tmp_path / "d")
    _rewrite_first_sample(root, "test", png=b"not a png at all")
    for workers in (0, 2):
        with pytest.raises(DataError, match=r"test-000000\.tar.*(sample|cannot identify)"):
            list(eval_batches(ShardIndex.load(root), replace(CFG, num_workers=workers), "test"))
    code, _, err = cli("summary", root, "--verify")
    assert code == 2 and err.strip().count("\n") == 0 and "test-000000.tar" in err


def test_missing_shards_dir(tmp_path, cli):
    code, _, err = cli("summary", tmp_path / "nothing")
    assert code == 2 and "index.json missing" in err


def test_shift_flip_has_the_same_outputs_as_torchvision_crop_flip():
    from torchvision.transforms import v2

    x = torch.arange(1, 51, dtype=torch.uint8).view(2, 5, 5)
    torch.manual_seed(0)
    mine = Counter(RandomShiftFlip(2)(x).numpy().tobytes() for _ in range(5000))
    ref = {v2.Compose([v2.RandomCrop(5, padding=2), v2.RandomHorizontalFlip()])(x).numpy().tobytes() for _ in range(3000)}
    assert set(mine) == ref and len(ref) == 50  # 25 shifts × 2 flips
    assert max(mine.values()) / min(mine.values()) < 2.0  # roughly uniform (expected 100 each)


def test_normalize_matches_reference():
    images = torch.randint(0, 256, (4, 1, 16, 16), dtype=torch.uint8)
    cfg = replace(CFG, mean=(0.25,), std=(0.5,))
    assert torch.allclose(normalize(images, cfg), (images.float() / 255 - 0.25) / 0.5)


def test_train_batches_whole_accumulation_groups(tiny_shards):
    index = ShardIndex.load(tiny_shards)
    full = train_batches(index, CFG, epoch=0, seed=0)
    cut = train_batches(index, CFG, epoch=0, seed=0, multiple_of=5)
    assert len(full) == 12 and len(cut) == 10
    assert sum(1 for _ in cut) == 10


# ------------------------------------------------------- a split in fixed pieces, spilled to disk
@pytest.mark.parametrize("workers", [0, 2])
def test_split_chunks_are_exact_pieces_in_load_split_order(tiny_shards, workers):
    from specialists.data.pipeline import load_split, split_chunks

    index = ShardIndex.load(tiny_shards)
    cfg = replace(CFG, num_workers=workers, eval_batch_size=13)
    images, labels = load_split(index, cfg, "val")
    pieces = list(split_chunks(index, cfg, "val", 40))
    assert [len(y) for _, y in pieces] == [40, 40, 16]  # 96 val images
    assert torch.equal(torch.cat([x for x, _ in pieces]), images)
    assert torch.equal(torch.cat([y for _, y in pieces]), labels)


def test_image_file_reads_rows_back(tmp_path):
    from specialists.data.image_file import ImageFile

    images = torch.randint(0, 256, (25, 1, 4, 4), dtype=torch.uint8)
    spill = ImageFile((1, 4, 4), folder=tmp_path / "spill")
    spill.append(images[:10])
    spill.append(images[10:])
    assert spill.count == 25 and list((tmp_path / "spill").iterdir()) == []  # anonymous: no name on disk
    rows = torch.tensor([0, 1, 2, 7, 8, 20, 24])
    assert torch.equal(spill.read(rows), images[rows])
    assert [len(x) for x in spill.chunks(rows, 3)] == [3, 3, 1]
    assert torch.equal(torch.cat(list(spill.chunks(rows, 3))), images[rows])
    assert spill.read(torch.zeros(0, dtype=torch.long)).shape == (0, 1, 4, 4)
    with pytest.raises(IndexError):
        spill.read(torch.tensor([25]))
    spill.close()
