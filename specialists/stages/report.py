"""``specialists report --run DIR``: (re)write a run's reports from what its stages wrote: the
clustering report, then the evaluation report of every evaluated split."""

from __future__ import annotations

import argparse

from ..layout import RunLayout
from ..reports.clusters import write_run_report
from ..reports.evaluation import write_evaluation_report

NAME = "report"
HELP = "(re)write a run's reports (clustering, evaluation)"
DESCRIPTION = ("Write DIR/report/index.html from DIR/clusters.json, covariance.npy and the shards named in the "
               "run's config, and DIR/report/evaluation-<split>.html for every split with metrics-<split>.json "
               "and predictions-<split>.npz.")
USES_CONFIG = False


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, metavar="DIR", help="run directory (the config's run_dir)")


def command(cfg: None, args: argparse.Namespace) -> int:
    print(write_run_report(args.run))
    for split in RunLayout(args.run).evaluated_splits():
        print(write_evaluation_report(args.run, split))
    return 0
