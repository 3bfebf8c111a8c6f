"""Losses: numerical gradients, known values, numerical stability."""
import numpy as np
import pytest

from mlp.gradcheck import check_loss
from mlp.losses import softmax_cross_entropy, svm_hinge

pytestmark = pytest.mark.numerics     # gradients checked in float64 round differently per BLAS kernel


@pytest.mark.parametrize("loss_fn", [softmax_cross_entropy, svm_hinge,
                                     lambda s, y: softmax_cross_entropy(s, y, 0.1)])
def test_loss_gradient_matches_numerical(loss_fn):
    rng = np.random.default_rng(1)
    scores, y = 0.5 * rng.standard_normal((7, 4)), rng.integers(0, 4, size=7)
    assert check_loss(loss_fn, scores, y) < 1e-7


def test_softmax_of_equal_scores_is_log_of_class_count():
    loss, dscores = softmax_cross_entropy(np.zeros((5, 10)), np.arange(5))
    assert loss == pytest.approx(np.log(10))
    np.testing.assert_allclose(dscores.sum(axis=1), 0, atol=1e-15)


def test_softmax_is_stable_for_huge_scores():
    loss, dscores = softmax_cross_entropy(np.array([[1000.0, 0.0], [0.0, -1000.0]]), np.array([0, 1]))
    assert loss == pytest.approx(1000.0 / 2)
    assert np.all(np.isfinite(dscores))


def test_label_smoothing_target_mixes_one_hot_and_uniform():
    loss, _ = softmax_cross_entropy(np.zeros((1, 4)), np.array([2]), label_smoothing=0.2)
    assert loss == pytest.approx(np.log(4))          # any target on uniform probs
    loss, d = softmax_cross_entropy(np.array([[0.0, 10.0]]), np.array([1]), label_smoothing=0.2)
    p = np.exp([0.0, 10.0]) / np.exp([0.0, 10.0]).sum()
    np.testing.assert_allclose(d, [p - [0.1, 0.9]])


def test_svm_hinge_known_values():
    # zero scores: every wrong class violates the margin of 1
    loss, _ = svm_hinge(np.zeros((3, 4)), np.array([0, 1, 2]))
    assert loss == pytest.approx(3.0)
    # cs231n notes example: scores [13, -7, 11], correct class 0, margin 10 -> 8 ... with margin 1:
    loss, d = svm_hinge(np.array([[13.0, -7.0, 11.0]]), np.array([0]))
    assert loss == 0.0 and not d.any()
    loss, d = svm_hinge(np.array([[3.2, 5.1, -1.7]]), np.array([0]))   # the notes' cat example
    assert loss == pytest.approx(2.9)
    np.testing.assert_allclose(d, [[-1.0, 1.0, 0.0]])


def test_softmax_rows_sum_to_one_and_survive_huge_scores():
    from mlp.losses import softmax
    probs = softmax(np.array([[1000.0, 0.0, -1000.0], [1.0, 1.0, 1.0]]))
    np.testing.assert_allclose(probs, [[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]])
