"""2D data sets: the cs231n spiral exactly, the others' shapes, noise and seeding."""
import numpy as np
import pytest

from experiments.datasets import GENERATORS, make_2d, spiral, stratified_split


def test_spiral_is_the_cs231n_construction():
    X, y = spiral(points=100, classes=3, noise=0.2, seed=0)
    rng = np.random.default_rng(0)
    for j in range(3):
        r = np.linspace(0.0, 1, 100)
        t = np.linspace(j * 4, (j + 1) * 4, 100) + rng.standard_normal(100) * 0.2
        np.testing.assert_allclose(X[100 * j:100 * (j + 1)], np.c_[r * np.sin(t), r * np.cos(t)])
        assert np.all(y[100 * j:100 * (j + 1)] == j)


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_generators_are_seeded_balanced_and_noise_moves_points(name):
    X, y = GENERATORS[name](points=50, seed=1)
    X2, y2 = GENERATORS[name](points=50, seed=1)
    np.testing.assert_array_equal(X, X2)
    assert X.shape == (len(y), 2) and y.dtype == np.int64
    assert len(set(np.bincount(y))) == 1                    # equal points per class
    quiet, _ = GENERATORS[name](points=50, noise=0.0, seed=1)
    noisy, y_noisy = GENERATORS[name](points=50, noise=0.5, seed=1)
    assert not np.allclose(quiet, noisy)
    np.testing.assert_array_equal(GENERATORS[name](points=50, noise=0.5, seed=1)[1], y_noisy)


def test_xor_labels_are_quadrant_parity_without_noise():
    X, y = GENERATORS["xor"](points=100, noise=0.0)
    np.testing.assert_array_equal(y, (X[:, 0] * X[:, 1] > 0).astype(int))


def test_split_is_stratified_and_disjoint():
    _, y = spiral(points=100, classes=3)
    is_val = stratified_split(y, 0.2, seed=0)
    assert np.bincount(y[is_val]).tolist() == [20, 20, 20]
    assert is_val.sum() == 60 and not np.array_equal(is_val, stratified_split(y, 0.2, seed=1))
    assert np.array_equal(is_val, stratified_split(y, 60, seed=0))      # a count or a fraction
    uneven = np.repeat([0, 1, 2], [50, 30, 20])
    assert np.bincount(uneven[stratified_split(uneven, 10, seed=0)]).tolist() == [5, 3, 2]


def test_two_class_sets_ignore_the_classes_option():
    assert make_2d("moons", 30, 5, None, 0).num_classes == 2
