"""A teacher's soft targets, cached once per training view and read back by any student trained on
the same views (as fast knowledge-distillation systems do), read and written here only.

One file per (epoch, process): for the i-th training image of that epoch's stream, the teacher's
``k`` most probable classes and their log-probabilities, the mass left on the other classes as
each cached temperature T softens it (Σ over the other classes of t^(1/T)), and a fingerprint of the augmented view it saw (so a student reading the cache is checked to see the
very same view). At T = 1 a target is rebuilt by spreading the remaining mass evenly over the
other classes: it differs from the teacher's distribution by at most twice that mass (L1).

Softening commutes with the top-k (it keeps the order), so the softened teacher is rebuilt exactly
on the top-k and on the total of the rest; only the rest's split is even. Spreading the T = 1 mass
evenly and softening *after* would not do: an even tail is the flattest one, and at T = 2 it took
a third of the softened target on 1,000 classes where the real tail held 0.5% of the mass
(docs/RESULTS.md, "Distillation back into one net").
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
    log_probs: np.ndarray  # (N, k) float32, their log-probabilities
    tails: np.ndarray  # (N, m) float32, Σ over the other classes of t^(1/T) for each cached T
    views: np.ndarray  # (N,) uint32 fingerprints of the views
    temperatures: np.ndarray  # (m,) float32, the cached temperatures

    def __len__(self) -> int:
        return len(self.views)

    @property
    def rest(self) -> np.ndarray:
        """(N,) 1 − Σ of the top-k probabilities: the mass on the other C − k classes."""
        return np.clip(1.0 - np.exp(self.log_probs.astype(np.float64)).sum(1), 0.0, None)

    def log_targets(self, start: int, stop: int, num_classes: int, temperature: float = 1.0) -> torch.Tensor:
        """(stop − start, C) log t of the rebuilt teacher for a student softening at ``temperature``:
        the top-k as stored, and each other class given (tail_T / (C − k))^T, so that
        softmax(log t / T) holds the softened teacher exactly on the top-k and on the rest's total
        (spread evenly). At T = 1, t is the remaining mass spread evenly: a distribution."""
        hits = np.flatnonzero(np.isclose(self.temperatures, temperature))
        if not len(hits):
            raise DataError(f"no cached tail for temperature {temperature:g} (cached: "
                            f"{', '.join(f'{t:g}' for t in self.temperatures)})")
        idx = torch.from_numpy(self.indices[start:stop].astype(np.int64))
        log_probs = torch.from_numpy(self.log_probs[start:stop])
        tail = torch.from_numpy(self.tails[start:stop, hits[0]]).double().clamp_min(1e-300)
        spread = (temperature * (tail / max(1, num_classes - idx.shape[1])).log()).float()
        t = spread[:, None].expand(len(tail), num_classes).clone()
        return t.scatter_(1, idx, log_probs)


def compress(log_q: torch.Tensor, k: int, temperatures: tuple[float, ...] = (1.0,)
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A teacher's (B, C) log-distributions → (top-k indices, their log-probabilities, (B, m) the
    remaining mass softened at each temperature: Σ over the other classes of t^(1/T))."""
    log_probs, idx = log_q.float().topk(min(k, log_q.shape[1]), dim=1)
    others = log_q.double().scatter(1, idx.long(), -torch.inf)
    tails = torch.stack([(others / t).exp().sum(1) for t in temperatures], dim=1)
    return idx.int().cpu().numpy(), log_probs.cpu().numpy(), tails.float().cpu().numpy()


def write_targets(path: Path, targets: CachedTargets) -> None:
    atomic_write(path, lambda f: np.savez(f, indices=targets.indices, log_probs=targets.log_probs,
                                          tails=targets.tails, views=targets.views,
                                          temperatures=targets.temperatures))


def read_targets(path: Path) -> CachedTargets:
    try:
        with np.load(path) as z:
            return CachedTargets(z["indices"], z["log_probs"], z["tails"], z["views"], z["temperatures"])
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"{path}: not a readable teacher cache ({exc.__class__.__name__}); delete it to rebuild") from None
