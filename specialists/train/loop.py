"""The one training loop (accelerate), shared by the generalist, the specialists, the control and
the distilled student.

A stage builds its model, optimiser and schedule, says where its batches come from (a
:class:`EpochSource` of sized epochs or a :class:`StreamSource` that never ends) and what the
loss of a batch is; :meth:`TrainLoop.fit` does the rest: ``accumulate``, ``autocast``,
``backward``, the schedule, checkpoints every ``checkpoint_every`` optimiser steps and at every
epoch end, and callbacks for evaluation. A resumed run replays the data from the start of the
checkpoint's epoch and skips what was consumed; with the RNG state restored, it ends with the
same weights as an uninterrupted run.

``ddp=True`` (generalist, student): the model is wrapped by ``accelerator.prepare`` and every
process trains it on its share of the data. ``ddp=False`` (a specialist, the control): this
process trains the model alone, even when other processes train other models.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
from accelerate import Accelerator

from ..config import DataConfig
from ..data.pipeline import normalize
from ..errors import DataError, UserError
from ..progress import progress_bar
from ..tracking import log_values
from .checkpoint import Checkpointer, restore_rng

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Where training is; saved *inside* every checkpoint (never parsed from a folder name)."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch
    batch_in_epoch: int = 0  # batches of the current epoch already consumed
    epoch_loss: float = 0.0  # summed over this epoch's samples so far (this process)
    epoch_samples: int = 0
    epoch_correct: int = 0  # top-1 hits on the (augmented) training batches, when the loss reports them
    log: dict[str, Any] = field(default_factory=dict)  # a stage's own JSON values (history, best score…)


class BatchSource(Protocol):
    def iterate(self, epoch: int, skip: int) -> Iterator[tuple[int, int, bool, Any]]:
        """(epoch, index in epoch, last of its epoch, batch) from ``epoch``, its first ``skip`` batches skipped."""


class EpochSource:
    """Epochs of ``make_epoch(e)`` (a sized iterable of batches), ``num_epochs`` of them or without end."""

    def __init__(self, make_epoch: Callable[[int], Iterable], num_epochs: int | None = None) -> None:
        self.make_epoch = make_epoch
        self.num_epochs = num_epochs

    def iterate(self, epoch: int, skip: int) -> Iterator[tuple[int, int, bool, Any]]:
        e = epoch
        while self.num_epochs is None or e < self.num_epochs:
            batches = self.make_epoch(e)
            n = len(batches)
            if n == 0:
                raise DataError(f"epoch {e} has no batches")
            for i, batch in enumerate(batches):
                if e == epoch and i < skip:
                    continue  # resumed mid-epoch: the data order is reproducible, so skip what was done
                yield e, i, i == n - 1, batch
            e += 1


class StreamSource:
    """One endless stream of batches (epoch 0), e.g. a specialist's enriched batches."""

    def __init__(self, make_stream: Callable[[], Iterable]) -> None:
        self.make_stream = make_stream

    def iterate(self, epoch: int, skip: int) -> Iterator[tuple[int, int, bool, Any]]:
        for i, batch in enumerate(self.make_stream()):
            if i < skip:
                continue
            yield 0, i, False, batch


# (model, batch) → (loss, samples) or (loss, samples, correct): correct = top-1 hits, for the running accuracy
LossFn = Callable[[torch.nn.Module, Any], tuple]
Hook = Callable[["TrainLoop"], None]


class TrainLoop:
    def __init__(self, accelerator: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, *, checkpointer: Checkpointer, ddp: bool,
                 checkpoint_every: int = 0, channels_last: bool = False, desc: str = "train",
                 show_progress: bool = True, track_as: str | None = None, track_every: int = 50) -> None:
        self.accelerator = accelerator
        self.ddp = ddp
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        if ddp:
            self.model, self.optimizer = accelerator.prepare(model, optimizer)
        else:
            self.model = model.to(accelerator.device)
            self.optimizer = accelerator.prepare_optimizer(optimizer)
        self.scheduler = scheduler
        self.checkpointer = checkpointer
        self.checkpoint_every = checkpoint_every
        self.channels_last = channels_last
        self.desc = desc
        self.show_progress = show_progress
        self.track = StepTracker(accelerator, track_as or desc.replace(" ", "-"), track_every)
        self.state = TrainState()
        self.extra_weights: dict[str, dict[str, torch.Tensor]] = {}  # e.g. a specialist's best state

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def inputs(self, images: torch.Tensor, data_cfg: DataConfig) -> torch.Tensor:
        """uint8 images → the model's normalised float input on this loop's device."""
        x = normalize(images.to(self.accelerator.device, non_blocking=True), data_cfg)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.ndim == 4 else x

    # -------------------------------------------------------------- checkpoints
    def start(self, *, resume: bool = True, force: bool = False) -> None:
        """Start over (``force``: its checkpoints removed) or continue from the newest checkpoint;
        with ``resume=False`` an unfinished run is an error that says how to go on."""
        if force:
            self.checkpointer.clear()
        elif self.checkpointer.complete():
            if not resume:
                raise UserError(f"{self.checkpointer.root}: an unfinished run is here; pass --resume to continue it "
                                "or --force to start over")
            self.resume()

    def resume(self) -> bool:
        """Load the newest checkpoint (an error if its deciding values differ); False if there is none."""
        loaded = self.checkpointer.load(self.accelerator.device)
        if loaded is None:
            return False
        self.unwrapped.load_state_dict(loaded.weights)
        self.optimizer.load_state_dict(loaded.optimizer["optimizer"])
        self.scheduler.load_state_dict(loaded.optimizer["scheduler"])
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and loaded.optimizer.get("scaler") is not None:
            scaler.load_state_dict(loaded.optimizer["scaler"])
        self.state = TrainState(**loaded.state)
        self.state.log["resumed_samples"] = self.state.epoch_samples
        self.extra_weights = loaded.extra
        restore_rng(loaded.rng)
        log.info("%s: resumed from %s at step %d (epoch %d, batch %d)", self.desc, loaded.path.name, self.state.step,
                 self.state.epoch + 1, self.state.batch_in_epoch)
        return True

    def save_checkpoint(self) -> None:
        scaler = getattr(self.accelerator, "scaler", None)
        self.checkpointer.save(
            self.state.step, weights=self.unwrapped.state_dict(), state=asdict(self.state), extra=self.extra_weights,
            optimizer={"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                       "scaler": scaler.state_dict() if scaler is not None else None})

    # --------------------------------------------------------------------- loop
    def fit(self, source: BatchSource, loss_fn: LossFn, total_steps: int, *, on_step: Hook | None = None,
            on_epoch_end: Hook | None = None) -> TrainState:
        """Train until ``total_steps`` optimiser steps (or the source's last epoch) are done."""
        acc, st = self.accelerator, self.state
        if st.step >= total_steps:
            return st
        bar = progress_bar(total_steps, initial=st.step, main_process=self.show_progress, desc=self.desc,
                           unit="step", leave=False)
        loss_sum = torch.tensor(st.epoch_loss, dtype=torch.float64, device=acc.device)  # no sync per step
        correct_sum = torch.tensor(st.epoch_correct, dtype=torch.int64, device=acc.device)

        def sync_loss() -> None:
            st.epoch_loss, st.epoch_correct = float(loss_sum), int(correct_sum)

        images_per_sample = acc.num_processes if self.ddp else 1  # every process trains on as many
        step_samples = 0
        self.model.train()
        for epoch, i, last, batch in source.iterate(st.epoch, st.batch_in_epoch):
            with acc.accumulate(self.model):
                with acc.autocast():
                    loss, samples, *correct = loss_fn(self.model, batch)
                acc.backward(loss)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            st.epoch, st.batch_in_epoch = epoch, i + 1
            loss_sum += loss.detach().double() * samples
            if correct:
                correct_sum += correct[0]
            st.epoch_samples += samples
            step_samples += samples
            self.track.add(loss, samples)
            stepped = acc.sync_gradients
            if stepped:
                self.scheduler.step()
                st.step += 1
                bar.update(1, images=step_samples * images_per_sample)
                self.track.stepped(st.step, self.scheduler.get_last_lr()[0], step_samples * images_per_sample)
                step_samples = 0
                if on_step is not None:
                    sync_loss()
                    on_step(self)
                    self.model.train()
            if last:
                sync_loss()
                if on_epoch_end is not None:
                    on_epoch_end(self)
                    self.model.train()
                st.epoch, st.batch_in_epoch, st.epoch_loss, st.epoch_samples, st.epoch_correct = epoch + 1, 0, 0.0, 0, 0
                loss_sum.zero_()
                correct_sum.zero_()
                self.save_checkpoint()
            elif stepped and self.checkpoint_every and st.step % self.checkpoint_every == 0 and st.step < total_steps:
                sync_loss()
                self.save_checkpoint()
            if st.step >= total_steps:
                break
        sync_loss()
        bar.close()
        return st

    def close(self) -> None:
        """Drop accelerate's references to this loop's model and optimiser (many specialists, one process)."""
        self.accelerator.free_memory()


class StepTracker:
    """Training points for the experiment trackers: every ``every`` optimiser steps, the mean loss of
    the steps since the last point (this process), the learning rate and the images per second.

    Does nothing (no device sync either) when the accelerator has no tracker running.
    """

    def __init__(self, accelerator: Accelerator, name: str, every: int) -> None:
        self.accelerator, self.name, self.every = accelerator, name, max(1, every)
        self.loss = torch.zeros((), dtype=torch.float64, device=accelerator.device)
        self.samples = self.images = 0
        self.start = time.perf_counter()

    @property
    def active(self) -> bool:
        return bool(self.accelerator.trackers)

    def add(self, loss: torch.Tensor, samples: int) -> None:
        if self.active:
            self.loss += loss.detach().double() * samples
            self.samples += samples

    def stepped(self, step: int, lr: float, images: int) -> None:
        if not self.active:
            return
        self.images += images
        if step % self.every:
            return
        seconds = max(time.perf_counter() - self.start, 1e-9)
        log_values(self.accelerator, {f"{self.name}/train/loss": float(self.loss) / max(self.samples, 1),
                                      f"{self.name}/train/lr": lr,
                                      f"{self.name}/train/images_per_s": self.images / seconds}, step=step)
        self.loss.zero_()
        self.samples = self.images = 0
        self.start = time.perf_counter()
