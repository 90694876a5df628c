"""``specialists paths``: where a run's files are (for scripts: ``$(specialists paths … clusters)``)."""

from __future__ import annotations

import argparse

from ..config import RunConfig
from ..errors import UserError
from ..layout import RunLayout

NAME = "paths"
HELP = "print where the run's files are"
DESCRIPTION = ("Print NAME PATH for every file of the run (or only the path of NAME), from the run layout: "
               "scripts reach run files through it instead of spelling their names.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", help="one file (e.g. clusters, covariance, metrics_test); default: all")


def command(cfg: RunConfig, args: argparse.Namespace) -> int:
    files = RunLayout(cfg.run_dir).files()
    if args.name is None:
        width = max(map(len, files))
        print("\n".join(f"{name:{width}s}  {path}" for name, path in files.items()))
    elif args.name in files:
        print(files[args.name])
    else:
        raise UserError(f"paths {args.name!r}: unknown file (known: {', '.join(files)})")
    return 0
