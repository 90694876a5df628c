"""error_pair_share on hand-computed cases."""

import numpy as np
import pytest

from clustering import chance_pair_share, error_pair_share


def test_hand_computed_case():
    # C = 5, sets {0,1,2} and {2,3}; class 4 in no set.
    sets = [[0, 1, 2], [2, 3]]
    true = [0, 1, 2, 3, 4, 0, 3, 1]
    pred = [1, 1, 3, 0, 0, 2, 2, 1]
    # errors: (0,1) in, (2,3) in, (3,0) out, (4,0) out, (0,2) in, (3,2) in -> 4 of 6
    result = error_pair_share(true, pred, sets)
    assert result.num_errors == 6 and result.num_inside == 4
    assert result.share == pytest.approx(4 / 6)
    # ordered pairs sharing a set: {0,1,2} gives 6, {2,3} gives 2, none shared twice -> 8 of 20
    assert result.chance == pytest.approx(8 / 20)
    assert result.lift == pytest.approx((4 / 6) / (8 / 20))


def test_chance_counts_overlapping_pairs_once():
    # {0,1,2} and {1,2,3}: pairs (1,2),(2,1) are in both but count once.
    # unordered pairs: 01 02 12 13 23 -> 5, ordered 10; C = 4 -> 12 ordered pairs
    assert chance_pair_share([[0, 1, 2], [1, 2, 3]], 4) == pytest.approx(10 / 12)
    assert chance_pair_share([[0, 1, 2, 3]], 4) == 1.0


def test_num_classes_changes_chance_and_no_errors_is_nan():
    result = error_pair_share(np.array([0, 1]), np.array([0, 1]), [[0, 1]], num_classes=10)
    assert result.num_errors == 0 and np.isnan(result.share)
    assert result.chance == pytest.approx(2 / 90)


def test_errors():
    with pytest.raises(ValueError, match="true_labels has shape"):
        error_pair_share([0, 1], [0], [[0, 1]])
    with pytest.raises(ValueError, match="num_classes=3 but a label or set member is 5"):
        error_pair_share([0, 5], [1, 0], [[0, 1]], num_classes=3)
    with pytest.raises(ValueError, match="must hold integers"):
        error_pair_share(np.array([0.5]), np.array([1.0]), [[0, 1]])
