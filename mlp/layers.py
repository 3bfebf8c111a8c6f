"""Layers: each a forward(x, train) / backward(dout) pair with named params and grads.

A layer caches in ``forward`` exactly what its ``backward`` needs, and ``backward``
writes the gradient of every parameter into ``grads`` (same shape as the
parameter) and returns the gradient on its input.
"""
from __future__ import annotations

import inspect

import numpy as np

from mlp import reference
from mlp.init import init_weight
from mlp.kernels import elementwise, reference_kernels
from mlp.kernels.conv import nchw, nhwc
from mlp.parallel import matmul

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

    def fuses_with(self, following: Layer, x: np.ndarray) -> bool:
        """Whether ``forward_fused(x, following)`` trains this layer and the next as one
        step on the input x: the fast kernels of both in one go over each block of the
        batch, so the block between them stays in cache. Networks ask in training,
        unless NNX_KERNELS=reference or NNX_FUSION=off."""
        return False

    def absorbs(self, following: Layer, then: Layer) -> bool:
        """Whether a step fused with ``following`` also takes ``then``, the layer after it
        (``forward_fused(x, following, then)``)."""
        return False

    def forward_fused(self, x: np.ndarray, following: Layer, then: Layer | None = None) -> np.ndarray:
        """This layer then ``following`` (then ``then``, if it ``absorbs`` it), in training:
        the last one's output, the same numbers as the forwards one by one. The others keep
        no cache: the backward of the step is this layer's ``backward_fused``."""
        raise NotImplementedError

    def backward_fused(self, dout: np.ndarray) -> np.ndarray:
        """The gradient on this layer's input from the upstream gradient of the
        ``following`` layer it was fused with; fills both layers' grads."""
        raise NotImplementedError

    def forget(self) -> None:
        """Drop what the last forward cached: a fused step ran this layer's forward inside
        the layer before it, so a cache left here would be a stale one."""

    def arguments(self) -> dict:
        """Constructor arguments (JSON values) that rebuild this layer's shape."""
        return {}

    def spec(self) -> dict:
        return {"type": self.kind, **self.arguments()}

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of one example's output, given one example's input shape."""
        return input_shape

    def _zero_grads(self):
        self.grads = {name: np.zeros_like(p) for name, p in self.params.items()}

    def _check_dtype(self, x: np.ndarray) -> None:
        """A layer computes in its parameters' dtype: refuse another input dtype rather
        than cast it silently (a float64 input to a float32 conv came back float32)."""
        dtype = next(iter(self.params.values())).dtype
        if x.dtype != dtype:
            raise TypeError(f"{type(self).__name__} holds {dtype} parameters but got a {x.dtype} "
                            f"input: cast the input, or build the layer with dtype=np.{x.dtype}")

    def __repr__(self):
        args = ", ".join(f"{k}={v}" for k, v in self.arguments().items())
        return f"{type(self).__name__}({args})"


@register
class Linear(Layer):
    """Affine map. x: (N, d_1, ..., d_k) is flattened row-major to (N, D) -> (N, M).

    W: (D, M), b: (M,). ``init`` is he, xavier, normal (std ``weight_scale``) or
    dirac (PyTorch's uniform default here); without ``rng`` the weights are drawn
    from a generator seeded with 0 (``mlp.init.init_weight``).
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
        self._check_dtype(x)
        if reference_kernels():
            out, self.cache = reference.linear_forward(x, self.params["W"], self.params["b"])
            return out
        # The fast kernel: large products in fixed blocks of rows on all cores. After a
        # conv, x is NHWC memory: flattened in that order it is a view, and W's rows are
        # put in the same order instead (D*M numbers, not N*D; the gradients likewise).
        w = self.params["W"]
        channels_last = x.ndim == 4 and not x.flags.c_contiguous and nhwc(x).flags.c_contiguous
        if channels_last:
            n, c, h, wd = x.shape
            flat = nhwc(x).reshape(n, -1)
            w = np.ascontiguousarray(w.reshape(c, h, wd, -1).transpose(1, 2, 0, 3)).reshape(w.shape)
        else:
            flat = x.reshape(x.shape[0], -1)
        out = matmul(flat, w)
        out += self.params["b"]
        self.cache = (x.shape, flat, w, channels_last)
        return out

    def backward(self, dout):
        if reference_kernels():
            dx, self.grads["W"][...], self.grads["b"][...] = reference.linear_backward(dout, self.cache)
            return dx
        x_shape, flat, w, channels_last = self.cache
        np.sum(dout, axis=0, out=self.grads["b"])
        if not channels_last:
            matmul(flat.T, dout, out=self.grads["W"])
            return matmul(dout, w.T).reshape(x_shape)
        n, c, h, wd = x_shape
        dw = matmul(flat.T, dout)                 # rows in (h, w, c) order, as flat's columns
        np.copyto(self.grads["W"].reshape(c, h, wd, -1), dw.reshape(h, wd, c, -1).transpose(2, 0, 1, 3))
        return nchw(matmul(dout, w.T).reshape(n, h, wd, c))

    def arguments(self):
        return {"in_features": self.in_features, "out_features": self.out_features,
                "init": self.init, "weight_scale": self.weight_scale}

    def output_shape(self, input_shape):
        return (self.out_features,)


@register
class ReLU(Layer):
    """max(0, x), elementwise; the gradient routes through where x > 0."""

    kind = "relu"

    def forward(self, x, train=False):
        kernels = reference if reference_kernels() else elementwise
        out, self.mask = kernels.relu_forward(x)
        self.kernels = kernels
        return out

    def backward(self, dout):
        return self.kernels.relu_backward(dout, self.mask)

    def forget(self):
        self.mask = None


@register
class GELU(Layer):
    """GELU(x) = x Phi(x), Phi the standard normal CDF, in the tanh form
    0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) -- PyTorch's
    ``GELU(approximate="tanh")``, within 1e-3 of the exact form everywhere.

    NumPy has no erf; an exact form needs an approximation of it
    (Abramowitz-Stegun 7.1.26: a reciprocal, a degree-5 polynomial, an exp),
    measured here at 1.9x the tanh form's time for the forward with its
    derivative (78 ms against 41 ms on 2.1M numbers, one thread;
    ``bench/profile_conv.py --gelu-forms``). The fast kernel makes the
    derivative in the forward, so the backward is one multiplication.
    """

    kind = "gelu"

    def forward(self, x, train=False):
        self.x = x
        if reference_kernels():
            out, self.cache = reference.gelu_forward(x)
            self.slope = None
            return out
        out, self.slope = elementwise.gelu_forward(x, train)
        self.cache = None
        return out

    def backward(self, dout):
        if self.slope is not None:
            return elementwise.gelu_backward(dout, self.slope)
        cache = self.cache if self.cache is not None else reference.gelu_forward(self.x)[1]
        return reference.gelu_backward(dout, cache)

    def forget(self):
        self.x = self.slope = self.cache = None


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

    def arguments(self):
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


def check_drop_probability(p: float) -> float:
    """``p`` as a drop probability, which must be in [0, 1) (1 would drop everything)."""
    if not 0 <= p < 1:
        raise ValueError(f"dropout p is the drop probability and must be in [0, 1), got {p}")
    return float(p)


@register
class Dropout(Layer):
    """Inverted dropout: in training each unit is zeroed with probability ``p``
    (the drop probability) and survivors are scaled by 1/(1-p), so evaluation
    is the identity."""

    kind = "dropout"

    def __init__(self, p: float = 0.5, rng: np.random.Generator | None = None):
        super().__init__()
        self.p = check_drop_probability(p)
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

    def arguments(self):
        return {"p": self.p}


@register
class Scale(Layer):
    """Multiply by a constant: out = factor * x, dx = factor * dout. airbench scales
    its class scores by 1/9, which shrinks the head's effective learning rate."""

    kind = "scale"

    def __init__(self, factor: float):
        super().__init__()
        self.factor = float(factor)
        if not np.isfinite(self.factor) or self.factor == 0:
            raise ValueError(f"a scale factor must be finite and non-zero, got {factor}")

    def forward(self, x, train=False):
        return x * x.dtype.type(self.factor)

    def backward(self, dout):
        return dout * dout.dtype.type(self.factor)

    def arguments(self):
        return {"factor": self.factor}


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


ACTIVATIONS = {"relu": ReLU, "leaky_relu": LeakyReLU, "tanh": Tanh, "sigmoid": Sigmoid, "gelu": GELU}


# Constructor arguments renamed since nnx 0.1, whose model files name them so.
RENAMED_ARGUMENTS = {"batchnorm": {"momentum": "decay"}}


def layer_from_spec(spec: dict, dtype=np.float64) -> Layer:
    """Rebuild a layer from ``Layer.spec()`` (its parameters as freshly initialised, for a
    model file's arrays to fill); raises ValueError."""
    spec = dict(spec)
    kind = spec.pop("type", None)
    if kind not in LAYER_TYPES:
        raise ValueError(f"unknown layer type {kind!r}")
    for old, new in RENAMED_ARGUMENTS.get(kind, {}).items():
        if old in spec and new not in spec:
            spec[new] = spec.pop(old)
    cls = LAYER_TYPES[kind]
    if "dtype" in inspect.signature(cls.__init__).parameters:
        spec["dtype"] = dtype
    try:
        return cls(**spec)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"bad spec for layer {kind!r}: {exc}") from None
