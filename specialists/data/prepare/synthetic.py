"""A synthetic image generator with planted groups of confusable classes.

Classes are arranged in groups of ``group_size``. Every class of a group shares
a smooth random *base pattern*; each class adds its own small *detail* (a
faint blob at a class-specific place). A generalist therefore confuses classes
within a group far more than across groups — the structure the prediction
covariance should reveal (Hinton et al. 2015, section 5.3).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ...config import SyntheticConfig


def _smooth_noise(rng: np.random.Generator, n: int, size: int, cells: int) -> np.ndarray:
    """(n, size, size) smooth random fields in [0, 1] (bilinear upsampling of a coarse grid)."""
    coarse = torch.from_numpy(rng.random((n, 1, cells, cells), dtype=np.float32))
    fine = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)[:, 0]
    fine = fine - fine.amin(dim=(1, 2), keepdim=True)
    fine = fine / fine.amax(dim=(1, 2), keepdim=True).clamp_min(1e-6)
    return fine.numpy()


def _blob(size: int, cy: np.ndarray, cx: np.ndarray, radius: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    d2 = (yy[None] - cy[:, None, None]) ** 2 + (xx[None] - cx[:, None, None]) ** 2
    return np.exp(-d2 / (2 * radius**2)).astype(np.float32)


def class_templates(cfg: SyntheticConfig, seed: int) -> np.ndarray:
    """(C, S, S) float32 templates in [0, 1]: group base pattern + class detail."""
    rng = np.random.default_rng([seed, 1])
    size, c = cfg.image_size, cfg.num_classes
    num_groups = -(-c // cfg.group_size)
    bases = _smooth_noise(rng, num_groups, size, cells=4)
    group = np.arange(c) // cfg.group_size
    centre = rng.uniform(size * 0.2, size * 0.8, size=(c, 2)).astype(np.float32)
    detail = _blob(size, centre[:, 0], centre[:, 1], radius=max(1.0, size / 10))
    sign = rng.choice([-1.0, 1.0], size=c).astype(np.float32)
    templates = 0.15 + 0.7 * bases[group] + cfg.detail_strength * sign[:, None, None] * detail
    return np.clip(templates, 0.0, 1.0)


def generate(cfg: SyntheticConfig, labels: np.ndarray, seed: int, stream: int) -> np.ndarray:
    """(N, S, S) uint8 images for ``labels``: template + shift + contrast jitter + noise."""
    templates = class_templates(cfg, seed)
    rng = np.random.default_rng([seed, 2, stream])
    n, size = len(labels), cfg.image_size
    images = templates[labels].copy()
    shifts = rng.integers(-2, 3, size=(n, 2))
    for i in range(n):
        images[i] = np.roll(images[i], tuple(shifts[i]), axis=(0, 1))
    contrast = rng.uniform(0.7, 1.3, size=(n, 1, 1)).astype(np.float32)
    brightness = rng.uniform(-0.1, 0.1, size=(n, 1, 1)).astype(np.float32)
    noise = rng.normal(0.0, 0.12, size=(n, size, size)).astype(np.float32)
    images = (images - 0.5) * contrast + 0.5 + brightness + noise
    return (np.clip(images, 0.0, 1.0) * 255).round().astype(np.uint8)


def class_names(cfg: SyntheticConfig) -> list[str]:
    return [f"g{c // cfg.group_size:04d}-c{c:05d}" for c in range(cfg.num_classes)]
