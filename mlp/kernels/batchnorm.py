"""Batch normalization in blocks of images, the sums by BLAS, in a fixed order.

Works on x: (N, D), or (N, C, H, W) through the (M, C) matrix of its NHWC
memory (one feature per column; a view when x is a conv's NHWC output).
Column sums are matrix-vector products: BLAS reads the (M, C) rows once,
where a NumPy reduction over axis 0 of a narrow matrix crawls. Every sum goes
block by block (whole images, fixed boundaries) and the blocks' sums are
added in block order, so no number depends on the thread count.
"""
from __future__ import annotations

import numpy as np

from mlp.kernels.conv import nchw, nhwc
from mlp.parallel import block_size, over_blocks, sum_in_order


def _rows(x):
    """x: (N, D) or (N, C, H, W) -> (M, D) with one feature per column (a view when x is
    NHWC memory), plus the function mapping such a matrix back to x's shape."""
    if x.ndim == 2:
        return x, lambda m: m
    N, C, H, W = x.shape
    return nhwc(x).reshape(-1, C), lambda m: nchw(m.reshape(N, H, W, C))


def _row_blocks(n, rows):
    """``blocks(fn)``: ``fn(row_slice)`` over (M, C) ``rows`` belonging to ``n`` images,
    block by block of whole images, in parallel; the results in block order."""
    per_image = len(rows) // n
    block = block_size(per_image * rows.shape[1] * rows.itemsize)
    return lambda fn: over_blocks(lambda lo, hi: fn(slice(lo * per_image, hi * per_image)), n, block)


def batchnorm_forward(x, gamma, beta, running_mean, running_var, momentum, eps, train):
    """As mlp.reference.batchnorm_forward: (out, cache), the running statistics updated
    in place in training."""
    rows, back = _rows(x)
    if not train:
        scale = gamma / np.sqrt(running_var + eps)
        return back(rows * scale + (beta - running_mean * scale)), None
    m = rows.shape[0]
    blocks = _row_blocks(x.shape[0], rows)
    mean = sum_in_order(blocks(lambda r: np.ones(r.stop - r.start, rows.dtype) @ rows[r])) / m
    xhat = np.empty_like(rows)

    def centre(r):
        np.subtract(rows[r], mean, out=xhat[r])
        return np.einsum("ij,ij->j", xhat[r], xhat[r])

    var = sum_in_order(blocks(centre)) / m
    inv_std = (1.0 / np.sqrt(var + eps)).astype(rows.dtype)
    out = np.empty_like(rows)

    def normalise(r):
        xhat[r] *= inv_std
        np.multiply(xhat[r], gamma, out=out[r])
        out[r] += beta

    blocks(normalise)
    running_mean *= momentum
    running_mean += (1 - momentum) * mean
    running_var *= momentum
    running_var += (1 - momentum) * var * (m / max(m - 1, 1))
    return back(out), (xhat, gamma, inv_std, x.shape[0])


def batchnorm_backward(dout, cache):
    """As mlp.reference.batchnorm_backward: (dx, dgamma, dbeta)."""
    xhat, gamma, inv_std, n = cache
    drows, back = _rows(dout)
    m = len(xhat)
    blocks = _row_blocks(n, drows)
    sums = blocks(lambda r: (np.ones(r.stop - r.start, drows.dtype) @ drows[r],
                             np.einsum("ij,ij->j", drows[r], xhat[r])))
    dbeta, dgamma = sum_in_order([s[0] for s in sums]), sum_in_order([s[1] for s in sums])
    # dx = k * dout - k * sum(dout) / M - xhat * k * sum(dout * xhat) / M, k = gamma * inv_std.
    k = gamma * inv_std
    shift, slope = k * dbeta / m, k * dgamma / m
    dx = np.empty_like(drows)

    def rows_of_dx(r):
        np.multiply(drows[r], k, out=dx[r])
        dx[r] -= shift
        dx[r] -= xhat[r] * slope

    blocks(rows_of_dx)
    return back(dx), dgamma, dbeta
