"""Clustering at JFT scale: C = 15,000 / 20,000 classes, 61 specialists x 300 classes.

Synthetic generalist outputs (clustering.synthetic: peaked softmax, mass on a
few confusable classes of a planted group of C // 61 classes) are accumulated
with top_k, then the covariance columns are clustered with faiss and with
on-line (minibatch) k-means. Every C runs in its own subprocess so that the
peak resident memory (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, which
counts torch's, numpy's and faiss's allocations alike) belongs to that C only.
Times are wall-clock (time.perf_counter); generating the synthetic batches is
timed apart and not counted as accumulation.

A second part checks, at C = 2,000, that the top-k covariance gives the same
clusters as the dense one, and that the random projection of the columns
(``max_dim``) gives the same clusters as the full columns (ARI).

    .venv/bin/python benchmarks/bench_clustering_scale.py
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np
from sklearn.metrics import adjusted_rand_score

from clustering import CovarianceAccumulator, cluster_classes
from clustering.synthetic import planted_groups, synthetic_outputs

GIB = 1 << 30


def peak_rss() -> float:
    """Peak resident memory of this process so far, in bytes (Linux: ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0


def accumulate(groups: np.ndarray, images: int, top_k: int | None, batch_size: int, seed: int):
    """Returns (accumulator, seconds in update(), seconds generating batches)."""
    acc = CovarianceAccumulator(len(groups), top_k=top_k)
    update_s = 0.0
    start = time.perf_counter()
    for probs, _ in synthetic_outputs(groups, images, batch_size=batch_size, seed=seed):
        t0 = time.perf_counter()
        acc.update(probs)
        update_s += time.perf_counter() - t0
    return acc, update_s, time.perf_counter() - start - update_s


def group_coverage(groups: np.ndarray, sets: list[list[int]]) -> tuple[float, int, int]:
    """Mean over planted groups of the largest share of the group inside one set;
    classes in no set; number of distinct sets."""
    best = []
    for g in np.unique(groups):
        members = set(np.flatnonzero(groups == g).tolist())
        best.append(max(len(members.intersection(s)) for s in sets) / len(members))
    covered = set().union(*map(set, sets))
    return float(np.mean(best)), len(groups) - len(covered), len({tuple(s) for s in sets})


def labels_of(sets: list[list[int]], c: int) -> np.ndarray:
    labels = np.full(c, -1)
    for m, s in enumerate(sets):
        labels[s] = m
    return labels


def run_scale(args: argparse.Namespace, c: int) -> dict:
    """One C, in this process: accumulation, then each k-means method."""
    groups = planted_groups(c, args.specialists, seed=1)
    images = args.images_per_class * c
    base = peak_rss()
    acc, update_s, generate_s = accumulate(groups, images, args.top_k, args.batch_size, seed=2)
    t0 = time.perf_counter()
    cov = acc.covariance(inplace=True)  # the sum buffer becomes the covariance
    covariance_s = time.perf_counter() - t0
    result = {
        "classes": c, "images": images, "top_k": args.top_k,
        "rss_after_imports_gib": base / GIB,
        "accumulate_s": update_s, "generate_s": generate_s, "covariance_s": covariance_s,
        "peak_after_accumulation_gib": peak_rss() / GIB,
    }
    for method in args.methods:
        t0 = time.perf_counter()
        sets = cluster_classes(
            cov, args.specialists, args.per_specialist, method=method, seed=0, max_dim=args.max_dim
        )
        seconds = time.perf_counter() - t0
        coverage, uncovered, distinct = group_coverage(groups, sets)
        result[method] = {
            "seconds": seconds, "peak_gib": peak_rss() / GIB, "group_coverage": coverage,
            "uncovered": uncovered, "distinct_sets": distinct,
            "sizes": sorted({len(s) for s in sets}),
        }
        disjoint = cluster_classes(cov, args.specialists, method=method, seed=0, max_dim=args.max_dim)
        result[method]["disjoint_ari_vs_planted"] = adjusted_rand_score(groups, labels_of(disjoint, c))
    return result


def run_agreement(args: argparse.Namespace) -> dict:
    """C = compare_classes: top-k vs dense covariance, projected vs full columns."""
    c, k = args.compare_classes, args.compare_classes // 50
    groups = planted_groups(c, k, seed=3)
    images = args.images_per_class * c
    dense, dense_s, _ = accumulate(groups, images, None, args.batch_size, seed=4)
    sparse, sparse_s, _ = accumulate(groups, images, args.top_k, args.batch_size, seed=4)
    cov_dense, cov_sparse = dense.covariance(), sparse.covariance()
    out = {"classes": c, "clusters": k, "images": images, "dense_update_s": dense_s,
           "top_k_update_s": sparse_s,
           "max_abs_cov_difference": float((cov_dense - cov_sparse).abs().max()),
           "max_abs_cov": float(cov_dense.abs().max())}
    for method in args.methods:
        lab = {}
        for name, cov, max_dim in (("dense", cov_dense, None), ("top_k", cov_sparse, None),
                                   ("top_k_projected", cov_sparse, args.max_dim)):
            lab[name] = labels_of(cluster_classes(cov, k, method=method, seed=0, max_dim=max_dim), c)
        out[method] = {
            "ari_top_k_vs_dense": adjusted_rand_score(lab["dense"], lab["top_k"]),
            "ari_projected_vs_full": adjusted_rand_score(lab["top_k"], lab["top_k_projected"]),
            "ari_dense_vs_planted": adjusted_rand_score(groups, lab["dense"]),
            "ari_top_k_vs_planted": adjusted_rand_score(groups, lab["top_k"]),
        }
    return out


def print_scale(r: dict, methods: list[str]) -> None:
    print(f"\n== C = {r['classes']:,} classes, {r['images']:,} images, top_k = {r['top_k']}")
    print(f"  RSS after imports           {r['rss_after_imports_gib']:6.2f} GiB")
    print(f"  accumulate (update calls)   {r['accumulate_s']:6.1f} s   "
          f"({r['images'] / r['accumulate_s']:,.0f} images/s; generating them: {r['generate_s']:.1f} s)")
    print(f"  covariance(inplace=True)    {r['covariance_s']:6.1f} s")
    print(f"  peak RSS after accumulation {r['peak_after_accumulation_gib']:6.2f} GiB")
    for m in methods:
        x = r[m]
        print(f"  {m:10s} 61x300 sets: {x['seconds']:5.1f} s, peak RSS {x['peak_gib']:.2f} GiB, "
              f"sizes {x['sizes']}, distinct sets {x['distinct_sets']}, uncovered classes "
              f"{x['uncovered']}, mean best-set coverage of planted groups {x['group_coverage']:.3f}, "
              f"disjoint-mode ARI vs planted {x['disjoint_ari_vs_planted']:.3f}")
    total = r["accumulate_s"] + r["covariance_s"] + r["faiss"]["seconds"] if "faiss" in r else None
    if total is not None:
        print(f"  accumulation + covariance + faiss: {total:.1f} s (target <= 60 s); "
              f"peak {r['faiss']['peak_gib']:.2f} GiB (target <= 4 GiB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[15_000, 20_000])
    parser.add_argument("--images-per-class", type=int, default=10)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--specialists", type=int, default=61)
    parser.add_argument("--per-specialist", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--max-dim", type=int, default=512)
    parser.add_argument("--methods", nargs="+", default=["faiss", "minibatch"])
    parser.add_argument("--compare-classes", type=int, default=2_000)
    parser.add_argument("--single", type=int, help=argparse.SUPPRESS)  # child: one C, JSON out
    args = parser.parse_args()
    if args.single is not None:
        print(json.dumps(run_scale(args, args.single)))
        return
    passthrough = [a for a in sys.argv[1:]]
    for c in args.classes:
        child = subprocess.run(
            [sys.executable, __file__, *passthrough, "--single", str(c)],
            check=True, capture_output=True, text=True,
        )
        print_scale(json.loads(child.stdout.strip().splitlines()[-1]), args.methods)
    if args.compare_classes:
        r = run_agreement(args)
        print(f"\n== agreement at C = {r['classes']:,} ({r['clusters']} disjoint clusters, "
              f"{r['images']:,} images): dense update {r['dense_update_s']:.1f} s vs top-{args.top_k} "
              f"{r['top_k_update_s']:.1f} s; max |cov_dense - cov_topk| = "
              f"{r['max_abs_cov_difference']:.2e} (max |cov| {r['max_abs_cov']:.2e})")
        for m in args.methods:
            x = r[m]
            print(f"  {m:10s} ARI top-k vs dense {x['ari_top_k_vs_dense']:.3f} (target >= 0.9), "
                  f"projected ({args.max_dim} dims) vs full columns {x['ari_projected_vs_full']:.3f}, "
                  f"vs planted: dense {x['ari_dense_vs_planted']:.3f}, top-k {x['ari_top_k_vs_planted']:.3f}")


if __name__ == "__main__":
    main()
