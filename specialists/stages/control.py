"""``specialists train-control``: does specialising beat plain extra training? (``inference.control``)

A copy of the generalist is fine-tuned on all classes, with the ordinary (natural) data
stream, for as many steps — same batch size, optimiser and schedule — as all the
specialists together. ``evaluate`` combines it with the generalist by the same solver,
as one "specialist" covering every class (its dustbin is empty), which makes q the
average of the two distributions.

``control.copies`` = K > 1 makes the rival a plain ensemble: K copies, each with its own
seed (data order, augmentation), the total steps split among them (steps / K each), in
``control-x<K>/<k>/``. Process r trains the copies with k mod P = r, each alone.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed

from ..artifacts.clusters import load_clusters
from ..artifacts.deciding import check_same
from ..artifacts.model_card import ModelCard, build_card, is_finished, read_card, save_model
from ..artifacts.shard_index import ShardIndex
from ..config import RunConfig
from ..context import (
    TRAIN_DATA_KEYS,
    deciding_values,
    generalist_card,
    load_generalist,
    make_accelerator,
    open_shards,
)
from ..data.pipeline import normalize, train_batches
from ..errors import UserError
from ..layout import RunLayout
from ..tracking import tracked
from ..train import Checkpointer, EpochSource, TrainLoop, build_optimizer, warmup_cosine

log = logging.getLogger(__name__)

NAME = "train-control"
HELP = "the compute-matched control: the generalist fine-tuned on all classes"
DESCRIPTION = ("Fine-tune a copy of the generalist on all classes for as many steps as all the specialists "
               "together; evaluate combines it with the generalist like a specialist.")
DECIDING = ("seed", *TRAIN_DATA_KEYS, "specialists.optimizer", "specialists.momentum",
            "specialists.weight_decay", "specialists.warmup_steps")
SEED_OFFSET = 7919  # the control's data order and initial RNG differ from the generalist's
COPY_SEED_STRIDE = 104729  # copy k of a plain ensemble: seed + SEED_OFFSET + k · stride (copy 0: the one-copy control's)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="retrain even if finished")
    p.add_argument("--planned", action="store_true",
                   help="count specialists not yet trained at the configured specialists.steps, so the control can "
                        "train beside them (a later run checks the count against their cards)")


def matched_steps(cfg: RunConfig, index: ShardIndex, *, planned: bool = False) -> int:
    """Steps of all specialists together, from their cards; with ``planned``, a specialist not yet
    trained counts as the configured ``specialists.steps``."""
    layout = RunLayout(cfg.run_dir)
    clusters = load_clusters(layout.clusters, index.class_names)
    total = 0
    for m in clusters.ids:
        paths = layout.specialist(m)
        if not is_finished(paths):
            if planned:
                total += cfg.specialists.steps
                continue
            raise UserError(f"{paths.weights}: specialist {m} missing; run `specialists train-specialists` "
                            "before the control")
        total += int(read_card(paths).training["steps"])
    return total


def control_lr(cfg: RunConfig) -> float:
    return cfg.control.lr if cfg.control.lr is not None else cfg.specialists.lr


def copy_steps(total: int, copies: int) -> list[int]:
    """The total steps split over K copies: total // K each, the first total % K one more."""
    return [total // copies + (k < total % copies) for k in range(copies)]


def copy_seed(cfg: RunConfig, k: int) -> int:
    """Copy k's seed (its data order and augmentation); copy 0's is the one-copy control's."""
    return cfg.seed + SEED_OFFSET + COPY_SEED_STRIDE * k


def deciding(cfg: RunConfig, index: ShardIndex, gcard: ModelCard, steps: int, *, copy: int = 0) -> dict[str, Any]:
    """What decides one copy: ``steps`` are its own; a plain ensemble's copies also record K and k."""
    values = deciding_values(cfg, DECIDING, index=index, generalist=gcard.sha256, steps=steps, lr=control_lr(cfg))
    if cfg.control.copies > 1:
        values.update(copies=cfg.control.copies, copy=copy)
    return values


def is_done(cfg: RunConfig, *, planned: bool = False) -> bool:
    copies = RunLayout(cfg.run_dir).control_copies(cfg.control.copies)
    if not all(is_finished(paths) for paths in copies):
        return False
    for k in range(len(copies)):
        _check_copy(cfg, k, planned=planned)
    return True


def command(cfg: RunConfig, args: argparse.Namespace) -> int:
    copies = RunLayout(cfg.run_dir).control_copies(cfg.control.copies)
    if not args.force and is_done(cfg, planned=args.planned):
        log.info("control already trained: %s", ", ".join(str(p.weights) for p in copies))
    else:
        run(cfg, force=args.force, planned=args.planned)
    for paths in copies:
        print(paths.weights)
    return 0


def run(cfg: RunConfig, *, force: bool = False, planned: bool = False) -> list[Path]:
    """Fine-tune ``control.copies`` copies of the generalist for the specialists' total steps
    (process r: the copies with k mod P = r)."""
    accelerator = make_accelerator(cfg)
    copies = RunLayout(cfg.run_dir).control_copies(cfg.control.copies)
    mine = [k for k in range(len(copies)) if k % accelerator.num_processes == accelerator.process_index]
    if mine:
        with tracked(accelerator, cfg, NAME) if accelerator.is_main_process else contextlib.nullcontext():
            for k in mine:
                if force or not is_finished(copies[k]):
                    _train(cfg, accelerator, k, force=force, planned=planned)
                else:
                    _check_copy(cfg, k, planned=planned)
    accelerator.wait_for_everyone()
    return [paths.weights for paths in copies]


def _check_copy(cfg: RunConfig, k: int, *, planned: bool) -> None:
    """A finished copy k must have been made with the current deciding values (else a one-line stale error)."""
    paths = RunLayout(cfg.run_dir).control_copies(cfg.control.copies)[k]
    index = ShardIndex.load(cfg.data.shards)
    steps = copy_steps(matched_steps(cfg, index, planned=planned), cfg.control.copies)[k]
    check_same(read_card(paths).deciding, deciding(cfg, index, generalist_card(cfg, index), steps, copy=k),
               what=paths.card, made="the control trained", redo="retrain it with `specialists train-control --force`")
    log.info("control copy %d already trained: %s", k, paths.weights)


def _train(cfg: RunConfig, accelerator, k: int, *, force: bool, planned: bool) -> None:
    scfg = cfg.specialists
    copies = cfg.control.copies
    paths = RunLayout(cfg.run_dir).control_copies(copies)[k]
    index = open_shards(cfg)
    steps = copy_steps(matched_steps(cfg, index, planned=planned), copies)[k]
    model, gcard = load_generalist(cfg, index, accelerator.device)
    decided = deciding(cfg, index, gcard, steps, copy=k)
    seed = copy_seed(cfg, k)
    set_seed(seed)
    optimizer = build_optimizer(model, scfg.optimizer, control_lr(cfg), scfg.momentum, scfg.weight_decay)
    scheduler = warmup_cosine(optimizer, scfg.warmup_steps, steps)
    checkpoints = Checkpointer(paths.checkpoints, deciding={**decided, "precision": accelerator.mixed_precision})
    desc = "control" if copies == 1 else f"control copy {k + 1}/{copies}"
    loop = TrainLoop(accelerator, model, optimizer, scheduler, checkpointer=checkpoints, ddp=False,
                     checkpoint_every=scfg.checkpoint_every, desc=desc, track_every=cfg.tracking.every)
    loop.start(force=force)
    source = EpochSource(lambda e: train_batches(index, cfg.data, epoch=e, seed=seed))
    start = time.perf_counter()

    def loss_fn(model: torch.nn.Module, batch) -> tuple[torch.Tensor, int]:
        images, labels = batch
        logits = model(normalize(images.to(accelerator.device), cfg.data))
        return F.cross_entropy(logits, labels.to(accelerator.device)), len(labels)

    loop.fit(source, loss_fn, steps)
    training = {"steps": steps, "lr": control_lr(cfg), "seconds": time.perf_counter() - start}
    if copies > 1:
        training.update(copy=k, copies=copies, seed=seed)
    card = build_card("control", arch=gcard.arch, arch_kwargs=gcard.arch_kwargs, num_outputs=gcard.num_outputs,
                      class_names=gcard.class_names, data_cfg=cfg.data, data=index.root, deciding=decided,
                      source_generalist=gcard.sha256, training=training)
    save_model(paths, loop.unwrapped.eval(), card)
    checkpoints.clear()
    loop.close()
    log.info("%s saved after %d steps: %s", desc, steps, paths.weights)
