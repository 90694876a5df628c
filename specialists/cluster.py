"""``specialists cluster``: the specialists' class sets from the generalist's confusions (section 5).

The generalist is run (under accelerate, one or many processes) over one split;
the covariance of its softmax outputs is accumulated on every rank, all-reduced,
and its columns clustered with k-means (:func:`clustering.cluster_classes`).
Labels are *not* used for the covariance; they only give the quality figure
(:func:`clustering.error_pair_share`: the share of the generalist's errors whose
(true, predicted) pair lies inside one set, next to chance).

Outputs (the main process writes each atomically, ``clusters.json`` last, so
its presence means the stage finished):

* ``<run_dir>/covariance.npy``: (C, C) float64.
* ``<run_dir>/cluster/confusion.npz``: the generalist's confusion counts on the
  split, *sparse* (``true``, ``pred``, ``count`` over the non-zero cells): a
  dense C×C int64 matrix is 1.8 GB at C = 15,000, the non-zero cells are at
  most one per image.
* ``<run_dir>/cluster/config.yaml``: the resolved config (absolute shard path),
  so that ``specialists report --run DIR`` needs nothing else.
* ``<run_dir>/clusters.json``: ``{"num_classes", "class_names", "specialists":
  [{"id", "classes"}], "method", "quality"}``.
* ``<run_dir>/report/``: the inspection report (:mod:`specialists.report_stage`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from clustering import CovarianceAccumulator, cluster_classes, describe_method, error_pair_share

from .checkpoints import load_model, read_sidecar
from .config import RunConfig, config_to_yaml
from .data import ShardIndex, eval_batches, normalize
from .errors import UserError
from .generalist import check_shards, generalist_weights
from .io import atomic_write, atomic_write_text, read_json
from .progress import progress
from .training import resolve_mixed_precision

log = logging.getLogger(__name__)

# Keys of clusters.json "method" that decide the sets; a finished stage whose keys differ is stale.
_DECIDING_KEYS = ("algorithm", "method", "num_specialists", "classes_per_specialist", "columns", "normalize",
                  "seed", "n_init", "max_iter", "max_dim", "coverage", "top_k", "split",
                  "generalist_sha256")


def clusters_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "clusters.json"


def covariance_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "covariance.npy"


def confusion_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "cluster" / "confusion.npz"


def stage_config_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "cluster" / "config.yaml"


# ------------------------------------------------------------------ clusters.json
@dataclass(frozen=True)
class Clusters:
    """A validated clusters.json: the specialists' class sets and how they were made."""

    path: Path
    class_names: list[str]
    ids: list[int]  # specialist ids, in file order
    sets: list[list[int]]  # sorted class indices of each specialist
    method: dict[str, Any]
    quality: dict[str, Any] | None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def load_clusters(path: str | Path, class_names: list[str], *, against: str = "the shards' classes.json") -> Clusters:
    """Read ``clusters.json`` and check it against the data's ``classes.json`` names.

    Every problem is a one-line :class:`UserError` naming the file and what differs:
    class count or names, a class index out of range, a set of fewer than 2 classes,
    a class twice in one set, a repeated specialist id.
    """
    path = Path(path)
    try:
        data = read_json(path)
    except FileNotFoundError:
        raise UserError(f"{path}: not found; run `specialists cluster` first") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None

    def fail(what: str) -> UserError:
        return UserError(f"{path}: {what}")

    if not isinstance(data, dict):
        raise fail("expected a JSON object with num_classes, class_names, specialists")
    missing = [k for k in ("num_classes", "class_names", "specialists") if k not in data]
    if missing:
        raise fail(f"missing {', '.join(missing)}")
    c, names = data["num_classes"], data["class_names"]
    if not isinstance(c, int) or isinstance(c, bool):
        raise fail(f"num_classes must be an integer, got {c!r}")
    if c != len(class_names):
        raise fail(f"num_classes is {c} but {against} has {len(class_names)} classes")
    if not isinstance(names, list) or len(names) != c:
        raise fail(f"class_names must be a list of {c} names")
    if names != list(class_names):
        i = next(i for i, (a, b) in enumerate(zip(names, class_names, strict=True)) if a != b)
        raise fail(f"class_names differ from {against} (class {i}: {names[i]!r} here, "
                   f"{class_names[i]!r} there)")
    specs = data["specialists"]
    if not isinstance(specs, list) or not specs:
        raise fail("specialists must be a non-empty list")
    ids: list[int] = []
    sets: list[list[int]] = []
    for n, spec in enumerate(specs):
        if not isinstance(spec, dict) or "id" not in spec or "classes" not in spec:
            raise fail(f"specialists[{n}] must be an object with id and classes")
        m, classes = spec["id"], spec["classes"]
        if not isinstance(m, int) or isinstance(m, bool) or m < 0:
            raise fail(f"specialists[{n}].id must be a non-negative integer, got {m!r}")
        if m in ids:
            raise fail(f"specialist id {m} appears twice")
        if not isinstance(classes, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in classes):
            raise fail(f"specialist {m}: classes must be a list of class indices")
        bad = [i for i in classes if not 0 <= i < c]
        if bad:
            raise fail(f"specialist {m}: class {bad[0]} outside 0..{c - 1}")
        if len(set(classes)) != len(classes):
            dup = next(i for i in classes if classes.count(i) > 1)
            raise fail(f"specialist {m}: class {dup} appears twice")
        if len(classes) < 2:
            raise fail(f"specialist {m}: {len(classes)} class(es), a specialist needs at least 2")
        ids.append(m)
        sets.append(sorted(classes))
    method = data.get("method") if isinstance(data.get("method"), dict) else {}
    quality = data.get("quality") if isinstance(data.get("quality"), dict) else None
    return Clusters(path, list(names), ids, sets, method, quality)


def read_confusion(path: str | Path, num_classes: int) -> np.ndarray | None:
    """The sparse confusion counts as a dense (C, C) int64 matrix (rows = true); None if absent."""
    path = Path(path)
    if not path.is_file():
        return None
    with np.load(path) as z:
        if int(z["num_classes"]) != num_classes:
            raise UserError(f"{path}: confusion over {int(z['num_classes'])} classes, expected {num_classes}")
        dense = np.zeros((num_classes, num_classes), dtype=np.int64)
        dense[z["true"], z["pred"]] = z["count"]
    return dense


# ----------------------------------------------------------------------- the stage
@dataclass(frozen=True)
class ClusterResult:
    clusters: Clusters
    skipped: bool  # the stage had already run with the same options
    report: Path | None


def run_cluster(cfg: RunConfig, *, force: bool = False, config_label: str = "the config",
                report: bool = True) -> ClusterResult | None:
    """Run the stage; the main process returns what it wrote (other processes: None).

    ``config_label`` names the config file in error messages.
    """
    run_dir = Path(cfg.run_dir)
    weights = generalist_weights(cfg)
    if not weights.is_file():
        raise UserError(f"{weights}: no generalist here; run `specialists train-generalist` "
                        f"(or import-generalist) with {config_label} first")
    index = check_shards(cfg)
    meta = read_sidecar(weights)
    _check_generalist(meta, index, weights, cfg)
    method = _method(cfg, meta)
    _check_options(cfg, index.num_classes, config_label)
    accelerator = Accelerator(mixed_precision=resolve_mixed_precision(cfg.generalist.mixed_precision,
                                                                      cpu=not torch.cuda.is_available()))
    done = None if force else _finished(run_dir, index, method)
    if done is not None:
        result = None
        if accelerator.is_main_process:
            log.info("clusters already computed: %s (use --force to redo)", done.path)
            page = _report(run_dir) if report and not (run_dir / "report" / "index.html").is_file() else None
            result = ClusterResult(done, skipped=True, report=page)
        accelerator.wait_for_everyone()
        return result

    rank, world = accelerator.process_index, accelerator.num_processes
    model, _ = load_model(weights, device=accelerator.device)
    batches = eval_batches(index, cfg.data, cfg.clustering.split, rank=rank, world_size=world)
    acc = CovarianceAccumulator(index.num_classes, top_k=cfg.clustering.top_k, device=accelerator.device)
    pairs, bad = accumulate(model, batches, acc, accelerator, cfg)
    bad_ranks = accelerator.gather(torch.tensor([bad is not None], device=accelerator.device))
    if bool(bad_ranks.any()):  # every rank stops here, none waits forever in all_reduce
        where = bad or f"rank {int(bad_ranks.nonzero()[0, 0])}"
        raise UserError(f"{weights}: the generalist's outputs on the {cfg.clustering.split} split contain NaN/Inf "
                        f"({where}); the weights are broken")
    acc.all_reduce()
    pairs = accelerator.gather(pairs)  # (world * N_local, 3): true, predicted, valid
    pairs = pairs[pairs[:, 2] > 0, :2].cpu().numpy()
    result = None
    if accelerator.is_main_process:
        method = {**method, "world_size": world, "num_images": acc.count}
        clusters = _write_outputs(cfg, index, acc, pairs, method, config_label)
        del acc  # its buffer became the covariance: free it before the report reads covariance.npy
        page = _report(run_dir) if report else None
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
                   desc=f"generalist on {split}", unit="batch", leave=False)
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


def _check_generalist(meta: dict, index: ShardIndex, weights: Path, cfg: RunConfig) -> None:
    names = meta.get("class_names")
    if meta.get("num_outputs") != index.num_classes or (names is not None and len(names) != index.num_classes):
        raise UserError(f"{weights}: the generalist has {meta.get('num_outputs')} outputs but "
                        f"{index.root}/classes.json has {index.num_classes} classes")
    if names is not None and list(names) != index.class_names:
        i = next(i for i, (a, b) in enumerate(zip(names, index.class_names, strict=True)) if a != b)
        raise UserError(f"{weights}: the generalist's class names differ from {index.root}/classes.json "
                        f"(class {i}: {names[i]!r} vs {index.class_names[i]!r})")
    if meta.get("in_channels") not in (None, cfg.data.channels):
        raise UserError(f"{weights}: the generalist takes {meta['in_channels']}-channel images but "
                        f"data.channels={cfg.data.channels}")


def _method(cfg: RunConfig, meta: dict) -> dict[str, Any]:
    """clusters.json "method": the k-means options, the data they ran on and the generalist's sha256."""
    cc = cfg.clustering
    method = describe_method(cc.num_specialists, cc.classes_per_specialist, cc.method, cfg.seed, columns=cc.columns,
                             normalize=cc.normalize, n_init=cc.n_init, max_iter=cc.max_iter, max_dim=cc.max_dim,
                             coverage=cc.coverage)
    return {**method, "top_k": cc.top_k, "split": cc.split, "generalist_sha256": meta.get("sha256")}


def _check_options(cfg: RunConfig, num_classes: int, config_label: str) -> None:
    """The checks cluster_classes would make, done before the generalist runs, naming config keys."""
    cc = cfg.clustering
    if cc.num_specialists > num_classes // 2:
        raise UserError(f"{config_label}: clustering.num_specialists={cc.num_specialists} but the data has "
                        f"{num_classes} classes, which allows at most {num_classes // 2} specialists "
                        "(each needs at least 2 classes)")
    k = cc.classes_per_specialist
    if k is not None and not 2 <= k <= num_classes:
        raise UserError(f"{config_label}: clustering.classes_per_specialist={k} but expected null or "
                        f"2..{num_classes} (the number of classes)")
    r, m = cc.coverage, cc.num_specialists
    if r is not None and (k is not None or not 1 <= r <= m or r * num_classes // m < 2):
        raise UserError(f"{config_label}: clustering.coverage={r} but expected null, or an int in 1..{m} "
                        "(num_specialists) giving sets of at least 2 classes, with classes_per_specialist null")


def _finished(run_dir: Path, index: ShardIndex, method: dict[str, Any]) -> Clusters | None:
    """The finished stage's clusters, None if there is none; an error if it was made with other options."""
    path = clusters_path(run_dir)
    if not path.is_file():
        return None
    try:
        done = load_clusters(path, index.class_names)
    except UserError as exc:
        log.warning("redoing the clustering: %s", exc)
        return None
    if not covariance_path(run_dir).is_file() or done.quality is None:
        log.warning("redoing the clustering: %s is incomplete", path)
        return None
    differ = [f"{k}: {done.method.get(k)!r} → {method.get(k)!r}" for k in _DECIDING_KEYS
              if done.method.get(k) != method.get(k)]
    if differ:
        raise UserError(f"{path}: made with other options ({'; '.join(differ)}); pass --force to redo it")
    return done


def _write_outputs(cfg: RunConfig, index: ShardIndex, acc: CovarianceAccumulator, pairs: np.ndarray,
                   method: dict[str, Any], config_label: str) -> Clusters:
    run_dir = Path(cfg.run_dir)
    c = index.num_classes
    cov = acc.covariance(inplace=True)  # (C, C) float64, the Σppᵀ buffer reused
    cc = cfg.clustering
    try:
        sets = cluster_classes(cov.cpu(), cc.num_specialists, cc.classes_per_specialist, cc.method, cfg.seed,
                               columns=cc.columns, normalize=cc.normalize, n_init=cc.n_init,
                               max_iter=cc.max_iter, max_dim=cc.max_dim, coverage=cc.coverage)
    except ValueError as exc:
        raise UserError(f"{config_label}: clustering failed: {exc}") from None
    save_npy_atomic(covariance_path(run_dir), cov.cpu().numpy())
    true, pred = pairs[:, 0], pairs[:, 1]
    _save_confusion(confusion_path(run_dir), true, pred, c)
    shards = os.path.abspath(cfg.data.shards)  # so `report --run DIR` works from any directory
    resolved = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, shards=shards))
    atomic_write_text(stage_config_path(run_dir), config_to_yaml(resolved))
    quality = error_pair_share(true, pred, sets, num_classes=c)
    record = {
        "num_classes": c,
        "class_names": index.class_names,
        "specialists": [{"id": m, "classes": s} for m, s in enumerate(sets)],
        "method": method,
        "quality": {
            "split": cc.split,
            "num_images": int(len(true)),
            "generalist_top1": float((true == pred).mean()) if len(true) else None,
            "num_errors": quality.num_errors,
            "num_errors_inside": quality.num_inside,
            "error_share_inside": _finite(quality.share),
            "chance_share": _finite(quality.chance),
            "lift": _finite(quality.lift),
        },
    }
    atomic_write_text(clusters_path(run_dir), format_clusters(record))
    log.info("%d specialists over %d classes written to %s", len(sets), c, clusters_path(run_dir))
    return load_clusters(clusters_path(run_dir), index.class_names)


def format_clusters(record: dict[str, Any]) -> str:
    """clusters.json text: one line per specialist and for the class names (readable at C = 15,000)."""
    def line(value: Any) -> str:
        return json.dumps(value, ensure_ascii=False)

    specs = ",\n".join(f"  {line(s)}" for s in record["specialists"])
    parts = [f' "{k}": {line(v)}' for k, v in record.items() if k != "specialists"]
    parts.insert(2, f' "specialists": [\n{specs}\n ]')
    return "{\n" + ",\n".join(parts) + "\n}\n"


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _save_confusion(path: Path, true: np.ndarray, pred: np.ndarray, num_classes: int) -> None:
    """Non-zero cells of the (C, C) confusion counts: at most one per image, never C² of them."""
    cells, counts = np.unique(true.astype(np.int64) * num_classes + pred, return_counts=True)
    atomic_write(path, lambda f: np.savez(f, true=cells // num_classes, pred=cells % num_classes,
                                     count=counts.astype(np.int64), num_classes=np.int64(num_classes)))


def save_npy_atomic(path: str | Path, array: np.ndarray) -> None:
    """``np.save`` to a temporary file then rename (streams: no second copy of a 1.8 GB matrix)."""
    atomic_write(path, lambda f: np.save(f, array))


def _report(run_dir: Path) -> Path:
    from .report_stage import write_run_report

    return write_run_report(run_dir)


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
