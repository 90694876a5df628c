"""A teacher's soft targets, cached once per training view and read back by any student trained on
the same views (as fast knowledge-distillation systems do), read and written here only.

One file per (epoch, process): for the i-th training image of that epoch's stream, the teacher's
``k`` most probable classes and their probabilities, the mass left on the other classes, and a
fingerprint of the augmented view it saw (so a student reading the cache is checked to see the
very same view). A target is rebuilt by spreading the remaining mass evenly over the other
classes: it differs from the teacher's distribution by at most twice that mass (L1).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from ..io import atomic_write


def view_fingerprints(images: torch.Tensor) -> np.ndarray:
    """(B,) uint32 CRC32 of each uint8 view (B, C, H, W) as the student receives it."""
    array = images.cpu().numpy()
    return np.array([zlib.crc32(row.tobytes()) for row in array], dtype=np.uint32)


@dataclass
class CachedTargets:
    indices: np.ndarray  # (N, k) int32, the teacher's top-k classes of each view
    probs: np.ndarray  # (N, k) float32
    rest: np.ndarray  # (N,) float32, 1 − Σ probs: the mass on the other C − k classes
    views: np.ndarray  # (N,) uint32 fingerprints of the views

    def __len__(self) -> int:
        return len(self.rest)

    def targets(self, start: int, stop: int, num_classes: int) -> torch.Tensor:
        """(stop − start, C) rebuilt distributions: top-k as stored, the rest spread evenly."""
        idx = torch.from_numpy(self.indices[start:stop].astype(np.int64))
        probs = torch.from_numpy(self.probs[start:stop])
        rest = torch.from_numpy(self.rest[start:stop]).clamp_min(0.0)
        spread = rest / max(1, num_classes - idx.shape[1])
        t = spread[:, None].expand(len(rest), num_classes).clone()
        return t.scatter_(1, idx, probs)


def compress(q: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A teacher's (B, C) distributions → (top-k indices, their probabilities, the remaining mass)."""
    probs, idx = q.float().topk(min(k, q.shape[1]), dim=1)
    rest = (1.0 - probs.sum(1)).clamp_min(0.0)
    return idx.int().cpu().numpy(), probs.cpu().numpy(), rest.cpu().numpy()


def write_targets(path: Path, targets: CachedTargets) -> None:
    atomic_write(path, lambda f: np.savez(f, indices=targets.indices, probs=targets.probs, rest=targets.rest,
                                          views=targets.views))


def read_targets(path: Path) -> CachedTargets:
    try:
        with np.load(path) as z:
            return CachedTargets(z["indices"], z["probs"], z["rest"], z["views"])
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"{path}: not a readable teacher cache ({exc.__class__.__name__}); delete it to rebuild") from None
