"""ImageFolder trees (one sub-folder per class of JPEG/PNG files), as ImageNet users have."""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ...errors import DataError
from ...progress import progress

EXTENSIONS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png"}
SPLIT_DIRS = ("train", "val", "test")


def _class_dirs(root: Path) -> list[Path]:
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not dirs:
        raise DataError(f"{root}: no class sub-folders found (expected one folder of images per class)")
    return dirs


def list_images(root: Path, class_names: list[str]) -> list[tuple[Path, int]]:
    """(file, label) pairs under ``root/<class>/``, sorted; unknown class folders are errors."""
    index = {name: i for i, name in enumerate(class_names)}
    items: list[tuple[Path, int]] = []
    for d in _class_dirs(root):
        if d.name not in index:
            raise DataError(f"{d}: class folder {d.name!r} is not one of the training classes")
        for f in sorted(d.rglob("*")):
            if f.is_file() and f.suffix.lower() in EXTENSIONS:
                items.append((f, index[d.name]))
    return items


def scan(root: str | Path) -> tuple[list[str], dict[str, list[tuple[Path, int]]]]:
    """Class names and per-split (file, label) lists.

    ``root`` is either one tree of class folders (split later by fractions) or
    holds ``train/`` plus optional ``val/`` and ``test/`` trees.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found")
    if (root / "train").is_dir():
        class_names = [d.name for d in _class_dirs(root / "train")]
        splits = {s: list_images(root / s, class_names) for s in SPLIT_DIRS if (root / s).is_dir()}
    else:
        class_names = [d.name for d in _class_dirs(root)]
        splits = {"all": list_images(root, class_names)}
    if not any(splits.values()):
        raise DataError(f"{root}: no .jpg/.jpeg/.png images found")
    training = "train" if "train" in splits else "all"
    have = {label for _, label in splits[training]}
    empty = [name for i, name in enumerate(class_names) if i not in have]
    if empty:
        tree = root / "train" if training == "train" else root
        raise DataError(f"{tree / empty[0]}: class folder holds no .jpg/.jpeg/.png images"
                        + (f" ({len(empty)} such classes)" if len(empty) > 1 else "")
                        + "; every class needs training images")
    return class_names, splits


def _check_one(path: Path) -> str | None:
    try:
        with Image.open(path) as img:
            img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        return f"{path}: cannot decode image ({exc.__class__.__name__}: {exc})"
    return None


def check_decodable(paths: list[Path], *, workers: int | None = None) -> None:
    """Fully decode every image once (in worker processes); the first failure is a DataError."""
    workers = workers or min(8, os.cpu_count() or 1)
    with ProcessPoolExecutor(max_workers=workers) as pool:
        results = pool.map(_check_one, paths, chunksize=64)
        for err in progress(results, total=len(paths), desc="check images", unit="img", leave=False):
            if err is not None:
                raise DataError(err)


def file_loader(path: Path):
    return lambda: path.read_bytes()
