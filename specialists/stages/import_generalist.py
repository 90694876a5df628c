"""``specialists import-generalist``: a classifier you already have becomes the run's generalist.

The architecture is a registered one (``--arch``, default ``generalist.arch``) built with the
config's architecture options (``generalist.width``, ``hidden``, ``dropout`` where it takes
them; change them with ``--set``); the card records them, so every later stage rebuilds it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..artifacts.model_card import build_card, is_finished, load_state_dict_file, save_model
from ..artifacts.shard_index import ShardIndex
from ..config import RunConfig
from ..context import deciding_values, open_shards
from ..errors import UserError
from ..io import read_json
from ..layout import RunLayout
from ..models.registry import arch_options, classifier, create_model

NAME = "import-generalist"
HELP = "use a classifier you already have as the generalist"
DESCRIPTION = ("Write an existing model (a registered architecture, weights as a .pt state_dict or .safetensors) as "
               "<run_dir>/generalist/model.safetensors + model.json. Architecture options come from the config's "
               "generalist section (e.g. --set generalist.width=48).")
# An imported generalist was decided by its architecture and the data it is used with.
DECIDING = ("data.image_size", "data.channels", "data.mean", "data.std")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", help="architecture name, e.g. resnet50, compact_cnn (default: generalist.arch)")
    p.add_argument("--weights", required=True, help="state_dict file (.pt/.pth or .safetensors)")
    p.add_argument("--classes", required=True, help="classes.json: the list of class names, index = output")
    p.add_argument("--force", action="store_true", help="replace a generalist that is already there")


def command(cfg: RunConfig, args: argparse.Namespace) -> int:
    print(run(cfg, arch=args.arch or cfg.generalist.arch, weights_file=args.weights, classes_file=args.classes,
              force=args.force))
    return 0


def deciding(cfg: RunConfig, index: ShardIndex, arch: str, options: dict[str, Any]) -> dict[str, Any]:
    return deciding_values(cfg, DECIDING, index=index, **{"generalist.arch": arch},
                           **{f"generalist.{k}": v for k, v in options.items()})


def run(cfg: RunConfig, *, arch: str, weights_file: str | Path, classes_file: str | Path, force: bool = False) -> Path:
    """Check the weights against ``arch`` and ``classes_file`` and write them as the run's generalist."""
    paths = RunLayout(cfg.run_dir).generalist
    if is_finished(paths) and not force:
        raise UserError(f"{paths.weights}: a generalist is already there (use --force to replace it)")
    index = open_shards(cfg)
    class_names = _read_classes(classes_file)
    if class_names != index.class_names:
        raise UserError(f"{classes_file}: its {len(class_names)} class names differ from {index.root}/classes.json "
                        f"({index.num_classes} classes); the generalist must predict the data's classes")
    state = load_state_dict_file(weights_file)
    options = arch_options(arch, cfg.generalist)
    model = create_model(arch, num_classes=len(class_names), in_channels=cfg.data.channels,
                         image_size=cfg.data.image_size, **options)
    fc_weight = state.get("fc.weight")
    if fc_weight is not None and fc_weight.shape[0] != len(class_names):
        raise UserError(f"{weights_file}: classifier fc has {fc_weight.shape[0]} outputs but {classes_file} "
                        f"lists {len(class_names)} classes")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        lines = str(exc).splitlines()
        detail = lines[1].strip() if len(lines) > 1 else ""
        raise UserError(f"{weights_file}: weights do not fit {arch} with options {options} ({lines[0]} {detail})") from None
    if classifier(model).out_features != len(class_names):
        raise UserError(f"{weights_file}: {arch} has {classifier(model).out_features} outputs, expected {len(class_names)}")
    card = build_card("generalist", arch=arch, arch_kwargs=options, num_outputs=len(class_names),
                      class_names=class_names, data_cfg=cfg.data, data=index.root,
                      deciding=deciding(cfg, index, arch, options), training={"imported_from": str(weights_file)})
    save_model(paths, model, card)
    return paths.weights


def _read_classes(path: str | Path) -> list[str]:
    try:
        names = read_json(path)
    except FileNotFoundError:
        raise UserError(f"{path}: classes file not found") from None
    except ValueError as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(names, list) or not all(isinstance(c, str) for c in names) or len(names) < 2:
        raise UserError(f"{path}: expected a JSON list of at least 2 class names")
    return names
