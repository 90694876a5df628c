"""Top-k of the EM solution without writing the dense q (``solve_kl_topk``, the engine).

Outside U, q_j = α·pᵍ_j, so the candidates are U plus the generalist's top classes
outside U; rows where those could enter the top-k are written densely.
"""

from __future__ import annotations

import torch
from torch import Tensor

from inference._sets import SetTable
from inference.em import CompactSolution


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


__all__ = ["compact_topk"]
