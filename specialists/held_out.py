"""What the specialists stage needs of the val split, in memory that does not grow with it.

One pass of the generalist over val, streamed in pieces of ``CHUNK`` images, leaves:

* every val image in an anonymous file (:class:`~specialists.data.image_file.ImageFile`), read
  back by rows: a specialist's periodic conditional accuracy reads the images of its own
  classes, a piece at a time;
* the labels (N ints);
* for a bounded *sample* of val — all of it up to ``SAMPLE_ROWS`` images, beyond that a seeded
  random subset of that many — the generalist's penultimate features, its routing of each image
  to each specialist (``inference.top_n``) and, per specialist, the dustbin target
  log Σ_{j∉Sᵐ} exp z_j: what :func:`~specialists.models.surgery.make_specialist` fits the
  dustbin row on; the dustbin corrections are fitted on the same images;
* per specialist, whether the generalist restricted to Sᵐ is right on each val image of Sᵐ (its
  conditional accuracy, for the card).

The generalist's logits exist one piece (CHUNK × C) at a time; nothing N × C is kept. Every
model runs on pieces of CHUNK rows, as when the stage held val whole, so per-image outputs (and
so every trained weight) are the same as then wherever N ≤ SAMPLE_ROWS.

Not a stage: ``train-specialists`` uses it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from inference import active_specialists

from .artifacts.shard_index import ShardIndex
from .config import RunConfig
from .data.image_file import ImageFile
from .data.pipeline import normalize, split_chunks
from .models.surgery import dustbin_targets, map_labels, penultimate_features
from .progress import progress

log = logging.getLogger(__name__)

SPLIT = "val"
CHUNK = 1000  # images per model call
SAMPLE_ROWS = 32_768  # val images the dustbin row and corrections are fitted on, at most


@dataclass
class HeldOut:
    """The val split as the specialists need it (see the module docstring); ``ids`` are the
    specialists whose columns ``routed``, ``targets`` and ``general_hits`` hold, in order."""

    images: ImageFile  # N uint8 images, on disk
    labels: torch.Tensor  # (N,) int64
    sample: torch.Tensor  # (n,) ascending rows of the sample
    features: torch.Tensor  # (n, D) generalist penultimate features of the sample
    routed: torch.Tensor  # (n, M') bool: the ensemble routes sample image i to specialist ids[k]
    targets: torch.Tensor  # (M', n) float64 dustbin targets of the sample
    general_hits: list[torch.Tensor]  # M' bool vectors: generalist right within Sᵐ, val images of Sᵐ
    ids: list[int]

    @property
    def sample_labels(self) -> torch.Tensor:
        return self.labels[self.sample]

    def column(self, m: int) -> int:
        return self.ids.index(m)

    def rows_of(self, classes: list[int]) -> torch.Tensor:
        """(k,) ascending rows of the val images whose class is in ``classes``."""
        return torch.isin(self.labels, torch.tensor(classes)).nonzero().squeeze(1)

    def close(self) -> None:
        self.images.close()


def sample_rows(num: int, seed: int, limit: int = SAMPLE_ROWS) -> torch.Tensor:
    """(min(num, limit),) ascending rows: all of them, or a seeded random subset of ``limit``."""
    if num <= limit:
        return torch.arange(num)
    order = torch.randperm(num, generator=torch.Generator().manual_seed(seed))
    return order[:limit].sort().values


@torch.inference_mode()
def run_model(model: torch.nn.Module, images: torch.Tensor, accelerator: Accelerator, cfg: RunConfig,
              *, features: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """float32 logits (and penultimate features) of ``model`` over one piece of uint8 images, on the CPU."""
    x = normalize(images.to(accelerator.device), cfg.data)
    with accelerator.autocast():
        if features:
            h, z = penultimate_features(model, x)
            return z.float().cpu(), h.float().cpu()
        return model(x).float().cpu()


def build_held_out(generalist: torch.nn.Module, index: ShardIndex, cfg: RunConfig, accelerator: Accelerator,
                   specialists: list[tuple[int, list[int]]], folder: Path) -> HeldOut:
    """One generalist pass over val (see the module docstring); the image file goes in ``folder``."""
    num = index.count(SPLIT)
    sample = sample_rows(num, cfg.seed, SAMPLE_ROWS)
    in_sample = torch.zeros(num, dtype=torch.bool)
    in_sample[sample] = True
    sets = [torch.tensor(classes) for _, classes in specialists]
    top_n = cfg.inference.top_n
    images = ImageFile((cfg.data.channels, cfg.data.image_size, cfg.data.image_size), folder=folder)
    labels, feats, routed, targets = [], [], [], []
    hits: list[list[torch.Tensor]] = [[] for _ in sets]
    start = 0
    pieces = progress(split_chunks(index, cfg.data, SPLIT, CHUNK), main_process=accelerator.is_local_main_process,
                      total=-(-num // CHUNK), desc="generalist on val", unit="piece", leave=False)
    for x, y in pieces:
        images.append(x)
        labels.append(y)
        z, h = run_model(generalist, x, accelerator, cfg, features=True)
        keep = in_sample[start : start + len(y)]
        start += len(y)
        feats.append(h[keep])
        zs = z[keep]
        if sets:
            routed.append(active_specialists(zs, sets, top_n=min(top_n, z.shape[1])))
            targets.append(dustbin_targets(zs, sets))  # (M', kept)
        for k, s in enumerate(sets):
            hits[k].append(_hits(z, y, s))
    if start != num:
        raise RuntimeError(f"{index.root}: read {start} {SPLIT} images, index.json says {num}")
    log.info("val: %d images on disk, a sample of %d in memory, %d specialists", num, len(sample), len(sets))
    return HeldOut(
        images=images, labels=torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long), sample=sample,
        features=torch.cat(feats) if feats else torch.zeros(0, 0),
        routed=torch.cat(routed) if routed else torch.zeros(len(sample), 0, dtype=torch.bool),
        targets=torch.cat(targets, dim=1) if sets else torch.zeros(0, len(sample)),
        general_hits=[torch.cat(h) for h in hits], ids=[m for m, _ in specialists])


def _hits(logits: torch.Tensor, labels: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """(k,) bool: on the images of Sᵐ, is argmax of the generalist's logits over Sᵐ the label?"""
    mask = torch.isin(labels, classes)
    target = map_labels(labels[mask], classes.tolist(), num_classes=logits.shape[1])
    return logits[mask][:, classes].argmax(dim=1) == target
