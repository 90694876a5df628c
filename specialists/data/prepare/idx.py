"""Fashion-MNIST (and MNIST-format) idx files, read and validated."""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from ...errors import DataError

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
CLASS_NAMES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip


def _read_gz(path: Path) -> bytes:
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (EOFError, OSError, zlib.error) as exc:
        raise DataError(f"{path}: not a complete gzip file ({exc})") from None


def read_idx(path: Path, *, expected_ndim: int) -> np.ndarray:
    """Read one idx file (``.gz``) into a uint8 array, checking its header and length."""
    data = _read_gz(path)
    if len(data) < 4:
        raise DataError(f"{path}: truncated idx header ({len(data)} bytes)")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08 or ndim != expected_ndim:
        raise DataError(
            f"{path}: not an idx{expected_ndim} uint8 file (magic {data[:4].hex()}, "
            f"expected 000008{expected_ndim:02x})"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated idx header ({len(data)} bytes)")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected = header + int(np.prod(shape))
    if len(data) != expected:
        raise DataError(f"{path}: truncated or padded idx data: expected {expected} bytes for shape {shape}, found {len(data)}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def load_fashion_mnist(directory: str | Path = DEFAULT_DIR) -> dict[str, np.ndarray]:
    """The four Fashion-MNIST arrays: train/test images (N, 28, 28) and labels (N,)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(
            f"{directory}: Fashion-MNIST directory not found; install the Debian package "
            "dataset-fashion-mnist or pass --source fashion-mnist:DIR with the four idx .gz files"
        )
    arrays = {}
    for name, fname in FILES.items():
        arrays[name] = read_idx(directory / fname, expected_ndim=3 if name.endswith("images") else 1)
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if len(images) != len(labels):
            raise DataError(f"{directory}: {split} has {len(images)} images but {len(labels)} labels")
        bad = np.flatnonzero(labels >= len(CLASS_NAMES))
        if bad.size:
            raise DataError(f"{directory / FILES[split + '_labels']}: label {labels[bad[0]]} at index {bad[0]} is outside 0..9")
    return arrays
