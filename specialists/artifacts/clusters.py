"""The cluster stage's outputs, read and written here only: ``clusters.json`` (the specialists'
class sets), the covariance of the generalist's outputs and its sparse confusion counts.

clusters.json: ``{"num_classes", "class_names", "specialists": [{"id", "classes"}], "method",
"quality", "deciding"}`` — one line per specialist, so that it stays readable at C = 15,000.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from ..io import atomic_write, atomic_write_text, read_json


@dataclass(frozen=True)
class Clusters:
    """A validated clusters.json: the specialists' class sets and how they were made."""

    path: Path
    class_names: list[str]
    ids: list[int]  # specialist ids, in file order
    sets: list[list[int]]  # sorted class indices of each specialist
    method: dict[str, Any]
    quality: dict[str, Any] | None
    deciding: dict[str, Any] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def classes_of(self, m: int) -> list[int]:
        return self.sets[self.ids.index(m)]


def load_clusters(path: str | Path, class_names: list[str], *, against: str = "the shards' classes.json") -> Clusters:
    """Read ``clusters.json`` and check it against the data's ``classes.json`` names.

    Every problem is a one-line :class:`UserError` naming the file and what differs:
    class count or names, a class index out of range, a set of fewer than 2 classes,
    a class twice in one set, a repeated specialist id.
    """
    path = Path(path)
    try:
        data = read_json(path)
    except FileNotFoundError:
        raise UserError(f"{path}: not found; run `specialists cluster` first") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None

    def fail(what: str) -> UserError:
        return UserError(f"{path}: {what}")

    if not isinstance(data, dict):
        raise fail("expected a JSON object with num_classes, class_names, specialists")
    missing = [k for k in ("num_classes", "class_names", "specialists") if k not in data]
    if missing:
        raise fail(f"missing {', '.join(missing)}")
    c, names = data["num_classes"], data["class_names"]
    if not isinstance(c, int) or isinstance(c, bool):
        raise fail(f"num_classes must be an integer, got {c!r}")
    if c != len(class_names):
        raise fail(f"num_classes is {c} but {against} has {len(class_names)} classes")
    if not isinstance(names, list) or len(names) != c:
        raise fail(f"class_names must be a list of {c} names")
    if names != list(class_names):
        i = next(i for i, (a, b) in enumerate(zip(names, class_names, strict=True)) if a != b)
        raise fail(f"class_names differ from {against} (class {i}: {names[i]!r} here, "
                   f"{class_names[i]!r} there)")
    specs = data["specialists"]
    if not isinstance(specs, list) or not specs:
        raise fail("specialists must be a non-empty list")
    ids: list[int] = []
    sets: list[list[int]] = []
    for n, spec in enumerate(specs):
        if not isinstance(spec, dict) or "id" not in spec or "classes" not in spec:
            raise fail(f"specialists[{n}] must be an object with id and classes")
        m, classes = spec["id"], spec["classes"]
        if not isinstance(m, int) or isinstance(m, bool) or m < 0:
            raise fail(f"specialists[{n}].id must be a non-negative integer, got {m!r}")
        if m in ids:
            raise fail(f"specialist id {m} appears twice")
        if not isinstance(classes, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in classes):
            raise fail(f"specialist {m}: classes must be a list of class indices")
        bad = [i for i in classes if not 0 <= i < c]
        if bad:
            raise fail(f"specialist {m}: class {bad[0]} outside 0..{c - 1}")
        if len(set(classes)) != len(classes):
            dup = next(i for i in classes if classes.count(i) > 1)
            raise fail(f"specialist {m}: class {dup} appears twice")
        if len(classes) < 2:
            raise fail(f"specialist {m}: {len(classes)} class(es), a specialist needs at least 2")
        if len(classes) >= c:
            raise fail(f"specialist {m}: holds all {c} classes, which leaves nothing for its dustbin")
        ids.append(m)
        sets.append(sorted(classes))
    method = data.get("method") if isinstance(data.get("method"), dict) else {}
    quality = data.get("quality") if isinstance(data.get("quality"), dict) else None
    deciding = data.get("deciding") if isinstance(data.get("deciding"), dict) else None
    return Clusters(path, list(names), ids, sets, method, quality, deciding)


def write_clusters(path: str | Path, class_names: list[str], sets: list[list[int]], *, method: dict[str, Any],
                   quality: dict[str, Any], deciding: dict[str, Any]) -> Clusters:
    """Write clusters.json atomically (specialist ids 0..M-1) and read it back validated."""
    record = {"num_classes": len(class_names), "class_names": list(class_names),
              "specialists": [{"id": m, "classes": list(s)} for m, s in enumerate(sets)],
              "method": method, "quality": quality, "deciding": deciding}
    atomic_write_text(path, format_clusters(record))
    return load_clusters(path, list(class_names))


def format_clusters(record: dict[str, Any]) -> str:
    """clusters.json text: one line per specialist and for the class names (readable at C = 15,000)."""
    def line(value: Any) -> str:
        return json.dumps(value, ensure_ascii=False)

    specs = ",\n".join(f"  {line(s)}" for s in record["specialists"])
    parts = [f' "{k}": {line(v)}' for k, v in record.items() if k != "specialists"]
    parts.insert(2, f' "specialists": [\n{specs}\n ]')
    return "{\n" + ",\n".join(parts) + "\n}\n"


def finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


# ------------------------------------------------------------------ covariance and confusion
def save_covariance(path: str | Path, cov: np.ndarray) -> None:
    """``np.save`` to a temporary file then rename (streams: no second copy of a 1.8 GB matrix)."""
    atomic_write(path, lambda f: np.save(f, cov))


def read_covariance(path: str | Path, num_classes: int) -> np.ndarray:
    path = Path(path)
    try:
        cov = np.load(path)
    except FileNotFoundError:
        raise UserError(f"{path}: not found; run `specialists cluster` first") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read ({exc})") from None
    if cov.shape != (num_classes, num_classes):
        raise UserError(f"{path}: shape {cov.shape} but clusters.json has {num_classes} classes")
    return cov


def save_confusion(path: str | Path, true: np.ndarray, pred: np.ndarray, num_classes: int) -> None:
    """Non-zero cells of the (C, C) confusion counts: at most one per image, never C² of them."""
    cells, counts = np.unique(true.astype(np.int64) * num_classes + pred, return_counts=True)
    atomic_write(path, lambda f: np.savez(f, true=cells // num_classes, pred=cells % num_classes,
                                          count=counts.astype(np.int64), num_classes=np.int64(num_classes)))


def read_confusion(path: str | Path, num_classes: int) -> np.ndarray | None:
    """The sparse confusion counts as a dense (C, C) int64 matrix (rows = true); None if absent."""
    path = Path(path)
    if not path.is_file():
        return None
    with np.load(path) as z:
        if int(z["num_classes"]) != num_classes:
            raise UserError(f"{path}: confusion over {int(z['num_classes'])} classes, expected {num_classes}")
        dense = np.zeros((num_classes, num_classes), dtype=np.int64)
        dense[z["true"], z["pred"]] = z["count"]
    return dense
