"""Model registry (timm's ``register_model`` / ``create_model``).

Every architecture exposes its classifier as ``model.fc`` (an ``nn.Linear``), as
torchvision's ResNets do, so a specialist can replace it (section 5.2 of the paper).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torchvision import models as tv_models

from ..errors import UserError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, *, num_classes: int, in_channels: int = 3, image_size: int = 224, **kwargs) -> nn.Module:
    """Build architecture ``name``; an unknown name is an error listing the known ones."""
    try:
        fn = _REGISTRY[name]
    except KeyError:
        raise UserError(f"unknown architecture {name!r} (known: {', '.join(list_models())})") from None
    return fn(num_classes=num_classes, in_channels=in_channels, image_size=image_size, **kwargs)


def arch_options(name: str, settings: Any) -> dict[str, Any]:
    """The options architecture ``name`` takes (e.g. ``width``, ``hidden``, ``dropout``), read from an
    object with those attributes (the ``generalist`` config section): the card records them."""
    try:
        fn = _REGISTRY[name]
    except KeyError:
        raise UserError(f"unknown architecture {name!r} (known: {', '.join(list_models())})") from None
    params = inspect.signature(fn).parameters
    fixed = {"num_classes", "in_channels", "image_size"}
    return {k: getattr(settings, k) for k, p in params.items()
            if k not in fixed and p.kind is p.KEYWORD_ONLY and hasattr(settings, k)}


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class CompactCNN(nn.Module):
    """A small VGG-style CNN: conv-pool, conv-conv-pool, conv, global average pool, linear.

    One convolution at full resolution only: on a CPU that layer dominates the cost
    (a second one made training 3× slower). Use channels_last on CPU too (≈1.4× faster).
    """

    def __init__(self, num_classes: int, in_channels: int = 1, width: int = 32, dropout: float = 0.0) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            *_conv_bn(in_channels, w), nn.MaxPool2d(2),
            *_conv_bn(w, 2 * w), *_conv_bn(2 * w, 2 * w), nn.MaxPool2d(2),
            *_conv_bn(2 * w, 4 * w),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, H, W) → (B, num_classes)
        return self.fc(self.dropout(self.features(x)))


@register_model
def compact_cnn(*, num_classes: int, in_channels: int, image_size: int, width: int = 32, dropout: float = 0.0) -> nn.Module:
    return CompactCNN(num_classes, in_channels, width=width, dropout=dropout)


class GlyphCNN(nn.Module):
    """A small CNN for glyphs and other images whose layout is the class: three conv stages down to
    4×4, then the 4×4 map flattened into a hidden layer (no global pooling, which would discard
    where strokes are: 己/已/巳 differ only there), then the classifier ``fc``."""

    def __init__(self, num_classes: int, in_channels: int = 1, width: int = 32, hidden: int = 512,
                 dropout: float = 0.0) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            *_conv_bn(in_channels, w), nn.MaxPool2d(2),
            *_conv_bn(w, 2 * w), *_conv_bn(2 * w, 2 * w), nn.MaxPool2d(2),
            *_conv_bn(2 * w, 4 * w), nn.AdaptiveMaxPool2d(4), nn.Flatten(),
            nn.Linear(4 * w * 16, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
        )  # fmt: skip
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.features(x)))


@register_model
def glyph_cnn(*, num_classes: int, in_channels: int, image_size: int, width: int = 32, hidden: int = 512,
              dropout: float = 0.0) -> nn.Module:
    return GlyphCNN(num_classes, in_channels, width=width, hidden=hidden, dropout=dropout)


def _resnet(builder: Callable[..., tv_models.ResNet], num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """A torchvision ResNet; for inputs ≤ 64 px a 3×3 stride-1 stem without max-pool (CIFAR-style)."""
    model = builder(weights=None, num_classes=num_classes)
    if image_size <= 64:
        model.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    return model


@register_model
def resnet18(*, num_classes: int, in_channels: int, image_size: int, **_: object) -> nn.Module:
    return _resnet(tv_models.resnet18, num_classes, in_channels, image_size)


@register_model
def resnet34(*, num_classes: int, in_channels: int, image_size: int, **_: object) -> nn.Module:
    return _resnet(tv_models.resnet34, num_classes, in_channels, image_size)


@register_model
def resnet50(*, num_classes: int, in_channels: int, image_size: int, **_: object) -> nn.Module:
    return _resnet(tv_models.resnet50, num_classes, in_channels, image_size)


def classifier(model: nn.Module) -> nn.Linear:
    """The final linear layer (``model.fc``)."""
    fc = getattr(model, "fc", None)
    if not isinstance(fc, nn.Linear):
        raise UserError(f"{type(model).__name__} has no nn.Linear classifier at .fc")
    return fc


def num_outputs(model: nn.Module) -> int:
    return classifier(model).out_features
