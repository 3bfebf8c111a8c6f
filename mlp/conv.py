"""Convolutional layers: Conv2D, MaxPool2D and BatchNorm, cs231n-style forward/backward pairs.

Every layer takes and returns arrays shaped NCHW, ``x: (N, C, H, W)``, the
layout the data loaders give and users see. The maths of each is in
mlp/reference.py (plain NumPy); the layers run the fast kernels of
mlp/kernels/ unless ``NNX_KERNELS=reference``. The fast kernels work
channels-last (NHWC): a conv's output is an NCHW-shaped *view* of NHWC memory,
and the elementwise layers and the max-pool keep that memory order, so the
next conv gets its NHWC input without a transposing copy. Only the shape is
a promise, not the strides: call ``np.ascontiguousarray`` if you need
C-ordered NCHW memory.
"""
from __future__ import annotations

import numpy as np

from mlp import reference
from mlp.init import init_weight
from mlp.kernels import batchnorm as batchnorm_kernels
from mlp.kernels import conv as conv_kernels
from mlp.kernels import pool as pool_kernels
from mlp.kernels import reference_kernels
from mlp.layers import GELU, Layer, ReLU, register


def conv_output_size(size: int, kernel: int, stride: int, padding: int, axis: str = "") -> int:
    """(size - kernel + 2 * padding) / stride + 1, refusing sizes that do not divide."""
    span = size - kernel + 2 * padding
    if span < 0 or span % stride:
        where = f" {axis}" if axis else ""
        raise ValueError(
            f"conv does not tile the input{where}: (size {size} - kernel {kernel} + 2 * padding "
            f"{padding}) / stride {stride} + 1 = {span / stride + 1:g} is not a positive integer; "
            f"change the padding or stride")
    return span // stride + 1


@register
class Conv2D(Layer):
    """2-D cross-correlation. x: (N, C, H, W) -> (N, F, Ho, Wo).

    W: (F, C, HH, WW), b: (F,); Ho = (H - HH + 2P) / S + 1 and likewise Wo,
    which must be integers (else ValueError). ``input_grad=False`` makes
    ``backward`` skip the input gradient and return None: a network's first
    layer needs none (PyTorch skips it too, since images do not require grad),
    and for a small-channel input it is the costliest part of the backward.

    ``algorithm`` is how the fast kernels compute it: im2col, or Winograd
    F(2x2, 3x3) / F(4x4, 3x3) for 3x3 and F(2x2, 5x5) for 5x5 stride-1 layers
    (mlp/kernels/conv.py).
    None until the first forward measures the candidates; set it (or load a
    model file that recorded it) to fix the rounding a run gets.
    """

    kind = "conv2d"
    regularized = ("W",)

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, *, init: str = "he", weight_scale: float = 1e-2,
                 rng: np.random.Generator | None = None, dtype=np.float32,
                 input_grad: bool = True):
        super().__init__()
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size, self.stride, self.padding = int(kernel_size), int(stride), int(padding)
        if min(self.in_channels, self.out_channels, self.kernel_size, self.stride) < 1 or self.padding < 0:
            raise ValueError("conv channels, kernel size and stride must be >= 1 and padding >= 0")
        self.init, self.weight_scale, self.input_grad = init, float(weight_scale), bool(input_grad)
        k, c, f = self.kernel_size, self.in_channels, self.out_channels
        self.params["W"] = init_weight((f, c, k, k), c * k * k, f * k * k, init, weight_scale, rng, dtype)
        self.params["b"] = np.zeros(f, dtype=dtype)
        self._zero_grads()
        self._algorithm: str | None = None
        self.workspace: dict[str, np.ndarray] = {}   # the fast kernels' buffers, reused across batches

    def arguments(self):
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": self.kernel_size, "stride": self.stride, "padding": self.padding,
                "init": self.init, "weight_scale": self.weight_scale, "input_grad": self.input_grad}

    @property
    def algorithm(self) -> str | None:
        return self._algorithm

    @algorithm.setter
    def algorithm(self, name: str | None):
        if name is not None and (name not in conv_kernels.ALGORITHMS or not conv_kernels.applies(
                name, self.kernel_size, self.stride, self.padding)):
            raise ValueError(f"conv algorithm {name!r} does not apply to a {self.kernel_size}x"
                             f"{self.kernel_size} conv with stride {self.stride}, padding {self.padding}")
        self._algorithm = name

    def output_shape(self, input_shape):
        c, h, w = input_shape
        if c != self.in_channels:
            raise ValueError(f"conv expects {self.in_channels} input channels, got {c}")
        k, s, p = self.kernel_size, self.stride, self.padding
        return (self.out_channels, conv_output_size(h, k, s, p, "height"),
                conv_output_size(w, k, s, p, "width"))

    def forward(self, x, train=False):
        self._check_input(x)
        w, b, S, P = self.params["W"], self.params["b"], self.stride, self.padding
        if reference_kernels():
            out, cache = reference.conv_forward(x, w, b, S, P)
            self.cache = ("reference", cache)
            return out
        self._choose_algorithm(x)
        out, cache = conv_kernels.forward(self.algorithm, x, w, b, S, P, self.workspace, train)
        self.cache = ("fast", cache)
        return out

    def fuses_with(self, following, x):
        """A 2x2 max-pool after the conv: the conv's output is pooled block by block in
        cache and never written out whole (nor its gradient, in the backward); where
        the conv's kernels allow it and its blocks are large enough (``conv_kernels.fuses``)."""
        if not (type(following) is MaxPool2D and following.pool_size == following.stride == 2):
            return False
        self._check_input(x)
        self._choose_algorithm(x, pooled=True)
        w = self.params["W"]
        return conv_kernels.fuses(self.algorithm, x.shape, w.shape, self.stride, self.padding,
                                  self.input_grad, w.dtype)

    def _check_input(self, x):
        """x's dtype and shape against the layer -> the output's shape (F, Ho, Wo)."""
        self._check_dtype(x)
        return self.output_shape(x.shape[1:])   # refuses sizes that do not divide

    def _choose_algorithm(self, x, pooled: bool = False):
        """The fast kernels' algorithm for x: the forced or recorded one, else measured
        the first time (``pooled``: as the fused step with a 2x2 max-pool runs it)."""
        self.algorithm = conv_kernels.algorithm_for(self.algorithm, x, self.params["W"], self.stride,
                                                    self.padding, self.input_grad, pooled)

    def absorbs(self, following, then):
        """A ReLU after the fused max-pool: relu(max of a window) is the max with 0, and its
        gradient goes to the window's argmax where that max is positive (the pool's one-hot
        argmaxes, ANDed with it): no pass of its own either way."""
        return type(then) is ReLU

    def forward_fused(self, x, following, then=None):
        F, Ho, Wo = self._check_input(x)             # the conv's output, the pool's input
        following.output_shape((F, Ho, Wo))          # refuses a window that does not fit
        self._choose_algorithm(x, pooled=True)
        w, b, S, P = self.params["W"], self.params["b"], self.stride, self.padding
        pool, out, pool_cache = pool_kernels.tournament_epilogue(len(x), Ho, Wo, F, w.dtype,
                                                                relu=then is not None)
        _, cache = conv_kernels.forward(self.algorithm, x, w, b, S, P, self.workspace, True, epilogue=pool)
        self.cache = ("fused", cache, pool_cache)
        following.forget()
        if then is not None:
            then.forget()
        return out

    def backward_fused(self, dout):
        _, cache, pool_cache = self.cache
        dx, dw, db = conv_kernels.backward(
            None, cache, self.input_grad,
            prologue=pool_kernels.backward_prologue(dout, pool_cache))
        self.grads["W"][...] = dw
        self.grads["b"][...] = db
        return dx if self.input_grad else None

    def backward(self, dout):
        """dout: (N, F, Ho, Wo) -> dx: (N, C, H, W), or None without ``input_grad``."""
        kernels, cache = self.cache
        if kernels == "reference":
            dx, dw, db = reference.conv_backward(dout, cache)
        else:
            dx, dw, db = conv_kernels.backward(dout, cache, self.input_grad)
        self.grads["W"][...] = dw
        self.grads["b"][...] = db
        return dx if self.input_grad else None


@register
class MaxPool2D(Layer):
    """Max over pool_size x pool_size windows, ``stride`` apart (default: pool_size).

    x: (N, C, H, W) -> (N, C, Ho, Wo), Ho = (H - pool) // stride + 1 (PyTorch's
    floor mode: trailing rows/columns no window covers are dropped). The
    backward routes each upstream gradient to its window's argmax, the first
    maximum in row-major window order when values tie, as PyTorch does.
    """

    kind = "maxpool2d"

    def __init__(self, pool_size: int = 2, stride: int | None = None):
        super().__init__()
        self.pool_size = int(pool_size)
        self.stride = int(stride) if stride is not None else self.pool_size
        if self.pool_size < 1 or self.stride < 1:
            raise ValueError("pool size and stride must be >= 1")

    def arguments(self):
        return {"pool_size": self.pool_size, "stride": self.stride}

    def output_shape(self, input_shape):
        c, h, w = input_shape
        k, s = self.pool_size, self.stride
        if h < k or w < k:
            raise ValueError(f"max-pool {k}x{k} does not fit a {h}x{w} input")
        return (c, (h - k) // s + 1, (w - k) // s + 1)

    def forward(self, x, train=False):
        self.output_shape(x.shape[1:])
        kernels = reference if reference_kernels() else pool_kernels
        out, cache = kernels.maxpool_forward(x, self.pool_size, self.stride)
        self.cache = (kernels, cache)
        return out

    def backward(self, dout):
        kernels, cache = self.cache
        return kernels.maxpool_backward(dout, cache)[0]

    def forget(self):
        self.cache = None


@register
class BatchNorm(Layer):
    """Batch normalization over features: x: (N, D) or channels: x: (N, C, H, W).

    out = gamma * (x - mean) / sqrt(var + eps) + beta, per feature (per channel,
    pooling N, H and W). Training uses the batch mean and (biased) variance and
    updates the running statistics; evaluation uses the running statistics.

    ``decay`` is the fraction of the running statistics *kept* at each step:
    running = decay * running + (1 - decay) * batch. (PyTorch calls the fraction
    *replaced* ``momentum``: our decay 0.9 is its momentum 0.1; nnx 0.1 called
    decay "momentum", a name the optimizer's momentum already had; its model files
    still load: ``layer_from_spec`` reads the old name.) As in PyTorch the running
    variance is the unbiased batch variance (times M / (M - 1), M the number of
    values pooled per feature), starting from mean 0 and variance 1.
    """

    kind = "batchnorm"

    def __init__(self, num_features: int, decay: float = 0.9, eps: float = 1e-5,
                 dtype=np.float32):
        super().__init__()
        if not 0 <= decay <= 1:
            raise ValueError(f"batchnorm decay is the fraction of the running statistics kept, in "
                             f"[0, 1], got {decay}")
        if not eps > 0:
            raise ValueError(f"batchnorm eps must be > 0, got {eps}")
        self.num_features, self.decay, self.eps = int(num_features), float(decay), float(eps)
        self.params["gamma"] = np.ones(self.num_features, dtype=dtype)
        self.params["beta"] = np.zeros(self.num_features, dtype=dtype)
        self.buffers["running_mean"] = np.zeros(self.num_features, dtype=dtype)
        self.buffers["running_var"] = np.ones(self.num_features, dtype=dtype)
        self._zero_grads()

    def arguments(self):
        return {"num_features": self.num_features, "decay": self.decay, "eps": self.eps}

    def output_shape(self, input_shape):
        if input_shape[0] != self.num_features:
            raise ValueError(f"batchnorm expects {self.num_features} features, got {input_shape[0]}")
        return input_shape

    def _check_input(self, x, train):
        self._check_dtype(x)
        if train and x.size // max(x.shape[1], 1) < 2:
            raise ValueError("batchnorm in training needs at least two values per feature to "
                             f"normalise over, got an input of shape {x.shape}")
        if x.ndim not in (2, 4):
            raise ValueError(f"batchnorm takes (N, D) or (N, C, H, W) inputs, got shape {x.shape}")
        if x.shape[1] != self.num_features:
            raise ValueError(f"batchnorm expects {self.num_features} features, got {x.shape[1]}")

    def forward(self, x, train=False):
        self._check_input(x, train)
        kernels = reference if reference_kernels() else batchnorm_kernels
        out, cache = kernels.batchnorm_forward(
            x, self.params["gamma"], self.params["beta"], self.buffers["running_mean"],
            self.buffers["running_var"], self.decay, self.eps, train)
        self.cache = (kernels, cache)
        return out

    def backward(self, dout):
        kernels, cache = self.cache
        dx, self.grads["gamma"][...], self.grads["beta"][...] = kernels.batchnorm_backward(dout, cache)
        return dx

    def fuses_with(self, following, x):
        """A ReLU or GELU after the batch norm: applied in the batch norm's last pass
        over each block, its derivative used in the batch norm's first pass back."""
        return type(following) in (ReLU, GELU)

    def forward_fused(self, x, following, then=None):
        self._check_input(x, True)
        out, cache = batchnorm_kernels.batchnorm_forward(
            x, self.params["gamma"], self.params["beta"], self.buffers["running_mean"],
            self.buffers["running_var"], self.decay, self.eps, True, activation=following.kind)
        self.cache = (batchnorm_kernels, cache)
        following.forget()
        return out

    backward_fused = backward   # the cache holds the activation's derivative


@register
class Whiten(Conv2D):
    """A patch-whitening conv (Page 2018, as airbench's first layer): K x K, stride 1, no
    padding, 2 * C * K * K filters. x: (N, C, H, W) -> (N, 2CK^2, H - K + 1, W - K + 1).

    ``fit(X)`` sets the filters from training images: the eigenvectors v_i of the
    covariance of their K x K patches, scaled to v_i / sqrt(lambda_i + eps) so that
    each output channel has variance about 1 and the channels are uncorrelated, then
    the same filters negated (a following ReLU or GELU keeps both signs). Largest
    eigenvalue first. The filters are not trained (the trainer freezes W) and carry
    no L2; the bias trains, and may be frozen later (``--whiten-bias-epochs``).
    """

    kind = "whiten"
    regularized = ()

    def __init__(self, in_channels: int, kernel_size: int = 2, eps: float = 5e-4, *,
                 dtype=np.float32, input_grad: bool = False):
        k, c = int(kernel_size), int(in_channels)
        super().__init__(c, 2 * c * k * k, k, 1, 0, dtype=dtype, input_grad=input_grad)
        self.params["W"][...] = 0.0            # until fit()
        self.eps = float(eps)

    def arguments(self):
        return {"in_channels": self.in_channels, "kernel_size": self.kernel_size, "eps": self.eps,
                "input_grad": self.input_grad}

    def fit(self, X: np.ndarray) -> None:
        """Set the filters from images X: (N, C, H, W) (a few thousand are plenty)."""
        k, c = self.kernel_size, self.in_channels
        if X.ndim != 4 or X.shape[1] != c:
            raise ValueError(f"whitening needs (N, {c}, H, W) images, got shape {X.shape}")
        windows = np.lib.stride_tricks.sliding_window_view(X, (k, k), axis=(2, 3))
        # (N, C, H', W', K, K) -> one row per patch, in the filters' (C, K, K) order
        patches = windows.transpose(0, 2, 3, 1, 4, 5).reshape(-1, c * k * k).astype(np.float64)
        covariance = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = np.linalg.eigh(covariance)
        order = np.argsort(eigenvalues)[::-1]
        filters = (eigenvectors[:, order] / np.sqrt(eigenvalues[order] + self.eps)).T
        filters = filters.reshape(c * k * k, c, k, k)
        self.params["W"][...] = np.concatenate([filters, -filters])


def _distinct(rng, shape):
    """Values at least 0.05 apart, so no max-pool window ties within the check's step."""
    n = int(np.prod(shape))
    return (0.05 * rng.permutation(n) - 0.025 * n).reshape(shape) + 1e-3 * rng.random(shape)


def _batchnorm(num_features, rng):
    """A float64 BatchNorm with random gamma and beta, so the check exercises both."""
    bn = BatchNorm(num_features, dtype=np.float64)
    bn.params["gamma"][...] = 1 + 0.5 * rng.standard_normal(num_features)
    bn.params["beta"][...] = rng.standard_normal(num_features)
    return bn


def _fitted_whiten(rng):
    """A float64 Whiten fitted to random images, its input gradient on (the check
    needs one; a first layer has it off)."""
    layer = Whiten(2, 2, dtype=np.float64, input_grad=True)
    layer.fit(rng.standard_normal((3, 2, 6, 6)))
    return layer


def _winograd(layer, tile):
    """The layer, set to run Winograd F(tile x tile, r x r), r its kernel size."""
    layer.algorithm = f"winograd{tile}"
    return layer


def gradcheck_cases(rng: np.random.Generator):
    """(name, layer, x, before_forward) cases for ``mlp.gradcheck``, in float64."""
    f64 = np.float64
    return [
        ("Conv2D 3x3, stride 1, pad 1", Conv2D(2, 3, 3, 1, 1, rng=rng, dtype=f64),
         rng.standard_normal((2, 2, 5, 5)), None),
        ("Conv2D 3x3, stride 2, pad 1, non-square", Conv2D(3, 2, 3, 2, 1, rng=rng, dtype=f64),
         rng.standard_normal((2, 3, 7, 5)), None),
        ("Conv2D 2x2, stride 1, no pad, non-square", Conv2D(2, 2, 2, rng=rng, dtype=f64),
         rng.standard_normal((1, 2, 3, 4)), None),
        ("Conv2D 3x3 Winograd F(2x2), pad 1, odd sizes",
         _winograd(Conv2D(3, 2, 3, 1, 1, rng=rng, dtype=f64), 2), rng.standard_normal((2, 3, 5, 7)), None),
        ("Conv2D 3x3 Winograd F(4x4), pad 1, odd sizes",
         _winograd(Conv2D(3, 2, 3, 1, 1, rng=rng, dtype=f64), 4), rng.standard_normal((2, 3, 7, 6)), None),
        ("Conv2D 3x3 Winograd F(4x4), no pad",
         _winograd(Conv2D(2, 3, 3, 1, 0, rng=rng, dtype=f64), 4), rng.standard_normal((1, 2, 7, 9)), None),
        ("Conv2D 5x5 Winograd F(2x2), pad 2, odd sizes",
         _winograd(Conv2D(2, 3, 5, 1, 2, rng=rng, dtype=f64), 2), rng.standard_normal((2, 2, 7, 5)), None),
        ("Conv2D 5x5 Winograd F(2x2), pad 1",
         _winograd(Conv2D(2, 2, 5, 1, 1, rng=rng, dtype=f64), 2), rng.standard_normal((1, 2, 6, 8)), None),
        ("Conv2D 5x5 Winograd F(4x4), pad 2, odd sizes",
         _winograd(Conv2D(2, 3, 5, 1, 2, rng=rng, dtype=f64), 4), rng.standard_normal((2, 2, 7, 6)), None),
        ("Whiten 2x2 (fitted), no pad", _fitted_whiten(rng), rng.standard_normal((2, 2, 4, 5)), None),
        ("MaxPool2D 2x2", MaxPool2D(2), _distinct(rng, (2, 2, 4, 6)), None),
        ("MaxPool2D 2x2 on odd sizes", MaxPool2D(2), _distinct(rng, (2, 2, 5, 7)), None),
        ("MaxPool2D 3x3 stride 2 (overlapping)", MaxPool2D(3, 2), _distinct(rng, (2, 2, 7, 5)), None),
        ("BatchNorm (N, D), train", _batchnorm(4, rng), rng.standard_normal((6, 4)), None),
        ("BatchNorm (N, C, H, W), train", _batchnorm(3, rng),
         rng.standard_normal((2, 3, 3, 2)), None),
    ]
