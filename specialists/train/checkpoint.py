"""One checkpoint scheme for every training stage (generalist, specialists, control, student).

A checkpoint is a directory ``ckpt-<step>`` holding the model's weights (safetensors), the
optimiser / schedule / grad-scaler state (``torch.save`` of tensors and plain values: loadable
with ``weights_only=True``), any extra weights a stage keeps (a specialist's best state), one RNG
state per process, and ``state.json`` — the step, the position in the data and what decided the
run (:mod:`specialists.artifacts.deciding`). It is assembled in a temporary directory and
renamed into place, so a checkpoint is complete or absent. The newest ``keep`` are kept; when
the newest cannot be read, the one before it is used.

Why not ``accelerator.save_state``: a specialist is trained by one process alone while other
processes train other specialists, and ``save_state`` both synchronises every process and
writes only from the main one.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from ..artifacts.deciding import check_same
from ..io import atomic_write_json, read_json

log = logging.getLogger(__name__)

STATE = "state.json"  # written last: its presence marks a complete checkpoint
WEIGHTS = "weights.safetensors"
OPTIMIZER = "optimizer.pt"
PREFIX = "ckpt-"


@dataclass
class Loaded:
    path: Path
    state: dict[str, Any]
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    extra: dict[str, dict[str, torch.Tensor]]
    rng: dict[str, Any] | None


class Checkpointer:
    """Checkpoints of one training run under ``root``.

    ``collective``: every process of a DDP run calls :meth:`save` (each adds its RNG state; the
    main process writes the rest); otherwise one process saves alone (a specialist).
    """

    def __init__(self, root: str | Path, *, deciding: dict[str, Any], keep: int = 2, rank: int = 0,
                 is_main: bool = True, barrier: Callable[[], None] | None = None) -> None:
        self.root = Path(root)
        self.deciding = deciding
        self.keep = max(1, keep)
        self.rank = rank
        self.is_main = is_main
        self.barrier = barrier or (lambda: None)

    # ------------------------------------------------------------------ finding
    def complete(self) -> list[Path]:
        """Complete checkpoints, newest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.glob(f"{PREFIX}*") if p.is_dir() and (p / STATE).is_file()]
        return sorted(found, key=lambda p: p.name, reverse=True)

    def check_deciding(self) -> None:
        """Stop (one line) when the newest checkpoint was made under other deciding values."""
        for path in self.complete():
            try:
                recorded = read_json(path / STATE).get("deciding")
            except (OSError, ValueError):
                continue  # unreadable: load() will skip it
            check_same(recorded, self.deciding, what=self.root, made="checkpoints made",
                       redo="pass --force to start over")
            return

    # ------------------------------------------------------------------- saving
    def save(self, step: int, *, weights: dict[str, torch.Tensor], optimizer: dict[str, Any],
             state: dict[str, Any], extra: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
        name = f"{PREFIX}{step:09d}"
        final = self.root / name
        tmp = self.root / f".{name}.tmp"
        if self.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            for left in self.root.glob(f".{PREFIX}*.tmp"):  # from a process killed while saving
                shutil.rmtree(left, ignore_errors=True)
            tmp.mkdir()
        self.barrier()
        try:
            _write(tmp / f"rng-{self.rank:05d}.pt", _torch_bytes(_rng_state()))
            self.barrier()
            if self.is_main:
                _write(tmp / WEIGHTS, _tensor_bytes(weights))
                for label, tensors in (extra or {}).items():
                    _write(tmp / f"{label}.safetensors", _tensor_bytes(tensors))
                _write(tmp / OPTIMIZER, _torch_bytes(optimizer))
                atomic_write_json(tmp / STATE, {**state, "deciding": self.deciding, "extra": sorted(extra or {})})
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # a failed save (a full disk) leaves nothing half-written
            raise
        if self.is_main:
            for old in self.complete()[self.keep:]:
                shutil.rmtree(old, ignore_errors=True)
        self.barrier()
        return final

    def clear(self) -> None:
        if self.is_main:
            shutil.rmtree(self.root, ignore_errors=True)
        self.barrier()

    # ------------------------------------------------------------------ loading
    def load(self, device: torch.device | str = "cpu") -> Loaded | None:
        """The newest readable checkpoint (older ones are tried when the newest is damaged), or None."""
        self.check_deciding()
        for path in self.complete():
            try:
                return self._read(path, device)
            except Exception as exc:  # a damaged checkpoint must not stop a resume that an older one can serve
                log.warning("checkpoint %s cannot be read (%s: %s); trying the one before it", path,
                            exc.__class__.__name__, str(exc).splitlines()[0] if str(exc) else "")
        return None

    def _read(self, path: Path, device: torch.device | str) -> Loaded:
        state = read_json(path / STATE)
        weights = load_file(str(path / WEIGHTS), device=str(device))
        optimizer = torch.load(path / OPTIMIZER, map_location=device, weights_only=True)
        extra = {label: load_file(str(path / f"{label}.safetensors"), device=str(device)) for label in state.get("extra", [])}
        rng_path = path / f"rng-{self.rank:05d}.pt"
        rng = torch.load(rng_path, weights_only=True) if rng_path.is_file() else None
        for key in ("deciding", "extra"):
            state.pop(key, None)
        return Loaded(path, state, weights, optimizer, extra, rng)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any] | None) -> None:
    if not state:
        return
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tensor_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})


def _torch_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _write(path: Path, data: bytes) -> None:
    """Plain file write, flushed to disk: a full or read-only file system raises OSError naming the file."""
    try:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(path)) from None

