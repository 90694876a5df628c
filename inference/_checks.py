"""Checks shared by the KL solvers: validation of their inputs (done once, at the door,
in ``inference.solver``) and the per-image stopping test of the iterations."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from inference._sets import ClassSets, SetTable, check_class_sets

_ROW_SUM_TOL = 1e-3  # rows of p_general must sum to 1 within this


def _check_probs(p_general: Tensor) -> None:
    if not isinstance(p_general, Tensor) or p_general.ndim != 2 or p_general.shape[1] == 0:
        shape = tuple(p_general.shape) if isinstance(p_general, Tensor) else type(p_general)
        raise ValueError(f"p_general must be a (B, C) probability tensor with C >= 1, got {shape}")
    if not p_general.dtype.is_floating_point:
        raise ValueError(f"p_general must be a floating tensor, got {p_general.dtype}")


def check_inputs(
    p_general: Tensor,
    p_specialists: Sequence[Tensor],
    class_sets: ClassSets,
    active: Tensor,
) -> tuple[SetTable, list[Tensor]]:
    """Validate the solver inputs; return the set table and the compact specialist rows."""
    _check_probs(p_general)
    batch, num_classes = p_general.shape
    device = p_general.device
    sets = check_class_sets(class_sets, num_classes, device)
    num_spec = sets.num_specialists
    if not isinstance(active, Tensor) or active.dtype != torch.bool:
        raise ValueError(f"active must be a (B, M) bool tensor, got {getattr(active, 'dtype', type(active))}")
    if tuple(active.shape) != (batch, num_spec):
        raise ValueError(
            f"active has shape {tuple(active.shape)}, expected (B, M) = ({batch}, {num_spec})"
        )
    if active.device != device:
        raise ValueError(f"active is on {active.device}, expected p_general's device {device}")
    if isinstance(p_specialists, Tensor) or len(p_specialists) != num_spec:
        got = "a tensor" if isinstance(p_specialists, Tensor) else f"{len(p_specialists)} tensors"
        raise ValueError(f"p_specialists must be a list of M = {num_spec} tensors, got {got}")
    n_active = active.sum(dim=0).tolist()  # (M,)
    rows = []
    for m, (p, size) in enumerate(zip(p_specialists, sets.size_list, strict=True)):
        if not isinstance(p, Tensor) or p.ndim != 2 or not p.dtype.is_floating_point:
            raise ValueError(f"p_specialists[{m}] must be a 2-D floating tensor, got {p!r:.60}")
        if p.shape[1] != size + 1:
            raise ValueError(
                f"p_specialists[{m}] has {p.shape[1]} columns, expected |class_sets[{m}]| + 1 = "
                f"{size + 1} (dustbin last)"
            )
        if p.device != device:
            raise ValueError(f"p_specialists[{m}] is on {p.device}, expected {device}")
        if p.shape[0] == batch:
            rows.append(p if n_active[m] == batch else p[active[:, m]])
        elif p.shape[0] == n_active[m]:
            rows.append(p)
        else:
            raise ValueError(
                f"p_specialists[{m}] has {p.shape[0]} rows, expected B = {batch} (full) or "
                f"active[:, {m}].sum() = {n_active[m]} (compact: the active images, in order)"
            )
    return sets, rows


def check_row_sums(p_general: Tensor) -> Tensor:
    """(B,) float64 row sums; raises ValueError unless each is 1 within _ROW_SUM_TOL."""
    sums = p_general.sum(dim=1).to(torch.float64)  # native-dtype sum: float64 casts are slow
    bad = (sums - 1).abs() > _ROW_SUM_TOL
    if bool(bad.any()):
        b = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"rows of p_general must be probability distributions summing to 1, row {b} "
            f"sums to {float(sums[b]):.6g}"
        )
    return sums


def converged(f_prev: Tensor, f: Tensor, tol: float, atol: Tensor) -> bool:
    """Every image's objective changed by at most tol relative (or by rounding noise
    ``atol``); an objective that stays infinite cannot improve and counts as converged."""
    finite = torch.isfinite(f) & torch.isfinite(f_prev)
    small = (f_prev - f).abs() <= tol * f.abs() + atol
    stuck = ~torch.isfinite(f) & ~torch.isfinite(f_prev)
    return bool(((finite & small) | stuck).all())


__all__ = ["check_inputs", "check_row_sums", "converged"]
