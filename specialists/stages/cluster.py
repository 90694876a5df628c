"""``specialists cluster``: the specialists' class sets from the generalist's confusions (section 5).

The generalist is run (under accelerate, one or many processes) over one split;
the covariance of its softmax outputs is accumulated on every rank, all-reduced,
and its columns clustered with k-means (:func:`clustering.cluster_classes`).
Labels are *not* used for the covariance; they only give the quality figure
(:func:`clustering.error_pair_share`: the share of the generalist's errors whose
(true, predicted) pair lies inside one set, next to chance).

Outputs (the main process writes each atomically, ``clusters.json`` last, so
its presence means the stage finished): the (C, C) float64 covariance, the
generalist's confusion counts on the split (sparse: a dense C×C int64 matrix is
1.8 GB at C = 15,000, the non-zero cells are at most one per image), the resolved
config (absolute shard path, so that ``specialists report --run DIR`` needs nothing
else), ``clusters.json`` and the inspection report.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from clustering import CovarianceAccumulator, cluster_classes, describe_method, error_pair_share

from ..artifacts.clusters import (
    Clusters,
    finite_or_none,
    load_clusters,
    save_confusion,
    save_covariance,
    write_clusters,
)
from ..artifacts.deciding import check_same
from ..artifacts.model_card import ModelCard, load_model
from ..artifacts.shard_index import ShardIndex
from ..config import RunConfig, config_to_yaml
from ..context import deciding_values, generalist_card, make_accelerator, open_shards
from ..data.pipeline import eval_batches, normalize
from ..errors import UserError
from ..io import atomic_write_text
from ..layout import RunLayout
from ..progress import progress
from ..reports.clusters import write_run_report

log = logging.getLogger(__name__)

NAME = "cluster"
HELP = "class sets of the specialists from the generalist's confusions"
DESCRIPTION = ("Run the generalist over clustering.split (works under accelerate launch), accumulate the covariance "
               "of its softmax outputs, cluster its columns. Writes <run_dir>/clusters.json, covariance.npy, "
               "cluster/ (confusion counts, config) and report/.")
DECIDING = ("seed", "clustering")
NOT_DECIDING = ("clustering.batch_size",)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="redo even if clusters.json is already there")


def deciding(cfg: RunConfig, index: ShardIndex, card: ModelCard) -> dict[str, Any]:
    return deciding_values(cfg, DECIDING, drop=NOT_DECIDING, index=index, generalist=card.sha256)


def is_done(cfg: RunConfig) -> bool:
    """clusters.json and the covariance are there, made with this config and this generalist."""
    layout = RunLayout(cfg.run_dir)
    if not layout.clusters.is_file():
        return False
    index = ShardIndex.load(cfg.data.shards)
    try:
        done = load_clusters(layout.clusters, index.class_names)
    except UserError as exc:
        log.warning("redoing the clustering: %s", exc)
        return False
    if not layout.covariance.is_file() or done.quality is None:
        log.warning("redoing the clustering: %s is incomplete", layout.clusters)
        return False
    check_same(done.deciding, deciding(cfg, index, generalist_card(cfg, index)), what=layout.clusters)
    return True


def command(cfg: RunConfig, args: argparse.Namespace) -> int:
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which SIMD build loaded: not news
    if not args.force and is_done(cfg):
        result = skipped(cfg)
    else:
        result = run(cfg, config_label=args.config)
    if result is not None:  # the main process
        print(describe(result))
    return 0


def skipped(cfg: RunConfig) -> ClusterResult | None:
    """The finished stage as a result (the report written if it is missing), on the main process."""
    layout = RunLayout(cfg.run_dir)
    if not make_accelerator(cfg).is_main_process:
        return None
    done = load_clusters(layout.clusters, ShardIndex.load(cfg.data.shards).class_names)
    log.info("clusters already computed: %s (use --force to redo)", layout.clusters)
    page = write_run_report(layout.root) if not layout.report_index.is_file() else None
    return ClusterResult(done, skipped=True, report=page)


# ----------------------------------------------------------------------- the stage
@dataclass(frozen=True)
class ClusterResult:
    clusters: Clusters
    skipped: bool  # the stage had already run with the same options
    report: Path | None


def run(cfg: RunConfig, *, config_label: str = "the config", report: bool = True) -> ClusterResult | None:
    """Run the stage; the main process returns what it wrote (other processes: None).

    ``config_label`` names the config file in error messages.
    """
    layout = RunLayout(cfg.run_dir)
    index = open_shards(cfg)
    card = generalist_card(cfg, index)
    _check_options(cfg, index.num_classes, config_label)
    accelerator = make_accelerator(cfg)
    rank, world = accelerator.process_index, accelerator.num_processes
    model, _ = load_model(layout.generalist, device=accelerator.device, card=card)
    batches = eval_batches(index, cfg.data, cfg.clustering.split, rank=rank, world_size=world)
    acc = CovarianceAccumulator(index.num_classes, top_k=cfg.clustering.top_k, device=accelerator.device)
    pairs, bad = accumulate(model, batches, acc, accelerator, cfg)
    bad_ranks = accelerator.gather(torch.tensor([bad is not None], device=accelerator.device))
    if bool(bad_ranks.any()):  # every rank stops here, none waits forever in all_reduce
        where = bad or f"rank {int(bad_ranks.nonzero()[0, 0])}"
        raise UserError(f"{layout.generalist.weights}: the generalist's outputs on the {cfg.clustering.split} split "
                        f"contain NaN/Inf ({where}); the weights are broken")
    acc.all_reduce()
    pairs = accelerator.gather(pairs)  # (world * N_local, 3): true, predicted, valid
    pairs = pairs[pairs[:, 2] > 0, :2].cpu().numpy()
    result = None
    if accelerator.is_main_process:
        method = {**_method(cfg, card), "world_size": world, "num_images": acc.count}
        clusters = _write_outputs(cfg, index, acc, pairs, method, deciding(cfg, index, card), config_label)
        del acc  # its buffer became the covariance: free it before the report reads covariance.npy
        page = write_run_report(layout.root) if report else None
        result = ClusterResult(clusters, skipped=False, report=page)
    accelerator.wait_for_everyone()
    return result


@torch.inference_mode()
def accumulate(model: torch.nn.Module, batches, acc: CovarianceAccumulator, accelerator: Accelerator,
               cfg: RunConfig) -> tuple[torch.Tensor, str | None]:
    """Add the softmax outputs of this rank's valid rows to ``acc``.

    Returns (N_local, 3) rows of (true, predicted, valid) and, if an output held NaN/Inf,
    where (the rank stops accumulating; the caller raises on every rank).
    """
    model.eval()
    if cfg.generalist.channels_last:
        model = model.to(memory_format=torch.channels_last)
    split = cfg.clustering.split
    rows = []
    bar = progress(batches, main_process=accelerator.is_main_process, total=len(batches),
                   desc=f"generalist on {split}", unit="batch", leave=False,
                   count_images=lambda batch: int(batch[2].sum()))
    for b, (images, labels, valid) in enumerate(bar):
        images = normalize(images.to(accelerator.device, non_blocking=True), cfg.data)
        if cfg.generalist.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        valid = valid.to(accelerator.device)
        with accelerator.autocast():
            logits = model(images)
        probs = logits.float().softmax(dim=1)  # (B, C)
        try:
            acc.update(probs[valid])
        except ValueError as exc:
            return torch.zeros((0, 3), dtype=torch.long), f"rank {accelerator.process_index}, batch {b}: {exc}"
        rows.append(torch.stack([labels.to(accelerator.device), probs.argmax(dim=1), valid.long()], dim=1))
    pairs = torch.cat(rows) if rows else torch.zeros((0, 3), dtype=torch.long, device=accelerator.device)
    return pairs, None


def _method(cfg: RunConfig, card: ModelCard) -> dict[str, Any]:
    """clusters.json "method": the k-means options, the data they ran on and the generalist's sha256."""
    cc = cfg.clustering
    method = describe_method(cc.num_specialists, cc.classes_per_specialist, cc.method, cfg.seed, columns=cc.columns,
                             normalize=cc.normalize, n_init=cc.n_init, max_iter=cc.max_iter, max_dim=cc.max_dim,
                             coverage=cc.coverage)
    return {**method, "top_k": cc.top_k, "split": cc.split, "generalist_sha256": card.sha256}


def _check_options(cfg: RunConfig, num_classes: int, config_label: str) -> None:
    """The checks cluster_classes would make, done before the generalist runs, naming config keys."""
    cc = cfg.clustering
    if cc.num_specialists > num_classes // 2:
        raise UserError(f"{config_label}: clustering.num_specialists={cc.num_specialists} but the data has "
                        f"{num_classes} classes, which allows at most {num_classes // 2} specialists "
                        "(each needs at least 2 classes)")
    k = cc.classes_per_specialist
    if k is not None and not 2 <= k < num_classes:
        raise UserError(f"{config_label}: clustering.classes_per_specialist={k} but expected null or "
                        f"2..{num_classes - 1} (fewer than the {num_classes} classes: a dustbin needs the others)")
    r, m = cc.coverage, cc.num_specialists
    if r is not None and (k is not None or not 1 <= r < m or r * num_classes // m < 2):
        raise UserError(f"{config_label}: clustering.coverage={r} but expected null, or an int in 1..{m - 1} "
                        "(below num_specialists, else every set holds every class) giving sets of at least 2 "
                        "classes, with classes_per_specialist null")


def _write_outputs(cfg: RunConfig, index: ShardIndex, acc: CovarianceAccumulator, pairs: np.ndarray,
                   method: dict[str, Any], decided: dict[str, Any], config_label: str) -> Clusters:
    layout = RunLayout(cfg.run_dir)
    c = index.num_classes
    cc = cfg.clustering
    # top-k: the columns are projected from the accumulator's kept rows, before it is spent
    sets = _cluster(acc, cfg, config_label) if cc.top_k is not None else None
    cov = acc.covariance(inplace=True)  # (C, C) float64, the Σppᵀ buffer reused
    if sets is None:
        sets = _cluster(cov.cpu(), cfg, config_label)
    save_covariance(layout.covariance, cov.cpu().numpy())
    true, pred = pairs[:, 0], pairs[:, 1]
    save_confusion(layout.confusion, true, pred, c)
    shards = os.path.abspath(cfg.data.shards)  # so `report --run DIR` works from any directory
    resolved = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, shards=shards))
    atomic_write_text(layout.cluster_config, config_to_yaml(resolved))
    quality = error_pair_share(true, pred, sets, num_classes=c)
    figures = {
        "split": cc.split,
        "num_images": int(len(true)),
        "generalist_top1": float((true == pred).mean()) if len(true) else None,
        "num_errors": quality.num_errors,
        "num_errors_inside": quality.num_inside,
        "error_share_inside": finite_or_none(quality.share),
        "chance_share": finite_or_none(quality.chance),
        "lift": finite_or_none(quality.lift),
    }
    clusters = write_clusters(layout.clusters, index.class_names, sets, method=method, quality=figures,
                              deciding=decided)
    log.info("%d specialists over %d classes written to %s", len(sets), c, layout.clusters)
    return clusters


def _cluster(cov: torch.Tensor | CovarianceAccumulator, cfg: RunConfig, config_label: str) -> list[list[int]]:
    cc = cfg.clustering
    try:
        return cluster_classes(cov, cc.num_specialists, cc.classes_per_specialist, cc.method, cfg.seed,
                               columns=cc.columns, normalize=cc.normalize, n_init=cc.n_init,
                               max_iter=cc.max_iter, max_dim=cc.max_dim, coverage=cc.coverage)
    except ValueError as exc:
        raise UserError(f"{config_label}: clustering failed: {exc}") from None


def describe(result: ClusterResult, *, max_lines: int = 12) -> str:
    """What the CLI prints: the sets (names), the quality figure and where the report is."""
    cl = result.clusters
    lines = [f"{cl.path}: {len(cl.sets)} specialists over {cl.num_classes} classes"
             + (" (already there)" if result.skipped else "")]
    for m, s in list(zip(cl.ids, cl.sets, strict=True))[:max_lines]:
        names = ", ".join(cl.class_names[i] for i in s[:10]) + (", …" if len(s) > 10 else "")
        lines.append(f"  specialist {m} ({len(s)}): {names}")
    if len(cl.sets) > max_lines:
        lines.append(f"  … {len(cl.sets) - max_lines} more")
    q = cl.quality or {}
    if q.get("num_errors"):
        lines.append(f"errors inside one set: {q['error_share_inside']:.3f} of the generalist's {q['num_errors']} "
                     f"errors on {q['split']} (chance {q['chance_share']:.3f}, lift {q['lift']:.2f}; "
                     f"generalist top-1 {q['generalist_top1']:.4f})")
    elif q:
        lines.append(f"the generalist made no errors on {q['split']}: no quality figure")
    if result.report is not None:
        lines.append(f"report: {result.report}")
    return "\n".join(lines)
