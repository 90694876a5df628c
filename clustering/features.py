"""The vectors k-means clusters: treated, normalised and (for large C) projected covariance columns.

``column_features`` takes the dense (C, C) covariance. ``accumulated_features`` computes the same
vectors from a top-k :class:`~clustering.covariance.CovarianceAccumulator` without the C × C × D
product that projecting the dense columns costs (115 G multiply-adds at C = 15,000, D = 512):
with ``cov = S/n − μμᵀ``, ``S = Σ_images p pᵀ`` over each image's k kept entries, a treated
column projected on the random directions R is

    a_i (cov_i ∘ b) R − t_i R_i = a_i [ Σ_images p_i (p ∘ b)ᵀ R / n − μ_i (μ ∘ b)ᵀ R ] − t_i R_i

(b = a = 1/sqrt(var) for correlations, t_i the treated diagonal when it is zeroed): per image
one k × D gather and k scattered D-vectors (0.4 G multiply-adds for 20,000 images), from the
rows the accumulator keeps. The columns' norms take one pass over the sums (C² multiply-adds).
Same vectors up to float rounding (float64 here, float32 products in the dense path).
"""

from __future__ import annotations

import numpy as np
import torch

from clustering.covariance import CovarianceAccumulator, as_float_tensor

__all__ = ["COLUMN_TREATMENTS", "accumulated_features", "column_features"]

COLUMN_TREATMENTS = ("raw", "zero_diagonal", "correlation", "correlation_keep_diagonal")
DEFAULT_COLUMNS = "correlation"
DEFAULT_MAX_DIM = 512
# Rows of the covariance handled at once when building features (~64 MiB float64).
_CHUNK_BYTES = 64 << 20


def column_features(
    cov: torch.Tensor | np.ndarray,
    *,
    columns: str = DEFAULT_COLUMNS,
    normalize: bool = True,
    max_dim: int | None = DEFAULT_MAX_DIM,
    seed: int = 0,
) -> np.ndarray:
    """The vectors k-means sees: treated (and maybe projected) columns, (C, D) float32.

    Works on chunks of rows (the covariance is symmetric, so rows are
    columns) and never copies the whole (C, C) matrix.
    """
    cov_t = check_cov(cov)
    _check_columns(columns)
    c = cov_t.shape[0]
    projection = _projection(c, max_dim, seed)
    out_dim = c if projection is None else max_dim
    out = np.empty((c, out_dim), dtype=np.float32)
    diag = torch.diagonal(cov_t).clamp_min(1e-30)  # (C,) variances
    chunk = max(1, _CHUNK_BYTES // (8 * c))
    for start in range(0, c, chunk):
        stop = min(c, start + chunk)
        rows = cov_t[start:stop].to(dtype=torch.float64, copy=True)  # (b, C)
        local = torch.arange(stop - start)
        if columns in ("correlation", "correlation_keep_diagonal"):
            rows /= torch.sqrt(diag[start:stop, None] * diag[None, :])
        if columns in ("zero_diagonal", "correlation"):
            rows[local, local + start] = 0.0
        if normalize:
            rows /= rows.norm(dim=1, keepdim=True).clamp_min(1e-30)
        if projection is not None:
            rows = rows.to(torch.float32) @ projection  # (b, D); float32: 2x faster, ample
        out[start:stop] = rows.to(torch.float32).numpy()
    return out


def accumulated_features(
    acc: CovarianceAccumulator,
    *,
    columns: str = DEFAULT_COLUMNS,
    normalize: bool = True,
    max_dim: int | None = DEFAULT_MAX_DIM,
    seed: int = 0,
) -> np.ndarray:
    """``column_features(acc.covariance(), ...)`` from the accumulator's sums, (C, D) float32.

    With ``top_k`` and C > ``max_dim`` the covariance is never formed (module docstring); memory
    is one chunk of rows besides the sums. Otherwise the covariance is computed (a copy).
    The accumulator is left as it was.
    """
    if not isinstance(acc, CovarianceAccumulator):
        raise ValueError(f"acc must be a CovarianceAccumulator, got {type(acc).__name__}")
    _check_columns(columns)
    c = acc.num_classes
    projection = _projection(c, max_dim, seed)
    if acc.rows is None or projection is None:  # no kept rows (dense sums), or full columns wanted
        return column_features(acc.covariance(), columns=columns, normalize=normalize, max_dim=max_dim, seed=seed)
    if acc.count == 0:
        raise RuntimeError("covariance of an empty accumulator: call update() first")
    return _sparse_features(acc, projection.to(acc.device, torch.float64), columns, normalize)


def _sparse_features(acc: CovarianceAccumulator, r: torch.Tensor, columns: str, normalize: bool) -> np.ndarray:
    """The projected treated columns from the kept rows (module docstring), (C, D) float32."""
    n, c = acc.count, acc.num_classes
    mu = acc.sum_p / n  # (C,)
    var = acc.sum_pp.diagonal() / n - mu * mu  # (C,) the covariance's diagonal
    scale = var.clamp_min(1e-30).rsqrt() if columns.startswith("correlation") else torch.ones_like(var)
    zeroed = columns in ("zero_diagonal", "correlation")
    diag = scale * scale * var if zeroed else torch.zeros_like(var)  # (C,) t_i
    y = _image_products(acc.rows, scale[:, None] * r, c) / n  # (C, D) Σ p_i (p ∘ b)ᵀ R / n
    y -= mu[:, None] * ((scale * mu) @ r)[None, :]
    y *= scale[:, None]
    y -= diag[:, None] * r
    if normalize:
        y /= _treated_norms(acc, mu, scale, diag).clamp_min(1e-30)[:, None]
    return y.to(torch.float32).cpu().numpy()


def _image_products(rows: tuple[list[torch.Tensor], list[torch.Tensor]], br: torch.Tensor, c: int,
                    images: int = 64) -> torch.Tensor:
    """(C, D) float64 Σ_images p_i (pᵀ B R) over every image's kept entries p (``br`` = B R, (C, D)).

    float32 products a few images at a time (their gathers stay in cache): 7x faster than float64
    in pieces of 512 images, and exact to ~1e-6 relative, below the float32 features' own rounding.
    """
    d = br.shape[1]
    br32 = br.to(torch.float32)
    out = torch.zeros(c, d, dtype=torch.float32, device=br.device)
    for values, index in zip(*rows, strict=True):
        for start in range(0, len(values), images):
            v = values[start : start + images].to(torch.float32)  # (m, k)
            i = index[start : start + images].long().reshape(-1)  # (m·k,)
            w = torch.bmm(v[:, None, :], br32.index_select(0, i).view(len(v), -1, d))  # (m, 1, D): pᵀ B R
            out.index_add_(0, i, torch.bmm(v[:, :, None], w).view(-1, d))  # p_i · (pᵀ B R), scattered
    return out.to(torch.float64)


def _treated_norms(acc: CovarianceAccumulator, mu: torch.Tensor, scale: torch.Tensor,
                   diag: torch.Tensor) -> torch.Tensor:
    """(C,) ‖treated row i‖ = sqrt(a_i² Σ_j b_j² cov_ij² − t_i²), with cov_ij = s_ij − μ_i μ_j expanded:
    Σ_j b_j² cov_ij² = ‖s_i ∘ b‖² − 2 μ_i (s_i ∘ b)·(b ∘ μ) + μ_i² ‖b ∘ μ‖², one pass over the sums
    (float64: the terms' cancellation costs ~1e-12 relative)."""
    c, n = acc.num_classes, acc.count
    bmu = scale * mu
    sq, cross = torch.empty_like(mu), torch.empty_like(mu)
    chunk = max(1, _CHUNK_BYTES // (8 * c))
    for start in range(0, c, chunk):
        rows = slice(start, min(c, start + chunk))
        scaled = acc.sum_pp[rows] * scale  # (b, C) n · s_i ∘ b
        sq[rows] = torch.linalg.vector_norm(scaled, dim=1) ** 2
        cross[rows] = scaled @ bmu
    total = sq / (n * n) - 2.0 * mu * cross / n + mu * mu * float(bmu @ bmu)
    return (scale * scale * total - diag * diag).clamp_min(0.0).sqrt()


def _projection(c: int, max_dim: int | None, seed: int) -> torch.Tensor | None:
    """(C, D) float32 seeded Gaussian projection with E‖xR‖² = ‖x‖², or None when C ≤ max_dim."""
    if max_dim is None or c <= max_dim:
        return None
    generator = torch.Generator().manual_seed(int(seed))
    projection = torch.randn(c, max_dim, generator=generator, dtype=torch.float64)
    return (projection / max_dim**0.5).to(torch.float32)


def _check_columns(columns: str) -> None:
    if columns not in COLUMN_TREATMENTS:
        raise ValueError(f"columns={columns!r} but expected one of {COLUMN_TREATMENTS}")


def check_cov(cov: torch.Tensor | np.ndarray) -> torch.Tensor:
    """A (C, C) finite float covariance as a CPU tensor (no copy of a CPU one)."""
    cov = as_float_tensor(cov, "cov")
    if cov.dim() != 2 or cov.shape[0] != cov.shape[1]:
        raise ValueError(f"cov has shape {tuple(cov.shape)} but expected a square (C, C) matrix")
    cov = cov.detach().cpu()
    chunk = max(1, _CHUNK_BYTES // (8 * max(1, cov.shape[1])))
    for start in range(0, cov.shape[0], chunk):
        finite = torch.isfinite(cov[start : start + chunk]).all(dim=1)
        if not bool(finite.all()):
            raise ValueError(f"cov contains NaN/Inf at row {start + int((~finite).nonzero()[0, 0])}")
    return cov
