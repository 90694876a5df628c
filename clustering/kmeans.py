"""Class sets for the specialists: k-means on the columns of the covariance.

Hinton et al. (2015), section 5: "we apply a clustering algorithm to the
covariance matrix of the predictions of our generalist model, so that a set of
classes Sᵐ that are often predicted together will be used as targets for one of
our specialist models m. We applied an on-line version of the K-means algorithm
to the columns of the covariance matrix."

What is clustered matters. The diagonal (each class's own variance) dominates
the raw columns, so a raw column mostly says "I am class i" and k-means groups
classes by how often they are predicted rather than with what. The default,
``columns="correlation"`` (cov_ij / sqrt(var_i var_j), diagonal set to 0) with
L2-normalised columns, was chosen by measurement on planted groups
(benchmarks/bench_clustering_columns.py, figures in docs/clustering-notes.md):
it removes both the diagonal and the differences in how often classes are
predicted, which defeat raw and zero-diagonal columns on imbalanced classes.

For large C the (C-dimensional) columns are reduced to ``max_dim`` dimensions
with a seeded Gaussian random projection before k-means (Johnson-Lindenstrauss:
distances and so clusters are preserved; measured in the notes).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from clustering.covariance import CovarianceAccumulator
from clustering.features import (
    COLUMN_TREATMENTS,
    DEFAULT_COLUMNS,
    DEFAULT_MAX_DIM,
    accumulated_features,
    check_cov,
    column_features,
)

logger = logging.getLogger(__name__)

__all__ = ["COLUMN_TREATMENTS", "METHODS", "cluster_classes", "column_features", "describe_method", "random_class_sets"]

METHODS = ("faiss", "minibatch", "random")
DEFAULT_N_INIT = 5
DEFAULT_MAX_ITER = 50


def cluster_classes(
    cov: torch.Tensor | np.ndarray | CovarianceAccumulator,
    num_specialists: int,
    classes_per_specialist: int | None = None,
    method: str = "faiss",
    seed: int = 0,
    *,
    columns: str = DEFAULT_COLUMNS,
    normalize: bool = True,
    n_init: int = DEFAULT_N_INIT,
    max_iter: int = DEFAULT_MAX_ITER,
    max_dim: int | None = DEFAULT_MAX_DIM,
    coverage: int | None = None,
) -> list[list[int]]:
    """Groups classes that the generalist confuses into specialist class sets.

    Args:
        cov: (C, C) symmetric covariance of the generalist's softmax outputs, or the
            ``CovarianceAccumulator`` holding its sums: with ``top_k`` and C > ``max_dim``
            the columns are then projected straight from its sparse sums, never forming the
            covariance (``clustering.features``; 20x fewer operations at C = 15,000); the
            accumulator is left unspent.
        num_specialists: M, the number of sets (k-means clusters).
        classes_per_specialist: None: the sets are the k-means clusters
            (disjoint, covering every class; a cluster with fewer than 2 classes
            takes the classes nearest its centroid from clusters that can spare
            one, so every set has >= 2 classes and there are exactly M sets).
            A number K: M sets of exactly K classes that may overlap (the
            paper's JFT run: 61 specialists x 300 of 15,000 classes), filled
            from the (class, centroid) pairs in order of distance: first every
            class joins its nearest set with room, then the sets are topped up
            with their nearest classes, no class joining more than
            ceil(M K / C) sets. (Taking each centroid's K nearest classes
            instead lets "hub" classes join nearly every set and leaves many
            uncovered: docs/clustering-notes.md.)
        coverage: instead of ``classes_per_specialist``, a number r: overlapping
            sets filled by the same rule so that every class is in r sets, the
            r C slots spread over the M sets (sizes floor(r C / M) or one more).
            When M K is not a multiple of C, fixed-size sets cover some classes
            once more than others, and the KL objective (section 5), one term per
            active specialist, then favours the classes held by more of them.
        method: "faiss" (``faiss.Kmeans``, best of ``n_init`` restarts),
            "minibatch" (scikit-learn ``MiniBatchKMeans`` fed batches of columns
            with ``partial_fit``: the paper's on-line k-means; best inertia of
            ``n_init`` runs) or "random": the ablation of the clustering, sets
            drawn by ``seed`` without looking at ``cov`` (only its size C),
            filled by the same rule from random (class, set) distances, so they
            have exactly the sizes and coverage that ``classes_per_specialist``
            / ``coverage`` give k-means. Without either option the k-means
            clusters' sizes depend on the covariance; random sets are then an
            even partition (sizes floor(C / M) or one more).
        seed: seeds initialisation, batch order and the random projection.
        columns: what is clustered, one of ``COLUMN_TREATMENTS``: "raw"
            columns, "zero_diagonal" (own variance set to 0), "correlation"
            (cov / sqrt(var_i var_j), diagonal set to 0), or
            "correlation_keep_diagonal" (diagonal left at 1).
        normalize: L2-normalise each column after the treatment (k-means then
            compares directions: with whom a class is confused, not how often).
        n_init: number of k-means restarts; the lowest objective is kept.
        max_iter: k-means iterations (faiss) or passes over the columns (minibatch).
        max_dim: if C > max_dim, project the columns to max_dim dimensions
            (seeded Gaussian projection) before k-means. None: never.

    Returns:
        M sorted lists of class indices (python ints), one per specialist.
    """
    options = {"columns": columns, "normalize": normalize, "max_dim": max_dim, "seed": seed}
    if method == "random":
        c = cov.num_classes if isinstance(cov, CovarianceAccumulator) else check_cov(cov).shape[0]
        _check_options(c, num_specialists, classes_per_specialist, method, columns, n_init, max_iter, max_dim, coverage)
        return random_class_sets(c, num_specialists, classes_per_specialist, seed=seed, coverage=coverage)
    if isinstance(cov, CovarianceAccumulator):
        c = cov.num_classes
        _check_options(c, num_specialists, classes_per_specialist, method, columns, n_init, max_iter, max_dim, coverage)
        features = accumulated_features(cov, **options)  # (C, D) float32
    else:
        cov_t = check_cov(cov)
        c = cov_t.shape[0]
        _check_options(c, num_specialists, classes_per_specialist, method, columns, n_init, max_iter, max_dim, coverage)
        features = column_features(cov_t, **options)  # (C, D) float32
    if method == "faiss":
        centroids = _faiss_kmeans(features, num_specialists, seed, n_init, max_iter)
    else:
        centroids = _minibatch_kmeans(features, num_specialists, seed, n_init, max_iter)
    distances = _squared_distances(features, centroids)  # (C, M)
    sets = _assign(distances, classes_per_specialist, coverage, disjoint=_disjoint_sets)
    logger.info(
        "clustered %d classes into %d sets (method=%s, columns=%s, sizes %d..%d)",
        c, len(sets), method, columns, min(map(len, sets)), max(map(len, sets)),
    )
    return sets


def random_class_sets(num_classes: int, num_specialists: int, classes_per_specialist: int | None = None, *,
                      seed: int = 0, coverage: int | None = None) -> list[list[int]]:
    """Seeded random class sets with the sizes and coverage of ``cluster_classes`` (the ablation of
    the clustering: ``method="random"``); without ``classes_per_specialist`` or ``coverage``, an even
    partition. Returns M sorted lists of class indices."""
    distances = np.random.default_rng(seed).random((num_classes, num_specialists))  # (C, M)
    sets = _assign(distances, classes_per_specialist, coverage, disjoint=_even_partition)
    logger.info("drew %d random sets over %d classes (seed %d, sizes %d..%d)", len(sets), num_classes, seed,
                min(map(len, sets)), max(map(len, sets)))
    return sets


def _assign(distances: np.ndarray, classes_per_specialist: int | None, coverage: int | None, *,
            disjoint) -> list[list[int]]:
    """Class sets from (C, M) class-to-set distances, by the sizes the options give."""
    c, m = distances.shape
    if coverage is not None:
        sizes = np.full(m, coverage * c // m, dtype=np.int64)
        sizes[: coverage * c % m] += 1
        return _balanced_sets(distances, sizes, cap=coverage)
    if classes_per_specialist is None:
        return disjoint(distances)
    size = min(classes_per_specialist, c)
    return _balanced_sets(distances, np.full(m, size, dtype=np.int64), cap=-(-m * size // c))


def _even_partition(distances: np.ndarray) -> list[list[int]]:
    """Disjoint sets of floor(C / M) or one more classes, filled in order of distance."""
    c, m = distances.shape
    sizes = np.full(m, c // m, dtype=np.int64)
    sizes[: c % m] += 1
    return _balanced_sets(distances, sizes, cap=1)


def describe_method(
    num_specialists: int,
    classes_per_specialist: int | None = None,
    method: str = "faiss",
    seed: int = 0,
    *,
    columns: str = DEFAULT_COLUMNS,
    normalize: bool = True,
    n_init: int = DEFAULT_N_INIT,
    max_iter: int = DEFAULT_MAX_ITER,
    max_dim: int | None = DEFAULT_MAX_DIM,
    coverage: int | None = None,
) -> dict[str, Any]:
    """The options of a ``cluster_classes`` call, for clusters.json's "method" field."""
    return {
        "algorithm": "random" if method == "random" else "kmeans",
        "method": method,
        "num_specialists": int(num_specialists),
        "classes_per_specialist": None if classes_per_specialist is None else int(classes_per_specialist),
        "columns": columns,
        "normalize": bool(normalize),
        "seed": int(seed),
        "n_init": int(n_init),
        "max_iter": int(max_iter),
        "max_dim": None if max_dim is None else int(max_dim),
        "coverage": None if coverage is None else int(coverage),
    }


# ----------------------------------------------------------------- validation
def _check_options(
    c: int,
    num_specialists: int,
    classes_per_specialist: int | None,
    method: str,
    columns: str,
    n_init: int,
    max_iter: int,
    max_dim: int | None,
    coverage: int | None = None,
) -> None:
    if isinstance(num_specialists, bool) or not isinstance(num_specialists, (int, np.integer)):
        raise ValueError(f"num_specialists must be an int, got {num_specialists!r}")
    if num_specialists < 1:
        raise ValueError(f"num_specialists={num_specialists} but expected at least 1")
    if num_specialists > c // 2:
        raise ValueError(
            f"num_specialists={num_specialists} but only {c} classes: "
            "need at least 2 classes per specialist"
        )
    if classes_per_specialist is not None and not 2 <= classes_per_specialist <= c:
        raise ValueError(
            f"classes_per_specialist={classes_per_specialist} but expected None or "
            f"2 <= classes_per_specialist <= {c} (the number of classes)"
        )
    if coverage is not None:
        if classes_per_specialist is not None:
            raise ValueError(f"coverage={coverage} and classes_per_specialist={classes_per_specialist}: "
                             "give one of them (coverage sets the sizes)")
        if isinstance(coverage, bool) or not isinstance(coverage, (int, np.integer)) or \
                not 1 <= coverage <= num_specialists or coverage * c // num_specialists < 2:
            raise ValueError(f"coverage={coverage!r} but expected an int in 1..{num_specialists} "
                             f"(num_specialists) giving sets of at least 2 of the {c} classes")
    if method not in METHODS:
        raise ValueError(f"method={method!r} but expected one of {METHODS}")
    if columns not in COLUMN_TREATMENTS:
        raise ValueError(f"columns={columns!r} but expected one of {COLUMN_TREATMENTS}")
    if n_init < 1:
        raise ValueError(f"n_init={n_init} but expected at least 1")
    if max_iter < 1:
        raise ValueError(f"max_iter={max_iter} but expected at least 1")
    if max_dim is not None and max_dim < 1:
        raise ValueError(f"max_dim={max_dim} but expected None or at least 1")


# ------------------------------------------------------------------- k-means
def _faiss_kmeans(x: np.ndarray, k: int, seed: int, n_init: int, max_iter: int) -> np.ndarray:
    """Centroids (k, D) of the best of n_init faiss k-means runs from k-means++ starts.

    faiss's own initialisation draws k random points; on small, well separated
    groups it rarely puts one seed in every group (measured: 8 planted groups of
    5 classes, nredo=5 never recovered them), so every run starts from greedy
    k-means++ instead.
    """
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    rng = np.random.default_rng(seed)
    best_centroids, best_objective = None, np.inf
    for _ in range(n_init):
        run_seed = int(rng.integers(2**31 - 1))
        init = _kmeans_plusplus(x, k, np.random.default_rng(run_seed))  # (k, D)
        kmeans = faiss.Kmeans(
            x.shape[1],
            k,
            niter=max_iter,
            seed=run_seed,
            verbose=False,
            min_points_per_centroid=1,  # C is small: no "too few points" warnings
            max_points_per_centroid=x.shape[0],  # and no subsampling
        )
        kmeans.train(x, init_centroids=np.ascontiguousarray(init, dtype=np.float32))
        objective = float(kmeans.obj[-1])
        if objective < best_objective:
            best_centroids, best_objective = np.array(kmeans.centroids, dtype=np.float32), objective
    return best_centroids


def _kmeans_plusplus(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Greedy k-means++ seeds (k, D), as scikit-learn's (2 + log k local trials).

    Written with float32 matrix products: scikit-learn's ``kmeans_plusplus``
    upcasts float32 distances in small chunks and took 21 s for 5,000 x 512
    points and k = 61 (this: well under a second).
    """
    n = x.shape[0]
    trials = 2 + int(np.log(k))
    norms = np.einsum("ij,ij->i", x, x)  # (n,)
    centers = np.empty((k, x.shape[1]), dtype=np.float32)
    first = int(rng.integers(n))
    centers[0] = x[first]
    closest = np.maximum(norms - 2.0 * x @ x[first] + norms[first], 0.0)  # (n,)
    for j in range(1, k):
        total = float(closest.sum())
        if total <= 0.0:  # fewer distinct points than k: any point will do
            candidates = rng.integers(n, size=trials)
        else:
            candidates = np.searchsorted(np.cumsum(closest), rng.random(trials) * total)
            candidates = np.minimum(candidates, n - 1)
        distances = norms[None, :] - 2.0 * (x[candidates] @ x.T) + norms[candidates, None]
        distances = np.minimum(closest[None, :], np.maximum(distances, 0.0))  # (trials, n)
        best = int(np.argmin(distances.sum(axis=1)))
        centers[j] = x[candidates[best]]
        closest = distances[best]
    return centers


def _minibatch_kmeans(
    x: np.ndarray, k: int, seed: int, n_init: int, max_iter: int
) -> np.ndarray:
    """On-line k-means: ``MiniBatchKMeans.partial_fit`` over shuffled column batches."""
    from sklearn.cluster import MiniBatchKMeans

    rng = np.random.default_rng(seed)
    batch_size = min(x.shape[0], max(2048, 3 * k))
    best_centroids, best_inertia = None, np.inf
    for _ in range(n_init):
        kmeans = MiniBatchKMeans(
            n_clusters=k,
            batch_size=batch_size,
            random_state=int(rng.integers(2**31 - 1)),
            n_init=1,
        )
        inertia = np.inf
        for _ in range(max_iter):  # passes over the columns, stopped once inertia settles
            order = rng.permutation(x.shape[0])
            for start in range(0, x.shape[0], batch_size):
                # the first batch (>= 2k columns since C >= 2k) initialises the centroids
                kmeans.partial_fit(x[order[start : start + batch_size]])
            previous, inertia = inertia, _inertia(x, kmeans.cluster_centers_)
            if inertia >= previous * (1.0 - 1e-4):
                break
        if inertia < best_inertia:
            best_centroids, best_inertia = kmeans.cluster_centers_.astype(np.float32), inertia
    return best_centroids


def _inertia(x: np.ndarray, centroids: np.ndarray) -> float:
    """Sum of squared distances of the points to their nearest centroid."""
    return float(_squared_distances(x, centroids).min(axis=1).sum())


def _squared_distances(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """(C, M) squared Euclidean distances between features and centroids."""
    x64, c64 = x.astype(np.float64), centroids.astype(np.float64)
    d = (x64**2).sum(1)[:, None] - 2.0 * x64 @ c64.T + (c64**2).sum(1)[None, :]
    return np.maximum(d, 0.0)


# ---------------------------------------------------------------- assignment
def _disjoint_sets(distances: np.ndarray) -> list[list[int]]:
    """Nearest-centroid clusters, repaired so that each has >= 2 classes.

    A cluster with fewer than 2 members takes, one at a time, the class nearest
    its centroid among clusters with more than 2 members (C >= 2M guarantees a
    donor exists). Every class stays in exactly one set.
    """
    c, m = distances.shape
    labels = distances.argmin(axis=1)  # (C,)
    sizes = np.bincount(labels, minlength=m)
    while (small := np.flatnonzero(sizes < 2)).size:
        target = small[np.argmin(sizes[small])]
        donors = sizes[labels] > 2  # (C,) classes whose cluster can spare one
        candidates = np.flatnonzero(donors)
        moved = candidates[np.argmin(distances[candidates, target])]
        sizes[labels[moved]] -= 1
        labels[moved] = target
        sizes[target] += 1
    return [sorted(int(i) for i in np.flatnonzero(labels == j)) for j in range(m)]


def _fill_by_moves(distances: np.ndarray, member: np.ndarray, count: np.ndarray, room: np.ndarray,
                   cap: int) -> None:
    """Fill the room the greedy passes left, in place, keeping every class within ``cap``.

    Room is left in set j only when every class still under the cap is already in j. Then a
    class h moves from another set j2 into j (h's count is unchanged: the nearest such h to
    j's centroid) and the under-covered class i takes h's place in j2 (the nearest set to i).
    """
    while room.any():
        j = int(np.flatnonzero(room)[0])
        short = np.flatnonzero(count < cap)
        moved = False
        for i in short[np.argsort(distances[short, j], kind="stable")].tolist():
            for j2 in np.argsort(distances[i], kind="stable").tolist():
                if member[i, j2]:
                    continue
                movable = np.flatnonzero(member[:, j2] & ~member[:, j])
                if movable.size == 0:
                    continue
                h = int(movable[np.argmin(distances[movable, j])])
                member[h, j2], member[h, j], member[i, j2] = False, True, True
                count[i] += 1
                room[j] -= 1
                moved = True
                break
            if moved:
                break
        if not moved:
            return


def _balanced_sets(distances: np.ndarray, sizes: np.ndarray, cap: int) -> list[list[int]]:
    """M overlapping sets, set j of ``sizes[j]`` classes: cover every class once, then top up, capped.

    Pairs (class, centroid) are visited in order of distance, twice: the first pass puts each
    class not yet in any set into the set with room nearest to it (all classes are covered when
    sum(sizes) >= C); the second fills the remaining room with each set's nearest classes, a class
    joining at most ``cap`` sets, so that no class can crowd into every set.
    Every set ends with exactly ``sizes[j]`` classes.
    """
    c, m = distances.shape
    member = np.zeros((c, m), dtype=bool)
    count = np.zeros(c, dtype=np.int64)
    room = np.minimum(np.asarray(sizes, dtype=np.int64), c)
    order = np.argsort(distances, axis=None, kind="stable")
    rows, cols = np.divmod(order, m)
    for cover_first in (True, False):
        for i, j in zip(rows.tolist(), cols.tolist(), strict=True):
            if room[j] == 0 or member[i, j] or count[i] >= cap or (cover_first and count[i] > 0):
                continue
            member[i, j] = True
            count[i] += 1
            room[j] -= 1
    _fill_by_moves(distances, member, count, room, cap)
    if room.any():  # without the cap: only in corner cases (tiny C) where the cap and the moves left room
        for i, j in zip(rows.tolist(), cols.tolist(), strict=True):
            if room[j] > 0 and not member[i, j]:
                member[i, j] = True
                count[i] += 1
                room[j] -= 1
    return [sorted(int(i) for i in np.flatnonzero(member[:, j])) for j in range(m)]
