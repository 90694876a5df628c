"""``specialists summary DIR``: what a prepared shard directory holds (and ``--verify``: read it all back)."""

from __future__ import annotations

import argparse

from ..data.summary import summarize

NAME = "summary"
HELP = "print what a prepared shard directory holds"
DESCRIPTION = "Classes, splits, shards and per-class counts of a prepared shard directory; --verify reads them all back."
USES_CONFIG = False


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("shards", help="prepared shard directory")
    p.add_argument("--verify", action="store_true", help="read every shard back and check it against the index")


def command(cfg: None, args: argparse.Namespace) -> int:
    print(summarize(args.shards, read=args.verify))
    return 0
