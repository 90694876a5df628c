"""A training stage's log: ``metrics.jsonl``, one JSON object per line, rewritten whole from the state.

Rewriting it from the checkpointed state (instead of appending) keeps it equal to what the
weights saw: a run resumed from an earlier checkpoint never logs an epoch twice.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..io import atomic_write_text


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
