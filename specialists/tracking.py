"""Experiment trackers through accelerate's tracking API (``log_with``): TensorBoard, W&B, MLflow, ….

Off by default. ``tracking.log_with`` (``--log-with tensorboard`` on the command line) names them;
:func:`specialists.context.make_accelerator` gives them to the accelerator with the run's
``tracking/`` folder as ``project_dir``; a stage opens one tracker run named after itself with
:func:`tracked` and logs through :func:`log_values`, which does nothing when no tracker runs (and
on processes other than the main one, as accelerate's trackers do). Under ``accelerate launch``,
``train-specialists`` therefore tracks the specialists of the main process only; every
specialist's figures are in its model card either way.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from accelerate import Accelerator

from .config import RunConfig
from .errors import UserError

log = logging.getLogger(__name__)

EXTRA = {"tensorboard": "pip install 'specialists[track]' (or tensorboard)"}


def check_trackers(names: Sequence[str]) -> list[str]:
    """The tracker names of ``tracking.log_with``, checked: known to accelerate and installed."""
    if not names:
        return []
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    known = [str(t) for t in LoggerType]
    available = {str(t) for t in get_available_trackers()}
    for name in names:
        if name not in known:
            raise UserError(f"tracking.log_with: unknown tracker {name!r} (accelerate knows: {', '.join(known)})")
        if name != "all" and name not in available:
            how = EXTRA.get(name, f"install the {name} package")
            raise UserError(f"tracking.log_with: {name} is not installed; {how}")
    if "all" in names and not available:
        log.warning("tracking.log_with=all but no tracker is installed: nothing will be tracked")
    return list(names)


@contextlib.contextmanager
def tracked(accelerator: Accelerator, cfg: RunConfig, name: str) -> Iterator[None]:
    """One tracker run, ``name`` (a stage), around the block, with the run's config as its parameters.

    Closed with each tracker's ``finish`` rather than ``accelerator.end_training()``, which also
    destroys the process group that the next stage of ``specialists run`` still needs.
    """
    if not accelerator.log_with:
        yield
        return
    accelerator.init_trackers(name, config=hyperparameters(cfg.to_dict()))
    try:
        yield
    finally:
        for tracker in accelerator.trackers:
            tracker.finish()
        accelerator.trackers.clear()


def log_values(accelerator: Accelerator, values: Mapping[str, Any], *, step: int) -> None:
    """``accelerator.log`` of the finite numbers in ``values`` (None / NaN left out); no tracker: nothing."""
    if not accelerator.trackers:
        return
    numbers = {k: float(v) for k, v in values.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    if numbers:
        accelerator.log(numbers, step=step)


def numeric_leaves(tree: Any, prefix: str) -> dict[str, float]:
    """``{"a": {"b": 1, "c": [{"d": 2}]}}`` → ``{"prefix/a/b": 1, "prefix/a/c/0/d": 2}``: the numbers of
    a nested figure (lists of plain numbers, such as class sets, are left out)."""
    out: dict[str, float] = {}
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            out.update(numeric_leaves(value, f"{prefix}/{key}"))
    elif isinstance(tree, (list, tuple)) and any(isinstance(v, (Mapping, list, tuple)) for v in tree):
        for i, value in enumerate(tree):
            out.update(numeric_leaves(value, f"{prefix}/{i}"))
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        out[prefix] = tree
    return out


def hyperparameters(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A config tree flattened to dotted keys with the plain values trackers accept (lists as text)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(hyperparameters(value, f"{dotted}."))
        elif isinstance(value, (list, tuple)):
            out[dotted] = ",".join(map(str, value))
        elif value is not None:
            out[dotted] = value
    return out
