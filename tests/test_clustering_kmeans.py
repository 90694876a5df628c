"""cluster_classes: planted confusable groups are recovered; options are validated."""

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from clustering import CovarianceAccumulator, cluster_classes, column_features, describe_method
from clustering.synthetic import planted_groups, synthetic_outputs

C, GROUPS = 40, 8


@pytest.fixture(scope="module")
def planted():
    groups = planted_groups(C, GROUPS, seed=1)
    acc = CovarianceAccumulator(C)
    for probs, _ in synthetic_outputs(groups, 4_000, batch_size=1_000, seed=2):
        acc.update(probs)
    return groups, acc.covariance()


def _labels(sets, c):
    labels = np.full(c, -1)
    for m, s in enumerate(sets):
        labels[s] = m
    return labels


@pytest.mark.parametrize("method", ["faiss", "minibatch"])
@pytest.mark.parametrize("seed", [0, 1])
def test_recovers_planted_groups(planted, method, seed):
    groups, cov = planted
    sets = cluster_classes(cov, GROUPS, method=method, seed=seed)
    assert len(sets) == GROUPS
    assert sorted(i for s in sets for i in s) == list(range(C))  # disjoint, covering
    assert all(s == sorted(s) and all(type(i) is int for i in s) for s in sets)
    assert adjusted_rand_score(groups, _labels(sets, C)) >= 0.95


def test_numpy_float32_input_gives_the_same_sets(planted):
    groups, cov = planted
    assert cluster_classes(cov.numpy().astype(np.float32), GROUPS) == cluster_classes(cov, GROUPS)


def test_same_seed_same_sets(planted):
    _, cov = planted
    for method in ("faiss", "minibatch"):
        assert cluster_classes(cov, GROUPS, method=method, seed=3) == cluster_classes(
            cov, GROUPS, method=method, seed=3
        )


@pytest.mark.parametrize("method", ["faiss", "minibatch"])
def test_overlap_mode_sets_have_the_requested_size(planted, method):
    groups, cov = planted
    sets = cluster_classes(cov, GROUPS, 7, method=method)
    assert [len(s) for s in sets] == [7] * GROUPS
    assert all(len(set(s)) == 7 and s == sorted(s) for s in sets)
    # each planted group of 5 lies entirely inside some set of 7
    for g in range(GROUPS):
        members = set(np.flatnonzero(groups == g).tolist())
        assert any(members <= set(s) for s in sets)


def test_projection_keeps_the_groups(planted):
    groups, cov = planted
    sets = cluster_classes(cov, GROUPS, max_dim=16, seed=0)
    assert adjusted_rand_score(groups, _labels(sets, C)) >= 0.95
    features = column_features(cov, max_dim=16)
    assert features.shape == (C, 16) and features.dtype == np.float32


def test_column_treatments():
    cov = torch.tensor([[4.0, 1.0, 0.0], [1.0, 1.0, -0.5], [0.0, -0.5, 1.0]], dtype=torch.float64)
    raw = column_features(cov, columns="raw", normalize=False)
    np.testing.assert_allclose(raw, cov.numpy())
    zero = column_features(cov, columns="zero_diagonal", normalize=False)
    np.testing.assert_allclose(zero, [[0, 1, 0], [1, 0, -0.5], [0, -0.5, 0]])
    corr = column_features(cov, columns="correlation", normalize=False)
    np.testing.assert_allclose(corr, [[0, 0.5, 0], [0.5, 0, -0.5], [0, -0.5, 0]])
    keep = column_features(cov, columns="correlation_keep_diagonal", normalize=True)
    np.testing.assert_allclose(keep[0], np.array([1, 0.5, 0]) / np.sqrt(1.25), rtol=1e-6)


def test_no_set_smaller_than_two():
    # Class 0 is alone and far away: its cluster would be a singleton.
    rng = np.random.default_rng(0)
    points = np.concatenate([[[50.0, 50.0]], rng.normal(size=(9, 2))])  # (10, 2)
    cov = points @ points.T  # features of "raw" columns are the rows of this Gram matrix
    for method in ("faiss", "minibatch"):
        sets = cluster_classes(cov, 5, method=method, columns="raw", normalize=False)
        assert len(sets) == 5
        assert min(len(s) for s in sets) >= 2
        assert sorted(i for s in sets for i in s) == list(range(10))


def test_describe_method_records_the_options():
    assert describe_method(61, 300, "minibatch", 7, n_init=3) == {
        "algorithm": "kmeans",
        "method": "minibatch",
        "num_specialists": 61,
        "classes_per_specialist": 300,
        "columns": "correlation",
        "normalize": True,
        "seed": 7,
        "n_init": 3,
        "max_iter": 50,
        "max_dim": 512,
        "coverage": None,
    }


def test_errors_name_the_value():
    cov = torch.eye(10, dtype=torch.float64)
    with pytest.raises(ValueError, match="num_specialists=0 but expected at least 1"):
        cluster_classes(cov, 0)
    with pytest.raises(
        ValueError,
        match="num_specialists=6 but only 10 classes: need at least 2 classes per specialist",
    ):
        cluster_classes(cov, 6)
    with pytest.raises(ValueError, match="classes_per_specialist=1 but expected"):
        cluster_classes(cov, 2, 1)
    with pytest.raises(ValueError, match="classes_per_specialist=11 but expected"):
        cluster_classes(cov, 2, 11)
    with pytest.raises(ValueError, match="coverage=2 and classes_per_specialist=4: give one"):
        cluster_classes(cov, 2, 4, coverage=2)
    with pytest.raises(ValueError, match=r"coverage=3 but expected an int in 1..2"):
        cluster_classes(cov, 2, coverage=3)
    with pytest.raises(ValueError, match=r"cov has shape \(10, 9\) but expected a square"):
        cluster_classes(cov[:, :9], 2)
    bad = cov.clone()
    bad[4, 2] = float("nan")
    with pytest.raises(ValueError, match="cov contains NaN/Inf at row 4"):
        cluster_classes(bad, 2)
    with pytest.raises(ValueError, match="method='kmeans' but expected one of"):
        cluster_classes(cov, 2, method="kmeans")
    with pytest.raises(ValueError, match="columns='diag' but expected one of"):
        cluster_classes(cov, 2, columns="diag")
    with pytest.raises(ValueError, match="n_init=0"):
        cluster_classes(cov, 2, n_init=0)


def test_fixed_size_sets_cover_every_class_and_cap_hubs():
    """Overlapping sets: exact size, every class covered when M·K >= C, no class in more than
    ceil(M·K / C) sets — even a "hub" class that is nearest to every centroid."""
    from clustering.kmeans import _balanced_sets

    rng = np.random.default_rng(0)
    c, m, k = 50, 6, 12
    distances = rng.uniform(1.0, 2.0, size=(c, m))
    distances[7] = 0.01  # the hub: closest class of every centroid
    sets = _balanced_sets(distances, np.full(m, k), cap=-(-m * k // c))
    assert [len(s) for s in sets] == [k] * m and all(len(set(s)) == k for s in sets)
    counts = np.bincount(np.concatenate(sets), minlength=c)
    assert counts.min() >= 1 and counts.max() <= -(-m * k // c) == 2
    assert counts[7] == 2  # the hub is capped, not in all 6 sets
    # Each class's first set is the nearest one that still had room when it came up: the
    # class nearest to a centroid overall, the hub aside (its 6 distances tie, and an unstable
    # sort orders ties differently on different CPUs), sits in that centroid's set.
    others = distances.copy()
    others[7] = np.inf
    i, j = np.unravel_index(np.argmin(others), others.shape)
    assert i != 7 and i in sets[j]


def test_fixed_size_sets_on_planted_groups(planted):
    groups, cov = planted  # 40 classes in 8 groups of 5
    sets = cluster_classes(cov, 8, 6, seed=0)
    counts = np.bincount(np.concatenate(sets), minlength=C)
    assert counts.min() == 1 and counts.max() == 2  # 48 slots: everyone once, 8 twice
    # Every planted group lies inside one set.
    members = [set(np.flatnonzero(groups == g).tolist()) for g in range(GROUPS)]
    assert all(any(g <= set(s) for s in sets) for g in members)


def test_equal_coverage_puts_every_class_in_r_sets(planted):
    """coverage=r: r·C slots spread over M sets (sizes differ by at most 1), every class in r of them."""
    groups, cov = planted  # 40 classes in 8 groups of 5
    for m, r in ((8, 1), (8, 2), (7, 2), (6, 3)):
        sets = cluster_classes(cov, m, coverage=r, seed=0)
        sizes = sorted(len(s) for s in sets)
        assert len(sets) == m and sum(sizes) == r * C and sizes[-1] - sizes[0] <= 1
        assert all(len(set(s)) == len(s) for s in sets)
        counts = np.bincount(np.concatenate(sets), minlength=C)
        assert counts.min() == counts.max() == r, (m, r, np.bincount(counts))
    sets = cluster_classes(cov, 8, coverage=1, seed=0)  # disjoint: the planted groups come back
    assert adjusted_rand_score(groups, _labels(sets, C)) >= 0.95


# ----------------------------------------------------- columns projected from an accumulator
@pytest.fixture(scope="module")
def top_k_planted():
    """300 classes in 12 planted groups, top-5 sums: sparse enough for the projected path."""
    c, groups_n = 300, 12
    groups = planted_groups(c, groups_n, seed=4)
    acc = CovarianceAccumulator(c, top_k=5)
    for probs, _ in synthetic_outputs(groups, 6_000, batch_size=1_000, seed=5):
        acc.update(probs)
    return groups, acc


@pytest.mark.parametrize("columns", ["raw", "zero_diagonal", "correlation", "correlation_keep_diagonal"])
@pytest.mark.parametrize("normalize", [True, False])
def test_accumulated_features_equal_the_dense_ones(top_k_planted, columns, normalize):
    """The projection from the kept rows (no C × C product) gives column_features' vectors."""
    from clustering.features import accumulated_features

    _, acc = top_k_planted
    dense = column_features(acc.covariance(), columns=columns, normalize=normalize, max_dim=32, seed=7)
    fast = accumulated_features(acc, columns=columns, normalize=normalize, max_dim=32, seed=7)
    assert fast.shape == dense.shape == (300, 32) and fast.dtype == np.float32
    np.testing.assert_allclose(fast, dense, rtol=0, atol=2e-5 * np.abs(dense).max())


def test_cluster_classes_from_the_accumulator(top_k_planted):
    """Same sets as from the dense covariance, the accumulator left unspent; 61-style overlapping sets."""
    groups, acc = top_k_planted
    count = acc.count
    sets = cluster_classes(acc, 12, 30, max_dim=32, seed=0)
    assert sets == cluster_classes(acc.covariance(), 12, 30, max_dim=32, seed=0)
    assert acc.count == count and acc.covariance().shape == (300, 300)  # still usable
    assert [len(s) for s in sets] == [30] * 12
    for g in range(12):  # each planted group of 25 inside some set of 30
        members = set(np.flatnonzero(groups == g).tolist())
        assert any(members <= set(s) for s in sets)


def test_accumulator_without_rows_falls_back_to_the_dense_columns(top_k_planted):
    from clustering.features import accumulated_features

    _, acc = top_k_planted
    restored = CovarianceAccumulator(300, top_k=5).load_state_dict(
        {k: v for k, v in acc.state_dict().items() if not k.startswith("row_")})
    assert restored.rows is None
    np.testing.assert_array_equal(accumulated_features(restored, max_dim=32),
                                  column_features(acc.covariance(), max_dim=32))
    dense_acc = CovarianceAccumulator(6).update(torch.softmax(torch.randn(20, 6), 1))
    assert dense_acc.rows is None
    assert cluster_classes(dense_acc, 2) == cluster_classes(dense_acc.covariance(), 2)
