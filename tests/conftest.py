"""Shared fixtures: tiny synthetic shards, and a helper to run the CLI in-process."""

from __future__ import annotations

from pathlib import Path

import pytest

from specialists.config import SyntheticConfig
from specialists.prepare import prepare

TINY = SyntheticConfig(num_classes=12, group_size=4, train_per_class=30, val_per_class=8, test_per_class=8, image_size=16)


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """Synthetic data: 12 classes in 3 groups; 360 train / 96 val / 96 test; 50 samples per shard."""
    out = tmp_path_factory.mktemp("data") / "tiny"
    return prepare("synthetic", out, seed=0, shard_size=50, synthetic_cfg=TINY)


@pytest.fixture
def cli(capsys):
    """Run ``specialists ARGS...`` in-process; return (exit code, stdout, stderr)."""
    from specialists.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    return run
