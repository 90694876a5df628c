"""How well class sets capture a classifier's confusions.

The point of the sets (Hinton et al. 2015, section 5) is that a specialist
resolves the generalist's confusions among its classes, so a good set of sets
holds most of the generalist's errors inside one set: the true and the
predicted class of an error are both in some Sᵐ. The figure is only meaningful
next to what sets of those sizes would catch by chance.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["ErrorPairShare", "error_pair_share", "chance_pair_share"]


@dataclass(frozen=True)
class ErrorPairShare:
    """Result of ``error_pair_share``.

    share: fraction of the errors whose (true, predicted) pair lies inside a
        common set (NaN when there are no errors).
    chance: fraction of all ordered pairs (i, j), i != j, of the C classes that
        lie inside a common set: the share expected if errors were random.
    num_errors: number of examples with true != predicted.
    num_inside: number of those whose pair lies inside a common set.
    """

    share: float
    chance: float
    num_errors: int
    num_inside: int

    @property
    def lift(self) -> float:
        """share / chance (how many times better than random sets)."""
        return self.share / self.chance if self.chance > 0 else float("nan")


def error_pair_share(
    true_labels: Sequence[int] | np.ndarray | torch.Tensor,
    predicted_labels: Sequence[int] | np.ndarray | torch.Tensor,
    class_sets: Sequence[Sequence[int]],
    *,
    num_classes: int | None = None,
) -> ErrorPairShare:
    """Share of the errors (true != predicted) whose pair falls inside one class set.

    Args:
        true_labels: (N,) integer labels.
        predicted_labels: (N,) integer predictions (e.g. the generalist's top-1).
        class_sets: the specialists' class sets (may overlap).
        num_classes: C; inferred as 1 + the largest label or set member if None.
    """
    true = _as_labels(true_labels, "true_labels")
    pred = _as_labels(predicted_labels, "predicted_labels")
    if true.shape != pred.shape:
        raise ValueError(
            f"true_labels has shape {true.shape} but predicted_labels has shape {pred.shape}"
        )
    sets = _as_sets(class_sets)
    members = [int(s.max()) for s in sets if s.size]
    if true.size:
        members += [int(true.max()), int(pred.max())]
    largest = max(members, default=-1)
    if num_classes is None:
        num_classes = largest + 1
    elif largest >= num_classes:
        raise ValueError(f"num_classes={num_classes} but a label or set member is {largest}")
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes} but expected at least 2")
    errors = true != pred
    inside = _pairs_inside(true[errors], pred[errors], sets, num_classes)
    num_errors, num_inside = int(errors.sum()), int(inside.sum())
    share = num_inside / num_errors if num_errors else float("nan")
    return ErrorPairShare(share, chance_pair_share(sets, num_classes), num_errors, num_inside)


def chance_pair_share(class_sets: Sequence[Sequence[int]], num_classes: int) -> float:
    """Fraction of ordered pairs of distinct classes that share at least one set (exact)."""
    sets = _as_sets(class_sets)
    partners = _partners(sets, num_classes)
    pairs = sum(len(p) - 1 for p in partners if len(p))  # own class excluded
    return pairs / (num_classes * (num_classes - 1))


def _partners(sets: list[np.ndarray], num_classes: int) -> list[np.ndarray]:
    """For each class, the sorted union of the sets containing it (itself included)."""
    containing: list[list[int]] = [[] for _ in range(num_classes)]
    for m, s in enumerate(sets):
        for i in s:
            containing[int(i)].append(m)
    empty = np.zeros(0, dtype=np.int64)
    return [
        np.unique(np.concatenate([sets[m] for m in ms])) if ms else empty for ms in containing
    ]


def _pairs_inside(
    true: np.ndarray, pred: np.ndarray, sets: list[np.ndarray], num_classes: int
) -> np.ndarray:
    """(N,) bool: whether true[n] and pred[n] lie inside a common set."""
    membership = np.zeros((num_classes, len(sets)), dtype=bool)  # (C, M)
    for m, s in enumerate(sets):
        membership[s, m] = True
    return (membership[true] & membership[pred]).any(axis=1)


def _as_labels(labels: Sequence[int] | np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    array = np.asarray(labels)
    if array.ndim != 1:
        raise ValueError(f"{name} has shape {array.shape} but expected (N,)")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must hold integers, got dtype {array.dtype}")
    array = array.astype(np.int64)
    if array.size and array.min() < 0:
        raise ValueError(f"{name} contains a negative label {int(array.min())}")
    return array


def _as_sets(class_sets: Sequence[Sequence[int]]) -> list[np.ndarray]:
    sets = []
    for m, s in enumerate(class_sets):
        array = np.unique(np.asarray(list(s), dtype=np.int64))
        if array.size and array.min() < 0:
            raise ValueError(f"class_sets[{m}] contains a negative class {int(array.min())}")
        sets.append(array)
    return sets
