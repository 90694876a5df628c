"""``predictions-<split>.npz``: what every predictor answered for every example of an evaluated split,
read and written here only.

Kept beside ``metrics-<split>.json`` so that a report can count what the figures summarise
(which confusions the ensemble fixed or broke, per-class accuracies) without running a model.
Compact at any number of classes: one int32 per example and predictor, and the specialists each
example was routed to as a sparse (CSR) list — never a C×C or N×M dense matrix. 30,040 examples
with four predictors take about 0.5 MB before compression.

Arrays: ``label`` (N,), ``pred.<name>`` (N,) top-1 of each predictor (``generalist``, ``ensemble``,
``control``, …), ``covering`` (N,) number of class sets holding the true class, ``specialist_ids``
(M,), and ``routed_indptr`` (N+1,) / ``routed_ids`` (nnz,): the ids of the specialists the ensemble
ran for example i are ``routed_ids[routed_indptr[i]:routed_indptr[i+1]]``.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..io import atomic_write_bytes

PREDICTIONS_FORMAT = "specialists-predictions/1"
_PRED = "pred."


@dataclass(frozen=True)
class Predictions:
    """Per-example results of one evaluated split (see the module docstring for the arrays)."""

    split: str
    num_classes: int
    label: np.ndarray  # (N,) int
    predicted: dict[str, np.ndarray]  # predictor name → (N,) top-1 class
    covering: np.ndarray  # (N,) sets holding the true class
    specialist_ids: np.ndarray  # (M,)
    routed_indptr: np.ndarray  # (N + 1,)
    routed_ids: np.ndarray  # (nnz,) specialist ids

    @property
    def num_examples(self) -> int:
        return len(self.label)

    def correct(self, name: str) -> np.ndarray:
        """(N,) bool: where predictor ``name`` is right."""
        return self.predicted[name] == self.label

    def routed_rows(self) -> np.ndarray:
        """(nnz,) the example index of each entry of ``routed_ids``."""
        return np.repeat(np.arange(self.num_examples), np.diff(self.routed_indptr))


def write_predictions(path: str | Path, *, split: str, num_classes: int, label: np.ndarray,
                      predicted: Mapping[str, np.ndarray], covering: np.ndarray, specialist_ids: list[int],
                      routed: np.ndarray | None = None) -> None:
    """Write the file atomically. ``routed``: (N, M) bool, columns in ``specialist_ids`` order."""
    label = np.asarray(label)
    n = len(label)
    for name, pred in predicted.items():
        if len(pred) != n:
            raise ValueError(f"predictions of {name!r} have {len(pred)} rows but there are {n} labels")
    ids = np.asarray(specialist_ids, dtype=np.int32)
    if routed is None:
        routed = np.zeros((n, len(ids)), dtype=bool)
    rows, cols = np.nonzero(np.asarray(routed, dtype=bool))  # row-major: grouped by example
    arrays = {
        "format": np.array(PREDICTIONS_FORMAT), "split": np.array(split), "num_classes": np.array(num_classes),
        "label": label.astype(np.int32), "covering": np.asarray(covering, dtype=np.int16),
        "specialist_ids": ids, "routed_indptr": np.searchsorted(rows, np.arange(n + 1)).astype(np.int64),
        "routed_ids": ids[cols],
        **{_PRED + name: np.asarray(pred, dtype=np.int32) for name, pred in predicted.items()},
    }
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def read_predictions(path: str | Path) -> Predictions:
    """Read and check the file; every problem is one :class:`UserError` line naming it."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except FileNotFoundError:
        raise UserError(f"{path}: not found; run `specialists evaluate` first") from None
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise UserError(f"{path}: not a predictions file ({exc})") from None
    if str(arrays.get("format", "")) != PREDICTIONS_FORMAT:
        raise UserError(f"{path}: not a predictions file of format {PREDICTIONS_FORMAT}")
    missing = [k for k in ("split", "num_classes", "label", "covering", "specialist_ids", "routed_indptr",
                           "routed_ids") if k not in arrays]
    if missing:
        raise UserError(f"{path}: lacks {', '.join(missing)}")
    predictions = Predictions(
        split=str(arrays["split"]), num_classes=int(arrays["num_classes"]), label=arrays["label"].astype(np.int64),
        predicted={k[len(_PRED):]: v.astype(np.int64) for k, v in arrays.items() if k.startswith(_PRED)},
        covering=arrays["covering"].astype(np.int64), specialist_ids=arrays["specialist_ids"].astype(np.int64),
        routed_indptr=arrays["routed_indptr"], routed_ids=arrays["routed_ids"].astype(np.int64))
    _check(path, predictions)
    return predictions


def _check(path: Path, p: Predictions) -> None:
    n, c = p.num_examples, p.num_classes
    for name, values in {"label": p.label, "covering": p.covering, **{_PRED + k: v for k, v in p.predicted.items()}}.items():
        if values.shape != (n,):
            raise UserError(f"{path}: {name} has shape {values.shape} but there are {n} labels")
    for name, values in {"label": p.label, **{_PRED + k: v for k, v in p.predicted.items()}}.items():
        if n and (values.min() < 0 or values.max() >= c):
            raise UserError(f"{path}: {name} holds a class outside 0..{c - 1}")
    indptr = p.routed_indptr
    if indptr.shape != (n + 1,) or indptr[0] != 0 or indptr[-1] != len(p.routed_ids) or (np.diff(indptr) < 0).any():
        raise UserError(f"{path}: routed_indptr is not a valid index of routed_ids")
    if not np.isin(p.routed_ids, p.specialist_ids).all():
        raise UserError(f"{path}: routed_ids names a specialist not in specialist_ids")
