"""``specialists report --run DIR``: (re)write a run's clustering report from what ``cluster`` wrote."""

from __future__ import annotations

import argparse

from ..reports.clusters import write_run_report

NAME = "report"
HELP = "(re)write a run's clustering report"
DESCRIPTION = ("Write DIR/report/index.html from DIR/clusters.json, covariance.npy and the shards named in the "
               "run's config.")
USES_CONFIG = False


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, metavar="DIR", help="run directory (the config's run_dir)")


def command(cfg: None, args: argparse.Namespace) -> int:
    print(write_run_report(args.run))
    return 0
