"""Synthetic generalist outputs with planted confusable groups (for tests and benchmarks).

Each image of class y gets a peaked softmax: a large logit on y, somewhat
smaller ones on a few classes of y's group (the confusions the clustering
should find), one weaker random confusion anywhere, and Gaussian noise on all
C logits. As with a trained generalist, the diagonal of the covariance
dominates its columns.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

__all__ = ["planted_groups", "synthetic_outputs"]


def planted_groups(num_classes: int, num_groups: int, *, seed: int = 0) -> np.ndarray:
    """(C,) group id of each class: a random partition into groups of near-equal size."""
    if not 1 <= num_groups <= num_classes:
        raise ValueError(f"num_groups={num_groups} but expected 1 <= num_groups <= {num_classes}")
    rng = np.random.default_rng(seed)
    return rng.permutation(np.arange(num_classes) % num_groups)


def synthetic_outputs(
    group_of_class: np.ndarray,
    num_images: int,
    *,
    batch_size: int = 1024,
    seed: int = 0,
    confusable: int = 3,
    margin: tuple[float, float] = (0.5, 4.0),
    noise: float = 1.0,
    zipf: float = 0.0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yields (probs (B, C) float32, labels (B,) int64) batches.

    Args:
        group_of_class: (C,) planted group of each class.
        num_images: total rows yielded.
        confusable: classes of the true class's group that get a confusion logit.
        margin: the confusion logits are ``peak - U(margin)``; ``peak = log C + 3``
            so that the top class keeps most of the mass against C noisy logits.
        noise: std of the Gaussian noise on every logit.
        zipf: class frequency ∝ (rank + 1) ** -zipf (0: uniform classes).
    """
    groups = torch.as_tensor(np.asarray(group_of_class), dtype=torch.int64)  # (C,)
    c = groups.numel()
    order = torch.argsort(groups, stable=True)  # classes sorted by group
    sizes = torch.bincount(groups)  # (G,)
    starts = torch.cumsum(sizes, 0) - sizes  # (G,)
    generator = torch.Generator().manual_seed(int(seed))
    weights = torch.arange(1, c + 1, dtype=torch.float64) ** -zipf
    weights = weights[torch.randperm(c, generator=generator)]
    peak = math.log(c) + 3.0
    low, high = margin
    for start in range(0, num_images, batch_size):
        b = min(batch_size, num_images - start)
        labels = torch.multinomial(weights, b, replacement=True, generator=generator)  # (B,)
        logits = noise * torch.randn(b, c, generator=generator)  # (B, C)
        rows = torch.arange(b)
        logits[rows, labels] += peak
        g = groups[labels]  # (B,)
        pick = (torch.rand(b, confusable, generator=generator) * sizes[g][:, None]).long()
        confused = order[starts[g][:, None] + pick]  # (B, confusable) classes of the group
        shift = peak - (low + (high - low) * torch.rand(b, confusable, generator=generator))
        logits[rows[:, None], confused] = torch.maximum(logits[rows[:, None], confused], shift)
        anywhere = torch.randint(c, (b,), generator=generator)
        weak = peak - (high + 1.0 + torch.rand(b, generator=generator))
        logits[rows, anywhere] = torch.maximum(logits[rows, anywhere], weak)
        yield torch.softmax(logits, dim=1), labels
