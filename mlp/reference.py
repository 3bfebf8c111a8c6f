"""Reference forward/backward of every layer that has a fast kernel: the maths, plainly.

cs231n's layers.py to mlp/kernels' fast_layers.py. Plain NumPy on arrays shaped
as the layers see them (NCHW for images), no threads, no blocks, no reused
buffers. Each ``*_forward`` returns ``(out, cache)`` and each ``*_backward``
takes ``(dout, cache)`` and returns the gradients on every input, in the
order the forward takes them. The layer classes (mlp/layers.py, mlp/conv.py)
run these when ``NNX_KERNELS=reference``; the fast kernels are tested against
them on random shapes.
"""
from __future__ import annotations

import math

import numpy as np

# ---- Linear ---------------------------------------------------------------------

def linear_forward(x, w, b):
    """x: (N, d_1, ..., d_k) flattened row-major to (N, D); w: (D, M), b: (M,) -> (N, M)."""
    flat = x.reshape(x.shape[0], -1)
    return flat @ w + b, (x.shape, flat, w)


def linear_backward(dout, cache):
    """dout: (N, M) -> dx: (N, d_1, ..., d_k), dw: (D, M), db: (M,)."""
    x_shape, flat, w = cache
    return (dout @ w.T).reshape(x_shape), flat.T @ dout, dout.sum(axis=0)


# ---- activations ------------------------------------------------------------------

def relu_forward(x):
    """max(0, x), elementwise."""
    return np.maximum(x, 0), x > 0


def relu_backward(dout, mask):
    """The gradient passes where the input was positive."""
    return dout * mask


GELU_C = math.sqrt(2 / math.pi)
GELU_K = 0.044715


def gelu_forward(x):
    """GELU, tanh form (PyTorch's ``approximate="tanh"``):
    0.5 x (1 + tanh(u)),  u = sqrt(2/pi) (x + 0.044715 x^3)."""
    t = np.tanh(GELU_C * (x + GELU_K * x ** 3))
    return 0.5 * x * (1 + t), (x, t)


def gelu_backward(dout, cache):
    """d/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)."""
    x, t = cache
    return dout * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * GELU_C * (1 + 3 * GELU_K * x * x))


# ---- convolution --------------------------------------------------------------------

def conv_forward(x, w, b, stride, pad):
    """2-D cross-correlation. x: (N, C, H, W), w: (F, C, K, K), b: (F,) ->
    out: (N, F, Ho, Wo), Ho = (H + 2 pad - K) / stride + 1 (likewise Wo).

    out[n, f, i, j] = b[f] + sum_{c, kh, kw} w[f, c, kh, kw] xpad[n, c, S i + kh, S j + kw]:
    one product over channels for each of the K*K kernel offsets."""
    N, C, H, W = x.shape
    F, _, K, _ = w.shape
    Ho, Wo = (H + 2 * pad - K) // stride + 1, (W + 2 * pad - K) // stride + 1
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    out = np.zeros((N, F, Ho, Wo), np.result_type(x, w))
    for kh in range(K):
        for kw in range(K):
            window = xp[:, :, kh:kh + stride * (Ho - 1) + 1:stride, kw:kw + stride * (Wo - 1) + 1:stride]
            out += np.einsum("nchw,fc->nfhw", window, w[:, :, kh, kw], optimize=True)
    out += b.reshape(1, F, 1, 1)
    return out, (x, w, stride, pad)


def conv_backward(dout, cache):
    """dout: (N, F, Ho, Wo) -> dx: (N, C, H, W), dw: (F, C, K, K), db: (F,).
    Each kernel offset's window of the input gets dout times that offset's weights
    (windows overlap: their gradients add), and the offset's weights get dout
    times the window."""
    x, w, stride, pad = cache
    N, C, H, W = x.shape
    _, F, Ho, Wo = dout.shape
    K = w.shape[2]
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    dxp, dw = np.zeros_like(xp, dtype=dout.dtype), np.zeros_like(w)
    for kh in range(K):
        for kw in range(K):
            rows = slice(kh, kh + stride * (Ho - 1) + 1, stride)
            cols = slice(kw, kw + stride * (Wo - 1) + 1, stride)
            dw[:, :, kh, kw] = np.einsum("nfhw,nchw->fc", dout, xp[:, :, rows, cols], optimize=True)
            dxp[:, :, rows, cols] += np.einsum("nfhw,fc->nchw", dout, w[:, :, kh, kw], optimize=True)
    return dxp[:, :, pad:pad + H, pad:pad + W], dw, dout.sum(axis=(0, 2, 3))


# ---- max-pooling ----------------------------------------------------------------------

def maxpool_forward(x, size, stride):
    """x: (N, C, H, W) -> (N, C, Ho, Wo), Ho = (H - size) // stride + 1 (floor mode:
    rows and columns no window covers are dropped). The argmax is the first
    maximum in row-major window order, as PyTorch's."""
    N, C, H, W = x.shape
    Ho, Wo = (H - size) // stride + 1, (W - size) // stride + 1
    windows = np.stack([x[:, :, kh:kh + stride * (Ho - 1) + 1:stride, kw:kw + stride * (Wo - 1) + 1:stride]
                        for kh in range(size) for kw in range(size)])     # (size*size, N, C, Ho, Wo)
    arg = windows.argmax(axis=0)
    out = np.take_along_axis(windows, arg[None], axis=0)[0]
    return out, (x.shape, arg, size, stride)


def maxpool_backward(dout, cache):
    """Each upstream gradient goes to its window's argmax; overlapping windows add."""
    x_shape, arg, size, stride = cache
    _, _, Ho, Wo = dout.shape
    dx = np.zeros(x_shape, dout.dtype)
    for k in range(size * size):
        kh, kw = divmod(k, size)
        dx[:, :, kh:kh + stride * (Ho - 1) + 1:stride, kw:kw + stride * (Wo - 1) + 1:stride] += \
            np.where(arg == k, dout, 0)
    return (dx,)


# ---- batch normalization ----------------------------------------------------------------

def _feature_axes(x):
    """Axes pooled per feature: (0,) for (N, D), (0, 2, 3) for (N, C, H, W); and the
    shape that broadcasts a per-feature vector against x."""
    if x.ndim == 2:
        return (0,), (1, -1)
    return (0, 2, 3), (1, -1, 1, 1)


def batchnorm_forward(x, gamma, beta, running_mean, running_var, decay, eps, train):
    """out = gamma * (x - mean) / sqrt(var + eps) + beta per feature; x: (N, D) or
    (N, C, H, W). Training uses the batch's mean and (biased) variance and updates the
    running statistics in place (running = decay * running + (1 - decay) * batch,
    the variance unbiased); evaluation uses the running statistics."""
    axes, shape = _feature_axes(x)
    if not train:
        xhat = (x - running_mean.reshape(shape)) / np.sqrt(running_var + eps).reshape(shape)
        return gamma.reshape(shape) * xhat + beta.reshape(shape), None
    m = x.size // x.shape[1]
    mean, var = x.mean(axis=axes), x.var(axis=axes)
    inv_std = 1 / np.sqrt(var + eps)
    xhat = (x - mean.reshape(shape)) * inv_std.reshape(shape)
    running_mean[...] = decay * running_mean + (1 - decay) * mean
    running_var[...] = decay * running_var + (1 - decay) * var * m / max(m - 1, 1)
    return gamma.reshape(shape) * xhat + beta.reshape(shape), (xhat, gamma, inv_std)


def batchnorm_backward(dout, cache):
    """dout like x -> dx, dgamma, dbeta. Through the batch's mean and variance:
    dx = gamma / sqrt(var + eps) * (dout - mean(dout) - xhat * mean(dout * xhat))."""
    xhat, gamma, inv_std = cache
    axes, shape = _feature_axes(xhat)
    dbeta, dgamma = dout.sum(axis=axes), (dout * xhat).sum(axis=axes)
    m = xhat.size // xhat.shape[1]
    dx = (gamma * inv_std).reshape(shape) * (dout - (dbeta / m).reshape(shape)
                                             - xhat * (dgamma / m).reshape(shape))
    return dx, dgamma, dbeta
