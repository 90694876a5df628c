"""specialists: generalist + specialists ensembles (Hinton, Vinyals & Dean 2015).

Public names: :func:`load` (a run's or an exported package's predictor), :class:`Predictor`,
:class:`Prediction` (:mod:`specialists.api`) and :func:`dustbin_bias`; the rest is private.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .bias import dustbin_bias

if TYPE_CHECKING:
    from .api import Prediction, Predictor, load

__all__ = ["Prediction", "Predictor", "__version__", "dustbin_bias", "load"]
__version__ = "0.1.0"

_API = ("Prediction", "Predictor", "load")


def __getattr__(name: str) -> Any:
    """The API on first use: ``import specialists`` stays light (no model or data code loaded)."""
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'specialists' has no attribute {name!r}")
