"""Data: preparing shards from a source, and reading them (train epochs, exact eval epochs, the
specialists' enriched stream) with webdataset."""

from ..artifacts.shard_index import ShardIndex
from .pipeline import Batches, build_transform, eval_batches, load_split, normalize, train_batches

__all__ = ["Batches", "ShardIndex", "build_transform", "eval_batches", "load_split", "normalize", "train_batches"]
