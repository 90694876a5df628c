"""The ``specialists`` command line: one subcommand per pipeline stage."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from .errors import UserError, one_line

log = logging.getLogger("specialists")

EPILOG = """Stages run in order: prepare → train-generalist → cluster → train-specialists → evaluate.
Every stage reads one run config (--config configs/X.yaml) and can override it with
--set section.key=value. See README.md."""


def add_config_args(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    p.add_argument("--config", required=required, help="run config YAML (e.g. configs/fashion-mnist.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (repeatable), e.g. --set generalist.epochs=2")


def _load(args: argparse.Namespace):
    from .config import load_config

    return load_config(args.config, args.overrides)


def cmd_prepare(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from .config import load_config
    from .prepare import prepare
    from .summary import summarize

    cfg = load_config(args.config, args.overrides)
    data = cfg.data
    syn = data.synthetic
    syn_overrides = {k: v for k, v in {
        "num_classes": args.num_classes, "train_per_class": args.samples_per_class,
        "image_size": args.image_size, "group_size": args.group_size,
    }.items() if v is not None}
    syn = replace(syn, **syn_overrides)
    source = args.source or data.source
    out = args.out or data.shards
    seed = data.split_seed if args.seed is None else args.seed
    shard_size = args.shard_size or data.shard_size
    path = prepare(source, out, seed=seed, shard_size=shard_size, force=args.force, synthetic_cfg=syn,
                   typefaces_cfg=_typefaces_options(data.typefaces, args),
                   val_fraction=data.val_fraction, test_fraction=data.test_fraction)
    print(summarize(path, read=args.verify))
    return 0


def _typefaces_options(tf, args: argparse.Namespace):
    from dataclasses import replace

    overrides = {k: v for k, v in {
        "chars": args.chars, "num_classes": args.num_classes, "image_size": args.image_size,
        "renders": args.renders, "workers": args.workers,
    }.items() if v is not None}
    return replace(tf, **overrides)


def cmd_summary(args: argparse.Namespace) -> int:
    from .summary import summarize

    print(summarize(args.shards, read=args.verify))
    return 0


def cmd_train_generalist(args: argparse.Namespace) -> int:
    from .generalist import train_generalist

    path = train_generalist(_load(args), resume=args.resume, force=args.force)
    print(path)
    return 0


def cmd_import_generalist(args: argparse.Namespace) -> int:
    from .generalist import import_generalist

    path = import_generalist(_load(args), arch=args.arch, weights_file=args.weights, classes_file=args.classes,
                             force=args.force)
    print(path)
    return 0


def cmd_cluster(args: argparse.Namespace) -> int:
    from .cluster import describe, run_cluster

    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which SIMD build loaded: not news
    result = run_cluster(_load(args), force=args.force, config_label=args.config)
    if result is not None:  # the main process
        print(describe(result))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report_stage import write_run_report

    print(write_run_report(args.run))
    return 0


def cmd_train_specialists(args: argparse.Namespace) -> int:
    from .specialist_training import train_specialists

    only = None
    if args.only:
        try:
            only = [int(v) for v in args.only.split(",") if v.strip()]
        except ValueError:
            raise UserError(f"--only {args.only!r}: expected comma-separated specialist ids, e.g. 0,3") from None
    for path in train_specialists(_load(args), only=only, force=args.force, refit=args.refit_bias):
        print(path)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import format_tables, metrics_path, run_evaluate

    cfg = _load(args)
    metrics = run_evaluate(cfg, split=args.split)
    if metrics is not None:  # the main process
        print(format_tables(metrics))
        print(f"\nmetrics written to {metrics_path(cfg.run_dir)}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .predict import run_predict

    result = run_predict(_load(args), args.input, args.output)
    if result is not None:  # the main process
        print(f"{result.num_predicted} predictions written to {result.output} ({result.world_size} process(es)); "
              f"{len(result.skipped)} unreadable image(s) skipped")
    return 0


def cmd_train_control(args: argparse.Namespace) -> int:
    from .control import train_control

    print(train_control(_load(args), force=args.force))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .run import run_pipeline, run_seeds

    cfg = _load(args)
    if args.seeds:
        try:
            seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        except ValueError:
            raise UserError(f"--seeds {args.seeds!r}: expected comma-separated integers, e.g. 0,1,2") from None
        run_seeds(cfg, seeds, config_label=args.config)
    else:
        run_pipeline(cfg, config_label=args.config)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specialists",
        description="Generalist + specialists ensembles (Hinton, Vinyals & Dean 2015).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("prepare", help="turn a data source into WebDataset shards",
                       description="Write train/val/test shards, by-class shards, classes.json and index.json. "
                                   "Sources: fashion-mnist[:DIR] (idx .gz files, default "
                                   "/usr/share/datasets/fashion-mnist), imagefolder:DIR (one folder per class, "
                                   "optionally under train/ val/ test/), synthetic (planted confusable groups).")
    add_config_args(p, required=False)
    p.add_argument("--source",
                   help="fashion-mnist[:DIR] | imagefolder:DIR | synthetic | typefaces (default: data.source)")
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
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train-generalist", help="train the generalist (works under accelerate launch)",
                       description="Train the generalist CNN on all classes. Run it as is on one process, or "
                                   "under `accelerate launch [--multi_gpu] --num_processes N` on many. Writes "
                                   "<run_dir>/generalist/model.safetensors + model.json, metrics.jsonl, checkpoints/.")
    add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--force", action="store_true", help="start over even if a finished or unfinished run is there")
    p.set_defaults(func=cmd_train_generalist)

    p = sub.add_parser("import-generalist", help="use a classifier you already have as the generalist",
                       description="Write an existing model (a registered architecture, weights as a .pt state_dict "
                                   "or .safetensors) as <run_dir>/generalist/model.safetensors + model.json.")
    add_config_args(p)
    p.add_argument("--arch", required=True, help="architecture name, e.g. resnet50, resnet18, compact_cnn")
    p.add_argument("--weights", required=True, help="state_dict file (.pt/.pth or .safetensors)")
    p.add_argument("--classes", required=True, help="classes.json: the list of class names, index = output")
    p.add_argument("--force", action="store_true", help="replace a generalist that is already there")
    p.set_defaults(func=cmd_import_generalist)

    p = sub.add_parser("cluster", help="class sets of the specialists from the generalist's confusions",
                       description="Run the generalist over clustering.split (works under accelerate launch), "
                                   "accumulate the covariance of its softmax outputs, cluster its columns. Writes "
                                   "<run_dir>/clusters.json, covariance.npy, cluster/ (confusion counts, config) "
                                   "and report/.")
    add_config_args(p)
    p.add_argument("--force", action="store_true", help="redo even if clusters.json is already there")
    p.set_defaults(func=cmd_cluster)

    p = sub.add_parser("report", help="(re)write a run's clustering report",
                       description="Write DIR/report/index.html from DIR/clusters.json, covariance.npy and the "
                                   "shards named in the run's config.")
    p.add_argument("--run", required=True, metavar="DIR", help="run directory (the config's run_dir)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("train-specialists", help="train the specialists of clusters.json (works under accelerate launch)",
                       description="Train one specialist per class set in <run_dir>/clusters.json, initialised from "
                                   "the generalist, with a dustbin class, enriched batches and a dustbin bias. Under "
                                   "`accelerate launch --num_processes P`, process r trains the specialists m with "
                                   "m mod P = r. Finished specialists are skipped; an interrupted one resumes.")
    add_config_args(p)
    p.add_argument("--only", help="comma-separated specialist ids to train, e.g. 0,3")
    p.add_argument("--force", action="store_true", help="retrain even finished specialists")
    p.add_argument("--refit-bias", action="store_true",
                   help="only refit the dustbin bias/temperature of finished specialists on val (sidecars rewritten)")
    p.set_defaults(func=cmd_train_specialists)

    p = sub.add_parser("evaluate", help="generalist vs ensemble on the test split (works under accelerate launch)",
                       description="Top-1 of the generalist and of the ensemble (routing inference.top_n, solver "
                                   "inference.solver), the conditional accuracy on classes covered by specialists "
                                   "(paper's table 3), the change by number of covering specialists (table 4), "
                                   "McNemar's exact test and each specialist alone. Prints tables and writes "
                                   "<run_dir>/metrics.json.")
    add_config_args(p)
    p.add_argument("--split", default="test", help="split to evaluate on (default: test)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="the ensemble's top-1 class for every image (works under accelerate launch)",
                       description="Batched top-1 of the ensemble over shards:DIR[:split], list:FILE (one image path "
                                   "per line) or an image folder (.png/.jpg/.jpeg, recursive). Writes one JSON line "
                                   "per image {input, class, name, prob, generalist_class}, or CSV (input,class,name,"
                                   "prob) for an output ending in .csv. Unreadable images are named and skipped.")
    add_config_args(p)
    p.add_argument("--input", required=True, help="DIR | list:FILE | shards:DIR[:split]")
    p.add_argument("--output", required=True, help="predictions file: .jsonl (default) or .csv")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("train-control", help="the compute-matched control: the generalist fine-tuned on all classes",
                       description="Fine-tune a copy of the generalist on all classes for as many steps as all the "
                                   "specialists together; evaluate combines it with the generalist like a specialist.")
    add_config_args(p)
    p.add_argument("--force", action="store_true", help="retrain even if finished")
    p.set_defaults(func=cmd_train_control)

    p = sub.add_parser("run", help="every stage in order, skipping finished ones (resumable)",
                       description="prepare → train-generalist → cluster (+ report) → train-specialists → "
                                   "[train-control] → evaluate. Re-run the same command after a crash.")
    add_config_args(p)
    p.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2: one run per seed in <run_dir>/seed-<s>, "
                                   "then each seed's figures and their mean ± std")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("summary", help="print what a prepared shard directory holds")
    p.add_argument("shards", help="prepared shard directory")
    p.add_argument("--verify", action="store_true", help="read every shard back and check it against the index")
    p.set_defaults(func=cmd_summary)
    return parser


def run_command(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    try:
        return func(args)
    except UserError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not args.verbose:
        for noisy in ("accelerate", "faiss.loader"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    code = run_command(args.func, args)
    if code == 0:
        _end_distributed()
    return code


def _end_distributed() -> None:
    """Tear down the process group of an ``accelerate launch``-ed stage before the interpreter exits.

    Left to interpreter shutdown, gloo's threads can be destroyed while still joinable, and one rank
    then aborts ("terminate called without an active exception") after all its work is done
    (pytorch/pytorch#190489). Only after success: a rank that failed must not wait for the others.
    """
    torch = sys.modules.get("torch")
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
