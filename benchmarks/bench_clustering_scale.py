"""Clustering at JFT scale: C = 15,000 classes, 61 specialists x 300 classes, top_k = 20.

Part 1, the cluster stage's work after the generalist: accumulate the top-k covariance of
``--images`` synthetic generalist outputs (clustering.synthetic: peaked softmax, mass on a few
confusable classes of a planted group), cluster its columns (61 x 300 overlapping sets, faiss),
form the (C, C) covariance (the stage saves it). Two ways, each in its own subprocess so that
its peak resident memory (``ru_maxrss``: torch's, numpy's and faiss's allocations alike) is
its own, timed with time.perf_counter and time.process_time (CPU seconds: near what a quiet
machine takes for this one-thread work; generating the outputs is timed apart, not counted):

    projected  cluster_classes(accumulator): the columns projected from the kept top-k rows
               without a C x C x 512 product (clustering.features), then covariance(inplace)
    dense      covariance(inplace), then cluster_classes(covariance): the dense path (baseline)

and prints the time ratio dense / projected, whether the two give the same sets, and how
well the sets hold the planted groups.

Part 2 (``--compare-classes``, 0 to skip) checks at C = 2,000 that the top-k covariance gives
the same clusters as the dense one, and the projected columns the same as the full ones (ARI).

    .venv/bin/python benchmarks/bench_clustering_scale.py [--classes 15000 20000] [--images 20000]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import torch
from sklearn.metrics import adjusted_rand_score

from clustering import CovarianceAccumulator, cluster_classes
from clustering.synthetic import planted_groups, synthetic_outputs

GIB = 1 << 30


def peak_rss() -> float:
    """Peak resident memory of this process so far, in bytes (Linux: ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0


def accumulate(groups: np.ndarray, images: int, top_k: int | None, batch_size: int, seed: int):
    """Returns (accumulator, seconds in update(), seconds generating batches, CPU seconds in update())."""
    acc = CovarianceAccumulator(len(groups), top_k=top_k)
    update_s = update_cpu = 0.0
    start = time.perf_counter()
    for probs, _ in synthetic_outputs(groups, images, batch_size=batch_size, seed=seed):
        t0, c0 = time.perf_counter(), time.process_time()
        acc.update(probs)
        update_s += time.perf_counter() - t0
        update_cpu += time.process_time() - c0
    return acc, update_s, time.perf_counter() - start - update_s, update_cpu


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


def run_scale(args: argparse.Namespace, c: int, way: str) -> dict:
    """One C and one way (projected | dense), in this process."""
    groups = planted_groups(c, args.specialists, seed=1)
    base = peak_rss()
    acc, update_s, generate_s, update_cpu = accumulate(groups, args.images, args.top_k, args.batch_size, seed=2)
    options = {"method": args.method, "seed": 0, "max_dim": args.max_dim}
    c0 = time.process_time()
    t0 = time.perf_counter()
    if way == "projected":
        sets = cluster_classes(acc, args.specialists, args.per_specialist, **options)
        t1 = time.perf_counter()
        acc.covariance(inplace=True)  # the stage saves it
        covariance_s, cluster_s = time.perf_counter() - t1, t1 - t0
    else:
        cov = acc.covariance(inplace=True)
        t1 = time.perf_counter()
        sets = cluster_classes(cov, args.specialists, args.per_specialist, **options)
        covariance_s, cluster_s = t1 - t0, time.perf_counter() - t1
    cpu_s = update_cpu + time.process_time() - c0
    coverage, uncovered, distinct = group_coverage(groups, sets)
    return {"cpu_s": cpu_s, "classes": c, "images": args.images, "top_k": args.top_k, "way": way,
            "rss_after_imports_gib": base / GIB, "accumulate_s": update_s, "generate_s": generate_s,
            "covariance_s": covariance_s, "cluster_s": cluster_s,
            "total_s": update_s + covariance_s + cluster_s, "peak_gib": peak_rss() / GIB,
            "group_coverage": coverage, "uncovered": uncovered, "distinct_sets": distinct,
            "sizes": sorted({len(s) for s in sets}), "sets": sets}


def run_agreement(args: argparse.Namespace) -> dict:
    """C = compare_classes: top-k vs dense covariance, projected vs full columns."""
    c, k = args.compare_classes, args.compare_classes // 50
    groups = planted_groups(c, k, seed=3)
    images = 10 * c  # 10 images per class
    dense, dense_s, *_ = accumulate(groups, images, None, args.batch_size, seed=4)
    sparse, sparse_s, *_ = accumulate(groups, images, args.top_k, args.batch_size, seed=4)
    cov_dense, cov_sparse = dense.covariance(), sparse.covariance()
    out = {"classes": c, "clusters": k, "images": images, "dense_update_s": dense_s,
           "top_k_update_s": sparse_s,
           "max_abs_cov_difference": float((cov_dense - cov_sparse).abs().max()),
           "max_abs_cov": float(cov_dense.abs().max())}
    for method in [args.method]:
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


def print_scale(runs: dict[str, dict]) -> None:
    first = next(iter(runs.values()))
    print(f"\n== C = {first['classes']:,} classes, {first['images']:,} images, top_k = {first['top_k']}, "
          f"RSS after imports {first['rss_after_imports_gib']:.2f} GiB")
    for way, r in runs.items():
        print(f"  {way:9s} accumulate {r['accumulate_s']:5.1f} s + covariance {r['covariance_s']:4.1f} s + "
              f"cluster_classes {r['cluster_s']:5.1f} s = {r['total_s']:5.1f} s (CPU {r['cpu_s']:.1f} s; target "
              f"<= 10 s), peak RSS "
              f"{r['peak_gib']:.2f} GiB (target <= 3); sizes {r['sizes']}, distinct sets {r['distinct_sets']}, "
              f"uncovered {r['uncovered']}, best-set coverage of planted groups {r['group_coverage']:.3f}")
    if {"projected", "dense"} <= set(runs):
        p, d = runs["projected"], runs["dense"]
        same = p["sets"] == d["sets"]
        ari = adjusted_rand_score(labels_of(d["sets"], p["classes"]), labels_of(p["sets"], p["classes"]))
        print(f"  dense / projected: {d['total_s'] / p['total_s']:.2f}x the time ({d['cpu_s'] / p['cpu_s']:.2f}x the "
              f"CPU time; cluster_classes alone "
              f"{d['cluster_s'] / p['cluster_s']:.2f}x), {d['peak_gib'] / p['peak_gib']:.2f}x the peak; "
              f"same sets: {same} (ARI of their first-set labels {ari:.3f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[15_000])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--specialists", type=int, default=61)
    parser.add_argument("--per-specialist", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--max-dim", type=int, default=512)
    parser.add_argument("--method", default="faiss", choices=["faiss", "minibatch"])
    parser.add_argument("--ways", nargs="+", default=["projected", "dense"], choices=["projected", "dense"])
    parser.add_argument("--threads", type=int, default=1, help="torch and faiss threads (OpenMP)")
    parser.add_argument("--compare-classes", type=int, default=2_000)
    parser.add_argument("--single", nargs=2, help=argparse.SUPPRESS)  # child: C and way, JSON out
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.single is not None:
        print(json.dumps(run_scale(args, int(args.single[0]), args.single[1])))
        return
    passthrough = list(sys.argv[1:])
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    print(f"torch {torch.__version__}, {args.threads} thread(s); k-means: {args.method}")
    for c in args.classes:
        runs = {}
        for way in args.ways:
            child = subprocess.run([sys.executable, __file__, *passthrough, "--single", str(c), way],
                                   check=True, capture_output=True, text=True, env=env)
            runs[way] = json.loads(child.stdout.strip().splitlines()[-1])
        print_scale(runs)
    if args.compare_classes:
        r = run_agreement(args)
        print(f"\n== agreement at C = {r['classes']:,} ({r['clusters']} disjoint clusters, "
              f"{r['images']:,} images): dense update {r['dense_update_s']:.1f} s vs top-{args.top_k} "
              f"{r['top_k_update_s']:.1f} s; max |cov_dense - cov_topk| = "
              f"{r['max_abs_cov_difference']:.2e} (max |cov| {r['max_abs_cov']:.2e})")
        x = r[args.method]
        print(f"  {args.method:10s} ARI top-k vs dense {x['ari_top_k_vs_dense']:.3f} (target >= 0.9), "
              f"projected ({args.max_dim} dims) vs full columns {x['ari_projected_vs_full']:.3f}, "
              f"vs planted: dense {x['ari_dense_vs_planted']:.3f}, top-k {x['ari_top_k_vs_planted']:.3f}")


if __name__ == "__main__":
    main()
