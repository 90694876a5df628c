"""``specialists compare``: predictors of several evaluated runs on one split, over seeds.

Each ``--group`` is one seed: run directories evaluated on the same split with the same
generalist (e.g. the clustered run, with its controls, and the run of random class sets).
Prints the attribution table — per predictor the seeds' mean top-1 and range, the change
and McNemar p per seed against the generalist and against the ensemble, training steps and
forward passes per image — and writes it as ``OUT.md``, every group's rows as ``OUT.tsv``
and everything as ``OUT.json`` (see :mod:`specialists.comparison`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..artifacts.metrics import read_metrics
from ..artifacts.predictions import read_predictions
from ..comparison import RunResult, compare_groups, markdown_table, tsv_rows
from ..errors import UserError
from ..io import atomic_write_json, atomic_write_text
from ..layout import RunLayout

NAME = "compare"
HELP = "predictors of several evaluated runs on one split, over seeds (the attribution table)"
DESCRIPTION = ("Join the evaluations of several runs that share a generalist (--group DIR[,DIR...], one group per "
               "seed) and print each predictor's top-1 over the groups with McNemar against the generalist and the "
               "ensemble per group; writes OUT.md, OUT.tsv and OUT.json.")
USES_CONFIG = False


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--group", action="append", required=True, metavar="[LABEL=]DIR[,DIR...]",
                   help="run directories of one seed (repeatable: one per seed), e.g. seed0=runs/a/s0,runs/a/s0-random")
    p.add_argument("--split", default="test", help="the evaluated split (default: test)")
    p.add_argument("--out", required=True, metavar="PREFIX", help="writes PREFIX.md, PREFIX.tsv, PREFIX.json")


def parse_group(text: str, position: int) -> tuple[str, list[str]]:
    """``[LABEL=]DIR[,DIR...]`` → (label, run directories); the label defaults to the group's position."""
    label, sep, dirs = text.partition("=")
    if not sep:
        label, dirs = str(position), text
    runs = [d.strip() for d in dirs.split(",") if d.strip()]
    if not label.strip() or not runs:
        raise UserError(f"--group {text!r}: expected [LABEL=]DIR[,DIR...]")
    return label.strip(), runs


def load_run(run_dir: str, split: str) -> RunResult:
    layout = RunLayout(run_dir)
    if not layout.metrics(split).is_file() or not layout.predictions(split).is_file():
        raise UserError(f"{layout.metrics(split)}: missing (or its predictions); run `specialists evaluate "
                        f"--split {split}` on {run_dir} first")
    predictions = read_predictions(layout.predictions(split))
    return RunResult(run_dir, read_metrics(layout.metrics(split)), predictions.label, predictions.predicted)


def command(cfg: None, args: argparse.Namespace) -> int:
    parsed = [parse_group(text, i) for i, text in enumerate(args.group)]
    labels = [label for label, _ in parsed]
    if len(set(labels)) != len(labels):
        raise UserError(f"--group labels repeat: {', '.join(labels)}")
    result = compare_groups([[load_run(d, args.split) for d in dirs] for _, dirs in parsed], labels)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table = markdown_table(result)
    atomic_write_text(out.with_name(out.name + ".md"), table + "\n")
    atomic_write_text(out.with_name(out.name + ".tsv"), tsv_rows(result))
    atomic_write_json(out.with_name(out.name + ".json"), result)
    print(f"{result['split']}, {result['num_examples']} images, {len(labels)} group(s)\n{table}")
    print(f"\nwritten: {out}.md, {out}.tsv, {out}.json")
    return 0
