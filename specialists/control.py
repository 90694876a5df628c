"""The compute-matched control (``inference.control``): does specialising beat plain extra training?

A copy of the generalist is fine-tuned on all classes, with the ordinary (natural) data
stream, for as many steps — same batch size, optimiser and schedule — as all the
specialists together. ``evaluate`` combines it with the generalist by the same solver,
as one "specialist" covering every class (its dustbin is empty), which makes q the
average of the two distributions.
"""

from __future__ import annotations

import io
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed

from .checkpoints import load_model, read_sidecar, save_model
from .config import RunConfig
from .data import ShardIndex, normalize, train_batches
from .errors import UserError
from .generalist import check_shards, generalist_weights
from .io import atomic_write_bytes
from .progress import progress
from .training import build_optimizer, warmup_cosine

log = logging.getLogger(__name__)


def control_weights(cfg: RunConfig) -> Path:
    return Path(cfg.run_dir) / "control" / "model.safetensors"


class WithEmptyDustbin(torch.nn.Module):
    """A full classifier seen as a specialist over every class: C logits, then a dustbin that gets 0."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, ...) → (B, C + 1)
        logits = self.model(x)
        return torch.cat([logits, torch.full_like(logits[:, :1], -1e9)], dim=1)


def matched_steps(cfg: RunConfig) -> int:
    """Steps of all specialists together, from their sidecars."""
    from .cluster import clusters_path, load_clusters
    from .specialist_training import specialist_weights

    index = ShardIndex.load(cfg.data.shards)
    clusters = load_clusters(clusters_path(cfg.run_dir), index.class_names)
    total = 0
    for m in clusters.ids:
        path = specialist_weights(cfg, m)
        if not path.is_file():
            raise UserError(f"{path}: specialist {m} missing; run `specialists train-specialists` before the control")
        total += int(read_sidecar(path)["steps"])
    return total


def _batches_forever(index: ShardIndex, cfg: RunConfig, start_epoch: int):
    epoch = start_epoch
    while True:
        for images, labels in train_batches(index, cfg.data, epoch=epoch, seed=cfg.seed + 7919):
            yield epoch, images, labels
        epoch += 1


def train_control(cfg: RunConfig, *, force: bool = False) -> Path:
    """Fine-tune a copy of the generalist for the specialists' total steps (main process only)."""
    out = control_weights(cfg)
    accelerator = Accelerator(mixed_precision="no")
    if out.is_file() and not force:
        log.info("control already trained: %s", out)
        return out
    steps = matched_steps(cfg)
    if accelerator.is_main_process:
        _train(cfg, out, steps, accelerator.device)
    accelerator.wait_for_everyone()
    return out


def _train(cfg: RunConfig, out: Path, steps: int, device: torch.device) -> None:
    scfg = cfg.specialists
    index = check_shards(cfg)
    model, gmeta = load_model(generalist_weights(cfg), device=device)
    set_seed(cfg.seed + 7919)
    optimizer = build_optimizer(model, scfg.optimizer, scfg.lr, scfg.momentum, scfg.weight_decay)
    scheduler = warmup_cosine(optimizer, scfg.warmup_steps, steps)
    ckpt = out.parent / "checkpoint.pt"
    step, epoch = 0, 0
    if ckpt.is_file() and not ckpt.stat().st_size == 0:
        state = torch.load(ckpt, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, epoch = state["step"], state["epoch"]
        log.info("control: resumed at step %d", step)
    batches = _batches_forever(index, cfg, epoch)
    model.train()
    start = time.perf_counter()
    for step_index in progress(range(step, steps), desc="control", unit="step", initial=step, total=steps, leave=False):
        epoch, images, labels = next(batches)
        logits = model(normalize(images.to(device), cfg.data))
        loss = F.cross_entropy(logits, labels.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        step = step_index + 1
        if step % scfg.checkpoint_every == 0 and step < steps:
            buffer = io.BytesIO()
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "step": step, "epoch": epoch + 1}, buffer)
            atomic_write_bytes(ckpt, buffer.getvalue())
    meta = {key: gmeta[key] for key in ("arch", "arch_kwargs", "num_outputs", "num_classes", "class_names",
                                        "in_channels", "image_size", "mean", "std", "data")}
    meta.update(role="control", steps=steps, lr=scfg.lr, source_generalist=gmeta.get("sha256"),
                seconds=time.perf_counter() - start, config_hash=cfg.hash())
    save_model(out, model.eval(), meta)
    ckpt.unlink(missing_ok=True)
    log.info("control saved after %d steps: %s", steps, out)
