"""Combine the generalist with its active specialists (Hinton et al. 2015, section 5).

For an image with generalist distribution pᵍ and active specialists A, find the
distribution q over all C classes that minimises

    KL(pᵍ, q) + Σ_{m∈A} KL(pᵐ, Aᵐ q)                                  (paper, eq. 5)

where Aᵐ q keeps q_k for k ∈ Sᵐ and sums q over the classes outside Sᵐ into the
dustbin entry. The problem is convex in q; two solvers are provided:

* ``method="em"`` (default): the EM fixed point of DESIGN.md. For every class
  outside the union U of the active sets, q_j = α·pᵍ_j with one scalar α per
  image, so the iteration runs on the |U| entries (a few hundred) of each image
  plus α: its cost does not grow with C. Only reading pᵍ and writing q do.
* ``method="gradient"``: the paper's gradient descent on logits z, q = softmax(z),
  here L-BFGS on dense (B, C) z started at log pᵍ. The reference implementation.

Specialist rows (``p_specialists[m]``), two accepted layouts:

* full: shape (B, |Sᵐ|+1), one row per image; only rows b with ``active[b, m]``
  are read (the others may hold anything, e.g. zeros);
* compact: shape (n_m, |Sᵐ|+1) with n_m = ``active[:, m].sum()``, the rows of the
  images that activate m, in increasing image order (what running a specialist on
  ``images[active[:, m]]`` gives).

When n_m = B the two coincide. The dustbin probability is the last column.
The iteration itself runs in float64 whatever the input dtype; q is returned in
p_general's dtype and on its device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from inference._sets import ClassSets, SetTable, check_class_sets

_METHODS = ("em", "gradient")
_DEFAULT_MAX_ITER = {"em": 1000, "gradient": 500}
_ROW_SUM_TOL = 1e-3  # rows of p_general must sum to 1 within this
_TOPK_EXTRA = 16  # extra generalist candidates read when looking outside U for top-k


# --------------------------------------------------------------------------- validation


def _check_probs(p_general: Tensor) -> None:
    if not isinstance(p_general, Tensor) or p_general.ndim != 2 or p_general.shape[1] == 0:
        shape = tuple(p_general.shape) if isinstance(p_general, Tensor) else type(p_general)
        raise ValueError(f"p_general must be a (B, C) probability tensor with C >= 1, got {shape}")
    if not p_general.dtype.is_floating_point:
        raise ValueError(f"p_general must be a floating tensor, got {p_general.dtype}")


def _check_inputs(
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


def _check_options(method: str, tol: float, max_iter: int | None) -> int:
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if not isinstance(tol, int | float) or not tol >= 0:
        raise ValueError(f"tol must be a number >= 0, got {tol!r}")
    if max_iter is None:
        return _DEFAULT_MAX_ITER[method]
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0:
        raise ValueError(f"max_iter must be an int >= 0, got {max_iter!r}")
    return max_iter


def _row_sums(p_general: Tensor) -> Tensor:
    """(B,) float64 row sums; raises ValueError unless each is 1 within _ROW_SUM_TOL."""
    sums = p_general.sum(dim=1, dtype=torch.float64)
    bad = (sums - 1).abs() > _ROW_SUM_TOL
    if bool(bad.any()):
        b = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"rows of p_general must be probability distributions summing to 1, row {b} "
            f"sums to {float(sums[b]):.6g}"
        )
    return sums


# --------------------------------------------------------------------------- public API


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
    max_iter: iteration cap (default 1000 for em, 500 for gradient).
    history: if a list is given, the (B,) float64 objective of every iterate is appended.

    Returns q (B, C) in p_general's dtype, rows summing to 1. An image with no active
    specialist gets q = pᵍ exactly.
    """
    sets, rows = _check_inputs(p_general, p_specialists, class_sets, active)
    max_iter = _check_options(method, tol, max_iter)
    row_sums = _row_sums(p_general)
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
    sets, rows = _check_inputs(p_general, p_specialists, class_sets, active)
    max_iter = _check_options(method, tol, max_iter)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= p_general.shape[1]:
        raise ValueError(f"k must be an int in [1, C={p_general.shape[1]}], got {k!r}")
    row_sums = _row_sums(p_general)
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
    sets, rows = _check_inputs(p_general, p_specialists, class_sets, active)
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


# --------------------------------------------------------------------------- EM


@dataclass
class CompactSolution:
    """q on the union U of the active sets, α·pᵍ elsewhere.

    img, cls: (N,) image and class of each U entry (cls = C marks padding, valid False).
    q: (N,) float64; alpha: (B,) float64; flat: (N,) img·C + cls for valid entries.
    """

    img: Tensor
    cls: Tensor
    valid: Tensor
    q: Tensor
    alpha: Tensor


@dataclass
class _EMProblem:
    batch: int
    pair_img: Tensor  # (P,) image of each active (image, specialist) pair
    entry_u: Tensor  # (P*S,) position in U of each (pair, set slot)
    width: int  # S, the padded set size
    d: Tensor  # (P,) dustbin probability
    u_img: Tensor  # (N,) image of each U entry (sorted)
    u_cls: Tensor  # (N,) class of each U entry, C for padding
    valid: Tensor  # (N,) bool, not padding
    g: Tensor  # (N,) pᵍ on U (0 on padding)
    p_in: Tensor  # (N,) Σ_{m∈A, j∈Sᵐ} pᵐ_j
    g_out: Tensor  # (B,) Σ_{j∉U} pᵍ_j
    n_act: Tensor  # (B,) |A| as float64
    const: Tensor  # (B,) Σ_U pᵍ log pᵍ + Σ_m Σ pᵐ log pᵐ (objective's constant)


def _seg_sum(x: Tensor, index: Tensor, size: int) -> Tensor:
    return torch.zeros(size, dtype=x.dtype, device=x.device).index_add_(0, index, x)


def _em_problem(
    p_general: Tensor, sets: SetTable, active: Tensor, rows: list[Tensor], row_sums: Tensor
) -> _EMProblem:
    """Gather everything the iteration needs onto the active pairs and the union U."""
    batch, num_classes = p_general.shape
    f64 = torch.float64
    width = sets.table.shape[1]
    pair_m, pair_img = active.T.nonzero(as_tuple=True)  # (P,), m-major: matches compact rows
    # (P, S) specialist probabilities on the set slots (0 on padding) and (P,) dustbins
    pieces = [
        F.pad(p[:, :-1].to(f64), (0, width - p.shape[1] + 1)) for p in rows if p.shape[0] > 0
    ]
    if pieces:
        pv = torch.cat(pieces)
        d = torch.cat([p[:, -1].to(f64) for p in rows if p.shape[0] > 0])
    else:
        pv = torch.zeros(0, width, dtype=f64, device=p_general.device)
        d = torch.zeros(0, dtype=f64, device=p_general.device)
    keys = pair_img[:, None] * (num_classes + 1) + sets.table[pair_m]  # (P, S)
    ukeys, entry_u = torch.unique(keys.reshape(-1), sorted=True, return_inverse=True)  # (N,)
    u_img = ukeys // (num_classes + 1)
    u_cls = ukeys % (num_classes + 1)
    valid = u_cls < num_classes
    g = p_general[u_img, u_cls.clamp_max(num_classes - 1)].to(f64) * valid
    n_u = ukeys.numel()
    p_in = _seg_sum(pv.reshape(-1), entry_u, n_u)
    g_out = (row_sums - _seg_sum(g, u_img, batch)).clamp_min(0.0)
    spec_const = torch.cat(
        [torch.xlogy(p, p).sum(1, dtype=f64) for p in rows if p.shape[0] > 0]
        or [torch.zeros(0, dtype=f64, device=p_general.device)]
    )
    const = _seg_sum(torch.xlogy(g, g), u_img, batch) + _seg_sum(spec_const, pair_img, batch)
    return _EMProblem(
        batch=batch,
        pair_img=pair_img,
        entry_u=entry_u,
        width=width,
        d=d,
        u_img=u_img,
        u_cls=u_cls,
        valid=valid,
        g=g,
        p_in=p_in,
        g_out=g_out,
        n_act=active.sum(1).to(f64),
        const=const,
    )


def _converged(f_prev: Tensor, f: Tensor, tol: float, atol: Tensor) -> bool:
    """Every image's objective changed by at most tol relative (or by rounding noise
    ``atol``); an objective that stays infinite cannot improve and counts as converged."""
    finite = torch.isfinite(f) & torch.isfinite(f_prev)
    small = (f_prev - f).abs() <= tol * f.abs() + atol
    stuck = ~torch.isfinite(f) & ~torch.isfinite(f_prev)
    return bool(((finite & small) | stuck).all())


def solve_em(
    p_general: Tensor,
    sets: SetTable,
    active: Tensor,
    rows: list[Tensor],
    row_sums: Tensor,
    *,
    tol: float,
    max_iter: int,
    history: list[Tensor] | None = None,
) -> CompactSolution:
    """EM fixed point of DESIGN.md on the active pairs and the union U (valid input).

        q_j ← (pᵍ_j + Σ_{m∈A} t^m_j) / (1 + |A|),
        t^m_j = pᵐ_j (j ∈ Sᵐ),  q_j·pᵐ_dustbin / Σ_{i∉Sᵐ} q_i (j ∉ Sᵐ),

    with q_j = α·pᵍ_j outside U. Each step increases the (concave) log-likelihood,
    i.e. decreases the KL objective; it is evaluated cheaply on U at every iterate.
    """
    pr = _em_problem(p_general, sets, active, rows, row_sums)
    batch, u_img, pair_img = pr.batch, pr.u_img, pr.pair_img
    n_pairs = pair_img.numel()
    tiny = torch.finfo(torch.float64).tiny
    q = pr.g.clone()  # (N,) start at pᵍ
    alpha = torch.ones(batch, dtype=torch.float64, device=p_general.device)
    denom = 1.0 + pr.n_act  # (B,)
    denom_u = denom[u_img]  # (N,)
    base = pr.g + pr.p_in  # (N,) the constant part of the numerator, also log q's weight
    has_pair = pr.n_act > 0
    atol = 1e-14 * (1.0 + pr.const.abs() + pr.n_act)
    f_prev = None
    for it in range(max_iter + 1):
        s_in = q[pr.entry_u].view(n_pairs, pr.width).sum(1)  # (P,) Σ_{j∈Sᵐ} q_j
        rest = (_seg_sum(q, u_img, batch)[pair_img] - s_in).clamp_min(0.0)
        rest = rest + alpha[pair_img] * pr.g_out[pair_img]  # (P,) Σ_{j∉Sᵐ} q_j
        f = (
            pr.const
            - _seg_sum(torch.xlogy(base, q), u_img, batch)
            - torch.xlogy(pr.g_out, alpha)
            - _seg_sum(torch.xlogy(pr.d, rest), pair_img, batch)
        )  # (B,) objective at the current iterate
        if history is not None:
            history.append(f.clone())
        if it == max_iter or (f_prev is not None and _converged(f_prev, f, tol, atol)):
            break
        f_prev = f
        ratio = pr.d / rest.clamp_min(tiny)  # (P,) pᵐ_dustbin / Σ_{i∉Sᵐ} q_i
        ratio_img = _seg_sum(ratio, pair_img, batch)  # (B,) Σ_{m∈A} ratio_m
        ratio_in = _seg_sum(ratio[:, None].expand(n_pairs, pr.width).reshape(-1), pr.entry_u, q.numel())
        q = (base + q * (ratio_img[u_img] - ratio_in).clamp_min(0.0)) / denom_u
        alpha = (1.0 + alpha * ratio_img) / denom
        total = torch.where(has_pair, _seg_sum(q, u_img, batch) + alpha * pr.g_out, 1.0)
        q = q / total[u_img]  # guard the simplex against rounding and clamped dustbins
        alpha = alpha / total
    return CompactSolution(img=u_img, cls=pr.u_cls, valid=pr.valid, q=q, alpha=alpha)


def densify(sol: CompactSolution, p_general: Tensor) -> Tensor:
    """Write the dense (B, C) q: α·pᵍ everywhere, then the U entries."""
    num_classes = p_general.shape[1]
    q = sol.alpha.to(p_general.dtype)[:, None] * p_general  # (B, C); α = 1 exactly if no pair
    v = sol.valid
    flat = sol.img[v] * num_classes + sol.cls[v]
    q.view(-1).index_copy_(0, flat, sol.q[v].to(p_general.dtype))
    return q


def compact_topk(
    sol: CompactSolution, p_general: Tensor, sets: SetTable, active: Tensor, k: int
) -> tuple[Tensor, Tensor]:
    """Top-k of q without writing it: candidates are U and α·(pᵍ's best classes outside U)."""
    batch, num_classes = p_general.shape
    f64 = torch.float64
    device = p_general.device
    kk = min(num_classes, k + _TOPK_EXTRA)
    g_val, g_idx = p_general.topk(kk, dim=1)  # (B, kk)
    in_u = (sets.member[g_idx] & active[:, None, :]).any(-1)  # (B, kk)
    counts = _seg_sum(sol.valid.to(torch.long), sol.img, batch)  # (B,) |U|
    found = (~in_u).sum(1)
    short = (found < k) & (found < num_classes - counts)
    out_val = g_val.to(f64).masked_fill(in_u, -1.0)
    out_val, pos = out_val.topk(min(k, kk), dim=1)  # (B, k)
    out_idx = g_idx.gather(1, pos)
    if bool(short.any()):  # the best kk classes were nearly all in U: mask U in a row copy
        rows_b = short.nonzero().squeeze(1)
        sub = p_general[rows_b].to(f64)  # (r, C)
        where = torch.full((batch,), -1, dtype=torch.long, device=device)
        where[rows_b] = torch.arange(rows_b.numel(), device=device)
        sel = sol.valid & (where[sol.img] >= 0)
        sub[where[sol.img[sel]], sol.cls[sel]] = -1.0
        sv, si = sub.topk(min(k, kk), dim=1)
        out_val[rows_b], out_idx[rows_b] = sv, si
    out_val = torch.where(out_val >= 0, out_val * sol.alpha[:, None], out_val)
    # U entries padded per image into (B, W)
    n_u = sol.img.numel()
    starts = torch.cumsum(_seg_sum(torch.ones_like(sol.img), sol.img, batch), 0)
    width = int(_seg_sum(torch.ones_like(sol.img), sol.img, batch).max()) if n_u else 0
    pos_u = torch.arange(n_u, device=device) - (starts - _seg_sum(torch.ones_like(sol.img), sol.img, batch))[sol.img]
    u_val = torch.full((batch, width), -1.0, dtype=f64, device=device)
    u_idx = torch.zeros((batch, width), dtype=torch.long, device=device)
    u_val[sol.img, pos_u] = torch.where(sol.valid, sol.q, -1.0)
    u_idx[sol.img, pos_u] = sol.cls.clamp_max(num_classes - 1)
    cand_val = torch.cat([u_val, out_val], 1)
    cand_idx = torch.cat([u_idx, out_idx], 1)
    top_val, top_pos = cand_val.topk(k, dim=1)
    return top_val.to(p_general.dtype), cand_idx.gather(1, top_pos)


# --------------------------------------------------------------------------- gradient


def _dense_objective(
    logq: Tensor,
    pg: Tensor,
    specs: list[tuple[Tensor, Tensor, Tensor, Tensor, Tensor]],
    const: Tensor,
) -> Tensor:
    """(B,) objective from log q (B, C) (float64, autograd-friendly)."""
    f = const - (pg * logq).sum(1)
    for idx, cls, member, p_in, d in specs:
        lq = logq[idx]  # (n_m, C)
        inside = (p_in * lq[:, cls]).sum(1)
        log_rest = lq.masked_fill(member, -1e300).logsumexp(1)  # log Σ_{j∉Sᵐ} q_j
        f = f.index_add(0, idx, -(inside + d * log_rest))
    return f


def solve_gradient(
    p_general: Tensor,
    sets: SetTable,
    active: Tensor,
    rows: list[Tensor],
    *,
    tol: float,
    max_iter: int,
    history: list[Tensor] | None = None,
) -> Tensor:
    """The paper's solver: descend on logits z with q = softmax(z), z₀ = log pᵍ.

    L-BFGS (strong Wolfe) on the dense (B, C) z in float64; stops when every image's
    objective changes by less than ``tol`` relative between iterations.
    """
    has_pair = active.any(1)
    if not bool(has_pair.any()):
        return p_general.clone()
    f64 = torch.float64
    with torch.inference_mode(False), torch.enable_grad():
        pg = p_general.detach().to(f64).clone()  # a normal tensor even under inference_mode
        const = torch.xlogy(pg, pg).sum(1)
        specs = []
        for m, p in enumerate(rows):
            if p.shape[0] == 0:
                continue
            idx = active[:, m].nonzero().squeeze(1).clone()
            p = p.detach().to(f64).clone()
            const = const.index_add(0, idx, torch.xlogy(p, p).sum(1))
            cls = sets.table[m, : sets.size_list[m]].clone()
            specs.append((idx, cls, sets.member[:, m].clone(), p[:, :-1], p[:, -1]))
        z = pg.clamp_min(1e-300).log().requires_grad_(True)
        opt = torch.optim.LBFGS(
            [z], lr=1.0, max_iter=1, history_size=50, line_search_fn="strong_wolfe",
            tolerance_grad=0.0, tolerance_change=1e-300,
        )

        def closure() -> Tensor:
            opt.zero_grad()
            loss = _dense_objective(torch.log_softmax(z, 1), pg, specs, const).sum()
            loss.backward()
            return loss

        atol = 1e-14 * (1.0 + const.abs())
        with torch.no_grad():
            f_prev = _dense_objective(torch.log_softmax(z, 1), pg, specs, const)
        if history is not None:
            history.append(f_prev.clone())
        for _ in range(max_iter):
            opt.step(closure)
            with torch.no_grad():
                f = _dense_objective(torch.log_softmax(z, 1), pg, specs, const)
            if history is not None:
                history.append(f.clone())
            if _converged(f_prev, f, tol, atol):
                break
            f_prev = f
        with torch.no_grad():
            q = torch.softmax(z, 1).to(p_general.dtype)
    q = torch.where(has_pair[:, None], q, p_general)
    return q


__all__ = ["solve_kl", "solve_kl_topk", "kl_objective", "CompactSolution"]
