"""specialists: generalist + specialists ensembles (Hinton, Vinyals & Dean 2015)."""

from .bias import dustbin_bias

__all__ = ["dustbin_bias"]
__version__ = "0.1.0"
