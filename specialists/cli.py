"""The ``specialists`` command line: one subcommand per stage of the table (:mod:`specialists.stages`),
and ``run`` for all of them in order."""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import sys
from collections.abc import Callable
from types import ModuleType

from . import pipeline
from .config import load_config
from .errors import UserError, one_line
from .io import exclusive_lock
from .layout import RunLayout
from .stages import STAGES

log = logging.getLogger("specialists")

EPILOG = """Stages run in order: prepare → train-generalist → cluster → train-specialists → [train-control] → evaluate.
Every stage reads one run config (--config configs/X.yaml) and can override it with
--set section.key=value. See README.md."""

# Errors of the file system rather than of the program: reported in one line, exit 2.
FILE_SYSTEM_ERRORS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG}

COMMANDS: tuple[ModuleType, ...] = (*(s.module for s in STAGES), pipeline)


def add_config_args(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    p.add_argument("--config", required=required, help="run config YAML (e.g. configs/fashion-mnist.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (repeatable), e.g. --set generalist.epochs=2")
    p.add_argument("--log-with", metavar="TRACKER[,TRACKER]",
                   help="experiment trackers for accelerate to log to (tensorboard, wandb, mlflow, …, all); "
                        "the same as --set tracking.log_with=[…]; files under <run_dir>/tracking/")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specialists", epilog=EPILOG,
                                     description="Generalist + specialists ensembles (Hinton, Vinyals & Dean 2015).",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS:
        p = sub.add_parser(module.NAME, help=module.HELP, description=module.DESCRIPTION)
        uses_config = getattr(module, "USES_CONFIG", True)
        if uses_config:
            add_config_args(p, required=uses_config is True)
        module.add_arguments(p)
        p.set_defaults(module=module, uses_config=bool(uses_config))
    return parser


def _execute(args: argparse.Namespace) -> int:
    module = args.module
    if not args.uses_config:
        return module.command(None, args)
    cfg = load_config(args.config, [*args.overrides, *_log_with_override(args.log_with)])
    with _run_dir_lock(cfg.run_dir, module.NAME):
        return module.command(cfg, args)


def _log_with_override(log_with: str | None) -> list[str]:
    """``--log-with tensorboard,wandb`` → the ``--set`` it stands for."""
    if log_with is None:
        return []
    names = [n.strip() for n in log_with.split(",") if n.strip()]
    return [f"tracking.log_with={json.dumps(names)}"]


def _run_dir_lock(run_dir: str, command: str) -> contextlib.AbstractContextManager:
    """One process at a time per run directory (the first rank of a launched group holds it for all)."""
    if command in ("paths", "prepare") or os.environ.get("RANK", "0") != "0":
        return contextlib.nullcontext()
    layout = RunLayout(run_dir)
    return exclusive_lock(layout.lock, what=f"run directory {layout.root}")


def run_command(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    try:
        return func(args)
    except UserError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in FILE_SYSTEM_ERRORS:
            raise
        print(f"error: cannot write {exc.filename or 'an output file'}: {exc.strerror} (read-only or full file "
              "system?); what was finished is kept, run the command again once it can write", file=sys.stderr)
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
    code = run_command(_execute, args)
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
