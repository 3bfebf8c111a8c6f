"""Convolutional layers: Conv2D, MaxPool2D and BatchNorm, cs231n-style forward/backward pairs.

Every layer takes and returns arrays shaped NCHW, ``x: (N, C, H, W)``, the
layout the data loaders give and users see. Inside, the work is done
channels-last (NHWC): a conv's output is an NCHW-shaped *view* of NHWC memory,
and the elementwise layers (ReLU, BatchNorm) and the max-pool keep that memory
order, so the next conv gets its NHWC input without a transposing copy. Only
the shape is a promise, not the strides: call ``np.ascontiguousarray`` if you
need C-ordered NCHW memory.

Why NHWC: a convolution is one matrix multiply ``cols @ W`` where ``cols``
holds one receptive field per row (im2col). Channels-last, each kernel row of
a receptive field (``WW * C`` numbers) is contiguous in the padded input, so
im2col is a copy of contiguous chunks from a strided view (no Python loops),
and the product ``(N*Ho*Wo, K) @ (K, F)`` is already the NHWC output.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import as_strided

from mlp.init import init_weight
from mlp.layers import Layer, register


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


def _nhwc(x: np.ndarray) -> np.ndarray:
    """x: (N, C, H, W) -> the (N, H, W, C) view of the same memory."""
    return x.transpose(0, 2, 3, 1)


def _nchw(x: np.ndarray) -> np.ndarray:
    """x: (N, H, W, C) -> the (N, C, H, W) view of the same memory."""
    return x.transpose(0, 3, 1, 2)


@register
class Conv2D(Layer):
    """2-D cross-correlation. x: (N, C, H, W) -> (N, F, Ho, Wo).

    W: (F, C, HH, WW), b: (F,); Ho = (H - HH + 2P) / S + 1 and likewise Wo,
    which must be integers (else ValueError). ``input_grad=False`` makes
    ``backward`` skip the input gradient and return None: a network's first
    layer needs none (PyTorch skips it too, since images do not require grad),
    and for a small-channel input it is the costliest part of the backward.
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
        self._work: dict[str, np.ndarray] = {}  # scratch arrays reused across batches

    def config(self):
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": self.kernel_size, "stride": self.stride, "padding": self.padding,
                "init": self.init, "weight_scale": self.weight_scale, "input_grad": self.input_grad}

    def output_shape(self, input_shape):
        c, h, w = input_shape
        if c != self.in_channels:
            raise ValueError(f"conv expects {self.in_channels} input channels, got {c}")
        k, s, p = self.kernel_size, self.stride, self.padding
        return (self.out_channels, conv_output_size(h, k, s, p, "height"),
                conv_output_size(w, k, s, p, "width"))

    def _scratch(self, name, shape, dtype):
        # Fresh large arrays cost a page fault per 4 KiB on first touch; reusing
        # them between batches of one shape saves that. Padded inputs are only
        # ever written inside their borders, so the zero borders survive reuse.
        buf = self._work.get(name)
        if buf is None or buf.shape != shape or buf.dtype != dtype:
            buf = self._work[name] = np.zeros(shape, dtype)
        return buf

    def forward(self, x, train=False):
        N, C, H, W = x.shape
        _, Ho, Wo = self.output_shape((C, H, W))
        F, K, S, P = self.out_channels, self.kernel_size, self.stride, self.padding
        dtype = self.params["W"].dtype
        xp = self._scratch("xp", (N, H + 2 * P, W + 2 * P, C), dtype)
        xp[:, P:P + H, P:P + W, :] = _nhwc(x)
        # Receptive field of output (n, i, j), kernel row kh: the WW*C contiguous
        # numbers xp[n, i*S + kh, j*S : j*S + WW, :].
        sN, sH, sW, sC = xp.strides
        windows = as_strided(xp, (N, Ho, Wo, K, K * C), (sN, S * sH, S * sW, sH, sC), writeable=False)
        cols = self._scratch("cols", (N * Ho * Wo, K * K * C), dtype)
        cols.reshape(N, Ho, Wo, K, K * C)[...] = windows
        # W as a (kh, kw, c) x F matrix, matching the column order of cols.
        self.w_mat = self.params["W"].transpose(2, 3, 1, 0).reshape(K * K * C, F)
        out = cols @ self.w_mat
        out += self.params["b"]
        self.cols, self.x_shape = cols, x.shape
        return _nchw(out.reshape(N, Ho, Wo, F))

    def backward(self, dout):
        N, C, H, W = self.x_shape
        _, F, Ho, Wo = dout.shape
        K, S, P = self.kernel_size, self.stride, self.padding
        dflat = _nhwc(dout).reshape(N * Ho * Wo, F)  # a view when dout is NHWC memory
        dw = self.cols.T @ dflat
        self.grads["W"][...] = dw.reshape(K, K, C, F).transpose(3, 2, 0, 1)
        np.sum(dflat, axis=0, out=self.grads["b"])
        if not self.input_grad:
            return None
        if S == 1 and P <= K - 1:
            return self._input_grad_by_convolution(dflat.reshape(N, Ho, Wo, F), H, W)
        dcols = self._scratch("dcols", (N * Ho * Wo, K * K * C), dflat.dtype)
        np.matmul(dflat, self.w_mat.T, out=dcols)
        # col2im: each kernel offset (kh, kw) adds one strided slab; K*K
        # vectorised adds, no np.add.at. (Per-offset (M, F) @ (F, C) products
        # would give contiguous blocks, but OpenBLAS runs such thin products
        # several times slower than this one big one.) Fresh zeros: dx goes to
        # the caller, who may keep it.
        dxp = np.zeros((N, H + 2 * P, W + 2 * P, C), dflat.dtype)
        dc = dcols.reshape(N, Ho, Wo, K, K, C)
        for kh in range(K):
            for kw in range(K):
                dxp[:, kh:kh + S * (Ho - 1) + 1:S, kw:kw + S * (Wo - 1) + 1:S, :] += dc[:, :, :, kh, kw, :]
        return _nchw(dxp[:, P:P + H, P:P + W, :])

    def _input_grad_by_convolution(self, dout, H, W):
        """dx for stride 1: the upstream gradient dout: (N, Ho, Wo, F), zero-padded
        by K-1-P, correlated with the kernel flipped in space and transposed in
        channels -- one im2col and one matrix product, like the forward. (A
        col2im instead scatters K*K strided slabs of a 6-D array into dx, which
        is memory-bound and several times slower.)"""
        N, Ho, Wo, F = dout.shape
        K, C, Q = self.kernel_size, self.in_channels, self.kernel_size - 1 - self.padding
        dp = self._scratch("dout_padded", (N, Ho + 2 * Q, Wo + 2 * Q, F), dout.dtype)
        dp[:, Q:Q + Ho, Q:Q + Wo, :] = dout
        sN, sH, sW, sF = dp.strides
        windows = as_strided(dp, (N, H, W, K, K * F), (sN, sH, sW, sH, sF), writeable=False)
        cols = self._scratch("dout_cols", (N * H * W, K * K * F), dout.dtype)
        cols.reshape(N, H, W, K, K * F)[...] = windows
        w_flipped = self.params["W"][:, :, ::-1, ::-1].transpose(2, 3, 0, 1).reshape(K * K * F, C)
        return _nchw((cols @ w_flipped).reshape(N, H, W, C))


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

    def config(self):
        return {"pool_size": self.pool_size, "stride": self.stride}

    def output_shape(self, input_shape):
        c, h, w = input_shape
        k, s = self.pool_size, self.stride
        if h < k or w < k:
            raise ValueError(f"max-pool {k}x{k} does not fit a {h}x{w} input")
        return (c, (h - k) // s + 1, (w - k) // s + 1)

    def _windows(self, x, Ho, Wo):
        """The pool_size**2 strided views x[:, kh + S*i, kw + S*j, :] of x: (N, H, W, C),
        each (N, Ho, Wo, C), in row-major window order."""
        K, S = self.pool_size, self.stride
        return [x[:, kh:kh + S * (Ho - 1) + 1:S, kw:kw + S * (Wo - 1) + 1:S, :]
                for kh in range(K) for kw in range(K)]

    def forward(self, x, train=False):
        N, C, H, W = x.shape
        _, Ho, Wo = self.output_shape((C, H, W))
        # Work channels-last when x is (a conv's output is), so every window
        # view has C contiguous numbers innermost.
        xt = _nhwc(x)
        self.x_shape, self.x_layout = x.shape, xt
        if self.pool_size == self.stride == 2:
            # Fast path, a two-round tournament: pairs along W, then the pair
            # winners along H. Strict ">" keeps the first maximum on ties.
            v00, v01, v10, v11 = self._windows(xt, Ho, Wo)
            top, bottom = np.maximum(v00, v01), np.maximum(v10, v11)
            right_top, right_bottom, lower = v01 > v00, v11 > v10, bottom > top
            np.maximum(top, bottom, out=top)
            if H == 2 * Ho and W == 2 * Wo:
                self.winner = self._winner_mask(right_top, right_bottom, lower)
            else:
                self.winner = None
                self.right_top, self.right_bottom, self.lower = right_top, right_bottom, lower
            return _nchw(top)
        views = self._windows(xt, Ho, Wo)
        out = views[0].copy()
        arg = np.zeros(out.shape, np.uint8)
        for k, v in enumerate(views[1:], 1):
            wins = v > out  # strict: a later equal value never takes the win
            np.copyto(arg, k, where=wins)
            np.maximum(out, v, out=out)
        self.arg = arg
        return _nchw(out)

    @staticmethod
    def _winner_mask(right_top, right_bottom, lower):
        """The tournament's results, each (N, Ho, Wo, C), as one-hot windows:
        a bool (N, Ho, 2, Wo, 2, C) array, True at each window's argmax."""
        N, Ho, Wo, C = lower.shape
        winner = np.empty((N, Ho, 2, Wo, 2, C), bool)
        np.logical_not(lower | right_top, out=winner[:, :, 0, :, 0])
        np.greater(right_top, lower, out=winner[:, :, 0, :, 1])  # bools: a > b is a and not b
        np.greater(lower, right_bottom, out=winner[:, :, 1, :, 0])
        np.logical_and(lower, right_bottom, out=winner[:, :, 1, :, 1])
        return winner

    def backward(self, dout):
        N, C, Ho, Wo = dout.shape
        H, W = self.x_shape[2:]
        K, S = self.pool_size, self.stride
        dt = _nhwc(dout)
        if dt.strides[-1] != dt.itemsize:  # NCHW memory (from a Linear): one transposing copy
            dt = np.ascontiguousarray(dt)
        if K == S == 2 and self.winner is not None:
            # One pass: each upstream gradient, broadcast over its 2x2 window,
            # times the window's one-hot argmax.
            dx = np.multiply(dt[:, :, None, :, None, :], self.winner, dtype=dout.dtype)
            return _nchw(dx.reshape(N, H, W, C))
        # Disjoint windows (S >= K) take plain writes; if they also cover x, no
        # input is left unwritten and dx needs no zeroing first.
        disjoint = S >= K
        covers = S == K and H == K * Ho and W == K * Wo
        dx = (np.empty_like if covers else np.zeros_like)(self.x_layout, dtype=dout.dtype)
        views = self._windows(dx, Ho, Wo)
        if K == S == 2:
            lower = np.where(self.lower, dt, 0)
            upper = dt - lower
            for (left, right), half, goes_right in ((views[:2], upper, self.right_top),
                                                    (views[2:], lower, self.right_bottom)):
                np.copyto(left, half)
                np.copyto(left, 0, where=goes_right)
                np.subtract(half, left, out=right)
            return _nchw(dx)
        for k, view in enumerate(views):
            routed = np.where(self.arg == k, dt, 0)
            if disjoint:
                view[...] = routed
            else:
                view += routed
        return _nchw(dx)


@register
class BatchNorm(Layer):
    """Batch normalization over features: x: (N, D) or channels: x: (N, C, H, W).

    out = gamma * (x - mean) / sqrt(var + eps) + beta, per feature (per channel,
    pooling N, H and W). Training uses the batch mean and (biased) variance and
    updates the running statistics; evaluation uses the running statistics.

    Running statistics follow the cs231n convention, ``momentum`` being the
    fraction *kept*:  running = momentum * running + (1 - momentum) * batch.
    PyTorch's ``momentum`` is the fraction *replaced*, so ours 0.9 == torch's
    0.1. As in PyTorch the running variance is the unbiased batch variance
    (times M / (M - 1), M the number of values pooled per feature), starting
    from mean 0 and variance 1.
    """

    kind = "batchnorm"

    def __init__(self, num_features: int, momentum: float = 0.9, eps: float = 1e-5,
                 dtype=np.float32):
        super().__init__()
        if not 0 <= momentum <= 1:
            raise ValueError(f"batchnorm momentum is the fraction kept, in [0, 1], got {momentum}")
        self.num_features, self.momentum, self.eps = int(num_features), float(momentum), float(eps)
        self.params["gamma"] = np.ones(self.num_features, dtype=dtype)
        self.params["beta"] = np.zeros(self.num_features, dtype=dtype)
        self.buffers["running_mean"] = np.zeros(self.num_features, dtype=dtype)
        self.buffers["running_var"] = np.ones(self.num_features, dtype=dtype)
        self._zero_grads()

    def config(self):
        return {"num_features": self.num_features, "momentum": self.momentum, "eps": self.eps}

    def output_shape(self, input_shape):
        if input_shape[0] != self.num_features:
            raise ValueError(f"batchnorm expects {self.num_features} features, got {input_shape[0]}")
        return input_shape

    @staticmethod
    def _rows(x):
        """x: (N, D) or (N, C, H, W) -> (M, D) with one feature per column (a view
        when x is NHWC memory), plus the function mapping such a matrix back."""
        if x.ndim == 2:
            return x, lambda m: m
        if x.ndim != 4:
            raise ValueError(f"batchnorm takes (N, D) or (N, C, H, W) inputs, got shape {x.shape}")
        N, C, H, W = x.shape
        return _nhwc(x).reshape(-1, C), lambda m: _nchw(m.reshape(N, H, W, C))

    def forward(self, x, train=False):
        if x.shape[1] != self.num_features:
            raise ValueError(f"batchnorm expects {self.num_features} features, got {x.shape[1]}")
        rows, back = self._rows(x)
        gamma, beta = self.params["gamma"], self.params["beta"]
        if not train:
            scale = gamma / np.sqrt(self.buffers["running_var"] + self.eps)
            return back(rows * scale + (beta - self.buffers["running_mean"] * scale))
        m = rows.shape[0]
        # Column sums as a matrix-vector product: BLAS reads the (M, C) rows
        # once, where a reduction over axis 0 of a narrow matrix crawls.
        ones = np.ones(m, rows.dtype)
        mean = (ones @ rows) / m
        xhat = rows - mean
        var = np.einsum("ij,ij->j", xhat, xhat) / m
        inv_std = (1.0 / np.sqrt(var + self.eps)).astype(rows.dtype)
        xhat *= inv_std
        mom = self.momentum
        self.buffers["running_mean"] *= mom
        self.buffers["running_mean"] += (1 - mom) * mean
        self.buffers["running_var"] *= mom
        self.buffers["running_var"] += (1 - mom) * var * (m / max(m - 1, 1))
        self.xhat, self.inv_std = xhat, inv_std
        out = xhat * gamma
        out += beta
        return back(out)

    def backward(self, dout):
        drows, back = self._rows(dout)
        xhat, m = self.xhat, self.xhat.shape[0]
        dbeta = np.ones(m, drows.dtype) @ drows
        dgamma = np.einsum("ij,ij->j", drows, xhat)
        self.grads["beta"][...] = dbeta
        self.grads["gamma"][...] = dgamma
        # d xhat = dout * gamma; through the mean and variance of the batch:
        # dx = k * dout - k * sum(dout) / M - xhat * k * sum(dout * xhat) / M,
        # with k = gamma * inv_std, in three passes over (M, C) arrays.
        k = self.params["gamma"] * self.inv_std
        dx = drows * k
        dx -= k * dbeta / m
        correction = np.multiply(xhat, k * dgamma / m)
        dx -= correction
        return back(dx)


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
        ("MaxPool2D 2x2", MaxPool2D(2), _distinct(rng, (2, 2, 4, 6)), None),
        ("MaxPool2D 3x3 stride 2 (overlapping)", MaxPool2D(3, 2), _distinct(rng, (2, 2, 7, 5)), None),
        ("BatchNorm (N, D), train", _batchnorm(4, rng), rng.standard_normal((6, 4)), None),
        ("BatchNorm (N, C, H, W), train", _batchnorm(3, rng),
         rng.standard_normal((2, 3, 3, 2)), None),
    ]
