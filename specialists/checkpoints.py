"""Model checkpoints: safetensors weights + a JSON sidecar describing them.

``model.safetensors`` holds the state dict; ``model.json`` says how to rebuild the
model (architecture, its options, class names, input size) and where it came from
(config hash, data, source generalist). Both are written atomically.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from .errors import UserError
from .io import atomic_write_bytes, atomic_write_json, read_json
from .models import create_model, num_outputs

SIDECAR_FORMAT = "specialists-model/1"


def sidecar_path(weights: str | Path) -> Path:
    return Path(weights).with_suffix(".json")


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_model(weights: str | Path, model: torch.nn.Module, meta: dict[str, Any]) -> dict[str, Any]:
    """Write ``weights`` (safetensors) then its sidecar; returns the sidecar dict (with the weights' sha256)."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    blob = save(state)
    atomic_write_bytes(weights, blob)
    sidecar = {"format": SIDECAR_FORMAT, **meta, "sha256": hashlib.sha256(blob).hexdigest()}
    atomic_write_json(sidecar_path(weights), sidecar)
    return sidecar


def read_sidecar(weights: str | Path) -> dict[str, Any]:
    path = sidecar_path(weights)
    if not Path(weights).is_file():
        raise UserError(f"{weights}: model weights not found")
    try:
        meta = read_json(path)
    except FileNotFoundError:
        raise UserError(f"{path}: sidecar missing next to {Path(weights).name}") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if meta.get("format") != SIDECAR_FORMAT:
        raise UserError(f"{path}: not a specialists model sidecar (format {meta.get('format')!r})")
    return meta


def build_from_sidecar(meta: dict[str, Any]) -> torch.nn.Module:
    return create_model(meta["arch"], num_classes=meta["num_outputs"], in_channels=meta["in_channels"],
                        image_size=meta["image_size"], **meta.get("arch_kwargs", {}))


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch ``.pt``/``.pth`` file (weights only)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, OSError, ValueError, EOFError) as exc:
        raise UserError(f"{path}: cannot read weights ({exc.__class__.__name__}: {str(exc).splitlines()[0]})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: expected a state_dict (a mapping of names to tensors)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_model(weights: str | Path, *, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild a model from its sidecar and load its weights (eval mode)."""
    meta = read_sidecar(weights)
    model = build_from_sidecar(meta)
    state = load_state_dict_file(weights)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise UserError(f"{weights}: weights do not fit {meta['arch']} ({str(exc).splitlines()[0]})") from None
    if num_outputs(model) != meta["num_outputs"]:
        raise UserError(f"{weights}: classifier has {num_outputs(model)} outputs, sidecar says {meta['num_outputs']}")
    return model.to(device).eval(), meta
