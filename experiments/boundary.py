"""Decision regions of a 2D model: a grid of predictions over the data's range,
and a number for how complex the boundary between the regions is.

The complexity is the fraction of grid cells that have a 4-neighbour of
another predicted class: about the boundary's length divided by the area, so
a straight cut scores low and a boundary that wraps every noisy point scores
high. It depends on the resolution, so compare it only between grids of the
same resolution over the same data.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mlp.network import Network

DEFAULT_RESOLUTION = 200
DEFAULT_MARGIN = 0.1


class NotDrawableError(ValueError):
    """A run, sweep or model that cannot give the figure asked for (no trials finished
    yet, no epochs recorded, a file missing): a run-time failure, exit code 1."""


class WrongKindError(NotDrawableError):
    """The path given is not the kind of thing the command draws (a CIFAR-10 model for
    decision regions, a run where a sweep is needed, a folder that is neither): a
    usage error, exit code 2."""


@dataclass
class Regions:
    """Predicted class on a regular grid. xs: (R,), ys: (R,), labels: (R, R) indexed [y, x]."""

    xs: np.ndarray
    ys: np.ndarray
    labels: np.ndarray

    @property
    def extent(self) -> tuple[float, float, float, float]:
        return float(self.xs[0]), float(self.xs[-1]), float(self.ys[0]), float(self.ys[-1])

    @property
    def complexity(self) -> float:
        return boundary_complexity(self.labels)


def grid_axes(X: np.ndarray, resolution: int = DEFAULT_RESOLUTION, margin: float = DEFAULT_MARGIN
              ) -> tuple[np.ndarray, np.ndarray]:
    """Grid coordinates covering X: (N, 2), widened by ``margin`` times the span on
    each side. -> xs: (resolution,), ys: (resolution,)."""
    if resolution < 2:
        raise ValueError(f"resolution must be at least 2, got {resolution}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    low, high = X.min(axis=0), X.max(axis=0)
    span = np.maximum(high - low, 1e-9)   # one point still gets a grid of non-zero size
    low, high = low - margin * span, high + margin * span
    return np.linspace(low[0], high[0], resolution), np.linspace(low[1], high[1], resolution)


def predict_grid(net: Network, xs: np.ndarray, ys: np.ndarray) -> Regions:
    """The class ``net`` predicts at every (x, y) of the grid."""
    gx, gy = np.meshgrid(xs, ys)
    points = np.c_[gx.ravel(), gy.ravel()]
    labels = net.predict(points, batch_size=8192).reshape(len(ys), len(xs))
    return Regions(xs, ys, labels)


def decision_regions(net: Network, X: np.ndarray, resolution: int = DEFAULT_RESOLUTION,
                     margin: float = DEFAULT_MARGIN) -> Regions:
    """``net``'s decision regions over the range of X: (N, 2)."""
    check_2d(net)
    return predict_grid(net, *grid_axes(X, resolution, margin))


def boundary_complexity(labels: np.ndarray) -> float:
    """Fraction of cells of labels: (H, W) with a 4-neighbour of another class."""
    across = labels[:, 1:] != labels[:, :-1]
    down = labels[1:, :] != labels[:-1, :]
    on_boundary = np.zeros(labels.shape, dtype=bool)
    on_boundary[:, 1:] |= across     # both cells on either side of a change count
    on_boundary[:, :-1] |= across
    on_boundary[1:, :] |= down
    on_boundary[:-1, :] |= down
    return float(on_boundary.mean())


def check_2d(net: Network) -> None:
    """Raise WrongKindError unless ``net`` takes 2D points."""
    if net.input_shape != (2,):
        data = net.metadata.get("data", "non-2D data")
        shape = "x".join(map(str, net.input_shape or ()))
        raise WrongKindError(f"decision regions need a model of 2D points; this one was "
                               f"trained on {data} (inputs of shape {shape})")
