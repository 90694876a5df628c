"""The paper's solver, kept as the reference: gradient descent on logits z with
q = softmax(z) (Hinton et al. 2015, section 5), here batched L-BFGS on the dense (B, C)
problem in float64. Dense, not fast.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from inference._checks import converged
from inference._sets import SetTable

_LBFGS_MEMORY = 20  # (s, y) pairs kept by the batched L-BFGS


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
        if converged(f_prev, f, tol, atol):
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


__all__ = ["solve_gradient"]
