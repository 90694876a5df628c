"""Writing WebDataset shards: split shards, by-class shards and their index."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from ...layout import DataLayout
from ...progress import progress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Record:
    """One sample to write. ``payload`` is encoded image bytes or a zero-arg loader of them."""

    key: str
    label: int
    ext: str  # "png" | "jpg"
    payload: bytes | Callable[[], bytes]

    def data(self) -> bytes:
        return self.payload if isinstance(self.payload, bytes) else self.payload()


def encode_png(image: np.ndarray) -> bytes:
    """uint8 (H, W) or (H, W, 3) array → PNG bytes (lossless)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def array_records(prefix: str, images: np.ndarray, labels: np.ndarray) -> list[Record]:
    return [
        Record(f"{prefix}{i:08d}", int(label), "png", encode_png(image))
        for i, (image, label) in enumerate(zip(images, labels, strict=True))
    ]


def write_shards(
    out_dir: Path, pattern: str, records: Sequence[Record], shard_size: int, *, desc: str,
    ranges: list[tuple[int, int]] | None = None,
) -> list[dict]:
    """Write ``records`` in order into ``pattern % i`` shards of at most ``shard_size`` samples.

    Returns one ``{"name", "count"}`` entry per shard, in order. With ``ranges``, appends each
    record's byte range ``(start, end)`` of tar members within its shard.
    """
    shards: list[dict] = []
    for start in progress(range(0, len(records), shard_size), desc=desc, unit="shard", leave=False):
        name = pattern % len(shards)
        chunk = records[start : start + shard_size]
        # An integral mtime keeps the headers plain ustar (no per-member pax records, 2× faster
        # to read) and the shards byte-reproducible.
        with wds.TarWriter(str(out_dir / name), mtime=0) as sink:
            for rec in chunk:
                start = sink.tarstream.offset
                sink.write({"__key__": rec.key, rec.ext: rec.data(), "cls": str(rec.label).encode()})
                if ranges is not None:
                    ranges.append((start, sink.tarstream.offset))
        shards.append({"name": name, "count": len(chunk)})
    return shards


def write_split(out_dir: Path, split: str, records: Sequence[Record], num_classes: int, shard_size: int) -> dict:
    """Write one split (already in the order wanted) and return its index entry."""
    shards = write_shards(out_dir, DataLayout.shard_pattern(split), records, shard_size, desc=split)
    counts = np.bincount([r.label for r in records], minlength=num_classes)
    return {"count": len(records), "class_counts": counts.tolist(), "shards": shards}


def write_by_class(out_dir: Path, records: Sequence[Record], num_classes: int, shard_size: int) -> dict:
    """Write the train split again, sorted by class, so a specialist can read only its classes.

    A class's samples are contiguous: they fill part of one shard or span a few.
    The index maps each class to ``[[shard_number, count, start, end], ...]``: ``start:end`` is
    the byte range of the class's tar members in that shard, so a reader can seek straight to
    a class instead of scanning the shard (small classes share a shard with hundreds of others).
    """
    ordered = sorted(records, key=lambda r: r.label)  # stable: keeps the shuffled order within a class
    ranges: list[tuple[int, int]] = []
    shards = write_shards(out_dir, DataLayout.shard_pattern("byclass"), ordered, shard_size, desc="by-class", ranges=ranges)
    classes: list[list[list[int]]] = [[] for _ in range(num_classes)]
    for position, (rec, (start, end)) in enumerate(zip(ordered, ranges, strict=True)):
        shard = position // shard_size
        entries = classes[rec.label]
        if entries and entries[-1][0] == shard:
            entries[-1][1] += 1
            entries[-1][3] = end
        else:
            entries.append([shard, 1, start, end])
    return {"shards": shards, "classes": classes}
