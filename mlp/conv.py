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
from mlp.parallel import block_size, over_batch, over_blocks


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
        self.xp = self.dp = None  # padded input and upstream gradient, reused across batches

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

    def _zero_bordered(self, name, shape, dtype):
        """The padded array ``self.<name>``, kept between batches of one shape: a fresh
        large array costs a page fault per 4 KiB on first touch. It is only ever
        written inside its borders, so the zero borders survive reuse."""
        buf = getattr(self, name)
        if buf is None or buf.shape != shape or buf.dtype != dtype:
            buf = np.zeros(shape, dtype)
            setattr(self, name, buf)
        return buf

    def _im2col(self, xp, cols, Ho, Wo):
        """Receptive fields of xp: (n, Hp, Wp, C) into cols: (n*Ho*Wo, K*K*C), one row per
        output position, columns in (kh, kw, c) order. Kernel row kh of output (i, j)'s
        field is the WW*C contiguous numbers xp[n, i*S + kh, j*S : j*S + WW, :]."""
        n, _, _, C = xp.shape
        K, S = self.kernel_size, self.stride
        sN, sH, sW, sC = xp.strides
        windows = as_strided(xp, (n, Ho, Wo, K, K * C), (sN, S * sH, S * sW, sH, sC), writeable=False)
        cols.reshape(n, Ho, Wo, K, K * C)[...] = windows

    def forward(self, x, train=False):
        """x: (N, C, H, W) -> (N, F, Ho, Wo), NHWC memory. Works through the batch a
        block of images at a time: im2col into a cache-sized scratch, then one product."""
        N, C, H, W = x.shape
        _, Ho, Wo = self.output_shape((C, H, W))
        F, K, P = self.out_channels, self.kernel_size, self.padding
        dtype = self.params["W"].dtype
        xp = self._zero_bordered("xp", (N, H + 2 * P, W + 2 * P, C), dtype)
        out = np.empty((N * Ho * Wo, F), dtype)
        # W as a (kh, kw, c) x F matrix, matching the column order of the im2col rows.
        w_mat = self.params["W"].transpose(2, 3, 1, 0).reshape(K * K * C, F)
        b, rows = self.params["b"], Ho * Wo

        def block(lo, hi):
            xp[lo:hi, P:P + H, P:P + W, :] = _nhwc(x[lo:hi])
            cols = np.empty(((hi - lo) * rows, K * K * C), dtype)
            self._im2col(xp[lo:hi], cols, Ho, Wo)
            np.matmul(cols, w_mat, out=out[lo * rows:hi * rows])
            out[lo * rows:hi * rows] += b

        over_blocks(block, N, self._block(rows * K * K * C, dtype))
        self.x_shape = x.shape
        return _nchw(out.reshape(N, Ho, Wo, F))

    def _block(self, numbers_per_image, dtype):
        return block_size(numbers_per_image * np.dtype(dtype).itemsize)

    def backward(self, dout):
        """dout: (N, F, Ho, Wo) -> dx: (N, C, H, W) (None without ``input_grad``). Block by
        block: the im2col rows again (cheaper than keeping them: they stay in cache),
        their share of dW and db, and the block's input gradient."""
        N, C, H, W = self.x_shape
        _, F, Ho, Wo = dout.shape
        K, S, P = self.kernel_size, self.stride, self.padding
        dtype = dout.dtype
        dflat = _nhwc(dout).reshape(N * Ho * Wo, F)  # a view when dout is NHWC memory
        rows = Ho * Wo
        by_convolution = self.input_grad and S == 1 and P <= K - 1
        if by_convolution:
            Q = K - 1 - P
            dx = np.empty((N, H, W, C), dtype)
            dp = self._zero_bordered("dp", (N, Ho + 2 * Q, Wo + 2 * Q, F), dtype)
            w_flipped = self.params["W"][:, :, ::-1, ::-1].transpose(2, 3, 0, 1).reshape(K * K * F, C)

        def block(lo, hi):
            d = dflat[lo * rows:hi * rows]
            cols = np.empty(((hi - lo) * rows, K * K * C), dtype)
            self._im2col(self.xp[lo:hi], cols, Ho, Wo)
            if by_convolution:
                self._input_grad_by_convolution(d.reshape(hi - lo, Ho, Wo, F), dp[lo:hi], w_flipped,
                                                dx[lo:hi])
            return cols.T @ d, np.ones(len(d), dtype) @ d

        per_image = rows * K * K * max(C, F if by_convolution else 0)
        parts = over_blocks(block, N, self._block(per_image, dtype))
        dw, db = _sum_over([p[0] for p in parts]), _sum_over([p[1] for p in parts])
        self.grads["W"][...] = dw.reshape(K, K, C, F).transpose(3, 2, 0, 1)
        self.grads["b"][...] = db
        if not self.input_grad:
            return None
        if by_convolution:
            return _nchw(dx)
        return self._input_grad_by_col2im(dflat, N, H, W, Ho, Wo)

    def _input_grad_by_col2im(self, dflat, N, H, W, Ho, Wo):
        """dx for any stride: dcols = dout @ W^T, then col2im. Each kernel offset (kh, kw)
        adds one strided slab; K*K vectorised adds, no np.add.at."""
        C, K, S, P = self.in_channels, self.kernel_size, self.stride, self.padding
        w_mat = self.params["W"].transpose(2, 3, 1, 0).reshape(K * K * C, self.out_channels)
        dcols = dflat @ w_mat.T
        dxp = np.zeros((N, H + 2 * P, W + 2 * P, C), dflat.dtype)
        dc = dcols.reshape(N, Ho, Wo, K, K, C)
        for kh in range(K):
            for kw in range(K):
                dxp[:, kh:kh + S * (Ho - 1) + 1:S, kw:kw + S * (Wo - 1) + 1:S, :] += dc[:, :, :, kh, kw, :]
        return _nchw(dxp[:, P:P + H, P:P + W, :])

    def _input_grad_by_convolution(self, dout, dp, w_flipped, dx):
        """dx: (n, H, W, C) for stride 1, written in place: the upstream gradient
        dout: (n, Ho, Wo, F), zero-padded by K-1-P into ``dp`` (its borders zero),
        correlated with the kernel flipped in space and transposed in channels
        (``w_flipped``: (K*K*F, C)) -- one im2col and one matrix product, like the
        forward. (A col2im instead scatters K*K strided slabs of a 6-D array into
        dx, which is memory-bound and several times slower.)"""
        n, Ho, Wo, F = dout.shape
        _, H, W, C = dx.shape
        K, Q = self.kernel_size, self.kernel_size - 1 - self.padding
        dp[:, Q:Q + Ho, Q:Q + Wo, :] = dout
        sN, sH, sW, sF = dp.strides
        windows = as_strided(dp, (n, H, W, K, K * F), (sN, sH, sW, sH, sF), writeable=False)
        cols = np.empty((n * H * W, K * K * F), dout.dtype)
        cols.reshape(n, H, W, K, K * F)[...] = windows
        np.matmul(cols, w_flipped, out=dx.reshape(n * H * W, C))


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
        self.winner = None
        if self.pool_size == self.stride == 2 and H == 2 * Ho and W == 2 * Wo:
            out = np.empty((N, Ho, Wo, C), x.dtype)
            self.winner = np.empty((N, Ho, 2, Wo, 2, C), bool)
            over_batch(lambda lo, hi: self._tournament(xt[lo:hi], out[lo:hi], self.winner[lo:hi]),
                       N, x.size)
            return _nchw(out)
        views = self._windows(xt, Ho, Wo)
        out = views[0].copy()
        arg = np.zeros(out.shape, np.uint8)
        for k, v in enumerate(views[1:], 1):
            wins = v > out  # strict: a later equal value never takes the win
            np.copyto(arg, k, where=wins)
            np.maximum(out, v, out=out)
        self.arg = arg
        return _nchw(out)

    def _tournament(self, x, out, winner):
        """2x2 windows tiling x: (n, H, W, C): their maxima into out: (n, H/2, W/2, C) and
        one-hot argmaxes into winner: (n, H/2, 2, W/2, 2, C), by a two-round tournament:
        pairs along W, then the pair winners along H. Strict ">" keeps the first
        maximum on ties, as PyTorch does."""
        v00, v01, v10, v11 = self._windows(x, *out.shape[1:3])
        top, bottom = np.maximum(v00, v01, out=out), np.maximum(v10, v11)
        right_top, right_bottom, lower = v01 > v00, v11 > v10, bottom > top
        np.maximum(top, bottom, out=top)
        np.logical_not(lower | right_top, out=winner[:, :, 0, :, 0])
        np.greater(right_top, lower, out=winner[:, :, 0, :, 1])  # bools: a > b is a and not b
        np.greater(lower, right_bottom, out=winner[:, :, 1, :, 0])
        np.logical_and(lower, right_bottom, out=winner[:, :, 1, :, 1])

    def backward(self, dout):
        N, C, Ho, Wo = dout.shape
        H, W = self.x_shape[2:]
        K, S = self.pool_size, self.stride
        dt = _nhwc(dout)
        if dt.strides[-1] != dt.itemsize:  # NCHW memory (from a Linear): one transposing copy
            dt = np.ascontiguousarray(dt)
        if self.winner is not None:
            # Each upstream gradient, broadcast over its 2x2 window, times the
            # window's one-hot argmax.
            dx = np.empty(self.winner.shape, dout.dtype)
            over_batch(lambda lo, hi: np.multiply(dt[lo:hi, :, None, :, None, :], self.winner[lo:hi],
                                                  out=dx[lo:hi]), N, dx.size)
            return _nchw(dx.reshape(N, H, W, C))
        # Disjoint windows (S >= K) take plain writes; if they also cover x, no
        # input is left unwritten and dx needs no zeroing first.
        disjoint = S >= K
        covers = S == K and H == K * Ho and W == K * Wo
        dx = (np.empty_like if covers else np.zeros_like)(self.x_layout, dtype=dout.dtype)
        views = self._windows(dx, Ho, Wo)
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
        m, per_image = rows.shape[0], rows.shape[0] // x.shape[0]
        blocks = _row_blocks(x.shape[0], per_image, rows)
        # Column sums as a matrix-vector product: BLAS reads the (M, C) rows
        # once, where a reduction over axis 0 of a narrow matrix crawls. Both
        # sums go block by block, in block order.
        mean = _sum_over(blocks(lambda r: np.ones(r.stop - r.start, rows.dtype) @ rows[r])) / m
        xhat = np.empty_like(rows)

        def centre(r):
            np.subtract(rows[r], mean, out=xhat[r])
            return np.einsum("ij,ij->j", xhat[r], xhat[r])

        var = _sum_over(blocks(centre)) / m
        inv_std = (1.0 / np.sqrt(var + self.eps)).astype(rows.dtype)
        out = np.empty_like(rows)

        def normalise(r):
            xhat[r] *= inv_std
            np.multiply(xhat[r], gamma, out=out[r])
            out[r] += beta

        blocks(normalise)
        mom = self.momentum
        self.buffers["running_mean"] *= mom
        self.buffers["running_mean"] += (1 - mom) * mean
        self.buffers["running_var"] *= mom
        self.buffers["running_var"] += (1 - mom) * var * (m / max(m - 1, 1))
        self.xhat, self.inv_std = xhat, inv_std
        return back(out)

    def backward(self, dout):
        drows, back = self._rows(dout)
        xhat, m = self.xhat, self.xhat.shape[0]
        blocks = _row_blocks(dout.shape[0], m // dout.shape[0], drows)
        sums = blocks(lambda r: (np.ones(r.stop - r.start, drows.dtype) @ drows[r],
                                 np.einsum("ij,ij->j", drows[r], xhat[r])))
        dbeta, dgamma = _sum_over([s[0] for s in sums]), _sum_over([s[1] for s in sums])
        self.grads["beta"][...] = dbeta
        self.grads["gamma"][...] = dgamma
        # d xhat = dout * gamma; through the mean and variance of the batch:
        # dx = k * dout - k * sum(dout) / M - xhat * k * sum(dout * xhat) / M,
        # with k = gamma * inv_std.
        k = self.params["gamma"] * self.inv_std
        shift, slope = k * dbeta / m, k * dgamma / m
        dx = np.empty_like(drows)

        def rows_of_dx(r):
            np.multiply(drows[r], k, out=dx[r])
            dx[r] -= shift
            dx[r] -= xhat[r] * slope

        blocks(rows_of_dx)
        return back(dx)


def _row_blocks(n, rows_per_image, rows):
    """``blocks(fn)``: ``fn(row_slice)`` over (M, C) ``rows`` belonging to ``n`` images,
    block by block of whole images, in parallel; the results in block order."""
    block = block_size(rows_per_image * rows.shape[1] * rows.itemsize)
    return lambda fn: over_blocks(lambda lo, hi: fn(slice(lo * rows_per_image, hi * rows_per_image)),
                                  n, block)


def _sum_over(parts):
    """Arrays summed in list order (a fixed order: the same numbers every run)."""
    total = np.array(parts[0], copy=True)
    for part in parts[1:]:
        total += part
    return total


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
