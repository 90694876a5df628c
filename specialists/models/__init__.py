"""Architectures (a registry, as timm's ``create_model``) and the surgery that makes a specialist."""

from .registry import (
    arch_options,
    classifier,
    create_model,
    list_models,
    num_outputs,
    register_model,
)

__all__ = ["arch_options", "classifier", "create_model", "list_models", "num_outputs", "register_model"]
