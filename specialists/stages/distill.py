"""``specialists distill``: one network trained on a teacher's soft targets (section 2; the paper's
open question whether the specialists' knowledge distils back into a single net).

The teacher (``distill.teacher``) is the ensemble — q of eq. 5, routed and solved by the engine,
only the active specialists run — or the generalist alone (classic knowledge distillation, the
born-again control), or none (hard labels only: the same student trained for the same steps
without a teacher, the control that separates the teacher's contribution from the extra
training). The teacher sees exactly the augmented view the student sees: it runs online, on
each training batch. The student is the generalist's architecture initialised from its weights
by default, or any registered architecture (``distill.arch`` / ``width`` / ``hidden``) from
scratch. It trains with DDP under ``accelerate launch`` (every process runs the teacher on its
share) and resumes from the one checkpoint scheme.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from ..artifacts.clusters import load_clusters
from ..artifacts.deciding import check_same
from ..artifacts.model_card import (
    ModelCard,
    build_card,
    is_finished,
    load_model,
    read_card,
    save_model,
)
from ..artifacts.shard_index import ShardIndex
from ..artifacts.teacher_cache import (
    CachedTargets,
    compress,
    read_targets,
    view_fingerprints,
    write_targets,
)
from ..config import RunConfig, config_to_yaml
from ..context import (
    TRAIN_DATA_KEYS,
    deciding_values,
    generalist_card,
    load_generalist,
    make_accelerator,
    open_shards,
)
from ..data.pipeline import eval_batches, normalize, train_batches
from ..ensemble import correction_choice, load_ensemble
from ..errors import DataError, UserError
from ..io import atomic_write_text
from ..layout import RunLayout
from ..models.registry import arch_options, create_model
from ..tracking import tracked
from ..train import Checkpointer, EpochSource, TrainLoop, build_optimizer, warmup_cosine
from ..train.epochs import EpochLog, count_steps, ranks_in_sync
from ..train.losses import distillation_loss

log = logging.getLogger(__name__)

NAME = "distill"
HELP = "a single student trained on the ensemble's (or the generalist's) soft targets (works under accelerate launch)"
DESCRIPTION = ("Train a student on the soft targets of distill.teacher (ensemble: q of eq. 5; generalist; none: hard "
               "labels only) with loss alpha·T²·KL(teacher ‖ student) + (1 − alpha)·CE. Writes "
               "<run_dir>/students/<name>/ (weights + model card, metrics.jsonl); evaluate reports every student.")
DECIDING = ("seed", *TRAIN_DATA_KEYS, "distill")
# the cached temperatures change the cache, not a student at one of them (its targets are the same)
NOT_DECIDING = ("distill.enabled", "distill.checkpoint_every", "distill.name", "distill.cache_temperatures")
SEED_OFFSET = 4099  # the student's data order and RNG differ from the generalist's


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="retrain even if finished")


def student_name(cfg: RunConfig) -> str:
    return cfg.distill.name or cfg.distill.teacher


def _teacher_identity(cfg: RunConfig, gcard: ModelCard) -> dict[str, Any]:
    """What the teacher's targets depend on: the generalist, and for the ensemble its specialists
    and the inference settings that route and solve."""
    teacher = cfg.distill.teacher
    if teacher == "none":
        return {}
    values: dict[str, Any] = {"generalist": gcard.sha256}
    if teacher == "ensemble":
        layout = RunLayout(cfg.run_dir)
        clusters = load_clusters(layout.clusters, gcard.class_names)
        values["specialists"] = [read_card(layout.specialist(m)).sha256 for m in clusters.ids]
        icfg = cfg.inference
        values.update({"inference.top_n": icfg.top_n, "inference.correction": correction_choice(cfg),
                       "inference.solver": icfg.solver, "inference.tol": icfg.tol, "inference.max_iter": icfg.max_iter})
    return values


def deciding(cfg: RunConfig, index: ShardIndex, gcard: ModelCard) -> dict[str, Any]:
    values = deciding_values(cfg, DECIDING, drop=NOT_DECIDING, index=index, **_teacher_identity(cfg, gcard))
    if cfg.distill.init == "generalist":
        values["init"] = gcard.sha256
    return values


def is_done(cfg: RunConfig) -> bool:
    paths = RunLayout(cfg.run_dir).student(student_name(cfg))
    if not is_finished(paths):
        return False
    index = ShardIndex.load(cfg.data.shards)
    check_same(read_card(paths).deciding, deciding(cfg, index, generalist_card(cfg, index)), what=paths.card,
               made="the student trained", redo="retrain it with `specialists distill --force`")
    return True


def command(cfg: RunConfig, args: argparse.Namespace) -> int:
    paths = RunLayout(cfg.run_dir).student(student_name(cfg))
    if not args.force and is_done(cfg):
        log.info("student %s already trained: %s", student_name(cfg), paths.weights)
    else:
        run(cfg, force=args.force)
    print(paths.weights)
    return 0


def _student(cfg: RunConfig, index: ShardIndex, gcard: ModelCard, device: torch.device) -> tuple[torch.nn.Module, str, dict]:
    """The student model, its architecture and options: the generalist's (with its weights) by default."""
    dcfg = cfg.distill
    arch = dcfg.arch or gcard.arch
    options = dict(gcard.arch_kwargs) if arch == gcard.arch else arch_options(arch, cfg.generalist)
    for key in ("width", "hidden"):
        if getattr(dcfg, key) is not None:
            options[key] = getattr(dcfg, key)
    if dcfg.init == "generalist":
        if arch != gcard.arch or options != gcard.arch_kwargs:
            raise UserError(f"distill.init=generalist needs the generalist's architecture ({gcard.arch} "
                            f"{gcard.arch_kwargs}), got {arch} {options}; use distill.init=scratch")
        model, _ = load_model(RunLayout(cfg.run_dir).generalist, device=device, card=gcard)
        return model.train(), arch, options
    model = create_model(arch, num_classes=index.num_classes, in_channels=cfg.data.channels,
                         image_size=cfg.data.image_size, **options)
    return model, arch, options


def run(cfg: RunConfig, *, force: bool = False) -> Path:
    """Train (or resume) the student; returns its weights' path."""
    accelerator = make_accelerator(cfg)
    with tracked(accelerator, cfg, NAME):
        return _train(cfg, accelerator, force=force)


def _train(cfg: RunConfig, accelerator: Accelerator, *, force: bool) -> Path:
    dcfg = cfg.distill
    name = student_name(cfg)
    paths = RunLayout(cfg.run_dir).student(name)
    index = open_shards(cfg)
    gcard = generalist_card(cfg, index)
    rank, world = accelerator.process_index, accelerator.num_processes
    decided = deciding(cfg, index, gcard)
    teacher = _teacher(cfg, index, accelerator.device)
    set_seed(cfg.seed + SEED_OFFSET)
    model, arch, options = _student(cfg, index, gcard, accelerator.device)
    lr = dcfg.lr * cfg.data.batch_size * world / 128
    optimizer = build_optimizer(model, dcfg.optimizer, lr, dcfg.momentum, dcfg.weight_decay)

    def epoch(e: int):
        return train_batches(index, cfg.data, epoch=e, seed=cfg.seed + SEED_OFFSET, rank=rank, world_size=world)

    if teacher is not None and dcfg.teacher_cache:
        teacher = _cached_teacher(cfg, decided, epoch, teacher, accelerator, index.num_classes)
    steps = count_steps(epoch, dcfg.epochs, 1, cfg.data.shards)
    scheduler = warmup_cosine(optimizer, round(dcfg.warmup_epochs * steps[0]), sum(steps))
    checkpoints = Checkpointer(paths.checkpoints, rank=rank, is_main=accelerator.is_main_process,
                               barrier=accelerator.wait_for_everyone,
                               deciding={**decided, "world_size": world, "precision": accelerator.mixed_precision})
    loop = TrainLoop(accelerator, model, optimizer, scheduler, checkpointer=checkpoints, ddp=True,
                     checkpoint_every=dcfg.checkpoint_every, channels_last=cfg.generalist.channels_last,
                     desc=f"student {name}", show_progress=accelerator.is_main_process)
    loop.start(force=force)
    if accelerator.is_main_process:
        atomic_write_text(paths.config, config_to_yaml(cfg))
        log.info("distilling %s (%s %s, init %s) from teacher %s: %d steps, alpha %.2f, T %.1f", name, arch, options,
                 dcfg.init, dcfg.teacher, sum(steps), dcfg.alpha, dcfg.temperature)

    def loss_fn(model: torch.nn.Module, batch) -> tuple[torch.Tensor, int, torch.Tensor]:
        images, labels, *cached = batch
        labels = labels.to(accelerator.device, non_blocking=True)
        x = loop.inputs(images, cfg.data)
        if cached:  # rebuilt from the cache, checked to be of this very view
            target = cached[0].to(accelerator.device)
        else:
            target = teacher(x) if teacher is not None else None  # the very view the student sees
        logits = model(x).float()
        loss = distillation_loss(logits, target, labels, alpha=dcfg.alpha, temperature=dcfg.temperature)
        return loss, len(labels), (logits.detach().argmax(1) == labels).sum()

    epoch_log = EpochLog(accelerator, eval_batches(index, cfg.data, "val", rank=rank, world_size=world), cfg.data,
                         paths.train_log, channels_last=cfg.generalist.channels_last, name=f"student {name} epoch")
    source = EpochSource(teacher.epoch if isinstance(teacher, CachedTeacher) else epoch, dcfg.epochs)
    loop.fit(source, loss_fn, sum(steps), on_epoch_end=epoch_log)
    in_sync = ranks_in_sync(accelerator, loop.unwrapped)
    if accelerator.is_main_process:
        card = build_card("student", arch=arch, arch_kwargs=options, num_outputs=index.num_classes,
                          class_names=index.class_names, data_cfg=cfg.data, data=index.root, deciding=decided,
                          source_generalist=gcard.sha256,
                          training={"name": name, "teacher": dcfg.teacher, "steps": loop.state.step, "lr": lr,
                                    "alpha": dcfg.alpha, "temperature": dcfg.temperature, "world_size": world,
                                    "ranks_in_sync": in_sync,
                                    "parameters": sum(p.numel() for p in loop.unwrapped.parameters()),
                                    "val_top1": loop.state.log["epochs"][-1]["val_top1"]})
        save_model(paths, loop.unwrapped, card)
        log.info("student %s saved: %s", name, paths.weights)
    accelerator.wait_for_everyone()
    loop.close()
    return paths.weights


def _teacher(cfg: RunConfig, index: ShardIndex, device: torch.device):
    """normalised images (B, …) → log of the teacher's distribution (B, C), or None without a teacher."""
    teacher = cfg.distill.teacher
    if teacher == "none":
        return None
    if teacher == "generalist":
        model, _ = load_generalist(cfg, index, device)

        @torch.no_grad()
        def generalist(x: torch.Tensor) -> torch.Tensor:
            return torch.log_softmax(model(x).float(), dim=1)

        return generalist
    engine = load_ensemble(cfg, device).engine
    # log q, floored as a distribution's zeros must be (a new tensor, out of inference mode, for the loss)
    return lambda x: engine.predict(x, return_q=True).q.clamp_min(1e-30).log()


class CachedTeacher:
    """The teacher's targets read from its cache, epoch by epoch, beside the training stream."""

    def __init__(self, cfg: RunConfig, key: str, make_epoch, rank: int, num_classes: int) -> None:
        self.cfg, self.key, self.make_epoch, self.rank, self.num_classes = cfg, key, make_epoch, rank, num_classes

    def path(self, e: int) -> Path:
        return RunLayout(self.cfg.run_dir).teacher_cache(self.key, e, self.rank)

    def epoch(self, e: int) -> _WithTargets:
        return _WithTargets(self.make_epoch(e), read_targets(self.path(e)), self.path(e), self.num_classes,
                            self.cfg.distill.temperature)


class _WithTargets:
    """An epoch's batches with the cached target of each view appended; a view that differs from the
    one the teacher saw stops training (the cache was made for another data stream)."""

    def __init__(self, batches, targets: CachedTargets, path: Path, num_classes: int, temperature: float) -> None:
        self.batches, self.targets, self.path = batches, targets, path
        self.num_classes, self.temperature = num_classes, temperature

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        start = 0
        for images, labels in self.batches:
            stop = start + len(labels)
            if not np.array_equal(view_fingerprints(images), self.targets.views[start:stop]):
                raise DataError(f"{self.path}: cached for other training views (images {start}..{stop - 1} differ); "
                                "delete the cache to rebuild it")
            yield images, labels, self.targets.log_targets(start, stop, self.num_classes, self.temperature)
            start = stop


def _cached_teacher(cfg: RunConfig, decided: dict[str, Any], make_epoch, teacher, accelerator,
                    num_classes: int) -> CachedTeacher:
    """Build the missing epochs of the teacher cache (each process its own views), then read from it.

    The cache is keyed by what its targets depend on — the teacher, the data and its order, the
    number of processes, k and the cached temperatures — not by the student: every student trained
    on these views at one of those temperatures shares it.
    """
    keep = {k: v for k, v in decided.items()
            if k != "init" and (not k.startswith("distill.") or k in ("distill.teacher", "distill.cache_top_k"))}
    keep["world_size"] = accelerator.num_processes
    temperatures = cfg.distill.cache_temperatures
    keep["distill.cache_temperatures"] = list(temperatures)
    key = hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]
    cache = CachedTeacher(cfg, key, make_epoch, accelerator.process_index, num_classes)
    k = cfg.distill.cache_top_k
    for e in range(cfg.distill.epochs):
        path = cache.path(e)
        if path.is_file():
            continue
        parts: list[tuple] = []
        with torch.no_grad():
            for images, _ in make_epoch(e):
                x = normalize(images.to(accelerator.device, non_blocking=True), cfg.data)
                parts.append((*compress(teacher(x), k, temperatures), view_fingerprints(images)))
        arrays = (np.concatenate(column) for column in zip(*parts, strict=True))
        write_targets(path, CachedTargets(*arrays, temperatures=np.asarray(temperatures, dtype=np.float32)))
        log.info("teacher cache: epoch %d of %d written (%s)", e + 1, cfg.distill.epochs, path)
    accelerator.wait_for_everyone()
    return cache
