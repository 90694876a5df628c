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
  ``_EMProblem``), accelerated by SQUAREM: its cost does not grow with C or |U|.
  Gathering the |U| entries once, reading pᵍ and writing q do.
* ``method="gradient"``: the paper's gradient descent on logits z, q = softmax(z),
  here L-BFGS on dense (B, C) z started at log pᵍ. The reference implementation.

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
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from inference._sets import BITS_PER_WORD, ClassSets, SetTable, check_class_sets, to_bits

_METHODS = ("em", "gradient")
_DEFAULT_MAX_ITER = {"em": 1000, "gradient": 500}
_ROW_SUM_TOL = 1e-3  # rows of p_general must sum to 1 within this
_LBFGS_MEMORY = 20  # (s, y) pairs kept by the batched L-BFGS


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
    max_iter: iteration cap (default 1000 for em, 500 for gradient); for em it counts EM
        steps (a SQUAREM cycle takes 3).
    history: if a list is given, the (B,) float64 objective of every iterate is appended
        (for em: of the start and of every accepted SQUAREM iterate; never increasing).

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
    slot (float32 or float64, the work dtype); repeat: (P, S) bool, slots that repeat an
    (image, class) already held by another slot (same value); alpha: (B,) float64;
    flat: (P, S) long, pair_img · C + cls (the slot's offset in a (B, C) tensor).
    """

    pair_img: Tensor
    cls: Tensor
    q: Tensor
    repeat: Tensor
    alpha: Tensor
    flat: Tensor | None = None


@dataclass
class _EMProblem:
    """The EM reduced to "nodes": per image, groups of classes whose q stays ∝ w.

    For j ∈ U the EM step is q_j ← (w_j + q_j·o_j) / (1 + |A|), with w_j = pᵍ_j + Σ pᵐ_j
    over the active sets holding j and o_j = Σ ratio_m over the active sets *not*
    holding j. o_j depends only on the pattern of j (which active sets hold it), so if
    q ∝ w within a pattern it stays so. The nodes of an image are its patterns: one per
    active pair (the classes of Sᵐ in no other active set), one per pattern of the
    shared classes (in ≥ 2 active sets), and one for the classes outside U (w = pᵍ,
    q = α·pᵍ). The EM on the node masses Q_n is the EM of the full problem restricted to
    that invariant subspace, and the optimum lies in it (KKT: q_j = w_j / (1 + |A| − o_j)).
    Nodes are laid out as [P pair nodes | shared patterns | B outside nodes].
    """

    batch: int
    pair_img: Tensor  # (P,) image of each pair; pairs m-major, as compact rows
    cls: Tensor  # (P, S) class of each slot (padding repeats the first slot's class)
    flat: Tensor  # (P, S) pair_img · C + cls
    pad: Tensor | None  # (P, S) bool padding slots, None if every set has S classes
    w: Tensor  # (P, S) w_j on the slots (0 on padding), work dtype
    d: Tensor  # (P,) float64 dustbin probabilities
    sh_idx: Tensor  # (K,) flat slot index of every shared entry
    sh_node: Tensor  # (K,) its node
    dup_idx: Tensor  # (D,) flat slot index of the duplicate entries (a subset of shared)
    node_img: Tensor  # (N,) image of each node
    weight: Tensor  # (N,) float64 W_n = Σ_{j∈n} w_j
    start: Tensor  # (N,) float64 Σ_{j∈n} pᵍ_j: the node masses of q = pᵍ
    inc_node: Tensor  # (P + I,) node of each (node, pair) incidence: pair m's set holds it
    inc_pair: Tensor  # (P + I,) its pair
    has_pair: Tensor  # (B,) bool
    denom: Tensor  # (N,) float64 1 + |A| of the node's image
    const: Tensor  # (B,) the objective's constant: f = const − Σ W log Q − Σ d log R


def _seg_sum(x: Tensor, index: Tensor, size: int) -> Tensor:
    return torch.zeros(size, dtype=x.dtype, device=x.device).index_add_(0, index, x)


def _plogp(x: Tensor) -> Tensor:
    """x log x elementwise, 0 at 0 (log of the clamped value: vectorised, unlike xlogy)."""
    return x * x.clamp_min(torch.finfo(x.dtype).tiny).log()


def _dense_ids(key: Tensor) -> tuple[Tensor, int]:
    """Consecutive ids of the distinct values (rows, for 2-D) of ``key``, and how many."""
    if key.numel() == 0:
        return key.new_zeros(0), 0
    uniq, ids = torch.unique(key, dim=0 if key.ndim == 2 else None, return_inverse=True)
    return ids, uniq.shape[0]


@dataclass
class _Shared:
    """Slots whose class lies in ≥ 2 active sets of the image (K entries, every copy)."""

    idx: Tensor  # (K,) flat slot index
    pair: Tensor  # (K,)
    img: Tensor  # (K,)
    group: Tensor  # (K,) id of its (image, class)
    n_groups: int
    pattern: Tensor  # (K,) id of its (image, set of active specialists holding it)
    n_patterns: int
    is_dup: Tensor  # (K,) bool: a lower-numbered active specialist holds it too


def _shared_entries(
    cls: Tensor, pair_m: Tensor, pair_img: Tensor, sets: SetTable, active: Tensor
) -> _Shared:
    """Find the shared slots with the precomputed bit words of the set table; only pairs
    of images with ≥ 2 active specialists are looked at."""
    num_classes, width = sets.num_classes, cls.shape[1]
    act_bits = to_bits(active)  # (B, W)
    words = act_bits.shape[1]
    can = (active.sum(1).index_select(0, pair_img) >= 2).nonzero().squeeze(1)  # (P',)
    common = sets.slot_others.index_select(0, pair_m[can]) & act_bits.index_select(
        0, pair_img[can]
    )[:, None, :]  # (P', S, W) the other active specialists holding the slot's class
    multi = common.squeeze(2) != 0 if words == 1 else (common != 0).any(2)  # (P', S)
    loc = multi.view(-1).nonzero().squeeze(1)  # (K,)
    pair = can[loc // width]
    slot = loc % width
    img, m = pair_img[pair], pair_m[pair]
    idx = pair * width + slot
    lower = sets.slot_lower[m, slot] & act_bits[img]  # (K, W)
    is_dup = (lower != 0).any(1)
    own = torch.zeros_like(lower).scatter_(
        1, (m // BITS_PER_WORD)[:, None], torch.bitwise_left_shift(1, m % BITS_PER_WORD)[:, None]
    )
    holders = common.view(-1, words)[loc] | own  # (K, W) the class's pattern
    group, n_groups = _dense_ids(img * num_classes + cls.view(-1)[idx])
    mask_id, n_masks = _dense_ids(holders.squeeze(1) if words == 1 else holders)
    pattern, n_patterns = _dense_ids(img * max(n_masks, 1) + mask_id)
    return _Shared(idx, pair, img, group, n_groups, pattern, n_patterns, is_dup)


def _work_dtype(p_general: Tensor, rows: list[Tensor]) -> torch.dtype:
    """Per-slot arrays in the inputs' precision (at least float32); sums in float64."""
    dtype = torch.promote_types(p_general.dtype, torch.float32)
    for p in rows:
        dtype = torch.promote_types(dtype, p.dtype)
    return dtype


def _specialist_slots(
    rows: list[Tensor], width: int, dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, Tensor, Tensor]:
    """(P, S) set probabilities (0 on padding), (P,) float64 dustbins, (P,) float64
    Σ pᵐ log pᵐ, from the compact rows stacked m-major."""
    rows = [p for p in rows if p.shape[0] > 0]
    if not rows:
        empty = torch.zeros(0, dtype=torch.float64, device=device)
        return torch.zeros(0, width, dtype=dtype, device=device), empty, empty
    if all(p.shape[1] == width + 1 for p in rows):
        spec = torch.cat(rows).to(dtype)  # (P, S + 1)
        pv = spec[:, :-1]
    else:
        spec = torch.cat([F.pad(p.to(dtype), (0, width + 1 - p.shape[1])) for p in rows])
        pv = torch.cat([F.pad(p[:, :-1].to(dtype), (0, width + 1 - p.shape[1])) for p in rows])
    d = torch.cat([p[:, -1] for p in rows]).to(torch.float64)
    return pv, d, _plogp(spec).sum(1, dtype=torch.float64)


def _em_problem(
    p_general: Tensor, sets: SetTable, active: Tensor, rows: list[Tensor], row_sums: Tensor
) -> _EMProblem:
    """Gather pᵍ and the specialists onto the active pairs' slots; build the nodes."""
    batch, num_classes = p_general.shape
    device = p_general.device
    f64 = torch.float64
    dtype = _work_dtype(p_general, rows)
    width = sets.table.shape[1]
    pair_m, pair_img = active.T.nonzero(as_tuple=True)  # (P,), m-major: matches compact rows
    n_pairs = pair_m.numel()
    cls = sets.slot_class.index_select(0, pair_m)  # (P, S)
    pad = None
    if min(sets.size_list) < width:
        pad = torch.arange(width, device=device) >= sets.sizes.index_select(0, pair_m)[:, None]
    flat = (pair_img * num_classes)[:, None] + cls  # (P, S)
    g = p_general.reshape(-1).index_select(0, flat.view(-1)).view(n_pairs, width).to(dtype)
    if pad is not None:
        g = g.masked_fill(pad, 0.0)
    pv, d, spec_const = _specialist_slots(rows, width, dtype, device)
    w = g + pv  # (P, S)
    sh = _shared_entries(cls, pair_m, pair_img, sets, active)
    g_sh = g.view(-1)[sh.idx]  # (K,) the same pᵍ_j in every copy
    if sh.idx.numel():  # a shared class gets every active specialist's probability
        pv_sh = pv[sh.pair, sh.idx % width]  # (pv may be a strided view: no reshape copy)
        pv_sum = _seg_sum(pv_sh, sh.group, sh.n_groups)
        w.view(-1)[sh.idx] = g_sh + pv_sum.index_select(0, sh.group)
    w_sh = w.view(-1)[sh.idx]
    first = (~sh.is_dup).nonzero().squeeze(1)  # one copy per (image, class)
    dup = sh.is_dup.nonzero().squeeze(1)
    dup_idx, dup_img = sh.idx[dup], sh.img[dup]
    n_pat = sh.n_patterns
    pat_first = sh.pattern[first]
    g_out = row_sums - _seg_sum(g.sum(1, dtype=f64), pair_img, batch) + _seg_sum(
        g_sh[dup].to(f64), dup_img, batch
    )  # (B,) Σ_{j∉U} pᵍ_j
    weight = torch.cat([
        (w.sum(1, dtype=f64) - _seg_sum(w_sh.to(f64), sh.pair, n_pairs)).clamp_min(0.0),
        _seg_sum(w_sh[first].to(f64), pat_first, n_pat),
        g_out.clamp_min(0.0),
    ])  # (N,)
    start = torch.cat([
        (g.sum(1, dtype=f64) - _seg_sum(g_sh.to(f64), sh.pair, n_pairs)).clamp_min(0.0),
        _seg_sum(g_sh[first].to(f64), pat_first, n_pat),
        g_out.clamp_min(0.0),
    ])
    pat_img = torch.zeros(n_pat, dtype=torch.long, device=device).index_copy_(
        0, pat_first, sh.img[first]
    )
    node_img = torch.cat([pair_img, pat_img, torch.arange(batch, device=device)])
    n_act = active.sum(1).to(f64)
    # on the simplex: Σ pᵍ is 1 only within rounding (float32 inputs), and the EM steps
    # renormalise, so an unnormalised start could look better than its first step
    total = torch.where(n_act > 0, _seg_sum(start, node_img, batch), 1.0)
    start /= total.index_select(0, node_img)
    inc, _ = torch.unique(sh.pattern * max(n_pairs, 1) + sh.pair, return_inverse=True)
    arange_p = torch.arange(n_pairs, device=device)
    # f = Σ pᵍ log pᵍ + Σ pᵐ log pᵐ − Σ_j w_j log q_j − Σ d log R over U (outside U the
    # pᵍ log pᵍ cancel); with q_j = Q_n w_j / W_n: − Σ_j w_j log q_j = Σ_U w log w
    # − Σ_n W_n log W_n − Σ_n W_n log Q_n.
    slot_const = _plogp(g).sub_(_plogp(w))  # (P, S)
    const = (
        _seg_sum(slot_const.sum(1, dtype=f64) + spec_const, pair_img, batch)
        - _seg_sum(slot_const.view(-1)[dup_idx].to(f64), dup_img, batch)
        + _seg_sum(torch.xlogy(weight, weight), node_img, batch)
    )
    return _EMProblem(
        batch=batch, pair_img=pair_img, cls=cls, flat=flat, pad=pad, w=w, d=d,
        sh_idx=sh.idx, sh_node=n_pairs + sh.pattern, dup_idx=dup_idx, node_img=node_img,
        weight=weight, start=start,
        inc_node=torch.cat([arange_p, n_pairs + inc // max(n_pairs, 1)]),
        inc_pair=torch.cat([arange_p, inc % max(n_pairs, 1)]),
        has_pair=n_act > 0, denom=(1.0 + n_act).index_select(0, node_img), const=const,
    )


def _converged(f_prev: Tensor, f: Tensor, tol: float, atol: Tensor) -> bool:
    """Every image's objective changed by at most tol relative (or by rounding noise
    ``atol``); an objective that stays infinite cannot improve and counts as converged."""
    finite = torch.isfinite(f) & torch.isfinite(f_prev)
    small = (f_prev - f).abs() <= tol * f.abs() + atol
    stuck = ~torch.isfinite(f) & ~torch.isfinite(f_prev)
    return bool(((finite & small) | stuck).all())


def _node_rest(pr: _EMProblem, mass: Tensor) -> Tensor:
    """(P,) R_m = Σ_{j∉Sᵐ} q_j of every pair: the image's total (1) minus its set's mass."""
    n_pairs = pr.pair_img.numel()
    inside = _seg_sum(mass.index_select(0, pr.inc_node), pr.inc_pair, n_pairs)
    total = _seg_sum(mass, pr.node_img, pr.batch).index_select(0, pr.pair_img)
    return (total - inside).clamp_min(0.0)


def _node_objective(pr: _EMProblem, mass: Tensor, rest: Tensor) -> Tensor:
    """(B,) objective of the node masses (the full KL objective of the q they define)."""
    return (
        pr.const
        - _seg_sum(torch.xlogy(pr.weight, mass), pr.node_img, pr.batch)
        - _seg_sum(torch.xlogy(pr.d, rest), pr.pair_img, pr.batch)
    )


def _node_step(pr: _EMProblem, mass: Tensor, rest: Tensor) -> Tensor:
    """One EM step on the node masses (renormalised per image against rounding)."""
    tiny = torch.finfo(mass.dtype).tiny
    ratio = pr.d / rest.clamp_min(tiny)  # (P,) pᵐ_dustbin / Σ_{i∉Sᵐ} q_i
    ratio_img = _seg_sum(ratio, pr.pair_img, pr.batch)  # (B,) Σ_{m∈A} ratio_m
    ratio_in = _seg_sum(ratio.index_select(0, pr.inc_pair), pr.inc_node, mass.numel())
    others = (ratio_img.index_select(0, pr.node_img) - ratio_in).clamp_min(0.0)  # (N,)
    new = torch.addcmul(pr.weight, mass, others).div_(pr.denom)
    total = _seg_sum(new, pr.node_img, pr.batch)
    total = torch.where(pr.has_pair, total, 1.0)  # no pair: Q = W = Σ pᵍ, kept exactly
    return new.div_(total.index_select(0, pr.node_img))


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
    accelerate: bool = True,
) -> CompactSolution:
    """EM fixed point of DESIGN.md on the active pairs and the union U (valid input).

        q_j ← (pᵍ_j + Σ_{m∈A} t^m_j) / (1 + |A|),
        t^m_j = pᵐ_j (j ∈ Sᵐ),  q_j·pᵐ_dustbin / Σ_{i∉Sᵐ} q_i (j ∉ Sᵐ),

    run on the node masses of ``_EMProblem`` (a few numbers per image): q_j = α·pᵍ_j
    outside U, q_j ∝ w_j within each node, started at the pᵍ mass of every node.
    ``accelerate``: SQUAREM cycles (two EM steps, a per-image extrapolation, one EM step
    from there, kept only where it beats the second EM step), else plain EM steps. Every
    accepted iterate has an objective no worse than the one before; ``max_iter`` caps
    the EM steps, and the run stops once every image's objective changed by at most
    ``tol`` relative from one accepted iterate to the next (at least one EM step apart).
    """
    pr = _em_problem(p_general, sets, active, rows, row_sums)
    mass = pr.start  # (N,)
    rest = _node_rest(pr, mass)
    f = _node_objective(pr, mass, rest)
    if history is not None:
        history.append(f.clone())
    atol = 1e-14 * (1.0 + pr.const.abs() + _seg_sum(pr.weight, pr.node_img, pr.batch))
    steps = 0
    while steps < max_iter:
        f_prev = f
        if accelerate and max_iter - steps >= 3:
            mass, rest, f = _squarem_cycle(pr, mass, rest)
            steps += 3
        else:
            mass = _node_step(pr, mass, rest)
            rest = _node_rest(pr, mass)
            f = _node_objective(pr, mass, rest)
            steps += 1
        if history is not None:
            history.append(f.clone())
        if _converged(f_prev, f, tol, atol):
            break
    return _node_solution(pr, mass)


def _squarem_cycle(pr: _EMProblem, x0: Tensor, rest0: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One SQUAREM cycle (Varadhan & Roland 2008, scheme S3) with a per-image step:
    x1 = F(x0), x2 = F(x1), r = x1 − x0, v = x2 − 2x1 + x0, a = −‖r‖/‖v‖ ≤ −1,
    x' = x0 − 2a·r + a²·v projected on the simplex, x3 = F(x'). Keeps x3 where its
    objective is no worse than x2's (which EM already guarantees to be no worse than
    x0's), else x2. Returns the masses, their R and objective."""
    img, batch = pr.node_img, pr.batch
    x1 = _node_step(pr, x0, rest0)
    x2 = _node_step(pr, x1, _node_rest(pr, x1))
    rest2 = _node_rest(pr, x2)
    f2 = _node_objective(pr, x2, rest2)
    r = x1 - x0
    v = x2 - x1 - r
    ratio = _seg_sum(r * r, img, batch) / _seg_sum(v * v, img, batch).clamp_min(1e-300)
    a = (-ratio.sqrt()).clamp_max(-1.0).nan_to_num(-1.0).index_select(0, img)  # (N,)
    xe = (x0 - 2.0 * a * r + a * a * v).clamp_min(0.0)
    xe /= _seg_sum(xe, img, batch).index_select(0, img).clamp_min(1e-300)
    xe = torch.where(pr.has_pair.index_select(0, img), xe, x2)  # no pair: Q = W, kept
    x3 = _node_step(pr, xe, _node_rest(pr, xe))
    rest3 = _node_rest(pr, x3)
    f3 = _node_objective(pr, x3, rest3)
    better = f3 <= f2  # (B,); False where f3 is NaN
    return (
        torch.where(better.index_select(0, img), x3, x2),
        torch.where(better.index_select(0, pr.pair_img), rest3, rest2),
        torch.where(better, f3, f2),
    )


def _node_solution(pr: _EMProblem, mass: Tensor) -> CompactSolution:
    """q on the slots (w_j · Q_n / W_n) and α = Q_outside / Σ_{j∉U} pᵍ_j."""
    n_pairs, batch = pr.pair_img.numel(), pr.batch
    w = pr.weight
    scale = torch.where(w > 0, mass / w.clamp_min(torch.finfo(w.dtype).tiny), 0.0)  # (N,)
    q = pr.w * scale[:n_pairs, None].to(pr.w.dtype)  # (P, S)
    if pr.sh_idx.numel():
        sh_scale = scale.index_select(0, pr.sh_node).to(pr.w.dtype)
        q.view(-1)[pr.sh_idx] = pr.w.view(-1)[pr.sh_idx] * sh_scale
    alpha = torch.where(pr.has_pair & (w[-batch:] > 0), scale[-batch:], 1.0)  # (B,)
    repeat = pr.pad.clone() if pr.pad is not None else torch.zeros_like(q, dtype=torch.bool)
    repeat.view(-1)[pr.dup_idx] = True
    if pr.pad is not None:  # padding repeats the pair's first slot: harmless duplicate writes
        q = torch.where(pr.pad, q[:, :1], q)
    return CompactSolution(
        pair_img=pr.pair_img, cls=pr.cls, q=q, repeat=repeat, alpha=alpha, flat=pr.flat
    )


def densify(sol: CompactSolution, p_general: Tensor) -> Tensor:
    """Write the dense (B, C) q: α·pᵍ everywhere, then the U entries."""
    num_classes = p_general.shape[1]
    q = torch.mul(p_general, sol.alpha.to(p_general.dtype)[:, None])  # (B, C); α = 1 if no pair
    flat = sol.flat if sol.flat is not None else sol.pair_img[:, None] * num_classes + sol.cls
    q.view(-1).index_copy_(0, flat.view(-1), sol.q.reshape(-1).to(p_general.dtype))  # repeats: same value
    return q


def compact_topk(
    sol: CompactSolution, p_general: Tensor, sets: SetTable, active: Tensor, k: int
) -> tuple[Tensor, Tensor]:
    """Top-k of q without writing it. Candidates: each image's k best U entries; a class
    outside U has q_j = α·pᵍ_j ≤ α·max pᵍ, so only the rows where that bound reaches
    the k-th U value look further: their largest pᵍ outside U (U masked in a small
    buffer, a few rows at a time), and where even that could enter the top-k, or U has
    fewer than k classes, the row's q is written densely."""
    del sets, active  # the solution already holds U
    f64 = torch.float64
    top_val, top_idx = _u_topk(sol, p_general.shape[0], k)  # (B, k), -1 where missing
    kth = top_val[:, -1]  # (B,)
    margin = 1.0 - 1e-12  # ties and rounding go to the careful path
    look = (kth < 0) | (sol.alpha * p_general.amax(1).to(f64) >= kth * margin)
    if bool(look.any()):
        rows_b = look.nonzero().squeeze(1)  # (r,)
        out_max = torch.full_like(kth, -1.0)
        part = rows_b[kth[rows_b] >= 0]
        if part.numel():
            out_max[part] = _max_outside_u(sol, p_general, part)
        redo = rows_b[(kth[rows_b] < 0) | (sol.alpha[rows_b] * out_max[rows_b] >= kth[rows_b] * margin)]
        if redo.numel():
            top_val[redo], top_idx[redo] = _dense_rows_topk(sol, p_general, redo, k)
    return top_val.to(p_general.dtype), top_idx


def _u_topk(sol: CompactSolution, batch: int, k: int) -> tuple[Tensor, Tensor]:
    """(B, k) float64 top-k of q over U (each pair's k best, then per image), -1 / 0
    where an image has fewer than k classes in U."""
    device = sol.q.device
    kp = min(k, sol.q.shape[1])
    pv, pi = sol.q.masked_fill(sol.repeat, -1.0).topk(kp, dim=1)  # (P, kp)
    pc = sol.cls.gather(1, pi)
    n_pairs = sol.pair_img.numel()
    order = torch.argsort(sol.pair_img, stable=True)  # pairs grouped by image
    counts = torch.bincount(sol.pair_img, minlength=batch)  # (B,)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(order)
    rank[order] = torch.arange(n_pairs, device=device) - starts[sol.pair_img[order]]
    width = max(int(counts.max()) * kp if n_pairs else 0, k)
    u_val = torch.full((batch, width), -1.0, dtype=torch.float64, device=device)
    u_idx = torch.zeros((batch, width), dtype=torch.long, device=device)
    cols = rank[:, None] * kp + torch.arange(kp, device=device)  # (P, kp)
    u_val[sol.pair_img[:, None], cols] = pv.to(torch.float64)
    u_idx[sol.pair_img[:, None], cols] = pc
    top_val, top_pos = u_val.topk(k, dim=1)
    return top_val, u_idx.gather(1, top_pos)


def _max_outside_u(sol: CompactSolution, p_general: Tensor, rows_b: Tensor) -> Tensor:
    """(r,) float64 max of pᵍ over the classes outside U of the images ``rows_b``
    (sorted), −1 if none: their pᵍ rows copied a few at a time into a buffer that stays
    in cache, U set to −1, row max."""
    batch, num_classes = p_general.shape
    device = p_general.device
    n_rows = rows_b.numel()
    slot = torch.full((batch,), -1, dtype=torch.long, device=device)
    slot[rows_b] = torch.arange(n_rows, device=device)
    pairs = (slot[sol.pair_img] >= 0).nonzero().squeeze(1)
    local = slot[sol.pair_img[pairs]]  # (P',) buffer row of each pair
    order = torch.argsort(local, stable=True)
    pairs, local = pairs[order], local[order]
    chunk = max(1, (1 << 19) // num_classes)  # rows per buffer: ~2 MB of float32
    starts = torch.arange(0, n_rows + chunk, chunk, device=device).clamp_max(n_rows)
    bounds = torch.searchsorted(local, starts).tolist()
    buf = torch.empty(min(chunk, n_rows), num_classes, dtype=p_general.dtype, device=device)
    out = torch.empty(n_rows, dtype=p_general.dtype, device=device)
    minus_one = torch.tensor(-1.0, dtype=p_general.dtype, device=device)
    for i, r0 in enumerate(range(0, n_rows, chunk)):
        r1 = min(r0 + chunk, n_rows)
        b = buf[: r1 - r0]
        torch.index_select(p_general, 0, rows_b[r0:r1], out=b)
        sel = pairs[bounds[i] : bounds[i + 1]]
        b.index_put_(((local[bounds[i] : bounds[i + 1]] - r0)[:, None], sol.cls[sel]), minus_one)
        torch.amax(b, 1, out=out[r0:r1])
    return out.to(torch.float64)


def _dense_rows_topk(
    sol: CompactSolution, p_general: Tensor, rows_b: Tensor, k: int
) -> tuple[Tensor, Tensor]:
    """Top-k of q for the images ``rows_b``, their q rows written densely (float64)."""
    batch = p_general.shape[0]
    device = p_general.device
    sub = p_general.index_select(0, rows_b).to(torch.float64) * sol.alpha[rows_b, None]  # (r, C)
    slot = torch.full((batch,), -1, dtype=torch.long, device=device)
    slot[rows_b] = torch.arange(rows_b.numel(), device=device)
    pairs = (slot[sol.pair_img] >= 0).nonzero().squeeze(1)
    sub[slot[sol.pair_img[pairs]][:, None], sol.cls[pairs]] = sol.q[pairs].to(torch.float64)
    return sub.topk(k, dim=1)


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
