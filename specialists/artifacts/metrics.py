"""``metrics-<split>.json``, the evaluation's figures, read and written here only.

The figures themselves are computed in :mod:`specialists.evaluation`; this module gives the file
its format, validates it on reading, and writes it atomically. Per specialist it records the
dustbin bias and temperature the engine *applied* (``models.specialists[*].applied``), which
depend on ``inference.bias`` and may differ from the values fitted at training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import UserError
from ..io import atomic_write_json, read_json

METRICS_FORMAT = "specialists-metrics/2"
REQUIRED = ("split", "num_examples", "predictors", "models", "inference")


def write_metrics(path: str | Path, metrics: dict[str, Any]) -> None:
    missing = [k for k in REQUIRED if k not in metrics]
    if missing:
        raise ValueError(f"metrics lack {', '.join(missing)}")
    atomic_write_json(path, {"format": METRICS_FORMAT, **metrics})


def read_metrics(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = read_json(path)
    except FileNotFoundError:
        raise UserError(f"{path}: not found; run `specialists evaluate` first") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != METRICS_FORMAT:
        raise UserError(f"{path}: not a metrics file of format {METRICS_FORMAT}")
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise UserError(f"{path}: lacks {', '.join(missing)}")
    return data
