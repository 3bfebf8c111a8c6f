"""Layers: each a forward(x, train) / backward(dout) pair with named params and grads.

A layer caches in ``forward`` exactly what its ``backward`` needs, and ``backward``
writes the gradient of every parameter into ``grads`` (same shape as the
parameter) and returns the gradient on its input.
"""
from __future__ import annotations

import inspect

import numpy as np

from mlp.init import init_weight
from mlp.parallel import MIN_PARALLEL_SIZE, matmul, over_batch

LAYER_TYPES: dict[str, type[Layer]] = {}


def register(cls):
    """Make a layer class constructible from its spec (``{"type": kind, ...}``)."""
    LAYER_TYPES[cls.kind] = cls
    return cls


class Layer:
    """Base class. Subclasses set ``kind`` and fill ``params``/``grads``/``buffers``.

    ``regularized`` names the parameters L2 regularization applies to (weights,
    never biases). ``buffers`` hold state that is saved but not trained
    (BatchNorm running statistics).
    """

    kind = ""
    regularized: tuple[str, ...] = ()

    def __init__(self):
        self.params: dict[str, np.ndarray] = {}
        self.grads: dict[str, np.ndarray] = {}
        self.buffers: dict[str, np.ndarray] = {}

    def forward(self, x: np.ndarray, train: bool = False) -> np.ndarray:
        raise NotImplementedError

    def backward(self, dout: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def config(self) -> dict:
        """Constructor arguments (JSON values) that rebuild this layer's shape."""
        return {}

    def spec(self) -> dict:
        return {"type": self.kind, **self.config()}

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of one example's output, given one example's input shape."""
        return input_shape

    def _zero_grads(self):
        self.grads = {name: np.zeros_like(p) for name, p in self.params.items()}

    def __repr__(self):
        args = ", ".join(f"{k}={v}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


@register
class Linear(Layer):
    """Affine map. x: (N, d_1, ..., d_k) is flattened row-major to (N, D) -> (N, M).

    W: (D, M), b: (M,). ``init`` is he, xavier or normal (std ``weight_scale``).
    """

    kind = "linear"
    regularized = ("W",)

    def __init__(self, in_features: int, out_features: int, *, init: str = "he",
                 weight_scale: float = 1e-2, rng: np.random.Generator | None = None,
                 dtype=np.float64):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.init, self.weight_scale = init, float(weight_scale)
        self.params["W"] = init_weight((self.in_features, self.out_features), self.in_features,
                                       self.out_features, init, weight_scale, rng, dtype)
        self.params["b"] = np.zeros(self.out_features, dtype=dtype)
        self._zero_grads()

    def forward(self, x, train=False):
        self.x_shape = x.shape
        self.x = x.reshape(x.shape[0], -1)
        out = matmul(self.x, self.params["W"])
        out += self.params["b"]
        return out

    def backward(self, dout):
        matmul(self.x.T, dout, out=self.grads["W"])
        np.sum(dout, axis=0, out=self.grads["b"])
        return matmul(dout, self.params["W"].T).reshape(self.x_shape)

    def config(self):
        return {"in_features": self.in_features, "out_features": self.out_features,
                "init": self.init, "weight_scale": self.weight_scale}

    def output_shape(self, input_shape):
        return (self.out_features,)


@register
class ReLU(Layer):
    """max(0, x), elementwise; the gradient routes through where x > 0."""

    kind = "relu"

    def forward(self, x, train=False):
        if x.size < MIN_PARALLEL_SIZE:  # an MLP's small batch: no hand-off to threads
            self.mask = x > 0
            return np.maximum(x, 0)
        # empty_like keeps x's memory order (a conv's NHWC), so chunks are contiguous
        self.mask, out = np.empty_like(x, dtype=bool), np.empty_like(x)

        def rows(lo, hi):
            np.greater(x[lo:hi], 0, out=self.mask[lo:hi])
            np.maximum(x[lo:hi], 0, out=out[lo:hi])

        over_batch(rows, len(x), x.size)
        return out

    def backward(self, dout):
        if dout.size < MIN_PARALLEL_SIZE:
            return dout * self.mask
        dx = np.empty_like(dout)
        over_batch(lambda lo, hi: np.multiply(dout[lo:hi], self.mask[lo:hi], out=dx[lo:hi]),
                   len(dout), dout.size)
        return dx


@register
class LeakyReLU(Layer):
    """x where x > 0, else alpha * x."""

    kind = "leaky_relu"

    def __init__(self, alpha: float = 0.01):
        super().__init__()
        self.alpha = float(alpha)

    def forward(self, x, train=False):
        self.mask = x > 0
        return np.where(self.mask, x, self.alpha * x)

    def backward(self, dout):
        return np.where(self.mask, dout, self.alpha * dout)

    def config(self):
        return {"alpha": self.alpha}


@register
class Tanh(Layer):
    """tanh(x); d tanh = 1 - tanh^2, computed from the cached output."""

    kind = "tanh"

    def forward(self, x, train=False):
        self.out = np.tanh(x)
        return self.out

    def backward(self, dout):
        return dout * (1 - self.out ** 2)


@register
class Sigmoid(Layer):
    """1 / (1 + exp(-x)), written as (1 + tanh(x/2)) / 2 so no exp overflows."""

    kind = "sigmoid"

    def forward(self, x, train=False):
        self.out = 0.5 * (1 + np.tanh(0.5 * x))
        return self.out

    def backward(self, dout):
        return dout * self.out * (1 - self.out)


@register
class Dropout(Layer):
    """Inverted dropout: in training each unit is zeroed with probability ``p``
    (the drop probability) and survivors are scaled by 1/(1-p), so evaluation
    is the identity."""

    kind = "dropout"

    def __init__(self, p: float = 0.5, rng: np.random.Generator | None = None):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout p is the drop probability and must be in [0, 1), got {p}")
        self.p = float(p)
        self.rng = rng if rng is not None else np.random.default_rng(0)
        self.mask = None

    def forward(self, x, train=False):
        if not train or self.p == 0:
            self.mask = None
            return x
        keep = self.rng.random(x.shape) >= self.p
        self.mask = keep.astype(x.dtype) / (1 - self.p)
        return x * self.mask

    def backward(self, dout):
        return dout if self.mask is None else dout * self.mask

    def config(self):
        return {"p": self.p}


@register
class Flatten(Layer):
    """x: (N, d_1, ..., d_k) -> (N, d_1 * ... * d_k), row-major."""

    kind = "flatten"

    def forward(self, x, train=False):
        self.x_shape = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, dout):
        return dout.reshape(self.x_shape)

    def output_shape(self, input_shape):
        return (int(np.prod(input_shape)),)


ACTIVATIONS = {"relu": ReLU, "leaky_relu": LeakyReLU, "tanh": Tanh, "sigmoid": Sigmoid}


def layer_from_spec(spec: dict, dtype=np.float64) -> Layer:
    """Rebuild a layer (parameters zeroed) from ``Layer.spec()``; raises ValueError."""
    spec = dict(spec)
    kind = spec.pop("type", None)
    if kind not in LAYER_TYPES:
        raise ValueError(f"unknown layer type {kind!r}")
    cls = LAYER_TYPES[kind]
    if "dtype" in inspect.signature(cls.__init__).parameters:
        spec["dtype"] = dtype
    try:
        return cls(**spec)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"bad spec for layer {kind!r}: {exc}") from None
