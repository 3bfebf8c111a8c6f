"""Numerical gradient checking with centred differences.

``numerical_gradient`` perturbs one entry at a time: (f(x + h) - f(x - h)) / 2h,
whose error is O(h^2); in float64 with h = 1e-5 an exact backward agrees to
about 1e-9 relative error or better.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from mlp.conv import gradcheck_cases as conv_gradcheck_cases
from mlp.layers import GELU, Dropout, Flatten, LeakyReLU, Linear, ReLU, Scale, Sigmoid, Tanh
from mlp.losses import softmax_cross_entropy, svm_hinge
from mlp.network import Network, build_mlp

DEFAULT_TOLERANCE = 1e-7


def numerical_gradient(f: Callable[[], float], x: np.ndarray, h: float = 1e-5) -> np.ndarray:
    """d f / d x by centred differences; ``f`` reads ``x``, which is perturbed in place."""
    grad = np.zeros_like(x, dtype=np.float64)
    for idx in np.ndindex(*x.shape):
        old = x[idx]
        x[idx] = old + h
        plus = f()
        x[idx] = old - h
        minus = f()
        x[idx] = old
        grad[idx] = (plus - minus) / (2 * h)
    return grad


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max(|a| + |b|) over the whole array.

    Measured against the array's scale rather than entry by entry, because an
    entry whose true gradient is ~1e-9 is dominated by the finite difference's
    round-off (~1e-11 absolute) and would report a meaningless large ratio.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    scale = np.max(np.abs(a) + np.abs(b), initial=0.0)
    return float(np.max(np.abs(a - b), initial=0.0) / max(scale, 1e-12))


def check_layer(layer, x: np.ndarray, rng: np.random.Generator, before_forward=None,
                h: float = 1e-5) -> dict[str, float]:
    """Relative error of the layer's input gradient ("x") and every parameter gradient.

    The scalar checked is sum(forward(x) * dout) for a fixed random dout, so the
    analytic gradients are backward(dout). ``before_forward`` resets any
    randomness (dropout masks) so every forward sees the same mask.
    """
    def forward():
        if before_forward:
            before_forward(layer)
        return layer.forward(x, train=True)

    dout = rng.standard_normal(forward().shape)
    forward()
    dx = layer.backward(dout)
    analytic = {"x": dx, **{name: g.copy() for name, g in layer.grads.items()}}

    def objective():
        return float(np.sum(forward() * dout))

    errors = {"x": rel_error(dx, numerical_gradient(objective, x, h))}
    for name, p in layer.params.items():
        errors[name] = rel_error(analytic[name], numerical_gradient(objective, p, h))
    return errors


def check_loss(loss_fn, scores: np.ndarray, y: np.ndarray, h: float = 1e-5) -> float:
    """Relative error of d loss / d scores."""
    _, dscores = loss_fn(scores, y)
    return rel_error(dscores, numerical_gradient(lambda: loss_fn(scores, y)[0], scores, h))


def check_network(net: Network, X: np.ndarray, y: np.ndarray, h: float = 1e-5) -> dict[str, float]:
    """Relative error of the full loss gradient (data + L2) on every parameter."""
    _, grads = net.loss(X, y, train=True)
    analytic = {k: g.copy() for k, g in grads.items()}
    return {name: rel_error(analytic[name],
                            numerical_gradient(lambda: net.loss(X, y, train=True)[0], p, h))
            for name, p in net.params.items()}


def check_stack(stack, X: np.ndarray, y: np.ndarray, before_forward=None, h: float = 1e-5) -> float:
    """Relative error of a stack's gradient on every trial's parameters, padded units
    included (``mlp.stack.MLPStack``): the function checked is the sum of the trials'
    losses (data + L2), each trial's loss depending on its own parameters alone.
    ``before_forward`` resets the trials' dropout generators before every forward."""
    def total_loss():
        if before_forward:
            before_forward(stack)
        return float(np.sum(stack.loss_and_scores(X, y, train=True)[0]))

    total_loss()
    analytic = stack.flat_grad.copy()
    return rel_error(analytic, numerical_gradient(total_loss, stack.flat, h))


@dataclass
class CheckResult:
    name: str
    kind: str          # "layer", "loss" or "network"
    max_rel_error: float
    tolerance: float = DEFAULT_TOLERANCE

    @property
    def passed(self) -> bool:
        return self.max_rel_error <= self.tolerance


def _reseed_dropout(layer):
    layer.rng = np.random.default_rng(123)


def _layer_cases(rng):
    """(name, layer, x, before_forward) for every core layer type, in float64."""
    x = rng.standard_normal((4, 5))
    return [
        ("Linear", Linear(5, 3, rng=rng), x, None),
        ("Linear (flattens N,2,3,2)", Linear(12, 3, rng=rng), rng.standard_normal((2, 2, 3, 2)), None),
        ("ReLU", ReLU(), x, None),
        ("GELU (tanh form)", GELU(), 2 * rng.standard_normal((3, 2, 4, 5)), None),
        ("LeakyReLU", LeakyReLU(0.1), x, None),
        ("Tanh", Tanh(), x, None),
        ("Sigmoid", Sigmoid(), x, None),
        ("Dropout (p=0.3)", Dropout(0.3), x, _reseed_dropout),
        ("Flatten", Flatten(), rng.standard_normal((2, 3, 2, 2)), None),
        ("Scale (x 1/9)", Scale(1 / 9), x, None),
    ]


def run_all_checks(seed: int = 0) -> list[CheckResult]:
    """Every layer type, every loss and a small network with and without reg."""
    rng = np.random.default_rng(seed)
    results = []
    cases = _layer_cases(rng) + conv_gradcheck_cases(rng)
    for name, layer, x, reset in cases:
        errors = check_layer(layer, x, rng, reset)
        results.append(CheckResult(name, "layer", max(errors.values())))
    scores, y = 0.5 * rng.standard_normal((6, 4)), rng.integers(0, 4, size=6)
    results.append(CheckResult("softmax cross-entropy", "loss", check_loss(softmax_cross_entropy, scores, y)))
    results.append(CheckResult("softmax cross-entropy (label smoothing 0.1)", "loss",
                               check_loss(lambda s, t: softmax_cross_entropy(s, t, 0.1), scores, y)))
    results.append(CheckResult("multiclass SVM hinge", "loss", check_loss(svm_hinge, scores, y)))
    X, y = rng.standard_normal((8, 3)), rng.integers(0, 3, size=8)
    for activation in ("relu", "tanh"):
        for loss in ("softmax", "svm"):
            for reg in (0.0, 0.1):
                net = build_mlp(3, [6, 5], 3, activation=activation, loss=loss, reg=reg, seed=seed)
                errors = check_network(net, X, y)
                results.append(CheckResult(f"MLP 3-6-5-3 {activation}, {loss}, reg={reg}",
                                           "network", max(errors.values())))
    from mlp.stack import MLPStack
    # its own data: the draws above change as layer cases are added, and a ReLU
    # input within h of 0 (a kink) fails any numerical check
    X = np.random.default_rng([seed, 15]).standard_normal((8, 3))
    for activation in ("relu", "sigmoid"):
        nets = [build_mlp(3, hidden, 3, activation=activation, reg=reg, dropout=p, seed=seed + i)
                for i, (hidden, reg, p) in enumerate([([6, 5], 0.1, 0.0), ([4, 5], 0.0, 0.3),
                                                      ([6, 2], 0.05, 0.0)])]
        nets[1].label_smoothing = 0.1
        stack = MLPStack(nets)
        error = check_stack(stack, X, y, before_forward=lambda s: s.reseed(
            lambda t, layer: np.random.default_rng([t, layer])))
        results.append(CheckResult(f"stack of 3 MLPs padded to 3-6-5-3, {activation}", "network", error))
    return results

