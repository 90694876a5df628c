"""Which covariance columns should k-means see? Recovery of planted groups (ARI).

For each scenario, synthetic generalist outputs with planted confusable groups
(clustering.synthetic) are accumulated into a covariance, then clustered with
every column treatment, with and without L2 normalisation, over several seeds.
Prints the mean and minimum adjusted Rand index against the planted groups.

    .venv/bin/python benchmarks/bench_clustering_columns.py
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from sklearn.metrics import adjusted_rand_score

from clustering import CovarianceAccumulator, cluster_classes
from clustering.kmeans import COLUMN_TREATMENTS
from clustering.synthetic import planted_groups, synthetic_outputs

# name: (classes, groups, images, synthetic_outputs options)
SCENARIOS = {
    "easy 40/8": (40, 8, 4_000, {}),
    "fmnist-like 10/2, 92% top-1": (10, 2, 10_000, {"confusable": 1, "margin": (1.5, 5.0)}),
    "imbalanced 200/20, zipf 1.2": (200, 20, 10_000, {"zipf": 1.2}),
    "few images 1000/50, 8/class": (1_000, 50, 8_000, {"zipf": 0.5}),
    "noisy 1000/100, 20/class": (1_000, 100, 20_000, {"noise": 1.5, "margin": (1.0, 5.0)}),
}


def labels_of(sets: list[list[int]], c: int) -> np.ndarray:
    labels = np.full(c, -1)
    for m, s in enumerate(sets):
        labels[s] = m
    return labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--methods", nargs="+", default=["faiss", "minibatch"])
    args = parser.parse_args()
    for name, (c, g, n, options) in SCENARIOS.items():
        groups = planted_groups(c, g, seed=1)
        acc = CovarianceAccumulator(c)
        correct = 0
        for probs, labels in synthetic_outputs(groups, n, seed=2, **options):
            acc.update(probs)
            correct += int((probs.argmax(1) == labels).sum())
        cov = acc.covariance()
        diag = cov.diagonal().abs().mean().item()
        off = (cov - cov.diag().diag()).abs().sum(1).mean().item() / (c - 1)
        print(f"\n== {name}: C={c}, {g} groups, {n} images, top-1 accuracy {correct / n:.3f}, "
              f"mean |diag| / mean |off-diag| = {diag / off:.0f}")
        print(f"{'columns':28s} {'norm':5s} " + " ".join(f"{m + ' ARI mean/min':>24s}" for m in args.methods))
        for columns in COLUMN_TREATMENTS:
            for normalize in (False, True):
                cells = []
                for method in args.methods:
                    t0 = time.perf_counter()
                    scores = [
                        adjusted_rand_score(groups, labels_of(cluster_classes(
                            cov, g, method=method, seed=s, columns=columns, normalize=normalize), c))
                        for s in range(args.seeds)
                    ]
                    cells.append(f"{np.mean(scores):.3f}/{np.min(scores):.3f} ({time.perf_counter() - t0:4.1f}s)")
                print(f"{columns:28s} {normalize!s:5s} " + " ".join(f"{x:>24s}" for x in cells))


if __name__ == "__main__":
    main()
