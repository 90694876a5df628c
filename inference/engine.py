"""Batched ensemble inference: generalist, routing, specialists on sub-batches, KL solve.

Section 5 of Hinton et al. (2015): run the generalist, pick the specialists whose
class sets meet its top-n classes, run each active specialist once on just the
images that activate it, and combine everything with the KL solver.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from inference._sets import ClassSets, SetTable, check_class_sets, table_on
from inference.em import densify, solve_em
from inference.gradient import solve_gradient
from inference.routing import route
from inference.solver import check_options
from inference.topk import compact_topk

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EnsemblePrediction:
    """What ``EnsembleEngine.predict`` returns for a batch of B images.

    top1, top1_prob: (B,) the ensemble's class (argmax q) and q at it.
    general_top1, general_top1_prob: (B,) the generalist's own top-1 and its probability.
    active: (B, M) bool, the specialists each image activated.
    q: (B, C) the ensemble distribution, only with ``return_q=True``.
    p_general: (B, C) the generalist's probabilities, only with ``return_q=True``.
    topk_indices, topk_probs: (B, k) with ``top_k=k``.
    """

    top1: Tensor
    top1_prob: Tensor
    general_top1: Tensor
    general_top1_prob: Tensor
    active: Tensor
    q: Tensor | None = None
    p_general: Tensor | None = None
    topk_indices: Tensor | None = None
    topk_probs: Tensor | None = None


class EnsembleEngine:
    """Generalist + specialists ensemble for batched inference (section 5).

    generalist: module, images (B, ...) -> logits (B, C).
    specialists: M modules, images (n, ...) -> logits (n, |Sᵐ|+1), dustbin last.
    class_sets: M class-index tensors or lists (Sᵐ, in the order of the specialist's
        outputs, i.e. sorted ascending).
    dustbin_biases: M floats b_m (e.g. from ``specialists.dustbin_bias``).
    temperatures: M floats T_m (default 1). A specialist's probabilities are
        softmax(z / T_m + b_m·e_dustbin): the bias is added to the dustbin logit
        after the temperature scaling.
    top_n: routing uses the generalist's top_n classes (paper: 1).
    method, tol, max_iter: passed to the KL solver ("em" or "gradient").
    amp: run the networks under CUDA autocast: True for bfloat16 where supported, else
        float16, or the dtype itself; probabilities and the solve stay float32. Ignored on CPU.
    channels_last: put the models and 4-D inputs in channels_last memory format.
        CUDA only (the models are converted in place at construction).

    The models are put in eval mode. Specialists may live on other devices than the
    generalist: each sub-batch is moved to its specialist's device and back.
    """

    def __init__(
        self,
        generalist: nn.Module,
        specialists: Sequence[nn.Module],
        class_sets: ClassSets,
        dustbin_biases: Sequence[float],
        *,
        temperatures: Sequence[float] | None = None,
        top_n: int = 1,
        method: str = "em",
        tol: float = 1e-7,
        max_iter: int | None = None,
        amp: bool | torch.dtype = False,
        channels_last: bool = False,
    ) -> None:
        if not isinstance(generalist, nn.Module):
            raise ValueError(f"generalist must be an nn.Module, got {type(generalist).__name__}")
        specialists = list(specialists)
        num_spec = len(specialists)
        if num_spec == 0 or not all(isinstance(s, nn.Module) for s in specialists):
            raise ValueError("specialists must be a non-empty list of nn.Module")
        if len(class_sets) != num_spec:
            raise ValueError(
                f"class_sets has {len(class_sets)} sets, expected one per specialist ({num_spec})"
            )
        biases = [float(b) for b in dustbin_biases]
        if len(biases) != num_spec:
            raise ValueError(
                f"dustbin_biases has {len(biases)} values, expected one per specialist ({num_spec})"
            )
        temps = [1.0] * num_spec if temperatures is None else [float(t) for t in temperatures]
        if len(temps) != num_spec or not all(t > 0 for t in temps):
            raise ValueError(f"temperatures must be {num_spec} positive numbers, got {temperatures!r}")
        if isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1:
            raise ValueError(f"top_n must be an int >= 1, got {top_n!r}")
        self.max_iter = check_options(method, tol, max_iter)
        self.generalist = generalist.eval()
        self.specialists = [s.eval() for s in specialists]
        self.class_sets = [torch.as_tensor(s) for s in class_sets]
        self._widths = [int(s.numel()) + 1 for s in self.class_sets]  # outputs of each specialist
        self.dustbin_biases = biases
        self.temperatures = temps
        self.top_n = top_n
        self.method = method
        self.tol = tol
        self.device = _module_device(generalist) or torch.device("cpu")
        self._amp_dtype = amp if isinstance(amp, torch.dtype) else None
        self.amp = bool(amp) and self.device.type == "cuda"
        self.channels_last = channels_last and self.device.type == "cuda"
        if self.channels_last:
            for model in [self.generalist, *self.specialists]:
                model.to(memory_format=torch.channels_last)
        self._sets: SetTable | None = None  # built on the first batch, when C is known

    # ------------------------------------------------------------------ pieces

    def _autocast(self) -> contextlib.AbstractContextManager:
        if not self.amp:
            return contextlib.nullcontext()
        dtype = self._amp_dtype or (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
        return torch.autocast(device_type="cuda", dtype=dtype)

    def _prepare(self, images: Tensor) -> Tensor:
        images = images.to(self.device, non_blocking=True)
        if self.channels_last and images.ndim == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def _set_table(self, num_classes: int, device: torch.device) -> SetTable:
        if self._sets is None or self._sets.num_classes != num_classes:
            self._sets = check_class_sets(self.class_sets, num_classes, device)
        return table_on(self._sets, device)

    def general_probs(self, images: Tensor) -> Tensor:
        """(B, C) float32 generalist probabilities."""
        with torch.inference_mode(), self._autocast():
            logits = self.generalist(self._prepare(images))
        return torch.softmax(logits.float(), dim=1)

    def specialist_probs(self, m: int, images: Tensor) -> Tensor:
        """(n, |Sᵐ|+1) float32 probabilities of specialist m: softmax(z / T_m + b_m·e_dustbin)."""
        model = self.specialists[m]
        device = _module_device(model) or images.device
        with torch.inference_mode(), self._autocast():
            logits = model(images.to(device, non_blocking=True))
        width = self._widths[m]
        if logits.ndim != 2 or logits.shape != (images.shape[0], width):
            raise ValueError(
                f"specialist {m} returned logits of shape {tuple(logits.shape)}, expected "
                f"({images.shape[0]}, |class_sets[{m}]| + 1 = {width})"
            )
        logits = logits.float()
        if self.temperatures[m] != 1.0 or self.dustbin_biases[m] != 0.0:  # else x / 1 + 0 = x
            logits = logits / self.temperatures[m]
            logits[:, -1] += self.dustbin_biases[m]
        return torch.softmax(logits, dim=1).to(self.device)

    def _routed_probs(self, images: Tensor, active: Tensor, sizes: list[int], like: Tensor) -> list[Tensor]:
        """Each specialist's probabilities on just the images that activate it, (n_m, |Sᵐ|+1) in image
        order; one nonzero over the whole mask instead of one per specialist."""
        pair_m, pair_img = active.T.nonzero(as_tuple=True)  # m-major, images ascending within m
        counts = torch.bincount(pair_m, minlength=len(self.specialists)).tolist()
        rows = []
        for m, idx in enumerate(torch.split(pair_img, counts)):
            if counts[m] == 0:
                rows.append(like.new_zeros(0, sizes[m] + 1))
            else:
                rows.append(self.specialist_probs(m, images.index_select(0, idx)))
        return rows

    # ------------------------------------------------------------------ predict

    @torch.inference_mode()
    def predict(
        self,
        images: Tensor,
        *,
        return_q: bool = False,
        top_k: int | None = None,
        run_all: bool = False,
    ) -> EnsemblePrediction:
        """Classify a batch of images (B, ...).

        return_q: also return the dense (B, C) q and pᵍ (otherwise q is never written
            when method="em": top-1 / top-k come from the compact solution).
        top_k: also return the k most probable classes of q.
        run_all: run every specialist on every image (the baseline without routing);
            the active mask and hence q are the same as with routing.
        """
        if not isinstance(images, Tensor) or images.ndim < 1 or images.shape[0] == 0:
            raise ValueError("images must be a non-empty batch tensor (B, ...)")
        images = self._prepare(images)
        p_general = self.general_probs(images)  # (B, C)
        batch, num_classes = p_general.shape
        if top_k is not None and (isinstance(top_k, bool) or not 1 <= top_k <= num_classes):
            raise ValueError(f"top_k must be an int in [1, C={num_classes}], got {top_k!r}")
        sets = self._set_table(num_classes, p_general.device)
        if self.top_n > num_classes:
            raise ValueError(f"top_n={self.top_n} exceeds the generalist's C={num_classes} classes")
        g_top_prob, g_top = p_general.max(dim=1)  # (B,): the first maximum, as argmax
        active = route(p_general, sets, self.top_n, top1=g_top)  # (B, M)
        if run_all:  # every specialist on every image, then the compact layout the solvers expect
            rows = [self.specialist_probs(m, images)[active[:, m]] for m in range(len(self.specialists))]
        else:
            rows = self._routed_probs(images, active, sets.size_list, p_general)
        logger.debug("batch %d: %.2f active specialists per image", batch, active.sum(1).float().mean())
        q = topk_probs = topk_idx = None
        if self.method == "gradient":
            q = solve_gradient(p_general, sets, active, rows, tol=self.tol, max_iter=self.max_iter)
        else:
            sol = solve_em(
                p_general, sets, active, rows, p_general.sum(1).double(),
                tol=self.tol, max_iter=self.max_iter,
            )
            if return_q:
                q = densify(sol, p_general)
            else:
                topk_probs, topk_idx = compact_topk(sol, p_general, sets, active, top_k or 1)
        if q is not None:
            topk_probs, topk_idx = q.topk(top_k or 1, dim=1)
        return EnsemblePrediction(
            top1=topk_idx[:, 0],
            top1_prob=topk_probs[:, 0],
            general_top1=g_top,
            general_top1_prob=g_top_prob,
            active=active,
            q=q if return_q else None,
            p_general=p_general if return_q else None,
            topk_indices=topk_idx if top_k is not None else None,
            topk_probs=topk_probs if top_k is not None else None,
        )


def _module_device(model: nn.Module) -> torch.device | None:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return None


__all__ = ["EnsembleEngine", "EnsemblePrediction"]
