"""A short text summary of prepared shards (and an optional full read-back check)."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..artifacts.shard_index import ShardIndex
from ..config import DataConfig
from .pipeline import eval_batches


def verify(index: ShardIndex, split: str) -> tuple[int, torch.Tensor, float]:
    """Read ``split`` completely; return (samples, class counts, images/s). Raises DataError on bad data."""
    image = index.meta.get("image") or {"height": 64, "channels": 3}
    cfg = DataConfig(image_size=image["height"], channels=image["channels"],
                     mean=(0.5,) * image["channels"], std=(0.5,) * image["channels"], num_workers=2)
    counts = torch.zeros(index.num_classes, dtype=torch.long)
    start = time.perf_counter()
    for _, labels, valid in eval_batches(index, cfg, split):
        counts += torch.bincount(labels[valid], minlength=index.num_classes)
    n = int(counts.sum())
    return n, counts, n / max(time.perf_counter() - start, 1e-9)


def summarize(root: str | Path, *, read: bool = False) -> str:
    index = ShardIndex.load(root)
    index.check_exists()
    lines = [f"{index.root}: {index.num_classes} classes, source {index.meta.get('source')}, seed {index.meta.get('seed')}"]
    for split in index.splits:
        counts = index.class_counts(split)
        lines.append(f"  {split:5s} {index.count(split):8,d} samples in {len(index.shards(split)):4d} shards; "
                     f"per class min {counts.min():,d} / max {counts.max():,d}")
        if read:
            n, seen, rate = verify(index, split)
            ok = "ok" if n == index.count(split) and seen.tolist() == counts.tolist() else "MISMATCH"
            lines.append(f"        read back {n:,d} samples at {rate:,.0f} images/s: {ok}")
    byclass = index.meta["byclass"]
    lines.append(f"  by-class: {len(byclass['shards'])} shards")
    names = index.class_names
    shown = ", ".join(names[:10]) + (f", … ({len(names)} in all)" if len(names) > 10 else "")
    lines.append(f"  classes: {shown}")
    return "\n".join(lines)
