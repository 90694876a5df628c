"""The dustbin bias: correcting a specialist for the enriched class mix it was trained on."""

from __future__ import annotations

import math
from typing import Any

from .errors import UserError


def dustbin_bias(special_fraction_in_data: float, special_fraction_in_training: float = 0.5) -> float:
    """Logit increment for the dustbin class at inference (DESIGN.md, method step 4).

    A specialist trained on batches in which a fraction ``f`` comes from its classes
    Sᵐ, while the true data holds a fraction ``πₛ`` of them, has learnt a prior that is
    off by the odds ratio. The exact prior-shift correction adds

        b = log(f / (1 − f)) + log((1 − πₛ) / πₛ)

    to the dustbin logit. (The paper's "log of the proportion by which the specialist
    class is oversampled", log(f / πₛ), differs from it by log((1 − πₛ) / (1 − f)).)
    """
    for name, value in (("special_fraction_in_data", special_fraction_in_data),
                        ("special_fraction_in_training", special_fraction_in_training)):
        if not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
            raise ValueError(f"{name}={value!r}: expected a fraction strictly between 0 and 1")
    f, pi = float(special_fraction_in_training), float(special_fraction_in_data)
    return math.log(f / (1.0 - f)) + math.log((1.0 - pi) / pi)


def dustbin_correction(meta: dict[str, Any], choice: str) -> tuple[float, float]:
    """(dustbin bias, temperature) for a specialist: as trained (``"trained"``: the sidecar's
    choice), the prior-shift formula, the values fitted on all of val or on the val images routed
    to the specialist, or no correction."""
    if choice == "trained":
        return float(meta["dustbin_bias"]), float(meta.get("temperature", 1.0))
    if choice == "prior":
        return float(meta["prior_bias"]), 1.0
    if choice == "fit":
        return float(meta["fitted_bias"]), float(meta["fitted_temperature"])
    if choice == "routed":
        if "routed_bias" not in meta:
            raise UserError(f"specialist {meta.get('id')}: its sidecar has no routed fit (trained before it existed); "
                            "run `specialists train-specialists --refit-bias`")
        return float(meta["routed_bias"]), float(meta["routed_temperature"])
    return 0.0, 1.0
