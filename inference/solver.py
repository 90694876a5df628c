"""Combine the generalist with its active specialists (Hinton et al. 2015, section 5).

For an image with generalist distribution pᵍ and active specialists A, find the
distribution q over all C classes that minimises

    KL(pᵍ, q) + Σ_{m∈A} KL(pᵐ, Aᵐ q)                                  (paper, eq. 5)

where Aᵐ q keeps q_k for k ∈ Sᵐ and sums q over the classes outside Sᵐ into the
dustbin entry. The problem is convex in q; two solvers are provided:

* ``method="em"`` (default): the EM fixed point of DESIGN.md. For every class
  outside the union U of the active sets, q_j = α·pᵍ_j with one scalar α per
  image, and within U, q stays ∝ w_j = pᵍ_j + Σ pᵐ_j on each group of classes held
  by the same active sets; so the iteration runs on a few masses per image (see
  ``inference.em``), accelerated by SQUAREM: its cost does not grow with C or |U|.
  Gathering the |U| entries once, reading pᵍ and writing q do. ``solve_kl_topk``
  reads its top-k off that compact solution (``inference.topk``).
* ``method="gradient"``: the paper's gradient descent on logits z, q = softmax(z),
  here L-BFGS on dense (B, C) z started at log pᵍ (``inference.gradient``). The
  reference implementation.

This module is the public front: it validates the inputs once (``inference._checks``)
and dispatches to those solvers.

Specialist rows (``p_specialists[m]``), two accepted layouts:

* full: shape (B, |Sᵐ|+1), one row per image; only rows b with ``active[b, m]``
  are read (the others may hold anything, e.g. zeros);
* compact: shape (n_m, |Sᵐ|+1) with n_m = ``active[:, m].sum()``, the rows of the
  images that activate m, in increasing image order (what running a specialist on
  ``images[active[:, m]]`` gives).

When n_m = B the two coincide. The dustbin probability is the last column.
Per-entry arrays use the inputs' precision (at least float32); the iteration and the
objective run in float64. q is returned in p_general's dtype and on its device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from inference._checks import check_inputs, check_row_sums
from inference._sets import ClassSets
from inference.em import CompactSolution, densify, solve_em
from inference.gradient import solve_gradient
from inference.topk import compact_topk

_METHODS = ("em", "gradient")
_DEFAULT_MAX_ITER = {"em": 1000, "gradient": 500}


def check_options(method: str, tol: float, max_iter: int | None) -> int:
    """Validate the solver options (shared with the engine); return the iteration cap,
    ``max_iter`` or the method's default."""
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if not isinstance(tol, int | float) or not tol >= 0:
        raise ValueError(f"tol must be a number >= 0, got {tol!r}")
    if max_iter is None:
        return _DEFAULT_MAX_ITER[method]
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0:
        raise ValueError(f"max_iter must be an int >= 0, got {max_iter!r}")
    return max_iter


def solve_kl(
    p_general: Tensor,
    p_specialists: Sequence[Tensor],
    class_sets: ClassSets,
    active: Tensor,
    *,
    method: str = "em",
    tol: float = 1e-7,
    max_iter: int | None = None,
    history: list[Tensor] | None = None,
) -> Tensor:
    """Distribution q minimising KL(pᵍ, q) + Σ_{m active} KL(pᵐ, Aᵐ q) (section 5).

    p_general: (B, C), rows summing to 1.
    p_specialists: M tensors, full (B, |Sᵐ|+1) or compact (n_m, |Sᵐ|+1), dustbin last
        (see the module docstring).
    class_sets: M class-index tensors or lists (sets may overlap).
    active: (B, M) bool, e.g. from ``active_specialists``.
    method: "em" (fixed point, cost independent of C) or "gradient" (L-BFGS on logits).
    tol: stop when every image's objective changes by less than ``tol`` relative.
    max_iter: iteration cap (default 1000 for em, 500 for gradient); for em it counts EM
        steps (a SQUAREM cycle takes 3).
    history: if a list is given, the (B,) float64 objective of every iterate is appended
        (for em: of the start and of every accepted SQUAREM iterate; never increasing).

    Returns q (B, C) in p_general's dtype, rows summing to 1. An image with no active
    specialist gets q = pᵍ exactly.
    """
    sets, rows = check_inputs(p_general, p_specialists, class_sets, active)
    max_iter = check_options(method, tol, max_iter)
    row_sums = check_row_sums(p_general)
    if method == "gradient":
        return solve_gradient(
            p_general, sets, active, rows, tol=tol, max_iter=max_iter, history=history
        )
    sol = solve_em(p_general, sets, active, rows, row_sums, tol=tol, max_iter=max_iter, history=history)
    return densify(sol, p_general)


def solve_kl_topk(
    p_general: Tensor,
    p_specialists: Sequence[Tensor],
    class_sets: ClassSets,
    active: Tensor,
    *,
    k: int = 1,
    method: str = "em",
    tol: float = 1e-7,
    max_iter: int | None = None,
) -> tuple[Tensor, Tensor]:
    """The k largest entries of ``solve_kl``'s q, as (values (B, k), indices (B, k)).

    With method="em" the dense (B, C) q is never written: outside U, q_j = α·pᵍ_j, so
    the candidates are U plus the generalist's top classes outside U.
    """
    sets, rows = check_inputs(p_general, p_specialists, class_sets, active)
    max_iter = check_options(method, tol, max_iter)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= p_general.shape[1]:
        raise ValueError(f"k must be an int in [1, C={p_general.shape[1]}], got {k!r}")
    row_sums = check_row_sums(p_general)
    if method == "gradient":
        q = solve_gradient(p_general, sets, active, rows, tol=tol, max_iter=max_iter)
        return q.topk(k, dim=1)
    sol = solve_em(p_general, sets, active, rows, row_sums, tol=tol, max_iter=max_iter)
    return compact_topk(sol, p_general, sets, active, k)


def kl_objective(
    q: Tensor,
    p_general: Tensor,
    p_specialists: Sequence[Tensor],
    class_sets: ClassSets,
    active: Tensor,
) -> Tensor:
    """KL(pᵍ, q) + Σ_{m active} KL(pᵐ, Aᵐ q) per image: (B,) float64 (0·log 0 = 0).

    q and p_general: (B, C); the other arguments as in ``solve_kl``. Dense reference
    computation (the mass of q outside Sᵐ is summed over the complement, not 1 − Σ_S).
    """
    sets, rows = check_inputs(p_general, p_specialists, class_sets, active)
    if not isinstance(q, Tensor) or q.shape != p_general.shape or q.device != p_general.device:
        got = tuple(q.shape) if isinstance(q, Tensor) else type(q)
        raise ValueError(f"q must be a tensor shaped like p_general {tuple(p_general.shape)}, got {got}")
    q64 = q.to(torch.float64)
    pg = p_general.to(torch.float64)
    f = (torch.xlogy(pg, pg) - torch.xlogy(pg, q64)).sum(dim=1)  # (B,)
    for m, p in enumerate(rows):
        if p.shape[0] == 0:
            continue
        idx = active[:, m].nonzero().squeeze(1)  # (n_m,)
        p = p.to(torch.float64)
        qm = q64[idx]  # (n_m, C)
        cls = sets.table[m, : sets.size_list[m]]
        inside = (torch.xlogy(p[:, :-1], p[:, :-1]) - torch.xlogy(p[:, :-1], qm[:, cls])).sum(1)
        rest = qm.masked_fill(sets.member[:, m], 0.0).sum(1)  # mass outside Sᵐ
        dust = torch.xlogy(p[:, -1], p[:, -1]) - torch.xlogy(p[:, -1], rest)
        f.index_add_(0, idx, inside + dust)
    return f


__all__ = ["solve_kl", "solve_kl_topk", "kl_objective", "check_options", "CompactSolution"]
