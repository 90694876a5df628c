"""``specialists train-generalist``: one CNN on all classes, with accelerate (section 5.2's generalist).

Outputs in ``<run_dir>/generalist/``: ``model.safetensors`` + ``model.json`` (the
final weights), ``metrics.jsonl`` (one line per epoch), ``checkpoints/``.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed

from .checkpoints import save_model
from .config import RunConfig, config_to_yaml
from .data import ShardIndex, eval_batches, normalize, train_batches
from .errors import DataError, UserError
from .io import atomic_write_text
from .models import create_model
from .progress import progress
from .training import (
    CheckpointManager,
    TrainState,
    append_jsonl,
    build_optimizer,
    evaluate,
    resolve_mixed_precision,
    warmup_cosine,
)

log = logging.getLogger(__name__)


def generalist_dir(cfg: RunConfig) -> Path:
    return Path(cfg.run_dir) / "generalist"


def generalist_weights(cfg: RunConfig) -> Path:
    return generalist_dir(cfg) / "model.safetensors"


def fingerprint(cfg: RunConfig) -> str:
    """What makes two generalist runs the same run: seed, data and generalist sections."""
    import hashlib
    import json

    keys = {"seed": cfg.seed, "data": cfg.to_dict()["data"], "generalist": cfg.to_dict()["generalist"]}
    for plumbing in ("num_workers", "eval_batch_size", "source"):  # where data comes from, not what is learnt
        keys["data"].pop(plumbing)
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


def model_meta(cfg: RunConfig, index: ShardIndex, *, arch: str, arch_kwargs: dict, role: str) -> dict:
    return {
        "role": role,
        "arch": arch,
        "arch_kwargs": arch_kwargs,
        "num_outputs": index.num_classes,
        "num_classes": index.num_classes,
        "class_names": index.class_names,
        "in_channels": cfg.data.channels,
        "image_size": cfg.data.image_size,
        "mean": list(cfg.data.mean),
        "std": list(cfg.data.std),
        "data": str(index.root),
        "config_hash": cfg.hash(),
    }


def check_shards(cfg: RunConfig) -> ShardIndex:
    index = ShardIndex.load(cfg.data.shards)
    index.check_exists()
    image = index.meta.get("image")
    if image and image.get("channels") not in (None, cfg.data.channels) and cfg.data.channels != 3:
        raise DataError(f"{cfg.data.shards}: images have {image['channels']} channels, config data.channels={cfg.data.channels}")
    return index


def train_one_epoch(model, optimizer, scheduler, batches, accelerator: Accelerator, cfg: RunConfig,
                    state: TrainState, ckpt: CheckpointManager) -> dict[str, float]:
    """One epoch from ``state.batch_in_epoch`` on; checkpoints every ``checkpoint_every`` steps."""
    gcfg = cfg.generalist
    model.train()
    skip = state.batch_in_epoch
    loss_sum, seen, start = torch.zeros((), device=accelerator.device), 0, time.perf_counter()
    bar = progress(batches, main_process=accelerator.is_main_process, total=len(batches),
                   desc=f"epoch {state.epoch + 1}/{gcfg.epochs}", unit="batch", leave=False)
    for i, (images, labels) in enumerate(bar):
        if i < skip:
            continue  # resumed mid-epoch: the data order is reproducible, so skip what was done
        images = normalize(images.to(accelerator.device, non_blocking=True), cfg.data)
        if gcfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = labels.to(accelerator.device, non_blocking=True)
        with accelerator.accumulate(model):
            with accelerator.autocast():
                logits = model(images)
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=gcfg.label_smoothing)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.detach() * len(labels)
        seen += len(labels)
        state.batch_in_epoch = i + 1
        if accelerator.sync_gradients:
            scheduler.step()
            state.step += 1
            if gcfg.checkpoint_every and state.step % gcfg.checkpoint_every == 0 and state.batch_in_epoch < len(batches):
                ckpt.save(state.step)
    elapsed = time.perf_counter() - start
    return {"train_loss": (loss_sum / max(seen, 1)).item(), "images_per_s": seen * accelerator.num_processes / max(elapsed, 1e-9)}


def train_generalist(cfg: RunConfig, *, resume: bool = False, force: bool = False) -> Path:
    """Train (or resume) the generalist; returns the final weights' path. A finished run is skipped."""
    out = generalist_dir(cfg)
    weights = generalist_weights(cfg)
    if weights.is_file() and not force:
        log.info("generalist already trained: %s (use --force to retrain)", weights)
        return weights
    gcfg = cfg.generalist
    index = check_shards(cfg)
    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(gcfg.mixed_precision, cpu=not torch.cuda.is_available()),
        gradient_accumulation_steps=gcfg.grad_accum_steps,
    )
    rank, world = accelerator.process_index, accelerator.num_processes
    set_seed(cfg.seed)
    arch_kwargs = {
        "compact_cnn": {"width": gcfg.width, "dropout": gcfg.dropout},
        "glyph_cnn": {"width": gcfg.width, "hidden": gcfg.hidden, "dropout": gcfg.dropout},
    }.get(gcfg.arch, {})
    model = create_model(gcfg.arch, num_classes=index.num_classes, in_channels=cfg.data.channels,
                         image_size=cfg.data.image_size, **arch_kwargs)
    if gcfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # Base lr is for a global batch of 128; scale linearly with the real global batch.
    global_batch = cfg.data.batch_size * world * gcfg.grad_accum_steps
    lr = gcfg.lr * global_batch / 128
    optimizer = build_optimizer(model, gcfg.optimizer, lr, gcfg.momentum, gcfg.weight_decay)
    # Steps per epoch come from the index; they can differ by one between epochs (the shard
    # order decides which worker holds the short shard), so the schedule counts every epoch.
    steps = [len(train_batches(index, cfg.data, epoch=e, seed=cfg.seed, rank=rank, world_size=world,
                               multiple_of=gcfg.grad_accum_steps)) // gcfg.grad_accum_steps for e in range(gcfg.epochs)]
    steps_per_epoch, total_steps = steps[0], sum(steps)
    if min(steps) < 1:
        raise DataError(f"{cfg.data.shards}: fewer batches per epoch per process than "
                        f"generalist.grad_accum_steps={gcfg.grad_accum_steps}")
    scheduler = warmup_cosine(optimizer, round(gcfg.warmup_epochs * steps_per_epoch), total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    state = TrainState()
    accelerator.register_for_checkpointing(scheduler, state)
    ckpt = CheckpointManager(accelerator, out / "checkpoints", keep=gcfg.keep_checkpoints, fingerprint=fingerprint(cfg))
    if force:
        if accelerator.is_main_process:
            shutil.rmtree(ckpt.root, ignore_errors=True)
        accelerator.wait_for_everyone()
    elif ckpt.latest() is not None:
        if not resume:
            raise UserError(f"{ckpt.root}: an unfinished run is here; pass --resume to continue it or --force to start over")
        ckpt.load()
        log.info("resumed at step %d (epoch %d, batch %d)", state.step, state.epoch + 1, state.batch_in_epoch)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", config_to_yaml(cfg))
        if state.step == 0 and (out / "metrics.jsonl").exists():
            (out / "metrics.jsonl").unlink()
        log.info("training %s on %d classes: %d processes × batch %d × accumulation %d, %d steps/epoch, lr %.4g, "
                 "mixed precision %s", gcfg.arch, index.num_classes, world, cfg.data.batch_size,
                 gcfg.grad_accum_steps, steps_per_epoch, lr, accelerator.mixed_precision)
    val = eval_batches(index, cfg.data, "val", rank=rank, world_size=world)
    while state.epoch < gcfg.epochs:
        batches = train_batches(index, cfg.data, epoch=state.epoch, seed=cfg.seed, rank=rank, world_size=world,
                                multiple_of=gcfg.grad_accum_steps)
        epoch_start = time.perf_counter()
        stats = train_one_epoch(model, optimizer, scheduler, batches, accelerator, cfg, state, ckpt)
        metrics = evaluate(model, val, accelerator, cfg.data, channels_last=gcfg.channels_last)
        record = {"epoch": state.epoch + 1, "step": state.step, **stats, "val_top1": metrics["top1"],
                  "val_top5": metrics["top5"], "val_loss": metrics["loss"], "val_n": metrics["n"],
                  "lr": scheduler.get_last_lr()[0], "epoch_seconds": time.perf_counter() - epoch_start}
        state.epoch += 1
        state.batch_in_epoch = 0
        if accelerator.is_main_process:
            append_jsonl(out / "metrics.jsonl", record)
            log.info("epoch %d: train loss %.4f, val top-1 %.4f, top-5 %.4f (%.0f images/s)", record["epoch"],
                     record["train_loss"], record["val_top1"], record["val_top5"], record["images_per_s"])
        ckpt.save(state.step)
    in_sync = ranks_in_sync(accelerator, accelerator.unwrap_model(model))
    if accelerator.is_main_process:
        meta = model_meta(cfg, index, arch=gcfg.arch, arch_kwargs=arch_kwargs, role="generalist")
        meta.update(steps=state.step, world_size=world, ranks_in_sync=in_sync)
        meta["val_top1"] = metrics["top1"]
        save_model(weights, accelerator.unwrap_model(model), meta)
        log.info("generalist saved: %s", weights)
    accelerator.wait_for_everyone()
    return weights


def ranks_in_sync(accelerator: Accelerator, model: torch.nn.Module) -> bool:
    """Whether every process holds exactly the same weights (a checksum compared across ranks)."""
    checksum = torch.stack([p.detach().double().sum() * (i + 1) for i, p in enumerate(model.state_dict().values())
                            if p.is_floating_point()]).sum().reshape(1).to(accelerator.device)
    sums = accelerator.gather(checksum)
    same = bool((sums == sums[0]).all())
    if not same:
        log.warning("weights differ across processes after training: %s", sums.tolist())
    return same


def import_generalist(cfg: RunConfig, *, arch: str, weights_file: str | Path, classes_file: str | Path,
                      force: bool = False) -> Path:
    """Bring your own classifier: write it as ``<run_dir>/generalist/model.safetensors`` + sidecar.

    ``arch`` is a registered architecture (torchvision ResNets included); its classifier must
    have one output per class of ``classes_file``.
    """
    from .checkpoints import load_state_dict_file
    from .io import read_json
    from .models import classifier

    weights = generalist_weights(cfg)
    if weights.is_file() and not force:
        raise UserError(f"{weights}: a generalist is already there (use --force to replace it)")
    try:
        class_names = read_json(classes_file)
    except FileNotFoundError:
        raise UserError(f"{classes_file}: classes file not found") from None
    except ValueError as exc:
        raise UserError(f"{classes_file}: not valid JSON ({exc})") from None
    if not isinstance(class_names, list) or not all(isinstance(c, str) for c in class_names) or len(class_names) < 2:
        raise UserError(f"{classes_file}: expected a JSON list of at least 2 class names")
    state = load_state_dict_file(weights_file)
    model = create_model(arch, num_classes=len(class_names), in_channels=cfg.data.channels, image_size=cfg.data.image_size)
    fc_weight = state.get("fc.weight")
    if fc_weight is not None and fc_weight.shape[0] != len(class_names):
        raise UserError(f"{weights_file}: classifier fc has {fc_weight.shape[0]} outputs but {classes_file} "
                        f"lists {len(class_names)} classes")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        detail = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else ""
        raise UserError(f"{weights_file}: weights do not fit {arch} ({first} {detail})") from None
    assert classifier(model).out_features == len(class_names)
    meta = {
        "role": "generalist", "arch": arch, "arch_kwargs": {}, "num_outputs": len(class_names),
        "num_classes": len(class_names), "class_names": class_names, "in_channels": cfg.data.channels,
        "image_size": cfg.data.image_size, "mean": list(cfg.data.mean), "std": list(cfg.data.std),
        "data": cfg.data.shards, "config_hash": cfg.hash(), "imported_from": str(weights_file),
    }
    save_model(weights, model, meta)
    return weights
