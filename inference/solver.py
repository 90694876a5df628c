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

from inference._sets import BITS_PER_WORD, ClassSets, SetTable, check_class_sets, to_bits

_METHODS = ("em", "gradient")
_DEFAULT_MAX_ITER = {"em": 1000, "gradient": 500}
_ROW_SUM_TOL = 1e-3  # rows of p_general must sum to 1 within this
_TOPK_EXTRA = 16
_LBFGS_MEMORY = 20  # (s, y) pairs kept by the batched L-BFGS  # extra generalist candidates read when looking outside U for top-k


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
    sums = p_general.sum(dim=1).to(torch.float64)  # native-dtype sum: float64 casts are slow
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
    """q on the union U of the active sets, α·pᵍ elsewhere, in (pair, slot) layout.

    pair_img: (P,) image of each active pair; cls, q: (P, S) class and q value of each
    slot (float64); repeat: (P, S) bool, slots that repeat an (image, class) already held
    by another slot (same value); alpha: (B,) float64.
    """

    pair_img: Tensor
    cls: Tensor
    q: Tensor
    repeat: Tensor
    alpha: Tensor


@dataclass
class _EMProblem:
    """The iteration's data on active (image, specialist) pairs × set slots.

    A class in the sets of several active specialists of one image appears in each of
    their pairs ("shared" entries); those copies are kept equal. One copy per (image,
    class), the one of the lowest-numbered specialist, counts towards sums over U; the
    others are "duplicates".
    """

    batch: int
    pair_img: Tensor  # (P,) image of each pair; pairs m-major, as compact rows
    cls: Tensor  # (P, S) class of each slot, C on padding
    pad: Tensor | None  # (P, S) bool padding slots, None if every set has S classes
    g: Tensor  # (P, S) pᵍ on the slots (0 on padding)
    base: Tensor  # (P, S) pᵍ_j + Σ_{m∈A, j∈Sᵐ} pᵐ_j (0 on padding)
    d: Tensor  # (P,) dustbin probabilities
    sh_idx: Tensor  # (K,) flat slot index of every shared entry
    sh_pair: Tensor  # (K,) its pair
    sh_img: Tensor  # (K,) its image
    sh_group: Tensor  # (K,) id of its (image, class)
    n_groups: int
    dup_idx: Tensor  # (D,) flat slot index of the duplicate entries (a subset of shared)
    dup_img: Tensor  # (D,)
    g_out: Tensor  # (B,) Σ_{j∉U} pᵍ_j
    n_act: Tensor  # (B,) |A| as float64
    const: Tensor  # (B,) Σ_U pᵍ log pᵍ + Σ_m Σ pᵐ log pᵐ (the objective's constant)


def _seg_sum(x: Tensor, index: Tensor, size: int) -> Tensor:
    return torch.zeros(size, dtype=x.dtype, device=x.device).index_add_(0, index, x)


def _shared_entries(
    cls: Tensor, pair_m: Tensor, pair_img: Tensor, sets: SetTable, active: Tensor
) -> tuple[Tensor, Tensor]:
    """Flat slot indices of the shared entries (class in ≥ 2 active sets of the image)
    and a (K,) bool marking the duplicates among them (a lower active set has it too)."""
    num_classes = sets.num_classes
    act_bits = to_bits(active)  # (B, W)
    words = act_bits.shape[1]
    common = sets.member_bits[cls.clamp_max(num_classes - 1)] & act_bits[pair_img][:, None, :]
    # (P, S, W) bit words of the active specialists holding the slot's class
    nonzero_words = (common != 0).sum(-1)
    multi = (nonzero_words > 1) | ((common & (common - 1)) != 0).any(-1)  # (P, S)
    multi &= cls < num_classes  # not padding
    sh_idx = multi.view(-1).nonzero().squeeze(1)  # (K,)
    if sh_idx.numel() == 0:
        return sh_idx, torch.zeros(0, dtype=torch.bool, device=cls.device)
    sh_common = common.view(-1, words)[sh_idx]  # (K, W)
    m = pair_m[sh_idx // cls.shape[1]]  # (K,) the entry's own specialist
    word, bit = m // BITS_PER_WORD, m % BITS_PER_WORD
    w_range = torch.arange(words, device=cls.device)
    below_in_word = torch.bitwise_left_shift(torch.ones_like(bit), bit) - 1  # bits < m
    lower = torch.where(w_range[None, :] == word[:, None], below_in_word[:, None], 0)
    lower = torch.where(w_range[None, :] < word[:, None], -1, lower)  # (K, W) specialists < m
    is_dup = ((sh_common & lower) != 0).any(-1)
    return sh_idx, is_dup


def _em_problem(
    p_general: Tensor, sets: SetTable, active: Tensor, rows: list[Tensor], row_sums: Tensor
) -> _EMProblem:
    """Gather everything the iteration needs onto the active pairs and their set slots."""
    batch, num_classes = p_general.shape
    device = p_general.device
    f64 = torch.float64
    width = sets.table.shape[1]
    pair_m, pair_img = active.T.nonzero(as_tuple=True)  # (P,), m-major: matches compact rows
    n_pairs = pair_m.numel()
    cls = sets.table.index_select(0, pair_m)  # (P, S)
    pad = None if min(sets.size_list) == width else cls == num_classes
    flat = pair_img[:, None] * num_classes + cls.clamp_max(num_classes - 1)
    g = p_general.reshape(-1).index_select(0, flat.view(-1)).view(n_pairs, width).to(f64)
    nonempty = [p for p in rows if p.shape[0] > 0]
    if nonempty:
        pv = torch.cat([F.pad(p[:, :-1], (0, width + 1 - p.shape[1])) for p in nonempty]).to(f64)
        d = torch.cat([p[:, -1] for p in nonempty]).to(f64)
        spec_const = torch.cat([torch.xlogy(p, p).sum(1) for p in nonempty]).to(f64)
    else:
        pv = torch.zeros(0, width, dtype=f64, device=device)
        d = spec_const = torch.zeros(0, dtype=f64, device=device)
    if pad is not None:
        g = g.masked_fill(pad, 0.0)
    base = g + pv
    sh_idx, is_dup = _shared_entries(cls, pair_m, pair_img, sets, active)
    sh_pair = sh_idx // width
    sh_img = pair_img[sh_pair]
    sh_cls = cls.view(-1)[sh_idx]
    _, sh_group = torch.unique(sh_img * num_classes + sh_cls, return_inverse=True)
    n_groups = int(sh_group.max()) + 1 if sh_idx.numel() else 0
    if sh_idx.numel():  # a shared class gets every active specialist's probability
        pv_sum = _seg_sum(pv.view(-1)[sh_idx], sh_group, n_groups)
        base.view(-1)[sh_idx] = g.view(-1)[sh_idx] + pv_sum[sh_group]
    dup_idx, dup_img = sh_idx[is_dup], sh_img[is_dup]
    g_in = _seg_sum(g.sum(1), pair_img, batch) - _seg_sum(g.view(-1)[dup_idx], dup_img, batch)
    g_out = (row_sums - g_in).clamp_min(0.0)  # (B,)
    glogg = torch.xlogy(g, g)
    const = (
        _seg_sum(glogg.sum(1) + spec_const, pair_img, batch)
        - _seg_sum(glogg.view(-1)[dup_idx], dup_img, batch)
    )
    return _EMProblem(
        batch=batch, pair_img=pair_img, cls=cls, pad=pad, g=g, base=base, d=d,
        sh_idx=sh_idx, sh_pair=sh_pair, sh_img=sh_img, sh_group=sh_group, n_groups=n_groups,
        dup_idx=dup_idx, dup_img=dup_img, g_out=g_out, n_act=active.sum(1).to(f64), const=const,
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

    with q_j = α·pᵍ_j outside U. For j ∈ U the sum is pᵐ_j over the active sets holding
    j plus q_j·Σ ratio_m over the others, ratio_m = pᵐ_dustbin / Σ_{i∉Sᵐ} q_i. Each step
    decreases the KL objective; it is evaluated on U at every iterate (cheap).
    """
    pr = _em_problem(p_general, sets, active, rows, row_sums)
    batch, pair_img, d = pr.batch, pr.pair_img, pr.d
    dup_idx, dup_img = pr.dup_idx, pr.dup_img
    tiny = torch.finfo(torch.float64).tiny
    q = pr.g.clone()  # (P, S) start at pᵍ
    s_in = q.sum(1)  # (P,) Σ_{j∈Sᵐ} q_j
    alpha = torch.ones(batch, dtype=torch.float64, device=p_general.device)
    denom = 1.0 + pr.n_act  # (B,)
    has_pair = pr.n_act > 0
    g_out_p = pr.g_out.index_select(0, pair_img)  # (P,)
    base_sh = pr.base.view(-1).index_select(0, pr.sh_idx)  # (K,)
    base_dup = pr.base.view(-1).index_select(0, dup_idx)  # (D,)
    atol = 1e-14 * (1.0 + pr.const.abs() + pr.n_act)
    f_prev = None
    for it in range(max_iter + 1):
        q_dup = q.view(-1).index_select(0, dup_idx)  # (D,)
        tot_u = _seg_sum(s_in, pair_img, batch) - _seg_sum(q_dup, dup_img, batch)  # (B,) Σ_U q
        rest = (tot_u.index_select(0, pair_img) - s_in).clamp_min(0.0)
        rest = rest + alpha.index_select(0, pair_img) * g_out_p  # (P,) Σ_{j∉Sᵐ} q_j
        logq = q.clamp_min(tiny).log_()  # (P, S); padding: weight 0 · finite
        wlogq_u = _seg_sum(torch.linalg.vecdot(pr.base, logq), pair_img, batch) - _seg_sum(
            base_dup * logq.view(-1).index_select(0, dup_idx), dup_img, batch
        )
        f = (
            pr.const - wlogq_u - torch.xlogy(pr.g_out, alpha)
            - _seg_sum(torch.xlogy(d, rest), pair_img, batch)
        )  # (B,) objective at the current iterate
        if history is not None:
            history.append(f.clone())
        if it == max_iter or (f_prev is not None and _converged(f_prev, f, tol, atol)):
            break
        f_prev = f
        ratio = d / rest.clamp_min(tiny)  # (P,) pᵐ_dustbin / Σ_{i∉Sᵐ} q_i
        ratio_img = _seg_sum(ratio, pair_img, batch)  # (B,) Σ_{m∈A} ratio_m
        others = (ratio_img.index_select(0, pair_img) - ratio).clamp_min(0.0)  # other pairs
        q_new = torch.addcmul(pr.base, q, others[:, None])  # (P, S) unnormalised
        if pr.sh_idx.numel():  # a shared class is in several active sets: fewer "others"
            ratio_in = _seg_sum(ratio.index_select(0, pr.sh_pair), pr.sh_group, pr.n_groups)
            others_sh = ratio_img.index_select(0, pr.sh_img) - ratio_in.index_select(0, pr.sh_group)
            q_sh = q.view(-1).index_select(0, pr.sh_idx)
            q_new.view(-1).index_copy_(0, pr.sh_idx, base_sh + q_sh * others_sh.clamp_min(0.0))
        alpha = (1.0 + alpha * ratio_img) / denom
        s_new = q_new.sum(1)  # (P,)
        tot_new = _seg_sum(s_new, pair_img, batch) - _seg_sum(
            q_new.view(-1).index_select(0, dup_idx), dup_img, batch
        )
        total = torch.where(has_pair, tot_new / denom + alpha * pr.g_out, 1.0)
        # divide by (1 + |A|) and renormalise (guards the simplex against rounding)
        scale = (1.0 / (denom * total)).index_select(0, pair_img)  # (P,)
        q = q_new.mul_(scale[:, None])
        s_in = s_new * scale
        alpha = alpha / total
    repeat = pr.pad.clone() if pr.pad is not None else torch.zeros_like(q, dtype=torch.bool)
    repeat.view(-1)[dup_idx] = True
    cls, q_out = pr.cls, q
    if pr.pad is not None:  # padding repeats the pair's first slot: harmless duplicate writes
        cls = torch.where(pr.pad, cls[:, :1], cls)
        q_out = torch.where(pr.pad, q[:, :1], q)
    return CompactSolution(pair_img=pair_img, cls=cls, q=q_out, repeat=repeat, alpha=alpha)


def densify(sol: CompactSolution, p_general: Tensor) -> Tensor:
    """Write the dense (B, C) q: α·pᵍ everywhere, then the U entries."""
    num_classes = p_general.shape[1]
    q = sol.alpha.to(p_general.dtype)[:, None] * p_general  # (B, C); α = 1 exactly if no pair
    flat = (sol.pair_img[:, None] * num_classes + sol.cls).view(-1)  # (P*S,)
    q.view(-1).index_copy_(0, flat, sol.q.view(-1).to(p_general.dtype))  # repeats: same value
    return q


def compact_topk(
    sol: CompactSolution, p_general: Tensor, sets: SetTable, active: Tensor, k: int
) -> tuple[Tensor, Tensor]:
    """Top-k of q without writing it. Candidates: each pair's k best U entries, and
    α·(pᵍ's best classes outside U) found among pᵍ's top k + 8; where all of those are
    in U, their smallest value bounds what lies outside, and only rows where that bound
    could reach the top-k read their full pᵍ row again."""
    batch, num_classes = p_general.shape
    f64 = torch.float64
    device = p_general.device
    # U side: per pair top-k, then per image over its pairs
    kp = min(k, sol.q.shape[1])
    pv, pi = sol.q.masked_fill(sol.repeat, -1.0).topk(kp, dim=1)  # (P, kp)
    pc = sol.cls.gather(1, pi)
    n_pairs = sol.pair_img.numel()
    order = torch.argsort(sol.pair_img, stable=True)  # pairs grouped by image
    counts = torch.bincount(sol.pair_img, minlength=batch)  # (B,)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(order)
    rank[order] = torch.arange(n_pairs, device=device) - starts[sol.pair_img[order]]
    width = int(counts.max()) * kp if n_pairs else 0
    u_val = torch.full((batch, width), -1.0, dtype=f64, device=device)
    u_idx = torch.zeros((batch, width), dtype=torch.long, device=device)
    cols = rank[:, None] * kp + torch.arange(kp, device=device)  # (P, kp)
    u_val[sol.pair_img[:, None], cols] = pv
    u_idx[sol.pair_img[:, None], cols] = pc
    # outside U: q_j = α·pᵍ_j
    kk = min(num_classes, k + _TOPK_EXTRA)
    g_val, g_idx = p_general.topk(kk, dim=1)  # (B, kk)
    g_val = g_val.to(f64)
    in_u = (sets.member[g_idx] & active[:, None, :]).any(-1)  # (B, kk)
    out_val, pos = g_val.masked_fill(in_u, -1.0).topk(min(k, kk), dim=1)
    out_idx = g_idx.gather(1, pos)
    out_val = torch.where(out_val >= 0, out_val * sol.alpha[:, None], out_val)
    cand_val = torch.cat([u_val, out_val], 1)
    cand_idx = torch.cat([u_idx, out_idx], 1)
    top_val, top_pos = cand_val.topk(k, dim=1)
    top_idx = cand_idx.gather(1, top_pos)
    # rows where a class outside U below pᵍ's top kk could still enter the top-k
    unseen = (~in_u).sum(1) < k  # fewer than k outside-U classes among the top kk
    bound = g_val[:, -1] * sol.alpha  # α · (kk-th largest pᵍ) bounds every unseen class
    redo = unseen & (kk < num_classes) & (bound >= top_val[:, -1])
    if bool(redo.any()):  # write q densely for those rows only
        rows_b = redo.nonzero().squeeze(1)  # (r,)
        sub = p_general.index_select(0, rows_b).to(f64) * sol.alpha[rows_b, None]  # (r, C)
        slot = torch.full((batch,), -1, dtype=torch.long, device=device)
        slot[rows_b] = torch.arange(rows_b.numel(), device=device)
        pairs = (slot[sol.pair_img] >= 0).nonzero().squeeze(1)
        sub[slot[sol.pair_img[pairs]][:, None], sol.cls[pairs]] = sol.q[pairs]
        top_val[rows_b], top_idx[rows_b] = sub.topk(k, dim=1)
    return top_val.to(p_general.dtype), top_idx


# --------------------------------------------------------------------------- gradient


@dataclass
class _DenseProblem:
    """The objective as a function of logits z (B, C), for the rows with a pair."""

    w: Tensor  # (B, C) pᵍ_j + Σ_{m∈A, j∈Sᵐ} pᵐ_j: the weight of log q_j
    w_total: Tensor  # (B,) Σ_j w_j + Σ_m pᵐ_dustbin (= 1 + |A|)
    const: Tensor  # (B,) Σ p log p over all the distributions
    specs: list[tuple[Tensor, Tensor, Tensor, Tensor]]  # (rows, Sᵐ, member column, dustbin)

    def __call__(self, z: Tensor, need_grad: bool) -> tuple[Tensor, Tensor | None]:
        """Objective (B,) and, if asked, its gradient dF/dz (B, C), in closed form:
        dF/dz_k = q_k (Σ w + Σ d − Σ_{m: k∉Sᵐ} d_m / R_m) − w_k, R_m = Σ_{j∉Sᵐ} q_j."""
        logq = torch.log_softmax(z, 1)  # (B, C)
        f = self.const - (self.w * logq).sum(1)
        if need_grad:
            ratio_total = torch.zeros_like(f)
            ratio_in = torch.zeros_like(z)  # Σ_{m: k∈Sᵐ} d_m / R_m
        for idx, cls, member, d in self.specs:
            log_rest = logq[idx].masked_fill(member, -1e300).logsumexp(1)  # (n_m,) log R_m
            f = f.index_add(0, idx, -d * log_rest)
            if need_grad:
                ratio = torch.where(d > 0, d * torch.exp(-log_rest), 0.0)  # (n_m,)
                ratio_total.index_add_(0, idx, ratio)
                ratio_in.index_put_(
                    (idx[:, None], cls[None, :]), ratio[:, None].expand(-1, cls.numel()),
                    accumulate=True,
                )
        if not need_grad:
            return f, None
        q = logq.exp()
        grad = q * ((self.w_total - ratio_total)[:, None] + ratio_in) - self.w
        return f, grad


def _dense_problem(
    p_general: Tensor, sets: SetTable, active: Tensor, rows: list[Tensor]
) -> _DenseProblem:
    f64 = torch.float64
    pg = p_general.to(f64)
    w = pg.clone()
    const = torch.xlogy(pg, pg).sum(1)
    dust_total = torch.zeros_like(const)
    specs = []
    for m, p in enumerate(rows):
        if p.shape[0] == 0:
            continue
        idx = active[:, m].nonzero().squeeze(1)  # (n_m,)
        p = p.to(f64)
        cls = sets.table[m, : sets.size_list[m]]
        const.index_add_(0, idx, torch.xlogy(p, p).sum(1))
        dust_total.index_add_(0, idx, p[:, -1])
        w.index_put_((idx[:, None], cls[None, :]), p[:, :-1], accumulate=True)
        specs.append((idx, cls, sets.member[:, m], p[:, -1]))
    return _DenseProblem(w=w, w_total=w.sum(1) + dust_total, const=const, specs=specs)


def _lbfgs(
    fun: _DenseProblem,
    z: Tensor,
    *,
    tol: float,
    max_iter: int,
    history: list[Tensor] | None,
    memory: int = _LBFGS_MEMORY,
) -> Tensor:
    """Batched L-BFGS: one independent two-loop recursion and Armijo backtracking line
    search per row (the rows are separate problems; a shared step would couple them)."""
    f, g = fun(z, True)
    if history is not None:
        history.append(f.clone())
    atol = 1e-14 * (1.0 + fun.const.abs())
    pairs: list[tuple[Tensor, Tensor, Tensor]] = []  # (s, y, rho)
    gamma = torch.ones_like(f)
    for _ in range(max_iter):
        r = g.clone()
        alphas = []
        for s_i, y_i, rho_i in reversed(pairs):
            a = rho_i * (s_i * r).sum(1)
            r -= a[:, None] * y_i
            alphas.append(a)
        r *= gamma[:, None]
        for (s_i, y_i, rho_i), a in zip(pairs, reversed(alphas), strict=True):
            r += s_i * (a - rho_i * (y_i * r).sum(1))[:, None]
        d = -r  # (B, C) search direction
        slope = (g * d).sum(1)
        uphill = ~(slope < 0)
        if bool(uphill.any()):  # fall back to steepest descent on those rows
            d[uphill] = -g[uphill]
            slope = (g * d).sum(1)
        step = torch.ones_like(f) if pairs else 1.0 / g.abs().sum(1).clamp_min(1.0)
        z_new, f_new = z.clone(), f.clone()
        done = slope > -1e-15 * (1.0 + f.abs())  # flat rows: nothing left to gain, stay put
        for _ls in range(30):
            f_try, _ = fun(z + step[:, None] * d, False)
            ok = ~done & (f_try <= f + 1e-4 * step * slope)
            z_new[ok] = z[ok] + step[ok, None] * d[ok]
            f_new[ok] = f_try[ok]
            done |= ok
            if bool(done.all()):
                break
            step = torch.where(done, step, step * 0.5)
        f_new, g_new = fun(z_new, True)
        s_k, y_k = z_new - z, g_new - g
        sy = (s_k * y_k).sum(1)
        curved = sy > 1e-12 * (s_k * s_k).sum(1).sqrt() * (y_k * y_k).sum(1).sqrt()
        rho = torch.where(curved, 1.0 / sy.clamp_min(1e-300), 0.0)  # rho = 0 drops the pair
        gamma = torch.where(curved, sy / (y_k * y_k).sum(1).clamp_min(1e-300), gamma)
        pairs = (pairs + [(s_k, y_k, rho)])[-memory:]
        f_prev, z, f, g = f, z_new, f_new, g_new
        if history is not None:
            history.append(f.clone())
        if _converged(f_prev, f, tol, atol):
            break
    return z


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

    Batched L-BFGS (per-row two-loop recursion and Armijo backtracking) on the dense
    (B, C) z in float64, with the gradient in closed form; stops when every image's
    objective changes by less than ``tol`` relative between iterations. Rows without an
    active specialist are returned as pᵍ. Reference implementation: dense, not fast.
    """
    has_pair = active.any(1)
    q = p_general.clone()
    if not bool(has_pair.any()):
        return q
    sub = has_pair.nonzero().squeeze(1)
    sub_active = active[sub]
    sub_rows = rows  # compact rows are per active image, so unchanged by dropping idle rows
    fun = _dense_problem(p_general[sub], sets, sub_active, sub_rows)
    z0 = p_general[sub].to(torch.float64).clamp_min(1e-30).log()  # q₀ ≈ pᵍ
    if history is not None:
        sub_history: list[Tensor] = []
        z = _lbfgs(fun, z0, tol=tol, max_iter=max_iter, history=sub_history)
        for h in sub_history:  # idle rows sit at their optimum, objective 0
            full = torch.zeros(p_general.shape[0], dtype=torch.float64, device=q.device)
            history.append(full.index_copy_(0, sub, h))
    else:
        z = _lbfgs(fun, z0, tol=tol, max_iter=max_iter, history=None)
    q[sub] = torch.softmax(z, 1).to(q.dtype)
    return q


__all__ = ["solve_kl", "solve_kl_topk", "kl_objective", "CompactSolution"]
