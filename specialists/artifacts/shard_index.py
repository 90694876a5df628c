"""The shard index: what ``prepare`` wrote (class names, shards, per-class counts), read and
written here only.

``index.json`` carries a checksum of its own content: the counts in it decide how many batches
an epoch has, so an edited index would silently change training; it is refused instead.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from ..io import atomic_write_json, atomic_write_text, read_json
from ..layout import DataLayout

INDEX_FORMAT = "specialists-shards/1"


def _checksum(meta: dict[str, Any]) -> str:
    body = {k: v for k, v in meta.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class ShardIndex:
    """A prepared shard directory: class names, shards and per-class counts (read, never scanned)."""

    root: Path
    class_names: list[str]
    meta: dict

    @classmethod
    def load(cls, root: str | Path) -> ShardIndex:
        files = DataLayout(root)
        if not files.index.is_file():
            raise DataError(f"{files.root}: no prepared shards here (index.json missing); run `specialists prepare` first")
        try:
            meta = read_json(files.index)
            names = read_json(files.classes)
        except (OSError, ValueError) as exc:
            raise DataError(f"{files.root}: cannot read index.json/classes.json ({exc})") from None
        if not isinstance(meta, dict) or not isinstance(names, list):
            raise DataError(f"{files.index}: expected an object, and a list in classes.json")
        if "checksum" in meta and meta["checksum"] != _checksum(meta):
            raise DataError(f"{files.index}: its content does not match its checksum (edited by hand?); "
                            "re-run `specialists prepare --force`")
        if len(names) != meta.get("num_classes"):
            raise DataError(f"{files.classes}: {len(names)} names but index.json says {meta.get('num_classes')} classes")
        return cls(files.root, list(names), meta)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def splits(self) -> list[str]:
        return list(self.meta["splits"])

    @property
    def digest(self) -> str:
        """Identifies the prepared data (the index's checksum): recorded by every model trained on it."""
        return self.meta.get("checksum") or _checksum(self.meta)

    def _split(self, split: str) -> dict:
        try:
            return self.meta["splits"][split]
        except KeyError:
            raise DataError(f"{self.root}: no {split!r} split (have: {', '.join(self.splits)})") from None

    def shards(self, split: str) -> list[tuple[str, int]]:
        """(url, count) for every shard of ``split``."""
        return [(str(self.root / s["name"]), s["count"]) for s in self._split(split)["shards"]]

    def count(self, split: str) -> int:
        return self._split(split)["count"]

    def class_counts(self, split: str) -> np.ndarray:
        return np.asarray(self._split(split)["class_counts"], dtype=np.int64)

    def byclass_shards(self, classes: Sequence[int]) -> list[tuple[str, int]]:
        """(url, count of the wanted classes in it) for the by-class shards holding ``classes``."""
        byclass = self.meta["byclass"]
        wanted: dict[int, int] = {}
        for c in classes:
            for shard, n, *_ in byclass["classes"][c]:
                wanted[shard] = wanted.get(shard, 0) + n
        return [(str(self.root / byclass["shards"][s]["name"]), n) for s, n in sorted(wanted.items())]

    def byclass_ranges(self, c: int) -> list[tuple[str, int, int, int]] | None:
        """(url, count, start, end) byte ranges of class ``c`` in the by-class shards; None for
        shards prepared before ranges were recorded."""
        byclass = self.meta["byclass"]
        entries = byclass["classes"][c]
        if any(len(e) < 4 for e in entries):
            return None
        return [(str(self.root / byclass["shards"][s]["name"]), n, start, end) for s, n, start, end in entries]

    def check_exists(self) -> None:
        for split in self.splits:
            for url, _ in self.shards(split):
                if not Path(url).is_file():
                    raise DataError(f"{url}: shard listed in index.json is missing")

    def check_channels(self, channels: int) -> None:
        """The images' channels against ``data.channels`` (3-channel input accepts any image)."""
        image = self.meta.get("image")
        if image and image.get("channels") not in (None, channels) and channels != 3:
            raise DataError(f"{self.root}: images have {image['channels']} channels, config data.channels={channels}")


def write_index(directory: Path, meta: dict[str, Any], class_names: list[str], card: str | None = None) -> None:
    """Write ``index.json`` (with its checksum), ``classes.json`` and the optional ``DATA.md`` card."""
    files = DataLayout(directory)
    meta = {"format": INDEX_FORMAT, **meta}
    meta["checksum"] = _checksum(meta)
    atomic_write_json(files.classes, class_names)
    if card is not None:
        atomic_write_text(files.card, card)
    atomic_write_json(files.index, meta, indent=None)


def is_prepared(directory: str | Path) -> bool:
    return DataLayout(directory).index.is_file()
