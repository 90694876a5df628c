"""Which specialists to run on an image (Hinton et al. 2015, section 5, "Performing inference")."""

from __future__ import annotations

from torch import Tensor

from inference._sets import ClassSets, SetTable, check_class_sets


def active_specialists(p_general: Tensor, class_sets: ClassSets, top_n: int = 1) -> Tensor:
    """Active-specialist mask: specialist m is active for image b when Sᵐ meets the
    generalist's ``top_n`` most probable classes for b (the paper uses n = 1).

    p_general: (B, C) generalist probabilities (or logits: only their order is used).
    class_sets: M class-index tensors or lists.
    Returns a (B, M) bool tensor on p_general's device.
    """
    if not isinstance(p_general, Tensor) or p_general.ndim != 2 or p_general.shape[1] == 0:
        shape = tuple(p_general.shape) if isinstance(p_general, Tensor) else type(p_general)
        raise ValueError(f"p_general must be a (B, C) tensor with C >= 1, got {shape}")
    if isinstance(top_n, bool) or not isinstance(top_n, int) or not 1 <= top_n <= p_general.shape[1]:
        raise ValueError(f"top_n must be an int in [1, C={p_general.shape[1]}], got {top_n!r}")
    sets = check_class_sets(class_sets, p_general.shape[1], p_general.device)
    return route(p_general, sets, top_n)


def route(p_general: Tensor, sets: SetTable, top_n: int, *, top1: Tensor | None = None) -> Tensor:
    """active_specialists on valid input: a row gather of the (C, M) membership matrix.
    ``top1``: p_general's argmax, if the caller has it already (top_n = 1)."""
    if top_n == 1:
        top = p_general.argmax(dim=1) if top1 is None else top1  # (B,)
        return sets.member[top]  # (B, M)
    top = p_general.topk(top_n, dim=1).indices  # (B, n)
    return sets.member[top].any(dim=1)  # (B, n, M) -> (B, M)


__all__ = ["active_specialists"]
