"""The EM fixed-point solver of DESIGN.md for the KL combination (paper, eq. 5).

Outside the union U of the active sets q_j = α·pᵍ_j; within U, q stays ∝ w_j on each
group of classes held by the same active sets, so the EM runs on a few node masses per
image (``_EMProblem``), accelerated by SQUAREM. The result is the compact "U + α"
``CompactSolution``; ``densify`` writes the dense (B, C) q.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from inference._checks import converged
from inference._sets import BITS_PER_WORD, SetTable, to_bits


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


def _row_sums64(x: Tensor) -> Tensor:
    """(R,) float64 row sums of an (R, S) tensor, as ``x.sum(1, dtype=float64)`` (the same
    values: rows are summed independently) but cast a few rows at a time, so that the
    float64 copy stays in cache and no (R, S) float64 temporary is allocated."""
    if x.dtype == torch.float64 or x.device.type != "cpu":
        return x.sum(1, dtype=torch.float64)
    out = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
    step = max(1, (1 << 15) // max(x.shape[1], 1))  # 256 KiB of float64 per piece
    for r0 in range(0, x.shape[0], step):
        torch.sum(x[r0 : r0 + step], 1, dtype=torch.float64, out=out[r0 : r0 + step])
    return out


def _plogp(x: Tensor) -> Tensor:
    """x log x elementwise, 0 at 0 (log of the clamped value: vectorised, unlike xlogy); one new tensor."""
    return x.clamp_min(torch.finfo(x.dtype).tiny).log_().mul_(x)


def _take(x: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """x[rows, cols] for an (R, S) or (R, S, W) tensor whose (S, W) entries are laid out
    densely within each row (x may be a row-strided view, e.g. a column slice): one
    ``index_select`` over a flat view of the rows' span, ~3x faster than the advanced
    index on the CPU, no copy of x."""
    inner = x.shape[2:]
    step = x.stride(1)  # elements per slot
    dense = step == inner.numel() and (not inner or x[0, 0].is_contiguous())
    if not dense or x.stride(0) % step:
        return x[rows, cols]
    row_step = x.stride(0) // step
    span = (x.shape[0] - 1) * row_step + x.shape[1]  # slots from the first row's to the last's
    slots = x.as_strided((span, *inner), (step, *x.stride()[2:]))
    return slots.index_select(0, rows * row_step + cols)


def _dense_ids(key: Tensor) -> tuple[Tensor, int]:
    """Consecutive ids of the distinct values (rows, for 2-D) of ``key``, and how many
    (in increasing order of the values, as ``torch.unique``)."""
    if key.numel() == 0:
        return key.new_zeros(0), 0
    if key.ndim == 1 and key.device.type == "cpu":  # numpy's sort: ~4x torch's at 15,000 keys
        uniq, ids = np.unique(key.numpy(), return_inverse=True)
        return torch.from_numpy(ids.reshape(-1).astype(np.int64, copy=False)), uniq.shape[0]
    uniq, ids = torch.unique(key, dim=0 if key.ndim == 2 else None, return_inverse=True)
    return ids, uniq.shape[0]


def _unique(key: Tensor) -> Tensor:
    """Sorted distinct values of a 1-D tensor (numpy's sort on the CPU)."""
    if key.device.type == "cpu":
        return torch.from_numpy(np.unique(key.numpy()))
    return torch.unique(key)


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
    pair = can.index_select(0, loc // width)
    slot = loc % width
    img, m = pair_img.index_select(0, pair), pair_m.index_select(0, pair)
    idx = pair * width + slot
    lower = _take(sets.slot_lower, m, slot) & act_bits.index_select(0, img)  # (K, W)
    is_dup = (lower != 0).any(1)
    own = torch.zeros_like(lower).scatter_(
        1, (m // BITS_PER_WORD)[:, None], torch.bitwise_left_shift(1, m % BITS_PER_WORD)[:, None]
    )
    holders = common.view(-1, words).index_select(0, loc) | own  # (K, W) the class's pattern
    group, n_groups = _dense_ids(img * num_classes + cls.view(-1).index_select(0, idx))
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
    return pv, d, _row_sums64(_plogp(spec))


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
    g_sh = g.view(-1).index_select(0, sh.idx)  # (K,) the same pᵍ_j in every copy
    if sh.idx.numel():  # a shared class gets every active specialist's probability
        pv_sh = _take(pv, sh.pair, sh.idx % width)  # (pv may be a strided view: no copy)
        pv_sum = _seg_sum(pv_sh, sh.group, sh.n_groups)
        w.view(-1).index_copy_(0, sh.idx, g_sh + pv_sum.index_select(0, sh.group))
    w_sh = w.view(-1).index_select(0, sh.idx)
    first = (~sh.is_dup).nonzero().squeeze(1)  # one copy per (image, class)
    dup = sh.is_dup.nonzero().squeeze(1)
    dup_idx, dup_img = sh.idx.index_select(0, dup), sh.img.index_select(0, dup)
    n_pat = sh.n_patterns
    pat_first = sh.pattern.index_select(0, first)
    g_rows = _row_sums64(g)  # (P,)
    g_out = row_sums - _seg_sum(g_rows, pair_img, batch) + _seg_sum(
        g_sh.index_select(0, dup).to(f64), dup_img, batch
    )  # (B,) Σ_{j∉U} pᵍ_j
    weight = torch.cat([
        (_row_sums64(w) - _seg_sum(w_sh.to(f64), sh.pair, n_pairs)).clamp_min(0.0),
        _seg_sum(w_sh.index_select(0, first).to(f64), pat_first, n_pat),
        g_out.clamp_min(0.0),
    ])  # (N,)
    start = torch.cat([
        (g_rows - _seg_sum(g_sh.to(f64), sh.pair, n_pairs)).clamp_min(0.0),
        _seg_sum(g_sh.index_select(0, first).to(f64), pat_first, n_pat),
        g_out.clamp_min(0.0),
    ])
    pat_img = torch.zeros(n_pat, dtype=torch.long, device=device).index_copy_(
        0, pat_first, sh.img.index_select(0, first)
    )
    node_img = torch.cat([pair_img, pat_img, torch.arange(batch, device=device)])
    n_act = active.sum(1).to(f64)
    # on the simplex: Σ pᵍ is 1 only within rounding (float32 inputs), and the EM steps
    # renormalise, so an unnormalised start could look better than its first step
    total = torch.where(n_act > 0, _seg_sum(start, node_img, batch), 1.0)
    start /= total.index_select(0, node_img)
    inc = _unique(sh.pattern * max(n_pairs, 1) + sh.pair)
    arange_p = torch.arange(n_pairs, device=device)
    # f = Σ pᵍ log pᵍ + Σ pᵐ log pᵐ − Σ_j w_j log q_j − Σ d log R over U (outside U the
    # pᵍ log pᵍ cancel); with q_j = Q_n w_j / W_n: − Σ_j w_j log q_j = Σ_U w log w
    # − Σ_n W_n log W_n − Σ_n W_n log Q_n.
    slot_const = _plogp(g).sub_(_plogp(w))  # (P, S)
    const = (
        _seg_sum(_row_sums64(slot_const) + spec_const, pair_img, batch)
        - _seg_sum(slot_const.view(-1).index_select(0, dup_idx).to(f64), dup_img, batch)
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
        if converged(f_prev, f, tol, atol):
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
        q.view(-1).index_copy_(0, pr.sh_idx, pr.w.view(-1).index_select(0, pr.sh_idx) * sh_scale)
    alpha = torch.where(pr.has_pair & (w[-batch:] > 0), scale[-batch:], 1.0)  # (B,)
    repeat = pr.pad.clone() if pr.pad is not None else torch.zeros_like(q, dtype=torch.bool)
    repeat.view(-1).index_fill_(0, pr.dup_idx, True)
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
    values = sol.q.reshape(-1).to(p_general.dtype)
    if q.device.type == "cpu" and q.dtype in _NUMPY_DTYPES and not q.requires_grad:  # numpy's indexed store: ~1.6x torch's index_copy_
        q.view(-1).numpy()[flat.view(-1).numpy()] = values.numpy()  # repeats: same value
    else:
        q.view(-1).index_copy_(0, flat.view(-1), values)
    return q


_NUMPY_DTYPES = (torch.float32, torch.float64)


__all__ = ["CompactSolution", "densify", "solve_em"]
