"""What every stage starts with: the shards checked against the config, an accelerator made the
same way everywhere, and the run's generalist checked against the data.

Not a stage: stages import it, it imports no stage.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from accelerate import Accelerator

from .artifacts.deciding import config_values, without
from .artifacts.model_card import ModelCard, load_model, read_card
from .artifacts.shard_index import ShardIndex
from .config import RunConfig
from .errors import UserError
from .layout import RunLayout
from .tracking import check_trackers
from .train.precision import resolve_mixed_precision

log = logging.getLogger(__name__)

# What the training data looks like to a model: these keys decide every trained model's result.
TRAIN_DATA_KEYS = ("data.image_size", "data.channels", "data.mean", "data.std", "data.augment", "data.crop_padding",
                   "data.batch_size", "data.num_workers", "data.shuffle_buffer")


def open_shards(cfg: RunConfig) -> ShardIndex:
    """The run's prepared shards, checked: every shard there, images with ``data.channels``."""
    index = ShardIndex.load(cfg.data.shards)
    index.check_exists()
    index.check_channels(cfg.data.channels)
    return index


def deciding_values(cfg: RunConfig, keys: tuple[str, ...], *, drop: tuple[str, ...] = (),
                    index: ShardIndex | None = None, **inputs: Any) -> dict[str, Any]:
    """The deciding values of a stage: its config ``keys`` (less ``drop``), the data's digest and
    other inputs (e.g. ``generalist=<sha256>``)."""
    values = without(config_values(cfg.to_dict(), keys), *drop)
    if index is not None:
        values["data.digest"] = index.digest
    values.update(inputs)
    return values


def on_cpu() -> bool:
    return not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. under taskset or a container)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def intra_op_threads(setting: int, num_workers: int, *, cores: int | None = None,
                     local_processes: int | None = None) -> tuple[int, str]:
    """torch's intra-op thread count for one process of a stage, and where it came from.

    ``setting`` > 0 (the config's ``threads``) is taken as is. 0 is auto: ``OMP_NUM_THREADS`` when
    set, else the cores available less every local process's ``num_workers`` data workers, shared
    among the local processes, at least 1. Two jobs on one machine that each take every core
    collapse (OpenMP threads spin-wait on each other): docs/RESULTS.md, "Threads".
    """
    if setting > 0:
        return setting, "threads in the config"
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env), "OMP_NUM_THREADS"
    cores = available_cores() if cores is None else cores
    local = local_processes or max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    threads = max(1, (cores - local * num_workers) // local)
    return threads, (f"auto: {cores} cores available, {num_workers} data worker(s) per process, "
                     f"{local} local process(es)")


def set_threads(cfg: RunConfig) -> int:
    """Apply the config's intra-op thread count to torch (logged: results can depend on it)."""
    threads, why = intra_op_threads(cfg.threads, cfg.data.num_workers)
    torch.set_num_threads(threads)
    log.info("torch intra-op threads: %d (%s)", threads, why)
    return threads


def make_accelerator(cfg: RunConfig, *, grad_accum_steps: int = 1) -> Accelerator:
    """An accelerator with the run's mixed precision, thread count and trackers (one rule for every stage).

    On a machine without a GPU it uses gloo, so ``accelerate launch --multi_gpu --num_processes N``
    forms one group of N CPU processes; a stage launched as several processes that still did not
    form one group stops instead of doing the work N times. The trackers of ``tracking.log_with``
    write under the run's ``tracking/`` folder; a stage starts its tracker run with
    :func:`specialists.tracking.tracked`.
    """
    set_threads(cfg)
    cpu = on_cpu()
    precision = resolve_mixed_precision(cfg.generalist.mixed_precision, "cpu" if cpu else "cuda")
    log_with = check_trackers(cfg.tracking.log_with)
    tracking = {"log_with": log_with, "project_dir": str(RunLayout(cfg.run_dir).tracking)} if log_with else {}
    try:
        accelerator = Accelerator(mixed_precision=precision, cpu=cpu, gradient_accumulation_steps=grad_accum_steps,
                                  **tracking)
    except ValueError as exc:  # accelerate's refusal of an incomplete launch environment
        raise UserError(f"cannot form the process group of this launch: {str(exc).splitlines()[0]}") from None
    check_process_group(int(os.environ.get("WORLD_SIZE", "1") or 1), accelerator.num_processes)
    return accelerator


def check_process_group(launched: int, formed: int) -> None:
    """Every process of a launch must be in one group; else each would do all the work alone."""
    if launched != formed:
        raise UserError(f"launched as {launched} processes (WORLD_SIZE) but they formed a group of {formed}; "
                        "launch with `accelerate launch --multi_gpu --num_processes N -m specialists.cli …` "
                        "(on a machine without a GPU every stage asks for CPU processes itself)")


def generalist_card(cfg: RunConfig, index: ShardIndex) -> ModelCard:
    """The run's generalist card, checked against the shards' classes and channels."""
    paths = RunLayout(cfg.run_dir).generalist
    if not paths.weights.is_file():
        raise UserError(f"{paths.weights}: no generalist; run `specialists train-generalist` (or import-generalist) first")
    card = read_card(paths)
    if card.num_outputs != index.num_classes or card.num_classes != index.num_classes:
        raise UserError(f"{paths.weights}: the generalist has {card.num_outputs} outputs but "
                        f"{index.root}/classes.json has {index.num_classes} classes")
    if card.class_names != index.class_names:
        i = next(i for i, (a, b) in enumerate(zip(card.class_names, index.class_names, strict=True)) if a != b)
        raise UserError(f"{paths.weights}: the generalist's class names differ from {index.root}/classes.json "
                        f"(class {i}: {card.class_names[i]!r} vs {index.class_names[i]!r})")
    if card.in_channels != cfg.data.channels:
        raise UserError(f"{paths.weights}: the generalist takes {card.in_channels}-channel images but "
                        f"data.channels={cfg.data.channels}")
    return card


def load_generalist(cfg: RunConfig, index: ShardIndex, device: torch.device) -> tuple[torch.nn.Module, ModelCard]:
    card = generalist_card(cfg, index)
    return load_model(RunLayout(cfg.run_dir).generalist, device=device, card=card)
