"""2D toy data sets, each a seeded generator of (X: (N, 2) float64, y: (N,) int64).

``noise`` always moves the points (Gaussian jitter on coordinates or angles);
labels come from where a point was generated, so noisy points can cross
class boundaries, as in real data.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from experiments.errors import (
    ConfigError,
    DataError,  # noqa: F401  raised by the loaders of every data set
)


def spiral(points: int = 100, classes: int = 3, noise: float = 0.2, seed: int = 0):
    """The cs231n spiral: ``points`` per class, ``classes`` arms; for arm j the
    radius is linspace(0, 1, points) and the angle linspace(4j, 4(j+1), points)
    plus Gaussian noise of std ``noise`` (radians)."""
    rng = np.random.default_rng(seed)
    X = np.zeros((points * classes, 2))
    y = np.zeros(points * classes, dtype=np.int64)
    for j in range(classes):
        ix = slice(points * j, points * (j + 1))
        r = np.linspace(0.0, 1, points)
        t = np.linspace(j * 4, (j + 1) * 4, points) + rng.standard_normal(points) * noise
        X[ix] = np.c_[r * np.sin(t), r * np.cos(t)]
        y[ix] = j
    return X, y


def circle(points: int = 100, classes: int = 2, noise: float = 0.1, seed: int = 0):
    """Two concentric rings: class 0 at radius 0.5, class 1 at radius 1, angles
    uniform, then Gaussian jitter of std ``noise`` on both coordinates."""
    rng = np.random.default_rng(seed)
    angles = rng.uniform(0, 2 * np.pi, size=2 * points)
    radius = np.repeat([0.5, 1.0], points)
    X = np.c_[radius * np.cos(angles), radius * np.sin(angles)]
    X += rng.standard_normal(X.shape) * noise
    return X, np.repeat(np.arange(2), points)


def xor(points: int = 100, classes: int = 2, noise: float = 0.1, seed: int = 0):
    """``points`` per class, uniform in [-1, 1]^2 kept 0.1 off the axes: class 1 in
    the quadrants where x*y > 0, class 0 in the others; then Gaussian jitter of
    std ``noise``."""
    rng = np.random.default_rng(seed)
    magnitude = rng.uniform(0.1, 1.0, size=(2 * points, 2))
    sx = np.where(rng.random(2 * points) < 0.5, -1.0, 1.0)
    y = np.repeat(np.arange(2), points)
    sy = np.where(y == 1, sx, -sx)              # same signs: x*y > 0
    X = magnitude * np.c_[sx, sy]
    X += rng.standard_normal(X.shape) * noise
    return X, y


def blobs(points: int = 100, classes: int = 3, noise: float = 0.3, seed: int = 0):
    """``classes`` isotropic Gaussian blobs of std ``noise``, centred evenly on the unit circle."""
    rng = np.random.default_rng(seed)
    angles = 2 * np.pi * np.arange(classes) / classes
    centres = np.c_[np.cos(angles), np.sin(angles)]
    y = np.repeat(np.arange(classes), points)
    X = centres[y] + rng.standard_normal((len(y), 2)) * noise
    return X, y


def moons(points: int = 100, classes: int = 2, noise: float = 0.1, seed: int = 0):
    """Two interleaving half circles (as scikit-learn's make_moons), then
    Gaussian jitter of std ``noise``."""
    rng = np.random.default_rng(seed)
    t = rng.uniform(0, np.pi, size=2 * points)
    upper = np.c_[np.cos(t[:points]), np.sin(t[:points])]
    lower = np.c_[1 - np.cos(t[points:]), 0.5 - np.sin(t[points:])]
    X = np.r_[upper, lower] + rng.standard_normal((2 * points, 2)) * noise
    return X, np.repeat(np.arange(2), points)


GENERATORS = {"spiral": spiral, "circle": circle, "xor": xor, "blobs": blobs, "moons": moons}
DEFAULT_NOISE = {"spiral": 0.2, "circle": 0.1, "xor": 0.1, "blobs": 0.3, "moons": 0.1}
FIXED_CLASSES = {"circle": 2, "xor": 2, "moons": 2}


@dataclass
class Dataset:
    """Arrays ready for training. X_*: (N, *input_shape), y_*: (N,) int64."""

    name: str
    X_train: np.ndarray
    y_train: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    num_classes: int
    class_names: list[str]
    X_test: np.ndarray | None = None
    y_test: np.ndarray | None = None
    metadata: dict = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.X_train.shape[1:])


def held_out_count(n: int, val_size: int | float) -> int:
    """How many of ``n`` examples a val_size holds out: a float is a fraction
    (rounded), an int a count; ConfigError unless it leaves training examples."""
    count = int(round(val_size * n)) if isinstance(val_size, float) else int(val_size)
    if not 0 <= count < n:
        raise ConfigError("val_size", f"{val_size} would hold out {count} of {n} examples; it must "
                                      "leave some for training")
    return count


def stratified_split(y: np.ndarray, val_size: int | float, seed: int) -> np.ndarray:
    """A boolean mask of the validation examples: ``val_size`` of them (a count, or a
    fraction of all) chosen by ``seed``, each class giving its share within one
    example. y: (N,) ints -> (N,) bool.

    An example's key is its rank within its class (in random order) over the
    class's size; the smallest keys take each class in proportion, and ties
    fall in random order.
    """
    count = held_out_count(len(y), val_size)
    is_val = np.zeros(len(y), dtype=bool)
    if count == 0:
        return is_val
    order = np.random.default_rng(seed).permutation(len(y))
    labels = y[order]
    counts = np.bincount(labels)
    by_class = np.argsort(labels, kind="stable")
    rank = np.empty(len(y))
    rank[by_class] = np.arange(len(y)) - np.repeat(np.cumsum(counts) - counts, counts)
    order = order[np.argsort((rank + 0.5) / counts[labels], kind="stable")]
    is_val[order[:count]] = True
    return is_val


def make_2d(name: str, points: int, classes: int, noise: float | None, seed: int,
            val_size: int | float = 0) -> Dataset:
    """One of GENERATORS, split into train/validation (``stratified_split``)."""
    noise = DEFAULT_NOISE[name] if noise is None else noise
    classes = FIXED_CLASSES.get(name, classes)
    X, y = GENERATORS[name](points=points, classes=classes, noise=noise, seed=seed)
    is_val = stratified_split(y, val_size, seed)
    X_train, y_train, X_val, y_val = X[~is_val], y[~is_val], X[is_val], y[is_val]
    return Dataset(name, X_train, y_train, X_val, y_val, classes,
                   [f"class {c}" for c in range(classes)],
                   metadata={"kind": "2d", "noise": noise})
