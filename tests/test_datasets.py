"""2D data sets: the cs231n spiral exactly, the others' shapes, noise and seeding."""
import numpy as np
import pytest

from experiments.datasets import GENERATORS, make_2d, spiral, stratified_split


def arm_angles(X: np.ndarray, arm: int, points: int) -> np.ndarray:
    """How far each point of ``arm`` (its centre excluded) is turned from the notes'
    angle linspace(4j, 4(j+1)), in radians wrapped to [-pi, pi)."""
    ix = slice(points * arm + 1, points * (arm + 1))
    angle = np.arctan2(X[ix, 0], X[ix, 1])                 # x = r sin t, y = r cos t
    planned = np.linspace(4 * arm, 4 * (arm + 1), points)[1:]
    return (angle - planned + np.pi) % (2 * np.pi) - np.pi


def test_spiral_arms_have_the_notes_radii_and_angles_plus_noise():
    """The cs231n spiral: arm j at radius linspace(0, 1) and angle linspace(4j, 4j + 4),
    the angle jittered by Gaussian noise of std ``noise``; the radius never is."""
    X, y = spiral(points=100, classes=3, noise=0.0)
    for arm in range(3):
        points = X[100 * arm:100 * (arm + 1)]
        np.testing.assert_allclose(np.hypot(points[:, 0], points[:, 1]), np.linspace(0, 1, 100),
                                   rtol=1e-15, atol=1e-15)
        np.testing.assert_allclose(arm_angles(X, arm, 100), 0, atol=1e-12)
        assert np.all(y[100 * arm:100 * (arm + 1)] == arm)
    X, _ = spiral(points=1000, classes=3, noise=0.2, seed=0)
    np.testing.assert_allclose(np.hypot(X[:1000, 0], X[:1000, 1]), np.linspace(0, 1, 1000), atol=1e-15)
    turns = np.concatenate([arm_angles(X, arm, 1000) for arm in range(3)])
    assert abs(turns.mean()) < 0.02 and 0.19 < turns.std() < 0.21     # 3000 draws of N(0, 0.2)


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
