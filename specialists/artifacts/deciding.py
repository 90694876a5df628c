"""What decided an output: the config keys (and inputs) that make two results the same result.

Every finished output and every checkpoint records a flat ``{dotted key: value}`` mapping of
what decided it. Resuming or reusing it under a config whose values differ stops with one
line naming the first key that changed and its two values.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..errors import UserError


class StaleError(UserError):
    """A finished output or a checkpoint was made under other deciding values."""


def config_values(tree: Mapping[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    """Dotted ``keys`` of a plain config tree (``RunConfig.to_dict()``) → ``{key: value}``.

    A key naming a section takes every key below it (``"specialists"`` → ``specialists.lr``, …).
    """
    out: dict[str, Any] = {}
    for key in keys:
        node: Any = tree
        for part in key.split("."):
            node = node[part]
        if isinstance(node, Mapping):
            out.update(_flatten(node, key))
        else:
            out[key] = node
    return out


def _flatten(node: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in node.items():
        key = f"{prefix}.{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def without(values: Mapping[str, Any], *dropped: str) -> dict[str, Any]:
    """``values`` less the keys named (a section name drops all its keys)."""
    return {k: v for k, v in values.items() if not any(k == d or k.startswith(d + ".") for d in dropped)}


def first_difference(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> tuple[str, Any, Any] | None:
    """(key, recorded value, current value) of the first deciding key that differs, else None."""
    for key in sorted(set(recorded) | set(current)):
        a, b = recorded.get(key, "<unset>"), current.get(key, "<unset>")
        if _plain(a) != _plain(b):
            return key, a, b
    return None


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value)) if isinstance(value, (tuple, list, dict)) else value


def check_same(recorded: Mapping[str, Any] | None, current: Mapping[str, Any], *, what: str | Path,
               made: str = "made", redo: str = "pass --force to redo it") -> None:
    """Raise :class:`StaleError` when ``recorded`` and ``current`` differ on any key.

    ``recorded is None`` (an output from before deciding keys were recorded) passes.
    """
    if recorded is None:
        return
    diff = first_difference(recorded, current)
    if diff is not None:
        key, old, new = diff
        raise StaleError(f"{what}: {made} with {key}={_show(old)}, the config now says {_show(new)}; {redo}")


def _show(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:77] + "..."


def file_digest(path: str | Path) -> str:
    """sha256 of a small file's bytes (e.g. a shard directory's index.json): identifies the data."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
