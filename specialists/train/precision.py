"""Mixed precision, decided in one place for every stage (training, clustering, inference)."""

from __future__ import annotations

import torch

from ..errors import ConfigError

CHOICES = ("auto", "no", "fp16", "bf16")


def resolve_mixed_precision(setting: str, device: str | torch.device | None = None) -> str:
    """``generalist.mixed_precision`` → what accelerate runs: ``no``, ``fp16`` or ``bf16``.

    ``auto``: bf16 on GPUs that support it, fp16 on other GPUs, none on CPU. ``fp16`` needs a
    GPU (a ConfigError on CPU); ``bf16`` runs on CPU too (autocast to bfloat16).
    """
    if setting not in CHOICES:
        raise ConfigError(f"generalist.mixed_precision: expected one of {', '.join(CHOICES)}, got {setting!r}")
    kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "auto":
        if kind != "cuda":
            return "no"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if setting == "fp16" and kind != "cuda":
        raise ConfigError("generalist.mixed_precision: fp16 needs a GPU (this process runs on "
                          f"{kind}); use bf16, auto or no")
    return setting
