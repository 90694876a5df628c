"""Inference for the generalist + specialists ensemble (Hinton et al. 2015, section 5).

Pure algorithms: routing images to specialists, the KL solvers that combine their
distributions, and a batched engine that runs given models on sub-batches.
"""

from inference.engine import EnsembleEngine, EnsemblePrediction
from inference.routing import active_specialists
from inference.solver import kl_objective, solve_kl, solve_kl_topk

__all__ = [
    "EnsembleEngine",
    "EnsemblePrediction",
    "active_specialists",
    "kl_objective",
    "solve_kl",
    "solve_kl_topk",
]
