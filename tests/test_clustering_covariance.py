"""CovarianceAccumulator against numpy.cov (population covariance)."""

import numpy as np
import pytest
import torch

from clustering import CovarianceAccumulator


def _probs(n: int, c: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, c)) * 2.0
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)  # (n, C) float64


def _reference(x: np.ndarray) -> np.ndarray:
    return np.cov(x, rowvar=False, bias=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_uneven_batches_and_merge_match_numpy_cov(dtype):
    x = torch.from_numpy(_probs(257, 13)).to(dtype)
    reference = _reference(x.double().numpy())  # numpy.cov of exactly what was fed
    cuts = [0, 1, 10, 11, 100, 180, 257]
    parts = []
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):
        acc = CovarianceAccumulator(13)
        acc.update(x[a:b] if a % 2 else x[a:b].numpy() if dtype == torch.float32 else x[a:b])
        parts.append(acc)
    merged = parts[0]
    for other in parts[1:]:
        assert merged.merge(other) is merged
    cov = merged.covariance()
    assert cov.dtype == torch.float64 and cov.shape == (13, 13)
    assert merged.count == 257
    np.testing.assert_allclose(cov.numpy(), reference, rtol=0, atol=1e-10)
    np.testing.assert_allclose(merged.mean().numpy(), x.double().numpy().mean(0), atol=1e-12)


def test_numpy_float32_input_and_empty_batch():
    x = _probs(50, 7, seed=3).astype(np.float32)
    acc = CovarianceAccumulator(7)
    acc.update(x[:0]).update(x[:20]).update(x[20:])
    np.testing.assert_allclose(acc.covariance().numpy(), _reference(x.astype(np.float64)), atol=1e-10)


def test_top_k_equal_to_num_classes_is_dense():
    x = _probs(300, 11, seed=1)
    dense, sparse = CovarianceAccumulator(11), CovarianceAccumulator(11, top_k=11)
    dense.update(x)
    sparse.update(x)
    np.testing.assert_allclose(sparse.covariance().numpy(), dense.covariance().numpy(), atol=1e-12)
    np.testing.assert_allclose(dense.covariance().numpy(), _reference(x), atol=1e-10)


def test_top_k_scatter_path_with_exactly_k_nonzeros_matches_dense(monkeypatch):
    # Rows with exactly k non-zeros: dropping the rest loses nothing.
    rng = np.random.default_rng(2)
    n, c, k = 400, 30, 4
    x = np.zeros((n, c))
    for row in x:
        idx = rng.choice(c, size=k, replace=False)
        row[idx] = rng.dirichlet(np.ones(k)) + 1e-3  # strictly positive on the k kept
    monkeypatch.setattr("clustering.covariance._SCATTER_ENTRIES", 5 * k * k)  # many chunks
    sparse = CovarianceAccumulator(c, top_k=k)
    for a in range(0, n, 37):
        sparse.update(torch.from_numpy(x[a : a + 37]))
    np.testing.assert_allclose(sparse.covariance().numpy(), _reference(x), rtol=0, atol=1e-12)


def test_top_k_smaller_drops_the_tail():
    x = _probs(100, 9, seed=4)
    acc = CovarianceAccumulator(9, top_k=2)
    acc.update(x)
    kept = np.where(x >= np.sort(x, axis=1)[:, [-2]], x, 0.0)  # the 2 largest per row
    np.testing.assert_allclose(acc.covariance().numpy(), _reference(kept), atol=1e-12)


def test_state_dict_round_trip(tmp_path):
    x = _probs(120, 6, seed=5)
    acc = CovarianceAccumulator(6, top_k=3)
    acc.update(x[:70])
    torch.save(acc.state_dict(), tmp_path / "partial.pt")
    restored = CovarianceAccumulator(6, top_k=3).load_state_dict(
        torch.load(tmp_path / "partial.pt", weights_only=True)
    )
    assert restored.count == 70
    restored.update(x[70:])
    acc.update(x[70:])
    assert torch.equal(restored.covariance(), acc.covariance())
    with pytest.raises(ValueError, match="top_k=3 but this accumulator has num_classes=6, top_k=None"):
        CovarianceAccumulator(6).load_state_dict(acc.state_dict())


def test_inplace_covariance_spends_the_accumulator():
    x = _probs(40, 5)
    acc = CovarianceAccumulator(5).update(x)
    expected = acc.covariance()
    assert torch.equal(acc.covariance(inplace=True), expected)
    with pytest.raises(RuntimeError, match="spent"):
        acc.update(x)


def test_errors_name_the_problem():
    acc = CovarianceAccumulator(4)
    bad = np.full((5, 4), 0.25)
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="probs contains NaN/Inf at row 3"):
        acc.update(bad)
    bad[3, 1] = np.inf
    with pytest.raises(ValueError, match="probs contains NaN/Inf at row 3"):
        acc.update(torch.from_numpy(bad))
    with pytest.raises(ValueError, match=r"probs has shape \(5, 3\) but expected \(B, 4\)"):
        acc.update(np.zeros((5, 3)))
    with pytest.raises(ValueError, match=r"probs has shape \(4,\)"):
        acc.update(np.zeros(4))
    with pytest.raises(ValueError, match="float dtype"):
        acc.update(torch.zeros(2, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="num_classes=0 but expected at least 1"):
        CovarianceAccumulator(0)
    with pytest.raises(ValueError, match="top_k=0"):
        CovarianceAccumulator(4, top_k=0)
    with pytest.raises(ValueError, match="cannot merge"):
        acc.merge(CovarianceAccumulator(5))
    with pytest.raises(RuntimeError, match="empty accumulator"):
        acc.covariance()
    assert acc.count == 0  # failed updates left no trace


def test_top_k_rows_are_kept_merged_and_saved():
    x = torch.from_numpy(_probs(50, 9)).float()
    a = CovarianceAccumulator(9, top_k=3).update(x[:20])
    b = CovarianceAccumulator(9, top_k=3).update(x[20:])
    values, index = a.merge(b).rows
    assert sum(len(v) for v in values) == 50 and values[0].dtype == torch.float32 and index[0].dtype == torch.int32
    top = x.topk(3, dim=1)
    got = torch.cat(values).sort(dim=1, descending=True).values
    assert torch.equal(got, top.values)
    assert torch.equal(torch.cat(index).long().sort(dim=1).values, top.indices.sort(dim=1).values)
    state = a.state_dict()
    assert state["row_values"].shape == (50, 3)
    restored = CovarianceAccumulator(9, top_k=3).load_state_dict(state)
    assert torch.equal(torch.cat(restored.rows[0]), torch.cat(values))


def test_nan_found_and_huge_finite_rows_accepted():
    x = torch.rand(4, 5)
    x[2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf at row 2"):
        CovarianceAccumulator(5, top_k=2).update(x)
    huge = torch.full((3, 5), 3e38)  # each finite; their float32 row sums overflow
    acc = CovarianceAccumulator(5).update(huge.double().div(1e38).float())
    assert acc.count == 3
    CovarianceAccumulator(5).update(huge)  # not refused: no entry is NaN/Inf
