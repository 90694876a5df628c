"""``specialists prepare``: turn a data source into WebDataset shards.

Output directory layout::

    classes.json                 class names, index = label
    index.json                   splits → shards and counts; class → by-class shards; what decided them
    train-000000.tar …           shuffled samples: <key>.png|.jpg + <key>.cls
    val-000000.tar …  test-000000.tar …
    byclass-000000.tar …         the train split sorted by class

Everything is written into a temporary sibling directory that is renamed into
place at the end, so an interrupted run leaves no partial output.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...artifacts.shard_index import is_prepared, write_index
from ...config import SyntheticConfig, TypefacesConfig
from ...errors import DataError, UserError
from ...io import atomic_directory, remove_temporaries
from . import idx, imagefolder, synthetic, typefaces
from .writer import Record, array_records, write_by_class, write_split

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedData:
    class_names: list[str]
    splits: dict[str, list[Record]]  # split → records in the order to write
    image: dict | None  # {"height", "width", "channels"} when fixed
    card: str | None = None  # DATA.md written beside the shards


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, held_out): ``round(fraction · n_c)`` of every class held out, seeded."""
    rng = np.random.default_rng([seed, 7])
    held = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        k = int(round(fraction * len(members)))
        held.append(rng.permutation(members)[:k])
    held_out = np.sort(np.concatenate(held)) if held else np.array([], dtype=np.int64)
    kept = np.setdiff1d(np.arange(len(labels)), held_out)
    return kept, held_out


def _shuffled(records: list[Record], seed: int, stream: int) -> list[Record]:
    order = np.random.default_rng([seed, 11, stream]).permutation(len(records))
    return [records[i] for i in order]


def from_fashion_mnist(directory: str, seed: int) -> PreparedData:
    """55,000 train / 5,000 val (500 per class, seeded) / 10,000 test."""
    a = idx.load_fashion_mnist(directory)
    train_idx, val_idx = stratified_split(a["train_labels"], 5000 / 60000, seed)
    splits = {
        "train": array_records("train", a["train_images"][train_idx], a["train_labels"][train_idx]),
        "val": array_records("val", a["train_images"][val_idx], a["train_labels"][val_idx]),
        "test": array_records("test", a["test_images"], a["test_labels"]),
    }
    # Key each sample by its position in the original files so it can be traced back.
    splits["train"] = [Record(f"train{i:08d}", r.label, r.ext, r.payload) for i, r in zip(train_idx, splits["train"], strict=True)]
    splits["val"] = [Record(f"train{i:08d}", r.label, r.ext, r.payload) for i, r in zip(val_idx, splits["val"], strict=True)]
    return PreparedData(list(idx.CLASS_NAMES), splits, {"height": 28, "width": 28, "channels": 1})


def from_synthetic(cfg: SyntheticConfig, seed: int) -> PreparedData:
    if not 2 <= cfg.num_classes <= 15000:
        raise UserError(f"synthetic num_classes={cfg.num_classes}: expected 2..15000")
    splits = {}
    for stream, (split, per_class) in enumerate(
        (("train", cfg.train_per_class), ("val", cfg.val_per_class), ("test", cfg.test_per_class))
    ):
        labels = np.repeat(np.arange(cfg.num_classes), per_class)
        images = synthetic.generate(cfg, labels, seed, stream)
        splits[split] = array_records(split, images, labels)
    size = cfg.image_size
    return PreparedData(synthetic.class_names(cfg), splits, {"height": size, "width": size, "channels": 1})


def from_imagefolder(directory: str, seed: int, val_fraction: float, test_fraction: float) -> PreparedData:
    class_names, found = imagefolder.scan(directory)
    if "all" in found:
        items = found.pop("all")
        labels = np.array([label for _, label in items])
        rest, test_idx = stratified_split(labels, test_fraction, seed + 1)
        train_sub, val_sub = stratified_split(labels[rest], val_fraction / max(1e-12, 1 - test_fraction), seed)
        found = {
            "train": [items[i] for i in rest[train_sub]],
            "val": [items[i] for i in rest[val_sub]],
            "test": [items[i] for i in test_idx],
        }
    elif "val" not in found:
        items = found["train"]
        labels = np.array([label for _, label in items])
        train_sub, val_sub = stratified_split(labels, val_fraction, seed)
        found["train"], found["val"] = [items[i] for i in train_sub], [items[i] for i in val_sub]
    imagefolder.check_decodable([p for items in found.values() for p, _ in items])
    splits = {
        split: [
            Record(f"{split}{i:08d}", label, imagefolder.EXTENSIONS[p.suffix.lower()], imagefolder.file_loader(p))
            for i, (p, label) in enumerate(items)
        ]
        for split, items in found.items()
    }
    return PreparedData(class_names, splits, None)


def from_typefaces(cfg: TypefacesConfig, seed: int) -> PreparedData:
    """Characters rendered from installed fonts, split by typeface design (see ``typefaces``)."""
    if cfg.renders < 1 or cfg.eval_renders < 1:
        raise UserError(f"typefaces renders={cfg.renders}, eval_renders={cfg.eval_renders}: expected ≥ 1")
    if not 8 <= cfg.image_size <= 256:
        raise UserError(f"typefaces image_size={cfg.image_size}: expected 8..256")
    chars = typefaces.select_chars(cfg, seed)
    faces = typefaces.find_faces(cfg.font_dirs, chars)
    typefaces.check_chars_available(chars, faces, cfg.font_dirs)
    split = typefaces.split_faces(faces, cfg)
    records, census = typefaces.render_splits(chars, split, cfg, seed)
    card = typefaces.data_card(chars, census, cfg, seed)
    size = cfg.image_size
    return PreparedData(list(chars), records, {"height": size, "width": size, "channels": 1}, card)


def load_source(
    source: str, *, seed: int, synthetic_cfg: SyntheticConfig, val_fraction: float, test_fraction: float,
    typefaces_cfg: TypefacesConfig | None = None,
) -> PreparedData:
    kind, _, arg = source.partition(":")
    if kind == "typefaces":
        return from_typefaces(typefaces_cfg or TypefacesConfig(), seed)
    if kind == "fashion-mnist":
        return from_fashion_mnist(arg or idx.DEFAULT_DIR, seed)
    if kind == "synthetic":
        return from_synthetic(synthetic_cfg, seed)
    if kind == "imagefolder":
        if not arg:
            raise UserError("--source imagefolder:DIR needs a directory")
        return from_imagefolder(arg, seed, val_fraction, test_fraction)
    raise UserError(f"--source {source!r}: unknown source "
                    " (expected fashion-mnist[:DIR], imagefolder:DIR, synthetic or typefaces)")


def source_options(source: str, *, seed: int, shard_size: int, synthetic_cfg: SyntheticConfig | None,
                   typefaces_cfg: TypefacesConfig | None, val_fraction: float, test_fraction: float) -> dict:
    """What decides the prepared data (recorded in index.json): the source kind, seed, shard size
    and the options of that source — not where its files are."""
    import dataclasses

    kind = source.partition(":")[0]
    options: dict = {"data.source": kind, "data.split_seed": seed, "data.shard_size": shard_size}
    if kind == "synthetic":
        options.update({f"data.synthetic.{k}": v for k, v in dataclasses.asdict(synthetic_cfg or SyntheticConfig()).items()})
    elif kind == "typefaces":
        tf = dataclasses.asdict(typefaces_cfg or TypefacesConfig())
        options.update({f"data.typefaces.{k}": list(v) if isinstance(v, tuple) else v for k, v in tf.items()
                        if k not in ("workers", "font_dirs")})
    elif kind == "imagefolder":
        options.update({"data.val_fraction": val_fraction, "data.test_fraction": test_fraction})
    return options


def prepare(
    source: str,
    out: str | Path,
    *,
    seed: int = 0,
    shard_size: int = 1000,
    force: bool = False,
    synthetic_cfg: SyntheticConfig | None = None,
    typefaces_cfg: TypefacesConfig | None = None,
    val_fraction: float = 5000 / 60000,
    test_fraction: float = 0.0,
) -> Path:
    """Prepare ``source`` into shards under ``out``; a finished ``out`` is left alone unless ``force``."""
    out = Path(out)
    if shard_size < 1:
        raise UserError(f"--shard-size {shard_size}: expected a positive integer")
    remove_temporaries(out)
    if out.exists() and not force:
        if is_prepared(out):
            log.info("%s is already prepared (use --force to redo it)", out)
            return out
        raise UserError(f"{out}: exists but holds no index.json; remove it or pass --force")
    data = load_source(
        source,
        seed=seed,
        synthetic_cfg=synthetic_cfg or SyntheticConfig(),
        typefaces_cfg=typefaces_cfg,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
    )
    num_classes = len(data.class_names)
    with atomic_directory(out, overwrite=True) as tmp:
        index: dict = {"source": source, "seed": seed, "num_classes": num_classes, "shard_size": shard_size,
                       "image": data.image, "splits": {},
                       "deciding": source_options(source, seed=seed, shard_size=shard_size, synthetic_cfg=synthetic_cfg,
                                                  typefaces_cfg=typefaces_cfg, val_fraction=val_fraction,
                                                  test_fraction=test_fraction)}
        shuffled = {}
        for stream, (split, records) in enumerate(data.splits.items()):
            if not records:
                raise DataError(f"{source}: the {split} split is empty")
            shuffled[split] = _shuffled(records, seed, stream)
            index["splits"][split] = write_split(tmp, split, shuffled[split], num_classes, shard_size)
        index["byclass"] = write_by_class(tmp, shuffled["train"], num_classes, shard_size)
        write_index(tmp, index, data.class_names, data.card)
    return out
