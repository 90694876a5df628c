"""What an epoch-based training stage (the generalist, a distilled student) shares beside the loop:
counting its optimiser steps, and the end-of-epoch validation written to ``metrics.jsonl``."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sized
from pathlib import Path

import torch
from accelerate import Accelerator

from ..config import DataConfig
from ..data.pipeline import Batches
from ..errors import DataError
from ..tracking import log_values
from .evaluate import evaluate
from .log import write_jsonl
from .loop import TrainLoop

log = logging.getLogger(__name__)


def count_steps(make_epoch: Callable[[int], Sized], num_epochs: int, grad_accum_steps: int, where: str) -> list[int]:
    """Optimiser steps of every epoch (from the index, so they are known before training; they can
    differ by one between epochs — the shard order decides which worker holds the short shard)."""
    steps = [len(make_epoch(e)) // grad_accum_steps for e in range(num_epochs)]
    if min(steps) < 1:
        raise DataError(f"{where}: fewer batches per epoch per process than the {grad_accum_steps} "
                        "of one gradient-accumulation group")
    return steps


class EpochLog:
    """The ``on_epoch_end`` hook: validate (exact over processes), keep the record in the loop's
    state (so a resumed run logs each epoch once), rewrite ``metrics.jsonl`` from it and log the
    record to the experiment trackers as ``<track_as>/epoch/<key>`` at the optimiser step."""

    def __init__(self, accelerator: Accelerator, val: Batches, data_cfg: DataConfig, path: Path, *,
                 channels_last: bool = False, name: str = "epoch", track_as: str | None = None) -> None:
        self.accelerator, self.val, self.data_cfg, self.path = accelerator, val, data_cfg, path
        self.channels_last, self.name, self.track_as = channels_last, name, track_as or name
        self.start, self.samples_at_start = time.perf_counter(), None

    def __call__(self, loop: TrainLoop) -> None:
        st, acc = loop.state, self.accelerator
        if self.samples_at_start is None:  # the first epoch of this process: resumed ones started mid-way
            self.samples_at_start = st.log.get("resumed_samples", 0)
        seconds = time.perf_counter() - self.start
        figures = evaluate(loop.model, self.val, acc, self.data_cfg, channels_last=self.channels_last)
        record = {"epoch": st.epoch + 1, "step": st.step, "train_loss": st.epoch_loss / max(st.epoch_samples, 1),
                  "train_top1": st.epoch_correct / max(st.epoch_samples, 1),
                  "images_per_s": (st.epoch_samples - self.samples_at_start) * acc.num_processes / max(seconds, 1e-9),
                  "val_top1": figures["top1"], "val_top5": figures["top5"], "val_loss": figures["loss"],
                  "val_n": figures["n"], "lr": loop.scheduler.get_last_lr()[0], "epoch_seconds": seconds}
        st.log.setdefault("epochs", []).append(record)
        if acc.is_main_process:
            write_jsonl(self.path, st.log["epochs"])
            log_values(acc, {f"{self.track_as}/epoch/{k}": v for k, v in record.items()
                             if k not in ("epoch", "step")}, step=st.step)
            log.info("%s %d: train loss %.4f, top-1 %.4f (augmented, this process); val top-1 %.4f, top-5 %.4f "
                     "(%.0f images/s)", self.name, record["epoch"], record["train_loss"], record["train_top1"],
                     record["val_top1"], record["val_top5"], record["images_per_s"])
        self.start, self.samples_at_start = time.perf_counter(), 0


def ranks_in_sync(accelerator: Accelerator, model: torch.nn.Module) -> bool:
    """Whether every process holds exactly the same weights (a checksum compared across ranks)."""
    checksum = torch.stack([p.detach().double().sum() * (i + 1) for i, p in enumerate(model.state_dict().values())
                            if p.is_floating_point()]).sum().reshape(1).to(accelerator.device)
    sums = accelerator.gather(checksum)
    same = bool((sums == sums[0]).all())
    if not same:
        log.warning("weights differ across processes after training: %s", sums.tolist())
    return same

