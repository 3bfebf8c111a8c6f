"""Max-pooling over channels-last memory: the 2x2 tournament and strided window views.

Layers see NCHW shapes; the work runs on the NHWC view of the same memory (a
conv's output is NHWC memory), so every window view has C contiguous numbers
innermost. The argmax is the first maximum in row-major window order, as
PyTorch's (mlp/reference.py's maxpool_forward says it plainly).
"""
from __future__ import annotations

import numpy as np

from mlp.kernels.conv import nchw, nhwc
from mlp.kernels.elementwise import relu_rows, zeros_like_rows
from mlp.parallel import block_size, over_blocks

# Bytes of input per block: a block's copies and comparisons stay in cache.
BLOCK_BYTES = 1 << 20


def _images_per_block(x):
    return block_size(x[0].size * x.itemsize, BLOCK_BYTES)


def _windows(x, K, S, Ho, Wo):
    """The K*K strided views x[:, kh + S*i, kw + S*j, :] of x: (N, H, W, C), each
    (N, Ho, Wo, C), in row-major window order."""
    return [x[:, kh:kh + S * (Ho - 1) + 1:S, kw:kw + S * (Wo - 1) + 1:S, :]
            for kh in range(K) for kw in range(K)]


def maxpool_forward(x, size: int, stride: int):
    """x: (N, C, H, W) -> (out: (N, C, Ho, Wo) as a view of NHWC memory, cache)."""
    N, C, H, W = x.shape
    Ho, Wo = (H - size) // stride + 1, (W - size) // stride + 1
    xt = nhwc(x)
    if size == stride == 2:
        # 2x2 windows tile the first 2*Ho rows and 2*Wo columns (an odd last one is
        # dropped, as in floor mode): a tournament over them.
        out = np.empty((N, Ho, Wo, C), x.dtype)
        winner = np.empty((2, 2, N, Ho, Wo, C), bool)
        windows = _tiled(xt, Ho, Wo)
        over_blocks(lambda lo, hi: _tournament(windows[lo:hi], out[lo:hi], winner[:, :, lo:hi]), N,
                    _images_per_block(x))
        return nchw(out), ("tournament", x.shape, winner)
    views = _windows(xt, size, stride, Ho, Wo)
    out = views[0].copy()
    arg = np.zeros(out.shape, np.uint8)
    for k, v in enumerate(views[1:], 1):
        wins = v > out  # strict: a later equal value never takes the win
        np.copyto(arg, k, where=wins)
        np.maximum(out, v, out=out)
    return nchw(out), ("windows", x.shape, arg, size, stride, xt)


def _tiled(x, Ho, Wo):
    """The 2x2 windows of x: (N, H, W, C) as a view (N, Ho, 2, Wo, 2, C)."""
    N, _, W, C = x.shape
    return x[:, :2 * Ho].reshape(N, Ho, 2, W, C)[:, :, :, :2 * Wo].reshape(N, Ho, 2, Wo, 2, C)


def _tournament(windows, out, winner):
    """The 2x2 windows: (n, Ho, 2, Wo, 2, C): their maxima into out: (n, Ho, Wo, C) and
    one-hot argmaxes into winner: (2, 2, n, Ho, Wo, C), by a two-round tournament:
    pairs along W, then the pair winners along H. Strict ">" keeps the first
    maximum on ties, as PyTorch does. The window entries are first copied apart
    into four contiguous arrays (a strided copy runs fast; strided comparisons,
    C numbers at a time, do not)."""
    v00, v01, v10, v11 = entries = np.empty((4,) + out.shape, out.dtype)
    np.copyto(entries.reshape((2, 2) + out.shape), windows.transpose(2, 4, 0, 1, 3, 5))
    top, bottom = np.maximum(v00, v01, out=out), np.maximum(v10, v11)
    right_top, right_bottom, lower = v01 > v00, v11 > v10, bottom > top
    np.maximum(top, bottom, out=top)
    np.logical_not(lower | right_top, out=winner[0, 0])
    np.greater(right_top, lower, out=winner[0, 1])  # bools: a > b is a and not b
    np.greater(lower, right_bottom, out=winner[1, 0])
    np.logical_and(lower, right_bottom, out=winner[1, 1])


def tournament_epilogue(N: int, H: int, W: int, C: int, dtype, relu: bool = False):
    """The 2x2 max-pool of a conv's output, fused into the conv: the conv hands each
    block of its output, (n, H, W, C) channels-last, to ``pool(lo, hi, block)`` while it
    is in cache, and only the pooled numbers and the one-hot argmaxes are kept (the
    conv's full output is never written out and read back). A conv that makes its
    output as 2x2 tiles, (n, ceil(H/2), ceil(W/2), 2, 2, C) (im2col over tiles), hands
    them to ``pool.tiles(lo, hi, tiles)`` instead: a tile is a pooling window, so they
    need no reordering first. With ``relu``, out is the ReLU of the pooled numbers, as
    ``elementwise.relu_forward`` makes it, and a window whose max is not positive has no
    argmax (its gradient is zero): the ReLU's forward and backward, fused.
    -> (pool, out: (N, C, Ho, Wo) as a view of NHWC memory filled block by block,
    cache for ``backward_prologue``)."""
    Ho, Wo = H // 2, W // 2
    out = np.empty((N, Ho, Wo, C), dtype)
    winner = np.empty((2, 2, N, Ho, Wo, C), bool)
    # The conv's blocks are sized for its own scratch; the tournament's copies go
    # BLOCK_BYTES of output at a time (measured: 3-5 % of a conv6bn step faster).
    step = block_size(H * W * C * np.dtype(dtype).itemsize, BLOCK_BYTES)

    zeros = zeros_like_rows(out, min(N, step)) if relu else None

    def over_steps(lo, hi, windows):
        for a in range(0, hi - lo, step):
            b = min(a + step, hi - lo)
            pooled, won = out[lo + a:lo + b], winner[:, :, lo + a:lo + b]
            _tournament(windows(a, b), pooled, won)
            if relu:
                positive = np.empty(pooled.shape, bool)
                relu_rows(pooled, pooled, positive, zeros)
                won &= positive

    def pool(lo, hi, block):
        over_steps(lo, hi, lambda a, b: _tiled(block[a:b], Ho, Wo))

    def tiles(lo, hi, y):
        # a dropped odd last row or column of the output is a last row of tiles
        over_steps(lo, hi, lambda a, b: y[a:b, :Ho, :Wo].transpose(0, 1, 3, 2, 4, 5))

    pool.tiles = tiles
    return pool, nchw(out), ((N, C, H, W), winner)


def backward_prologue(dout, cache):
    """The fused conv's blocks of the 2x2 max-pool's input gradient, from dout: (N, C, Ho,
    Wo) and ``tournament_epilogue``'s cache: ``prologue(lo, hi)`` -> (n, H, W, C)
    channels-last; ``prologue.tiles(lo, hi)`` -> (n, ceil(H/2), ceil(W/2), 2, 2, C), the
    same as 2x2 tiles (zeros past H, W), for a conv that works on tiles. Each block is
    made when the conv's backward reaches it, and read in cache."""
    (_, C, H, W), winner = cache
    Ho, Wo = H // 2, W // 2
    dt = nhwc(dout)

    def prologue(lo, hi):
        return maxpool_backward_block(dout, cache, lo, hi)

    def tiles(lo, hi):
        d = np.empty((hi - lo, -(-H // 2), -(-W // 2), 2, 2, C), dout.dtype)
        # one tile position at a time, from contiguous arrays (measured: 0.98 against 1.30
        # ms for 64 CIFAR images of 32 channels as one multiply through transposed views)
        for i in range(2):
            for j in range(2):
                np.multiply(winner[i, j, lo:hi], dt[lo:hi], out=d[:, :Ho, :Wo, i, j])
        d[:, Ho:] = 0
        d[:, :, Wo:] = 0
        return d

    prologue.tiles = tiles
    return prologue


def _route(dt, winner, dx):
    """The 2x2 tournament's input gradient dx: (n, H, W, C) from dt: (n, Ho, Wo, C) and
    the one-hot argmaxes winner: (2, 2, n, Ho, Wo, C): each upstream gradient times its
    window's argmax (contiguous arrays), then copied into the windows' part of dx; a
    dropped odd last row or column gets zeros."""
    _, Ho, Wo, _ = dt.shape
    np.copyto(_tiled(dx, Ho, Wo), (winner * dt).transpose(2, 3, 0, 4, 1, 5))
    dx[:, 2 * Ho:] = 0
    dx[:, :, 2 * Wo:] = 0


def maxpool_backward_block(dout, cache, lo: int, hi: int) -> np.ndarray:
    """Images lo:hi of the 2x2 max-pool's input gradient, (hi - lo, H, W, C)
    channels-last, from dout: (N, C, Ho, Wo) and ``tournament_epilogue``'s cache: the
    fused conv's backward asks for its blocks one at a time and reads each in cache."""
    (_, C, H, W), winner = cache
    dx = np.empty((hi - lo, H, W, C), dout.dtype)
    _route(nhwc(dout)[lo:hi], winner[:, :, lo:hi], dx)
    return dx


def maxpool_backward(dout, cache):
    """dout: (N, C, Ho, Wo) -> dx: (N, C, H, W) (a view of NHWC memory)."""
    N, C, Ho, Wo = dout.shape
    dt = nhwc(dout)
    if dt.strides[-1] != dt.itemsize:  # NCHW memory (from a Linear): one transposing copy
        dt = np.ascontiguousarray(dt)
    if cache[0] == "tournament":
        _, (_, _, H, W), winner = cache
        dx = np.empty((N, H, W, C), dout.dtype)
        over_blocks(lambda lo, hi: _route(dt[lo:hi], winner[:, :, lo:hi], dx[lo:hi]), N,
                    _images_per_block(dx))
        return (nchw(dx),)
    _, (_, _, H, W), arg, K, S, xt = cache
    # Disjoint windows (S >= K) take plain writes; if they also cover x, no
    # input is left unwritten and dx needs no zeroing first.
    disjoint = S >= K
    covers = S == K and H == K * Ho and W == K * Wo
    dx = (np.empty_like if covers else np.zeros_like)(xt, dtype=dout.dtype)
    for k, view in enumerate(_windows(dx, K, S, Ho, Wo)):
        routed = np.where(arg == k, dt, 0)
        if disjoint:
            view[...] = routed
        else:
            view += routed
    return (nchw(dx),)
