"""``specialists prepare``: a data source → WebDataset shards (split shards, by-class shards, index).

What decides the shards (source kind, seed, shard size, the source's options) is recorded in
``index.json``; a finished directory made with other values is reported stale, not reused.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path
from typing import Any

from ..artifacts.deciding import check_same
from ..artifacts.shard_index import ShardIndex, is_prepared
from ..config import RunConfig, TypefacesConfig
from ..data.prepare import prepare, source_options
from ..data.summary import summarize

log = logging.getLogger(__name__)

NAME = "prepare"
HELP = "turn a data source into WebDataset shards"
DESCRIPTION = ("Write train/val/test shards, by-class shards, classes.json and index.json. Sources: "
               "fashion-mnist[:DIR] (idx .gz files, default /usr/share/datasets/fashion-mnist), imagefolder:DIR (one "
               "folder per class, optionally under train/ val/ test/), synthetic (planted confusable groups), "
               "typefaces (rendered characters).")
USES_CONFIG = "optional"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", help="fashion-mnist[:DIR] | imagefolder:DIR | synthetic | typefaces (default: data.source)")
    p.add_argument("--out", help="output directory (default: data.shards)")
    p.add_argument("--seed", type=int, help="seed of the val split and shuffling (default: data.split_seed)")
    p.add_argument("--shard-size", type=int, help="samples per shard (default: data.shard_size)")
    p.add_argument("--force", action="store_true", help="redo even if OUT is already prepared")
    p.add_argument("--verify", action="store_true", help="read every shard back and check it against the index")
    g = p.add_argument_group("synthetic and typefaces sources")
    g.add_argument("--num-classes", type=int, help="number of classes (synthetic: 2..15000; typefaces: a seeded "
                                                   "subset of the character set)")
    g.add_argument("--image-size", type=int, help="image side in pixels")
    g.add_argument("--samples-per-class", type=int, help="synthetic: training samples per class")
    g.add_argument("--group-size", type=int, help="synthetic: classes per planted confusable group")
    g.add_argument("--chars", help="typefaces: gb2312-1 (default) | file:PATH | the characters themselves")
    g.add_argument("--renders", type=int, help="typefaces: train renders per face and character")
    g.add_argument("--workers", type=int, help="typefaces: rendering processes (0: one per CPU)")


def _options(cfg: RunConfig, args: argparse.Namespace | None = None) -> dict[str, Any]:
    """prepare()'s arguments from the config, with the command line's overrides."""
    d = cfg.data
    syn, tf = d.synthetic, d.typefaces
    if args is not None:
        syn = dataclasses.replace(syn, **{k: v for k, v in {
            "num_classes": args.num_classes, "train_per_class": args.samples_per_class,
            "image_size": args.image_size, "group_size": args.group_size}.items() if v is not None})
        tf = _typefaces_options(tf, args)
    return {
        "source": (args.source if args is not None and args.source else None) or d.source,
        "out": (args.out if args is not None and args.out else None) or d.shards,
        "seed": d.split_seed if args is None or args.seed is None else args.seed,
        "shard_size": (args.shard_size if args is not None and args.shard_size else None) or d.shard_size,
        "synthetic_cfg": syn, "typefaces_cfg": tf, "val_fraction": d.val_fraction, "test_fraction": d.test_fraction,
    }


def _typefaces_options(tf: TypefacesConfig, args: argparse.Namespace) -> TypefacesConfig:
    return dataclasses.replace(tf, **{k: v for k, v in {
        "chars": args.chars, "num_classes": args.num_classes, "image_size": args.image_size,
        "renders": args.renders, "workers": args.workers}.items() if v is not None})


def _check(options: dict[str, Any]) -> None:
    out = options["out"]
    recorded = ShardIndex.load(out).meta.get("deciding")
    current = source_options(options["source"], **{k: v for k, v in options.items() if k not in ("source", "out")})
    check_same(recorded, current, what=Path(out) / "index.json", made="prepared",
               redo="pass --force to prepare it again (or use another data.shards)")


def is_done(cfg: RunConfig) -> bool:
    options = _options(cfg)
    if not is_prepared(options["out"]):
        return False
    _check(options)
    return True


def run(cfg: RunConfig, args: argparse.Namespace | None = None) -> Path:
    options = _options(cfg, args)
    force = bool(args is not None and args.force)
    if is_prepared(options["out"]) and not force:
        _check(options)
    return prepare(options.pop("source"), options.pop("out"), force=force, **options)


def command(cfg: RunConfig, args: argparse.Namespace) -> int:
    path = run(cfg, args)
    print(summarize(path, read=args.verify))
    return 0
