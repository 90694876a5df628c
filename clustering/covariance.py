"""Streaming covariance of a generalist's softmax outputs (Hinton et al. 2015, section 5).

The specialists' class sets come from the covariance of the generalist's
predictions over images, ``Cov = E[p pᵀ] − E[p] E[p]ᵀ``: classes that are often
predicted together have similar columns. The accumulator keeps three float64
sums (count n, Σp of shape (C,), Σp pᵀ of shape (C, C)) so that batches,
processes and saved partial results can be combined exactly.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = ["CovarianceAccumulator"]

# Upper bound on the number of outer-product entries scattered at once in the
# top-k path: chunk_rows * k * k <= this (indices + values: ~64 MiB of scratch).
_SCATTER_ENTRIES = 1 << 22


def as_float_tensor(x: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    """A float numpy array or tensor as a tensor (no copy); ValueError naming ``name`` otherwise."""
    if isinstance(x, np.ndarray):
        if not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"{name} must have a float dtype, got {x.dtype}")
        x = torch.from_numpy(x)
    elif not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must have a float dtype, got {x.dtype}")
    return x


class CovarianceAccumulator:
    """Accumulates ``E[p pᵀ] − E[p] E[p]ᵀ`` over batches of probabilities.

    Args:
        num_classes: C, the width of every batch.
        top_k: if given, keep only each row's ``top_k`` largest probabilities
            (the others count as zero) and scatter the B·k² products into the
            sums instead of a dense (C, B) @ (B, C) product per batch. This is
            what makes C = 15,000 affordable; with ``top_k >= C`` it is exact.
            The kept entries of every row are also kept (``rows``: k values and
            indices, 8k bytes an image): ``cluster_classes`` projects the
            covariance's columns from them without a C × C product
            (``clustering.features``).
        device: where the float64 sums live (``"cuda"`` for NCCL all-reduce).

    The covariance is the population one (``numpy.cov(..., bias=True)``).
    """

    def __init__(
        self, num_classes: int, top_k: int | None = None, *, device: str | torch.device = "cpu"
    ) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
            raise ValueError(f"num_classes must be an int, got {num_classes!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes} but expected at least 1")
        if top_k is not None:
            if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
                raise ValueError(f"top_k={top_k!r} but expected None or an int >= 1")
        self.num_classes = int(num_classes)
        self.top_k = None if top_k is None else int(min(top_k, num_classes))
        self.device = torch.device(device)
        self.count = 0
        c = self.num_classes
        self.sum_p = torch.zeros(c, dtype=torch.float64, device=self.device)  # (C,)
        self.sum_pp = torch.zeros(c, c, dtype=torch.float64, device=self.device)  # (C, C)
        self.row_values: list[torch.Tensor] = []  # top-k: (B, k) float32 kept entries of each batch
        self.row_index: list[torch.Tensor] = []  # top-k: (B, k) int32 their classes
        self._rows_missing = False  # sums came in without their rows (load_state_dict, merge)
        self._spent = False

    # ------------------------------------------------------------------ update
    def update(self, probs: torch.Tensor | np.ndarray) -> CovarianceAccumulator:
        """Adds a batch of probability rows, shape (B, C), any float dtype."""
        self._check_not_spent()
        x = self._as_batch(probs)  # (B, C) on self.device, its own float dtype
        if x.shape[0] == 0:
            return self
        self.count += x.shape[0]
        if self.top_k is None or self.top_k >= self.num_classes:
            x = x.to(torch.float64)
            self.sum_p += x.sum(dim=0)
            self.sum_pp.addmm_(x.T, x)  # (C, B) @ (B, C)
        else:
            values, index = torch.topk(x, self.top_k, dim=1, sorted=False)  # (B, k) each
            self._scatter_top_k(values.to(torch.float64), index)
            self.row_values.append(values.to(torch.float32))
            self.row_index.append(index.to(torch.int32))
        return self

    @property
    def rows(self) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
        """Top-k mode: every row's kept entries, as lists of (B, k) float32 values and int32 classes
        (one pair per batch, all rows ever added, in any order); None when they are not all here
        (dense mode, or sums loaded or merged without them)."""
        if self.top_k is None or self.top_k >= self.num_classes or self._rows_missing:
            return None
        return self.row_values, self.row_index

    def _scatter_top_k(self, values: torch.Tensor, index: torch.Tensor) -> None:
        """Adds the k² products of every row's kept entries into the sums."""
        c, k = self.num_classes, values.shape[1]
        self.sum_p.index_add_(0, index.reshape(-1), values.reshape(-1))
        flat_sum = self.sum_pp.view(-1)  # (C*C,) view, no copy
        rows_per_chunk = max(1, _SCATTER_ENTRIES // (k * k))
        for start in range(0, values.shape[0], rows_per_chunk):
            v = values[start : start + rows_per_chunk]  # (b, k)
            i = index[start : start + rows_per_chunk]  # (b, k)
            products = v[:, :, None] * v[:, None, :]  # (b, k, k)
            flat_index = i[:, :, None] * c + i[:, None, :]  # (b, k, k)
            flat_sum.index_add_(0, flat_index.reshape(-1), products.reshape(-1))

    def _as_batch(self, probs: torch.Tensor | np.ndarray) -> torch.Tensor:
        probs = as_float_tensor(probs, "probs")
        if probs.dim() != 2 or probs.shape[1] != self.num_classes:
            raise ValueError(
                f"probs has shape {tuple(probs.shape)} but expected (B, {self.num_classes})"
            )
        x = probs.detach().to(device=self.device)
        # A row sum is NaN/Inf if the row holds a NaN/Inf (or, rarely, overflows: those rows are
        # looked at entry by entry); in the batch's own dtype it is ~18x cheaper than a float64
        # sum and ~100x cheaper than isfinite(x).all(1) on a (1024, 15000) float32 batch.
        suspect = (~torch.isfinite(x.sum(dim=1))).nonzero().squeeze(1)
        if suspect.numel():
            bad = suspect[~torch.isfinite(x[suspect]).all(dim=1)]
            if bad.numel():
                raise ValueError(f"probs contains NaN/Inf at row {int(bad[0])}")
        return x

    # ------------------------------------------------------------- combining
    def merge(self, other: CovarianceAccumulator) -> CovarianceAccumulator:
        """Adds another accumulator's sums into this one; returns self."""
        self._check_not_spent()
        if not isinstance(other, CovarianceAccumulator):
            raise ValueError(f"can only merge a CovarianceAccumulator, got {type(other).__name__}")
        other._check_not_spent()
        if other.num_classes != self.num_classes or other.top_k != self.top_k:
            raise ValueError(
                f"cannot merge an accumulator with num_classes={other.num_classes}, "
                f"top_k={other.top_k} into one with num_classes={self.num_classes}, "
                f"top_k={self.top_k}"
            )
        self.count += other.count
        self.sum_p += other.sum_p.to(self.device)
        self.sum_pp += other.sum_pp.to(self.device)
        self.row_values += [v.to(self.device) for v in other.row_values]
        self.row_index += [i.to(self.device) for i in other.row_index]
        self._rows_missing |= other._rows_missing
        return self

    def all_reduce(self, group: Any = None) -> CovarianceAccumulator:
        """Sums the count and sums over all processes (torch.distributed SUM).

        Afterwards every rank holds the global sums. Call it once, after the
        last ``update``: reducing twice would count each process's data again.
        Does nothing when torch.distributed is not initialised. Returns self.
        """
        self._check_not_spent()
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        count = torch.tensor([float(self.count)], dtype=torch.float64, device=self.device)
        for tensor in (count, self.sum_p, self.sum_pp):
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        self.count = int(round(count.item()))
        if self.rows is not None:
            self.row_values, self.row_index = _all_gather_rows(self.row_values, self.row_index, self.top_k,
                                                               self.device, group)
        logger.debug("all-reduced covariance sums: %d rows in total", self.count)
        return self

    # ---------------------------------------------------------------- result
    def covariance(self, *, inplace: bool = False) -> torch.Tensor:
        """Returns the (C, C) float64 covariance ``E[p pᵀ] − E[p] E[p]ᵀ``.

        ``inplace=True`` turns the Σp pᵀ buffer itself into the covariance (no
        second C×C buffer: 1.8 GB saved at C = 15,000); the accumulator is
        spent afterwards and refuses further use.
        """
        self._check_not_spent()
        if self.count == 0:
            raise RuntimeError("covariance of an empty accumulator: call update() first")
        mean = self.sum_p / self.count  # (C,)
        if inplace:
            self._spent = True
            cov = self.sum_pp.div_(self.count)
        else:
            cov = self.sum_pp / self.count
        cov.addr_(mean, mean, alpha=-1.0)  # cov -= mean meanᵀ
        return cov

    def mean(self) -> torch.Tensor:
        """Returns E[p], shape (C,), float64."""
        if self.count == 0:
            raise RuntimeError("mean of an empty accumulator: call update() first")
        return self.sum_p / self.count

    # ------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """Plain values and tensors (safe for ``torch.load(weights_only=True)``)."""
        self._check_not_spent()
        return {
            "num_classes": self.num_classes,
            "top_k": self.top_k,
            "count": self.count,
            "sum_p": self.sum_p.clone(),
            "sum_pp": self.sum_pp.clone(),
            **({"row_values": torch.cat(self.row_values), "row_index": torch.cat(self.row_index)}
               if self.rows is not None and self.row_values else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> CovarianceAccumulator:
        """Replaces the sums with saved ones; returns self."""
        missing = {"num_classes", "top_k", "count", "sum_p", "sum_pp"} - set(state)
        if missing:
            raise ValueError(f"state_dict is missing keys {sorted(missing)}")
        if state["num_classes"] != self.num_classes or state["top_k"] != self.top_k:
            raise ValueError(
                f"state_dict has num_classes={state['num_classes']}, top_k={state['top_k']} "
                f"but this accumulator has num_classes={self.num_classes}, top_k={self.top_k}"
            )
        c = self.num_classes
        sum_p, sum_pp = torch.as_tensor(state["sum_p"]), torch.as_tensor(state["sum_pp"])
        if tuple(sum_p.shape) != (c,) or tuple(sum_pp.shape) != (c, c):
            raise ValueError(
                f"state_dict sums have shapes {tuple(sum_p.shape)}, {tuple(sum_pp.shape)} "
                f"but expected ({c},), ({c}, {c})"
            )
        if int(state["count"]) < 0:
            raise ValueError(f"state_dict count={state['count']} but expected >= 0")
        self.count = int(state["count"])
        self.sum_p = sum_p.to(device=self.device, dtype=torch.float64).clone()
        self.sum_pp = sum_pp.to(device=self.device, dtype=torch.float64).clone()
        has_rows = "row_values" in state and "row_index" in state
        self.row_values = [torch.as_tensor(state["row_values"]).to(self.device, torch.float32)] if has_rows else []
        self.row_index = [torch.as_tensor(state["row_index"]).to(self.device, torch.int32)] if has_rows else []
        self._rows_missing = not has_rows and self.count > 0
        self._spent = False
        return self

    def _check_not_spent(self) -> None:
        if self._spent:
            raise RuntimeError("this accumulator was spent by covariance(inplace=True)")

    def __repr__(self) -> str:
        return (
            f"CovarianceAccumulator(num_classes={self.num_classes}, top_k={self.top_k}, "
            f"count={self.count})"
        )


def _all_gather_rows(values: list[torch.Tensor], index: list[torch.Tensor], k: int, device: torch.device,
                     group: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every process's kept rows, on every process (padded to the longest, then trimmed)."""
    import torch.distributed as dist

    mine_v = torch.cat(values) if values else torch.zeros(0, k, dtype=torch.float32, device=device)
    mine_i = torch.cat(index) if index else torch.zeros(0, k, dtype=torch.int32, device=device)
    world = dist.get_world_size(group)
    counts = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([len(mine_v)], dtype=torch.int64, device=device), group=group)
    longest = int(max(c.item() for c in counts))
    out_v, out_i = [], []
    for mine, out in ((mine_v, out_v), (mine_i, out_i)):
        padded = torch.zeros(longest, k, dtype=mine.dtype, device=device)
        padded[: len(mine)] = mine
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded, group=group)
        out += [part[: int(n.item())] for part, n in zip(parts, counts, strict=True)]
    return out_v, out_i
