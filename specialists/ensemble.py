"""The trained ensemble of a run as an :class:`inference.EnsembleEngine` (section 5).

:func:`load_ensemble` reads ``<run_dir>/generalist/``, ``clusters.json`` and every
specialist it lists from ``<run_dir>/specialists/<m>/``, checks that they belong
together, and builds the engine with each specialist's dustbin bias and temperature
taken from its sidecar. Every mismatch is a one-line :class:`UserError` naming the file.
All sidecars are checked before any weights are loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from inference import EnsembleEngine

from .bias import dustbin_correction
from .checkpoints import load_model, read_sidecar
from .cluster import Clusters, clusters_path, load_clusters
from .config import RunConfig
from .errors import UserError
from .generalist import generalist_weights
from .specialist_training import specialist_weights
from .surgery import CollapsedHead
from .training import resolve_mixed_precision


@dataclass(frozen=True)
class LoadedEnsemble:
    """An engine and what it was built from."""

    engine: EnsembleEngine
    class_names: list[str]
    clusters: Clusters
    generalist_path: Path
    generalist_meta: dict[str, Any]
    specialist_paths: list[Path]  # in clusters.json order (= the engine's specialist order)
    specialist_metas: list[dict[str, Any]]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def ids(self) -> list[int]:
        return self.clusters.ids

    @property
    def sets(self) -> list[list[int]]:
        return self.clusters.sets


def load_ensemble(cfg: RunConfig, device: str | torch.device = "cpu") -> LoadedEnsemble:
    """Load the generalist and every specialist of ``clusters.json`` as an :class:`EnsembleEngine`.

    Routing and solver options come from ``cfg.inference`` (top_n, solver, tol, max_iter);
    networks run under autocast on CUDA unless ``generalist.mixed_precision`` is "no".
    """
    device = torch.device(device)
    gen_path = generalist_weights(cfg)
    if not gen_path.is_file():
        raise UserError(f"{gen_path}: no generalist; run `specialists train-generalist` (or import-generalist) first")
    gen_meta = read_sidecar(gen_path)
    num_classes = gen_meta["num_outputs"]
    names = gen_meta.get("class_names")
    clusters = _load_clusters(Path(cfg.run_dir), gen_path, num_classes, names)
    paths, metas = [], []
    for m, classes in zip(clusters.ids, clusters.sets, strict=True):
        path = specialist_weights(cfg, m)
        if not path.is_file():
            raise UserError(f"{path}: specialist {m} of {clusters.path} is missing; run `specialists train-specialists`")
        meta = read_sidecar(path)
        _check_specialist(meta, path, m, classes, clusters.path, gen_meta, gen_path, num_classes)
        paths.append(path)
        metas.append(meta)

    generalist, _ = load_model(gen_path, device=device)
    specialists = []
    for path, meta in zip(paths, metas, strict=True):
        model, _ = load_model(path, device=device)
        specialists.append(CollapsedHead(model, meta["classes"]).to(device) if meta["head"] == "full" else model)
    icfg = cfg.inference
    amp = device.type == "cuda" and resolve_mixed_precision(cfg.generalist.mixed_precision, cpu=False) != "no"
    biases, temperatures = zip(*(dustbin_correction(meta, icfg.bias) for meta in metas), strict=True)
    engine = EnsembleEngine(
        generalist, specialists, [torch.tensor(s) for s in clusters.sets], list(biases),
        temperatures=list(temperatures),
        top_n=icfg.top_n, method=icfg.solver, tol=icfg.tol, max_iter=icfg.max_iter,
        amp=amp, channels_last=cfg.generalist.channels_last,
    )
    return LoadedEnsemble(engine, list(clusters.class_names), clusters, gen_path, gen_meta, paths, metas)


def _load_clusters(run_dir: Path, gen_path: Path, num_classes: int, names: list[str] | None) -> Clusters:
    """clusters.json, checked against the generalist's class names (messages name the generalist)."""
    if names is None or len(names) != num_classes:
        raise UserError(f"{gen_path}: {num_classes} outputs but its sidecar lists "
                        f"{'no' if names is None else len(names)} class names")
    return load_clusters(clusters_path(run_dir), list(names), against=f"the generalist {gen_path}")


def _check_specialist(meta: dict[str, Any], path: Path, m: int, classes: list[int], cpath: Path,
                      gen_meta: dict[str, Any], gen_path: Path, num_classes: int) -> None:
    if meta.get("num_classes") != num_classes:
        raise UserError(f"{path}: specialist {m} was trained on {meta.get('num_classes')} classes but the generalist "
                        f"{gen_path} has {num_classes}")
    if meta.get("classes") != list(classes):
        raise UserError(f"{path}: specialist {m}'s classes {meta.get('classes')} differ from {cpath} "
                        f"({list(classes)}); retrain it with `specialists train-specialists --only {m} --force`")
    head = meta.get("head", "dustbin")
    expected = {"dustbin": len(classes) + 1, "full": num_classes}.get(head)
    if expected is None:
        raise UserError(f"{path}: unknown head {head!r} (expected dustbin or full)")
    if meta.get("num_outputs") != expected:
        raise UserError(f"{path}: a {head} head over {len(classes)} classes should have {expected} outputs, "
                        f"the sidecar says {meta.get('num_outputs')}")
    if meta.get("source_generalist") != gen_meta.get("sha256"):
        raise UserError(f"{path}: specialist {m} was made from another generalist (sha256 "
                        f"{str(meta.get('source_generalist'))[:12]}…, {gen_path} is {str(gen_meta.get('sha256'))[:12]}…); "
                        "retrain it with `specialists train-specialists --force`")
    if "dustbin_bias" not in meta:
        raise UserError(f"{path}: sidecar has no dustbin_bias")
