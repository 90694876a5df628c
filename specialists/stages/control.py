"""``specialists train-control``: does specialising beat plain extra training? (``inference.control``)

A copy of the generalist is fine-tuned on all classes, with the ordinary (natural) data
stream, for as many steps — same batch size, optimiser and schedule — as all the
specialists together. ``evaluate`` combines it with the generalist by the same solver,
as one "specialist" covering every class (its dustbin is empty), which makes q the
average of the two distributions. The main process trains it.
"""

from __future__ import annotations

import argparse
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


def deciding(cfg: RunConfig, index: ShardIndex, gcard: ModelCard, steps: int) -> dict[str, Any]:
    return deciding_values(cfg, DECIDING, index=index, generalist=gcard.sha256, steps=steps, lr=control_lr(cfg))


def is_done(cfg: RunConfig, *, planned: bool = False) -> bool:
    paths = RunLayout(cfg.run_dir).control
    if not is_finished(paths):
        return False
    index = ShardIndex.load(cfg.data.shards)
    current = deciding(cfg, index, generalist_card(cfg, index), matched_steps(cfg, index, planned=planned))
    check_same(read_card(paths).deciding, current, what=paths.card, made="the control trained",
               redo="retrain it with `specialists train-control --force`")
    return True


def command(cfg: RunConfig, args: argparse.Namespace) -> int:
    if not args.force and is_done(cfg, planned=args.planned):
        log.info("control already trained: %s", RunLayout(cfg.run_dir).control.weights)
    else:
        run(cfg, force=args.force, planned=args.planned)
    print(RunLayout(cfg.run_dir).control.weights)
    return 0


def run(cfg: RunConfig, *, force: bool = False, planned: bool = False) -> Path:
    """Fine-tune a copy of the generalist for the specialists' total steps (main process only)."""
    accelerator = make_accelerator(cfg)
    paths = RunLayout(cfg.run_dir).control
    if accelerator.is_main_process:
        with tracked(accelerator, cfg, NAME):
            _train(cfg, accelerator, force=force, planned=planned)
    accelerator.wait_for_everyone()
    return paths.weights


def _train(cfg: RunConfig, accelerator, *, force: bool, planned: bool) -> None:
    scfg = cfg.specialists
    paths = RunLayout(cfg.run_dir).control
    index = open_shards(cfg)
    steps = matched_steps(cfg, index, planned=planned)
    model, gcard = load_generalist(cfg, index, accelerator.device)
    decided = deciding(cfg, index, gcard, steps)
    set_seed(cfg.seed + SEED_OFFSET)
    optimizer = build_optimizer(model, scfg.optimizer, control_lr(cfg), scfg.momentum, scfg.weight_decay)
    scheduler = warmup_cosine(optimizer, scfg.warmup_steps, steps)
    checkpoints = Checkpointer(paths.checkpoints, deciding={**decided, "precision": accelerator.mixed_precision})
    loop = TrainLoop(accelerator, model, optimizer, scheduler, checkpointer=checkpoints, ddp=False,
                     checkpoint_every=scfg.checkpoint_every, desc="control", track_every=cfg.tracking.every)
    loop.start(force=force)
    source = EpochSource(lambda e: train_batches(index, cfg.data, epoch=e, seed=cfg.seed + SEED_OFFSET))
    start = time.perf_counter()

    def loss_fn(model: torch.nn.Module, batch) -> tuple[torch.Tensor, int]:
        images, labels = batch
        logits = model(normalize(images.to(accelerator.device), cfg.data))
        return F.cross_entropy(logits, labels.to(accelerator.device)), len(labels)

    loop.fit(source, loss_fn, steps)
    card = build_card("control", arch=gcard.arch, arch_kwargs=gcard.arch_kwargs, num_outputs=gcard.num_outputs,
                      class_names=gcard.class_names, data_cfg=cfg.data, data=index.root, deciding=decided,
                      source_generalist=gcard.sha256,
                      training={"steps": steps, "lr": control_lr(cfg), "seconds": time.perf_counter() - start})
    save_model(paths, loop.unwrapped.eval(), card)
    checkpoints.clear()
    loop.close()
    log.info("control saved after %d steps: %s", steps, paths.weights)
