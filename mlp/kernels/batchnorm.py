"""Batch normalization in blocks of images, the sums by BLAS, in a fixed order.

Works on x: (N, D), or (N, C, H, W) through its channels-last memory, seen two
ways without copying: as an (M, C) matrix, one channel per column, whose
column sums are matrix-vector products (BLAS reads the rows once, where a
NumPy reduction over axis 0 of a narrow matrix crawls); and as an (N, H*W*C)
matrix, one image per row, against which a per-channel vector repeated H*W
times broadcasts with long inner loops (broadcast along the rows of the
narrow (M, C) view, NumPy's loops run C numbers at a time, several times
slower: measured here 0.085 ms against 0.023 ms for a copy of 1 MB). Every
sum goes block by block (whole images, fixed boundaries) and the blocks'
sums are added in block order, so no number depends on the thread count.
In a sharded training step (mlp/shards.py) x is one shard of the batch: the
mean and variance, and the backward's two sums, are the whole batch's
(``parallel.across_shards``), and gamma's and beta's gradients this shard's part.
"""
from __future__ import annotations

import numpy as np

from mlp.kernels.conv import nchw, nhwc
from mlp.kernels.elementwise import gelu_rows, relu_rows, zeros_like_rows
from mlp.parallel import across_shards, block_size, over_blocks, sum_in_order


def _views(x):
    """x: (N, D) or (N, C, H, W) -> (columns: (M, C), images: (N, P*C), P, back): the
    two views of x's channels-last memory (a copy first if x is not such memory),
    P = H*W positions per image, and the function mapping an images-shaped result
    back to x's shape."""
    if x.ndim == 2:
        return x, x, 1, lambda m: m
    N, C, H, W = x.shape
    t = nhwc(x)
    if not t.flags.c_contiguous:
        t = np.ascontiguousarray(t)
    return t.reshape(-1, C), t.reshape(N, -1), H * W, lambda m: nchw(m.reshape(N, H, W, C))


# Bytes of input per block: the passes over a block meet in cache.
BLOCK_BYTES = 1 << 20


def _block_images(images):
    return block_size(images.shape[1] * images.itemsize, BLOCK_BYTES)


def _blocks(n, images):
    """``blocks(fn)``: ``fn(lo, hi)`` over blocks of whole images, in parallel; the results
    in block order."""
    block = _block_images(images)
    return lambda fn: over_blocks(fn, n, block)


ACTIVATIONS = ("relu", "gelu")


def batchnorm_forward(x, gamma, beta, running_mean, running_var, decay, eps, train, activation=None):
    """As mlp.reference.batchnorm_forward: (out, cache), the running statistics updated
    in place in training. With ``activation`` ("relu" or "gelu", training only), out is
    the activation of it, made in the same pass over each block (the activation
    after a batch norm, fused: its own passes over memory are gone both ways), and
    ``batchnorm_backward`` then takes the activation's upstream gradient."""
    if activation not in (None, *ACTIVATIONS):
        raise ValueError(f"a batch norm fuses {' or '.join(ACTIVATIONS)}, not {activation!r}")
    columns, images, P, back = _views(x)
    C = columns.shape[1]
    if not train:
        if activation:
            raise ValueError("a batch norm fuses its activation in training only")
        scale = gamma / np.sqrt(running_var + eps)
        return back(images * np.tile(scale, P) + np.tile(beta - running_mean * scale, P)), None
    n, own = len(images), len(columns)
    blocks = _blocks(n, images)
    own_mean = sum_in_order(blocks(lambda lo, hi: np.ones((hi - lo) * P, x.dtype)
                                   @ columns[lo * P:hi * P])) / own
    centred = np.empty_like(images)     # x - own_mean, kept for the backward
    own_mean_t = np.tile(own_mean, P)

    def centre(lo, hi):
        np.subtract(images[lo:hi], own_mean_t, out=centred[lo:hi])
        squares = np.square(centred[lo:hi])
        return np.ones((hi - lo) * P, x.dtype) @ squares.reshape(-1, C)

    # The batch's mean and variance: this shard's alone, or every shard's of a sharded
    # step combined (m: the values per channel in the whole batch). ``offset`` = own_mean
    # - mean (zero unsharded) turns this shard's centred values into x - mean.
    moments, m = across_shards(np.stack([own_mean, sum_in_order(blocks(centre))]), own, combine_moments)
    mean, var = moments[0], moments[1] / m
    offset = own_mean - mean
    inv_std = (1.0 / np.sqrt(var + eps)).astype(x.dtype)
    scale_t, beta_t = np.tile(gamma * inv_std, P), np.tile(beta + offset * (gamma * inv_std), P)
    out = np.empty_like(images)
    # d activation / d input, for the backward: the ReLU's mask, the GELU's slope
    factor = None if activation is None else np.empty(images.shape, bool if activation == "relu" else x.dtype)
    zeros = zeros_like_rows(images, min(n, _block_images(images))) if activation == "relu" else None

    def normalise(lo, hi):
        o = out[lo:hi]
        np.multiply(centred[lo:hi], scale_t, out=o)
        o += beta_t
        if activation == "relu":
            relu_rows(o, o, factor[lo:hi], zeros)
        elif activation == "gelu":
            gelu_rows(o, o, factor[lo:hi])

    blocks(normalise)
    running_mean *= decay
    running_mean += (1 - decay) * mean
    running_var *= decay
    running_var += (1 - decay) * var * (m / max(m - 1, 1))
    return back(out), (centred, offset, gamma, inv_std, P, factor)


def combine_moments(parts: list[np.ndarray], counts: list[int]) -> tuple[np.ndarray, int]:
    """Parts of a batch, each [its mean, its sum of squared deviations from that mean]
    per channel with its count of values -> [the batch's mean, its sum of squared
    deviations from it] and its count: Chan, Golub and LeVeque's pairwise formula,
    added in part order. One part comes back as it is (its deviations from itself are
    zero), so an unsharded batch norm is the two-pass one, bit for bit."""
    if len(parts) == 1:
        return parts[0], counts[0]
    m = sum(counts)
    mean = sum_in_order([part[0] * count for part, count in zip(parts, counts, strict=True)]) / m
    squares = sum_in_order([part[1] + count * np.square(part[0] - mean)
                            for part, count in zip(parts, counts, strict=True)])
    return np.stack([mean, squares]), m


def batchnorm_backward(dout, cache):
    """As mlp.reference.batchnorm_backward: (dx, dgamma, dbeta). With c = x - mean,
    xhat = c * inv_std and k = gamma * inv_std:
        dbeta = sum(dout),  dgamma = inv_std * sum(dout * c),
        dx = k * dout - k * dbeta / M - c * k * inv_std * dgamma / M.
    After a fused activation (the cache holds its derivative: the ReLU's mask, the
    GELU's slope), dout is the activation's upstream gradient: each block's
    dout * derivative is made into dx's rows and read there again."""
    centred, offset, gamma, inv_std, P, factor = cache
    columns, dout_images, _, back = _views(dout)
    C = columns.shape[1]
    n = len(dout_images)
    blocks = _blocks(n, dout_images)
    dx = np.empty_like(dout_images)
    images = dout_images
    if factor is not None:
        images, columns = dx, dx.reshape(-1, C)   # the activation's gradient, block by block

    def sums(lo, hi):
        if factor is not None:
            np.multiply(dout_images[lo:hi], factor[lo:hi], out=dx[lo:hi])
        ones = np.ones((hi - lo) * P, dout.dtype)
        products = images[lo:hi] * centred[lo:hi]
        return ones @ columns[lo * P:hi * P], ones @ products.reshape(-1, C)

    parts = blocks(sums)
    own = np.stack([sum_in_order([p[0] for p in parts]), sum_in_order([p[1] for p in parts])])
    own[1] += offset * own[0]       # sum(dout * (x - mean)) from this shard's centred values
    # dx needs the sums over the whole batch; gamma's and beta's gradients are this
    # shard's part of them (a sharded step adds the shards' parameter gradients)
    both, m = across_shards(own, len(columns))
    dbeta, dgamma = both[0], both[1] * inv_std
    k = gamma * inv_std
    slope = k * inv_std * dgamma / m
    k_t, shift_t, slope_t = np.tile(k, P), np.tile(k * dbeta / m + offset * slope, P), np.tile(slope, P)

    def rows_of_dx(lo, hi):
        np.multiply(images[lo:hi], k_t, out=dx[lo:hi])
        dx[lo:hi] -= shift_t
        dx[lo:hi] -= centred[lo:hi] * slope_t

    blocks(rows_of_dx)
    if both is own:
        return back(dx), dgamma, dbeta
    return back(dx), own[1] * inv_std, own[0]
