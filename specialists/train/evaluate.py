"""Exact top-1 / top-5 / loss of a model over a split, under any number of processes."""

from __future__ import annotations

import torch
from accelerate import Accelerator

from ..config import DataConfig
from ..data.pipeline import Batches, normalize


@torch.inference_mode()
def evaluate(model: torch.nn.Module, batches: Batches, accelerator: Accelerator, data_cfg: DataConfig,
             *, channels_last: bool = False) -> dict[str, float]:
    """Exact top-1 / top-5 / loss over a split: padding rows dropped after ``gather_for_metrics``."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=accelerator.device)  # n, top1, top5, loss
    for images, labels, valid in batches:
        images = normalize(images.to(accelerator.device, non_blocking=True), data_cfg)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = labels.to(accelerator.device)
        with accelerator.autocast():
            logits = model(images)
        k = min(5, logits.shape[1])
        topk = logits.float().topk(k, dim=1).indices
        hit1 = topk[:, 0] == labels
        hit5 = (topk == labels[:, None]).any(dim=1)
        loss = torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none")
        stats = torch.stack([valid.to(accelerator.device).float(), hit1.float(), hit5.float(), loss], dim=1)
        stats = accelerator.gather_for_metrics(stats)
        mask = stats[:, 0] > 0
        totals += torch.stack([mask.sum(), stats[mask, 1].sum(), stats[mask, 2].sum(), stats[mask, 3].sum()]).double()
    n = max(totals[0].item(), 1.0)
    return {"n": int(totals[0].item()), "top1": totals[1].item() / n, "top5": totals[2].item() / n, "loss": totals[3].item() / n}
