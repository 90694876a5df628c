"""Shard read + decode throughput (images/s) with 0, 1 and 2 DataLoader workers.

    python benchmarks/bench_data.py                      # synthetic 28x28 shards made here
    python benchmarks/bench_data.py --shards data/fashion-mnist

Prints images/s for the eval pipeline (decode + normalise) and the train pipeline
(decode + random crop/flip + shuffle buffer), and each figure as a ratio to 0 workers.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from specialists.config import DataConfig, SyntheticConfig
from specialists.data import ShardIndex, eval_batches, train_batches
from specialists.data.prepare import prepare


def rate(make_batches, repeats: int) -> float:
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        n = sum(len(batch[1]) for batch in make_batches())
        best = max(best, n / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", help="prepared shard directory (default: make synthetic 28x28 shards)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the main process")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.shards) if args.shards else prepare(
            "synthetic", Path(tmp) / "shards", shard_size=1000,
            synthetic_cfg=SyntheticConfig(num_classes=10, train_per_class=2000, val_per_class=10,
                                          test_per_class=10, image_size=28))
        index = ShardIndex.load(root)
        image = index.meta.get("image") or {"height": 28, "channels": 1}
        base = DataConfig(image_size=image["height"], channels=image["channels"], mean=(0.5,) * image["channels"],
                          std=(0.5,) * image["channels"], batch_size=128, eval_batch_size=500)
        n = index.count(args.split)
        print(f"{root}: split {args.split}, {n:,d} images of {image['height']}px, {len(index.shards(args.split))} shards")
        print(f"{'pipeline':8s} {'workers':>7s} {'images/s':>10s} {'vs 0 workers':>13s}")
        for name in ("eval", "train"):
            baseline = None
            for workers in (0, 1, 2):
                cfg = replace(base, num_workers=workers)
                if name == "eval":
                    make = lambda cfg=cfg: eval_batches(index, cfg, args.split)  # noqa: E731
                else:
                    make = lambda cfg=cfg: train_batches(index, cfg, epoch=0, seed=0, split=args.split)  # noqa: E731
                r = rate(make, args.repeats)
                baseline = baseline or r
                print(f"{name:8s} {workers:7d} {r:10,.0f} {r / baseline:12.2f}x")


if __name__ == "__main__":
    main()
