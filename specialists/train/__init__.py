"""Training: one loop (accelerate), one checkpoint scheme, the optimiser and schedule, mixed precision."""

from .checkpoint import Checkpointer
from .evaluate import evaluate
from .loop import EpochSource, StreamSource, TrainLoop, TrainState
from .optim import build_optimizer, warmup_cosine
from .precision import resolve_mixed_precision

__all__ = ["Checkpointer", "EpochSource", "StreamSource", "TrainLoop", "TrainState", "build_optimizer", "evaluate",
           "resolve_mixed_precision", "warmup_cosine"]
