"""``specialists train-generalist``: one CNN on all classes, with accelerate (section 5.2's generalist).

Outputs (:class:`~specialists.layout.RunLayout` ``.generalist``): the weights and card,
``metrics.jsonl`` (one line per epoch), ``config.yaml`` and ``checkpoints/``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed

from ..artifacts.deciding import check_same
from ..artifacts.model_card import build_card, is_finished, read_card, save_model
from ..artifacts.shard_index import ShardIndex
from ..config import RunConfig, config_to_yaml
from ..context import TRAIN_DATA_KEYS, deciding_values, make_accelerator, open_shards
from ..data.pipeline import eval_batches, train_batches
from ..io import atomic_write_text
from ..layout import RunLayout
from ..models.registry import arch_options, create_model
from ..tracking import tracked
from ..train import Checkpointer, EpochSource, TrainLoop, build_optimizer, warmup_cosine
from ..train.epochs import EpochLog, count_steps, ranks_in_sync

log = logging.getLogger(__name__)

NAME = "train-generalist"
HELP = "train the generalist (works under accelerate launch)"
DESCRIPTION = ("Train the generalist CNN on all classes. Run it as is on one process, or under `accelerate launch "
               "[--multi_gpu] --num_processes N` on many. Writes <run_dir>/generalist/model.safetensors + model.json, "
               "metrics.jsonl, checkpoints/.")
DECIDING = ("seed", *TRAIN_DATA_KEYS, "generalist")
NOT_DECIDING = ("generalist.checkpoint_every", "generalist.keep_checkpoints")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--force", action="store_true", help="start over even if a finished or unfinished run is there")


def deciding(cfg: RunConfig, index: ShardIndex) -> dict[str, Any]:
    return deciding_values(cfg, DECIDING, drop=NOT_DECIDING, index=index)


def is_done(cfg: RunConfig) -> bool:
    """The generalist is trained (or imported) and was made with this config's deciding values."""
    paths = RunLayout(cfg.run_dir).generalist
    if not is_finished(paths):
        return False
    card = read_card(paths)
    index = ShardIndex.load(cfg.data.shards)
    if card.training.get("imported_from"):
        current = {k: v for k, v in deciding(cfg, index).items() if k in (card.deciding or {})}
    else:
        current = deciding(cfg, index)
    check_same(card.deciding, current, what=paths.card, made="trained", redo="pass --force to retrain it")
    return True


def command(cfg: RunConfig, args: argparse.Namespace) -> int:
    if not args.force and is_done(cfg):
        log.info("generalist already trained: %s (use --force to retrain)", RunLayout(cfg.run_dir).generalist.weights)
    else:
        run(cfg, resume=args.resume, force=args.force)
    print(RunLayout(cfg.run_dir).generalist.weights)
    return 0


def run(cfg: RunConfig, *, resume: bool = True, force: bool = False) -> Path:
    """Train (or resume) the generalist; returns the final weights' path."""
    index = open_shards(cfg)
    accelerator = make_accelerator(cfg, grad_accum_steps=cfg.generalist.grad_accum_steps)
    with tracked(accelerator, cfg, NAME):
        return _train(cfg, index, accelerator, resume=resume, force=force)


def _train(cfg: RunConfig, index: ShardIndex, accelerator: Accelerator, *, resume: bool, force: bool) -> Path:
    gcfg = cfg.generalist
    paths = RunLayout(cfg.run_dir).generalist
    rank, world = accelerator.process_index, accelerator.num_processes
    set_seed(cfg.seed)
    arch_kwargs = arch_options(gcfg.arch, gcfg)
    model = create_model(gcfg.arch, num_classes=index.num_classes, in_channels=cfg.data.channels,
                         image_size=cfg.data.image_size, **arch_kwargs)
    # Base lr is for a global batch of 128; scale linearly with the real global batch.
    lr = gcfg.lr * cfg.data.batch_size * world * gcfg.grad_accum_steps / 128
    optimizer = build_optimizer(model, gcfg.optimizer, lr, gcfg.momentum, gcfg.weight_decay)

    def epoch(e: int):
        return train_batches(index, cfg.data, epoch=e, seed=cfg.seed, rank=rank, world_size=world,
                             multiple_of=gcfg.grad_accum_steps)

    steps = count_steps(epoch, gcfg.epochs, gcfg.grad_accum_steps, cfg.data.shards)
    scheduler = warmup_cosine(optimizer, round(gcfg.warmup_epochs * steps[0]), sum(steps))
    checkpoints = Checkpointer(paths.checkpoints, keep=gcfg.keep_checkpoints, rank=rank,
                               is_main=accelerator.is_main_process, barrier=accelerator.wait_for_everyone,
                               deciding={**deciding(cfg, index), "world_size": world,
                                         "precision": accelerator.mixed_precision})
    loop = TrainLoop(accelerator, model, optimizer, scheduler, checkpointer=checkpoints, ddp=True,
                     checkpoint_every=gcfg.checkpoint_every, channels_last=gcfg.channels_last, desc="generalist",
                     show_progress=accelerator.is_main_process, track_every=cfg.tracking.every)
    loop.start(resume=resume, force=force)
    if accelerator.is_main_process:
        atomic_write_text(paths.config, config_to_yaml(cfg))
        log.info("training %s on %d classes: %d processes × batch %d × accumulation %d, %d steps/epoch, lr %.4g, "
                 "mixed precision %s", gcfg.arch, index.num_classes, world, cfg.data.batch_size,
                 gcfg.grad_accum_steps, steps[0], lr, accelerator.mixed_precision)

    def loss_fn(model: torch.nn.Module, batch) -> tuple[torch.Tensor, int]:
        images, labels = batch
        logits = model(loop.inputs(images, cfg.data))
        labels = labels.to(accelerator.device, non_blocking=True)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=gcfg.label_smoothing)
        return loss, len(labels), (logits.detach().argmax(1) == labels).sum()

    epoch_log = EpochLog(accelerator, eval_batches(index, cfg.data, "val", rank=rank, world_size=world), cfg.data,
                         paths.train_log, channels_last=gcfg.channels_last, track_as="generalist")
    loop.fit(EpochSource(epoch, gcfg.epochs), loss_fn, sum(steps), on_epoch_end=epoch_log)
    in_sync = ranks_in_sync(accelerator, loop.unwrapped)
    if accelerator.is_main_process:
        card = build_card("generalist", arch=gcfg.arch, arch_kwargs=arch_kwargs, num_outputs=index.num_classes,
                          class_names=index.class_names, data_cfg=cfg.data, data=index.root,
                          deciding=deciding(cfg, index),
                          training={"steps": loop.state.step, "world_size": world, "ranks_in_sync": in_sync,
                                    "precision": accelerator.mixed_precision, "lr": lr,
                                    "val_top1": loop.state.log["epochs"][-1]["val_top1"]})
        save_model(paths, loop.unwrapped, card)
        log.info("generalist saved: %s", paths.weights)
    accelerator.wait_for_everyone()
    loop.close()
    return paths.weights
