"""The dustbin bias: correcting a specialist for the enriched class mix it was trained on
(DESIGN.md, method step 4), and the corrections fitted on held-out data instead."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .artifacts.model_card import SpecialistHead

CORRECTIONS = ("prior", "fit", "routed", "none")


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


def dustbin_correction(head: SpecialistHead, choice: str) -> tuple[float, float]:
    """(dustbin bias, temperature) of a specialist for ``choice``: the prior-shift formula
    (``prior``), the values fitted on all of val (``fit``) or on the val images routed to the
    specialist (``routed``), or no correction (``none``)."""
    if choice == "prior":
        return float(head.prior_bias), 1.0
    if choice == "fit":
        return float(head.fitted_bias), float(head.fitted_temperature)
    if choice == "routed":
        return float(head.routed_bias), float(head.routed_temperature)
    if choice == "none":
        return 0.0, 1.0
    raise ValueError(f"choice={choice!r}: expected one of {', '.join(CORRECTIONS)}")


FIT_CHUNK = 1 << 18  # logits per piece of the NLL: its temporaries stay ~2 MB however many rows


def fit_bias_and_temperature(logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
    """(dustbin bias b, temperature T) minimising the held-out NLL of softmax(z / T + b·e_dustbin).

    logits: (N, |Sᵐ|+1), dustbin last; targets: (N,) specialist outputs. Above ``FIT_CHUNK``
    logits the NLL and its gradient are summed over row pieces: L-BFGS's line search otherwise
    leaves a dozen N × (|Sᵐ|+1) float64 temporaries per evaluation to the allocator (2.2 GB
    measured for 10,000 × 301); up to it, one piece, computed as it always was.
    """
    z = logits.double()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t, b], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")
    onehot = torch.zeros(z.shape[1], dtype=torch.float64)
    onehot[-1] = 1.0
    rows = max(1, FIT_CHUNK // max(1, z.shape[1]))

    def closure():
        opt.zero_grad()
        if len(z) <= rows:
            loss = F.cross_entropy(z / log_t.exp() + b * onehot, targets)
            loss.backward()
            return loss
        total = torch.zeros((), dtype=torch.float64)
        for start in range(0, len(z), rows):
            piece = F.cross_entropy(z[start : start + rows] / log_t.exp() + b * onehot,
                                    targets[start : start + rows], reduction="sum") / len(z)
            piece.backward()
            total += piece.detach()
        return total

    opt.step(closure)
    return float(b.detach()), float(log_t.detach().exp())
