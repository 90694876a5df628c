"""Pieces every training stage shares: optimiser, schedule, train state, checkpoints, evaluation."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from .config import DataConfig
from .data import Batches, normalize
from .errors import UserError
from .io import atomic_write_json, read_json


def build_optimizer(model: torch.nn.Module, name: str, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    """SGD (Nesterov momentum) or AdamW; no weight decay on biases and norm layers."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0)
    return torch.optim.AdamW(groups, lr=lr)


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to the base rate over ``warmup_steps``, then cosine decay to zero at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class TrainState:
    """Where training is; saved *inside* every checkpoint (never parsed from a folder name)."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch
    batch_in_epoch: int = 0  # batches of the current epoch already consumed
    best_metric: float = -1.0

    def state_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class CheckpointManager:
    """``accelerator.save_state`` into ``root/ckpt-<n>``; ``root/latest.json`` names the newest complete one.

    The pointer is written only after a save has finished, so a crash while saving
    leaves the previous checkpoint in charge. Old checkpoints beyond ``keep`` are removed.
    """

    def __init__(self, accelerator: Accelerator, root: Path, *, keep: int = 2, fingerprint: str = "") -> None:
        self.accelerator = accelerator
        self.root = Path(root)
        self.keep = max(1, keep)
        self.fingerprint = fingerprint

    @property
    def pointer(self) -> Path:
        return self.root / "latest.json"

    def latest(self) -> Path | None:
        if not self.pointer.is_file():
            return None
        info = read_json(self.pointer)
        if self.fingerprint and info.get("fingerprint") != self.fingerprint:
            raise UserError(f"{self.root}: checkpoints were made with another config "
                            f"(fingerprint {info.get('fingerprint')}, this config {self.fingerprint}); "
                            "use another run_dir or --force to start over")
        path = self.root / info["name"]
        return path if path.is_dir() else None

    def save(self, step: int) -> None:
        name = f"ckpt-{step:08d}"
        path = self.root / name
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(path))
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            atomic_write_json(self.pointer, {"name": name, "fingerprint": self.fingerprint})
            done = sorted(p for p in self.root.glob("ckpt-*") if p.is_dir() and p.name != name)
            for old in done[: max(0, len(done) - self.keep + 1)]:
                shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()

    def load(self) -> bool:
        path = self.latest()
        if path is None:
            return False
        self.accelerator.load_state(str(path))
        return True


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


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def resolve_mixed_precision(setting: str, cpu: bool) -> str:
    """``auto``: bf16 on GPUs that support it, fp16 on other GPUs, none on CPU."""
    if setting != "auto":
        return setting
    if cpu or not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
