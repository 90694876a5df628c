"""A trained model on disk: safetensors weights + its card (``model.json``), read and written here only.

The card says how to rebuild the model (architecture and options, outputs, input size and
normalisation), what it was trained on and what decided it (the deciding config values), and
— for a specialist — its class set and every dustbin correction fitted for it. The weights are
written first and the card last, so a card is the mark of a finished model; the card records
the weights' sha256 and loading checks it, so weights replaced behind a card are refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, load_file, save

from ..errors import UserError
from ..io import atomic_write_bytes, atomic_write_json, read_json
from ..layout import ModelPaths
from ..models.registry import create_model, num_outputs

log = logging.getLogger(__name__)

CARD_FORMAT = "specialists-model/2"
ROLES = ("generalist", "specialist", "control", "student")


@dataclass(frozen=True)
class SpecialistHead:
    """A specialist's class set and its dustbin corrections (section 5.2; DESIGN.md step 4).

    ``prior_bias`` is the prior-shift formula; ``fitted_*`` were fitted on all of val,
    ``routed_*`` on the val images routed to the specialist with ``routed_top_n``.
    """

    id: int
    classes: list[int]
    head: str  # dustbin | full
    special_fraction: float  # f, in training batches
    special_fraction_in_data: float  # πₛ
    prior_bias: float
    fitted_bias: float
    fitted_temperature: float
    routed_bias: float
    routed_temperature: float
    routed_top_n: int
    routed_val_images: int


@dataclass(frozen=True)
class ModelCard:
    role: str  # generalist | specialist | control | student
    arch: str
    arch_kwargs: dict[str, Any]
    num_outputs: int
    class_names: list[str]  # every class of the data (C), index = label
    in_channels: int
    image_size: int
    mean: list[float]
    std: list[float]
    data: str  # the shard directory it was made with
    deciding: dict[str, Any] | None  # what decided it (None: made before this was recorded)
    sha256: str = ""  # of the weights file; set by save_model
    source_generalist: str | None = None  # sha256 of the generalist it started from
    specialist: SpecialistHead | None = None
    training: dict[str, Any] = field(default_factory=dict)  # what happened: steps, seconds, val figures…
    format: str = CARD_FORMAT

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str | Path) -> ModelCard:
        if data.get("format") == "specialists-model/1":
            data = _from_format_1(data)
        if data.get("format") != CARD_FORMAT:
            raise UserError(f"{where}: not a specialists model card (format {data.get('format')!r})")
        names = {f.name for f in dataclasses.fields(cls)}
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in data]
        if missing:
            raise UserError(f"{where}: model card lacks {', '.join(missing)}")
        values = {k: v for k, v in data.items() if k in names}
        if values.get("role") not in ROLES:
            raise UserError(f"{where}: role {values.get('role')!r}, expected one of {', '.join(ROLES)}")
        if values.get("specialist") is not None:
            try:
                values["specialist"] = SpecialistHead(**values["specialist"])
            except TypeError as exc:
                raise UserError(f"{where}: bad specialist entry ({exc})") from None
        return cls(**values)


def _from_format_1(old: dict[str, Any]) -> dict[str, Any]:
    """A card of the first format (flat sidecar) in today's shape; its deciding values are unknown."""
    new = {k: old.get(k) for k in ("role", "arch", "arch_kwargs", "num_outputs", "class_names", "in_channels",
                                   "image_size", "mean", "std", "data", "sha256", "source_generalist")}
    new.update(format=CARD_FORMAT, deciding=None, arch_kwargs=old.get("arch_kwargs") or {})
    if old.get("role") == "specialist":
        prior = old.get("prior_bias", old.get("dustbin_bias", 0.0))
        new["specialist"] = {
            "id": old["id"], "classes": old["classes"], "head": old.get("head", "dustbin"),
            "special_fraction": old.get("special_fraction", 0.5),
            "special_fraction_in_data": old.get("special_fraction_in_data", 0.5), "prior_bias": prior,
            "fitted_bias": old.get("fitted_bias", prior), "fitted_temperature": old.get("fitted_temperature", 1.0),
            "routed_bias": old.get("routed_bias", prior), "routed_temperature": old.get("routed_temperature", 1.0),
            "routed_top_n": old.get("routed_top_n", 1), "routed_val_images": old.get("routed_val_images", 0),
        }
    new["training"] = {k: v for k, v in old.items() if k not in new and k != "format"}
    return new


def build_card(role: str, *, arch: str, arch_kwargs: dict[str, Any], num_outputs: int, class_names: list[str],
               data_cfg: Any, data: str | Path, deciding: dict[str, Any] | None,
               source_generalist: str | None = None, specialist: SpecialistHead | None = None,
               training: dict[str, Any] | None = None) -> ModelCard:
    """The one way a card is made (every stage that writes a model calls this)."""
    return ModelCard(role=role, arch=arch, arch_kwargs=dict(arch_kwargs), num_outputs=num_outputs,
                     class_names=list(class_names), in_channels=data_cfg.channels, image_size=data_cfg.image_size,
                     mean=list(data_cfg.mean), std=list(data_cfg.std), data=str(data), deciding=deciding,
                     source_generalist=source_generalist, specialist=specialist, training=dict(training or {}))


def save_model(paths: ModelPaths, model: torch.nn.Module, card: ModelCard) -> ModelCard:
    """Write the weights, then the card with their sha256 (the card marks the model finished)."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    blob = save(state)
    card = dataclasses.replace(card, sha256=hashlib.sha256(blob).hexdigest())
    atomic_write_bytes(paths.weights, blob)
    write_card(paths, card)
    return card


def write_card(paths: ModelPaths, card: ModelCard) -> None:
    """(Re)write a card, e.g. after refitting a specialist's corrections; the weights stay."""
    atomic_write_json(paths.card, card.to_dict())


def is_finished(paths: ModelPaths) -> bool:
    """A card and weights are there (the card is written last)."""
    return paths.card.is_file() and paths.weights.is_file()


def read_card(paths: ModelPaths) -> ModelCard:
    if not paths.weights.is_file():
        raise UserError(f"{paths.weights}: model weights not found")
    try:
        data = read_json(paths.card)
    except FileNotFoundError:
        raise UserError(f"{paths.card}: model card missing next to {paths.weights.name} (training stopped before "
                        "it finished); run the stage again to finish it, or --force to retrain") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{paths.card}: not a readable model card ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"{paths.card}: expected a JSON object")
    return ModelCard.from_dict(data, paths.card)


def build_model(card: ModelCard) -> torch.nn.Module:
    return create_model(card.arch, num_classes=card.num_outputs, in_channels=card.in_channels,
                        image_size=card.image_size, **card.arch_kwargs)


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch ``.pt``/``.pth`` file (tensors only, never pickled code)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        with warnings.catch_warnings():  # torch's notes on foreign pickles: the error below says it all
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, OSError, ValueError, EOFError) as exc:
        raise UserError(f"{path}: not a readable state_dict ({exc.__class__.__name__}); expected a .safetensors "
                        "file or a .pt/.pth file of tensors") from None
    except Exception as exc:  # torch.load(weights_only=True) raises UnpicklingError and others on foreign pickles
        raise UserError(f"{path}: not a state_dict of tensors ({exc.__class__.__name__}); expected a .safetensors "
                        "file or a .pt/.pth file saved with torch.save(model.state_dict())") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: expected a state_dict (a mapping of names to tensors)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_model(paths: ModelPaths, *, device: str | torch.device = "cpu",
               card: ModelCard | None = None) -> tuple[torch.nn.Module, ModelCard]:
    """Rebuild a model from its card and load its weights (eval mode), checking the weights' sha256."""
    card = card or read_card(paths)
    blob = paths.weights.read_bytes()
    if card.sha256 and hashlib.sha256(blob).hexdigest() != card.sha256:
        raise UserError(f"{paths.weights}: the weights are not those its card {paths.card.name} describes "
                        "(sha256 differs: replaced or damaged); retrain it with --force")
    model = build_model(card)
    try:
        state = load(blob)
        model.load_state_dict(state)
    except (SafetensorError, RuntimeError) as exc:
        raise UserError(f"{paths.weights}: weights do not fit {card.arch} ({str(exc).splitlines()[0]})") from None
    if num_outputs(model) != card.num_outputs:
        raise UserError(f"{paths.weights}: classifier has {num_outputs(model)} outputs, the card says {card.num_outputs}")
    return model.to(device).eval(), card
