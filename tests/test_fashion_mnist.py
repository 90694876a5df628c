"""The real data: prepared Fashion-MNIST agrees with the idx files (skipped when they are absent)."""

import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from specialists.data import ShardIndex
from specialists.data.prepare import prepare
from specialists.data.prepare.idx import load_fashion_mnist

FM_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
pytestmark = pytest.mark.skipif(not (FM_DIR / "train-images-idx3-ubyte.gz").is_file(),
                                reason=f"Fashion-MNIST idx files not in {FM_DIR}")


@pytest.fixture(scope="module")
def fm(tmp_path_factory):
    out = prepare(f"fashion-mnist:{FM_DIR}", tmp_path_factory.mktemp("fm") / "shards", seed=0, shard_size=5000)
    return ShardIndex.load(out), load_fashion_mnist(FM_DIR)


def test_split_sizes_and_class_counts(fm):
    index, arrays = fm
    assert (index.count("train"), index.count("val"), index.count("test")) == (55000, 5000, 10000)
    train_val = index.class_counts("train") + index.class_counts("val")
    assert train_val.tolist() == np.bincount(arrays["train_labels"], minlength=10).tolist()
    assert index.class_counts("val").tolist() == [500] * 10
    assert index.class_counts("test").tolist() == np.bincount(arrays["test_labels"], minlength=10).tolist()


def test_sampled_images_and_labels_match_byte_for_byte(fm):
    index, arrays = fm
    rng = np.random.default_rng(0)
    seen_train_keys: set[str] = set()
    checked = 0
    for split in ("train", "val", "test"):
        source = "test" if split == "test" else "train"
        for url, _ in index.shards(split):
            with tarfile.open(url) as tar:
                members = {m.name: m for m in tar.getmembers()}
                keys = sorted({name.split(".")[0] for name in members})
                if split != "test":
                    seen_train_keys |= set(keys)
                for key in rng.choice(keys, size=20, replace=False):
                    position = int(key.removeprefix(source))
                    png = tar.extractfile(members[f"{key}.png"]).read()
                    label = int(tar.extractfile(members[f"{key}.cls"]).read())
                    image = np.asarray(Image.open(io.BytesIO(png)))
                    assert image.tobytes() == arrays[f"{source}_images"][position].tobytes()
                    assert label == arrays[f"{source}_labels"][position]
                    checked += 1
    assert checked == 20 * (11 + 1 + 2)
    assert len(seen_train_keys) == 60000  # train and val partition the original training set
