"""The typed contracts between stages: shard index, model card, clusters, metrics, and what decided each.

Each artifact has one reader (which validates) and one writer (atomic); stages exchange
nothing else.
"""

from .clusters import Clusters, load_clusters, write_clusters
from .deciding import StaleError, check_same
from .metrics import read_metrics, write_metrics
from .model_card import ModelCard, SpecialistHead, build_card, load_model, read_card, save_model
from .shard_index import ShardIndex

__all__ = [
    "Clusters", "ModelCard", "ShardIndex", "SpecialistHead", "StaleError", "build_card", "check_same",
    "load_clusters", "load_model", "read_card", "read_metrics", "save_model", "write_clusters", "write_metrics",
]
