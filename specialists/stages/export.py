"""``specialists export --run DIR --out PKG [--tar]``: a run's predictors as one self-contained package.

The package (:mod:`specialists.artifacts.package`) holds the generalist, every specialist of
``clusters.json``, every finished control copy and student (weights + card each), the class sets,
and in ``package.json`` what a config would otherwise supply: class names, preprocessing,
inference settings and the dustbin correction the engine applies to each specialist (as
``evaluate`` records it). ``specialists.load(PKG)`` and ``specialists predict --package PKG`` need
nothing else: no config, no shards. Every predictor is loaded once before anything is written, so
a run that does not fit together is refused here, not where the package is used.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from .. import __version__
from ..artifacts.package import write_package, write_tar
from ..config import RunConfig, load_config
from ..ensemble import LoadedEnsemble, load_ensemble, load_predictors
from ..errors import UserError
from ..layout import ModelPaths, PackageLayout, RunLayout

NAME = "export"
HELP = "write a run's models and settings as one self-contained package (for load, predict --package)"
DESCRIPTION = ("Write PKG: the run's generalist, specialists, control copies and students with their cards, "
               "clusters.json, package.json (class names, preprocessing, inference settings, the applied dustbin "
               "corrections) and manifest.json (each file's sha256 and size, the project version); atomically. "
               "The settings come from DIR/config.yaml (else DIR/cluster/config.yaml) or --config, with --set.")
USES_CONFIG = False


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, metavar="DIR", help="run directory (the config's run_dir)")
    p.add_argument("--out", required=True, metavar="PKG", help="the package directory to write")
    p.add_argument("--tar", action="store_true", help="also write PKG.tar")
    p.add_argument("--force", action="store_true", help="replace an existing PKG (and PKG.tar)")
    p.add_argument("--config", help="the run's config (default: the one in DIR)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value, e.g. --set inference.top_n=2 (repeatable)")


def command(cfg: None, args: argparse.Namespace) -> int:
    layout = export(args.run, args.out, config=args.config, overrides=args.overrides, tar=args.tar, force=args.force)
    print(f"package written to {layout.root}" + (f" and {layout.tar}" if args.tar else ""))
    return 0


def run_config(run_dir: str | Path, config: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
               ) -> RunConfig:
    """A run directory's config: ``config``, else the one ``specialists run`` wrote, else the cluster stage's;
    its ``run_dir`` is set to ``run_dir`` (the run may have moved)."""
    layout = RunLayout(run_dir)
    if not layout.root.is_dir():
        raise UserError(f"{layout.root}: not a directory")
    candidates = [Path(config)] if config is not None else [layout.config, layout.cluster_config]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        if config is not None:
            raise UserError(f"{config}: config file not found")
        raise UserError(f"{layout.root}: no run config ({layout.config.name} or {layout.cluster_config}) and not a "
                        "package (no manifest.json); pass the run's config")
    return dataclasses.replace(load_config(path, overrides), run_dir=str(layout.root))


def export(run_dir: str | Path, out: str | Path, *, config: str | Path | None = None,
           overrides: list[str] | tuple[str, ...] = (), tar: bool = False, force: bool = False) -> PackageLayout:
    """Write the package of ``run_dir`` to ``out`` (and ``out.tar``); returns its layout."""
    out = Path(out)
    if out.exists() and not force:
        raise UserError(f"{out}: already exists; choose another --out or pass --force to replace it")
    cfg = run_config(run_dir, config, overrides)
    loaded = load_ensemble(cfg, "cpu")
    predictors = load_predictors(cfg, loaded, controls=True)  # all must load: refused here, not at use
    layout = RunLayout(cfg.run_dir)
    controls = layout.control_counts() if any(n.startswith("control") for n in predictors) else []
    students = [n.removeprefix("student:") for n in predictors if n.startswith("student:")]
    models = [layout.generalist, *(layout.specialist(m) for m in loaded.ids),
              *(paths for k in controls for paths in layout.control_copies(k)),
              *(layout.student(name) for name in students)]
    files = [(layout.clusters, layout.clusters.name), *_model_files(models, layout.root)]
    package = write_package(out, files, settings(cfg, loaded, controls, students), version=__version__,
                            overwrite=force)
    if tar:
        write_tar(package)
    return package


def _model_files(models: list[ModelPaths], root: Path) -> list[tuple[Path, str]]:
    """Each model's weights and card, under the same names inside the package as inside the run."""
    return [(path, path.relative_to(root).as_posix()) for paths in models for path in (paths.weights, paths.card)]


def settings(cfg: RunConfig, loaded: LoadedEnsemble, controls: list[int], students: list[str]) -> dict[str, Any]:
    """``package.json``: what the package's users would otherwise read from the run's config."""
    engine, data, icfg = loaded.engine, cfg.data, cfg.inference
    return {
        "name": cfg.name,
        "class_names": list(loaded.class_names),
        "preprocessing": {"image_size": data.image_size, "channels": data.channels, "mean": list(data.mean),
                          "std": list(data.std)},
        "inference": {"top_n": icfg.top_n, "solver": icfg.solver, "tol": icfg.tol, "max_iter": icfg.max_iter,
                      "batch_size": icfg.batch_size, "mixed_precision": cfg.generalist.mixed_precision,
                      "channels_last": cfg.generalist.channels_last},
        "correction": loaded.correction,
        "specialists": [{"id": m, "classes": list(s), "dustbin_bias": b, "temperature": t} for m, s, b, t in
                        zip(loaded.ids, loaded.sets, engine.dustbin_biases, engine.temperatures, strict=True)],
        "controls": controls,
        "students": students,
        "default_student": cfg.distill.name or cfg.distill.teacher,
        "source": {"run_dir": str(Path(cfg.run_dir).resolve()), "generalist_sha256": loaded.generalist_card.sha256},
    }
