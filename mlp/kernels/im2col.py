"""Convolution as im2col + one matrix product, in cache-sized blocks of images.

Arrays are channels-last, ``x: (N, H, W, C)``. A convolution is one matrix
multiply ``cols @ W`` where ``cols`` holds one receptive field per row. In
NHWC each kernel row of a receptive field (``K * C`` numbers) is contiguous in
the padded input, so im2col is a copy of contiguous chunks from a strided view
(no Python loops), and the product ``(n*Ho*Wo, K*K*C) @ (K*K*C, F)`` is already
the NHWC output. The batch goes a block of images at a time (about
``parallel.BLOCK_BYTES`` of im2col rows, so the copy and the product that
reads it meet in cache), blocks shared out among the threads.

``workspace`` is a dict the layer keeps between calls: the zero-bordered
padded input ``xp`` (the forward writes it, the backward reads it) and the
padded upstream gradient ``dp``, reused because a fresh large array costs a
page fault per 4 KiB on first touch.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import as_strided

from mlp.parallel import block_size, over_blocks, sum_in_order


def zero_bordered(workspace: dict, name: str, shape, dtype) -> np.ndarray:
    """``workspace[name]``, a zeroed array of this shape and dtype kept between calls.
    Callers write only inside its borders, so the zero borders survive reuse."""
    buf = workspace.get(name)
    if buf is None or buf.shape != shape or buf.dtype != dtype:
        buf = workspace[name] = np.zeros(shape, dtype)
    return buf


def put(dest, x):
    """dest[...] = x for (n, H, W, C) arrays. x may be an NHWC view of NCHW memory (a
    network's input): then it goes a channel at a time, runs of W numbers rather than
    of C (measured: 0.2 against 0.8 ms for 128 CIFAR images)."""
    if x.strides[-1] > x.strides[-2]:
        for c in range(x.shape[-1]):
            dest[..., c] = x[..., c]
    else:
        dest[...] = x


# Inputs of at most this many channels (an image's: 1-4) are gathered in two stages
# (below) where kernels are 3 wide or more. Measured here (float32, one thread, blocks of
# about 3 MiB of rows, as the kernels cut them): 1.16-2.03x faster for 1-4 channels and
# kernels of 3-8 (3 channels: 1.30-1.53x), 0.93x for a 2x2 kernel (airbench's whitening
# conv), 0.96x for 8 channels.
FEW_CHANNELS = 4


def in_two_stages(C: int, K: int) -> bool:
    """Whether ``im2col`` gathers an input of C channels for a K x K kernel in two stages."""
    return C <= FEW_CHANNELS and K >= 3


def im2col(xp, cols, K, S, Ho, Wo):
    """Receptive fields of xp: (n, Hp, Wp, C) into the first K*K*C columns of cols:
    (n*Ho*Wo, K*K*C [+ 1]), one row per output position, columns in (kh, kw, c) order.
    Kernel row kh of output (i, j)'s field is the K*C contiguous numbers
    xp[n, i*S + kh, j*S : j*S + K, :]."""
    n, _, _, C = xp.shape
    sN, sH, sW, sC = xp.strides
    row, item = cols.strides
    if in_two_stages(C, K):
        # A copy costs per contiguous run, and a first conv's runs are a few numbers
        # (K*C: 9-24 for 3 channels), K of them per field. First each column of
        # windows, kernel rows one after another: strip[n, j, h] = xp[n, h, j*S : j*S+K]
        # (a run of K*C per input row and output column, not per kernel row of each
        # output); then output (i, j)'s whole field is the K*K*C contiguous numbers
        # strip[n, j, i*S : i*S + K]: one run.
        strip = np.empty((n, Wo, S * (Ho - 1) + K, K * C), xp.dtype)
        strip[...] = as_strided(xp, strip.shape, (sN, S * sW, sH, sC), writeable=False)
        tN, tJ, tH, tC = strip.strides
        windows = as_strided(strip, (n, Ho, Wo, K * K * C), (tN, S * tH, tJ, tC), writeable=False)
        fields = as_strided(cols, (n, Ho, Wo, K * K * C), (Ho * Wo * row, Wo * row, row, item))
        fields[...] = windows
        return
    windows = as_strided(xp, (n, Ho, Wo, K, K * C), (sN, S * sH, S * sW, sH, sC), writeable=False)
    fields = as_strided(cols, (n, Ho, Wo, K, K * C), (Ho * Wo * row, Wo * row, row, K * C * item, item))
    fields[...] = windows


def with_ones(rows: int, fields: int, dtype) -> np.ndarray:
    """An (rows, fields + 1) array for im2col rows and a last column of ones: the bias
    row of [W; b] then rides in the matrix product (forward), and the upstream
    gradient's column sums, db, come out of the weight gradient's (backward),
    instead of a pass of their own over the output."""
    cols = np.empty((rows, fields + 1), dtype)
    cols[:, -1] = 1
    return cols


# From this many columns of im2col rows on, the weight gradient's product cols^T d runs
# faster computed as (d^T cols)^T: OpenBLAS packs the two ways differently. Measured
# here (float32, one thread, blocks of the kernels' sizes, three runs of
# bench/bench_im2col.py --weight-grad): 1.02-1.21x faster on the preset convs of 401-1153
# columns, even (0.97-1.02x) on cs231n-3layer's 148 and 193, 0.78-0.94x on those of 13-109.
TRANSPOSED_WEIGHT_GRAD_FIELDS = 128


def weight_grad(cols, d):
    """cols: (rows, fields), d: (rows, F) -> cols^T d: (fields, F), a transposed view of
    (d^T cols) where that product is the faster one (``TRANSPOSED_WEIGHT_GRAD_FIELDS``)."""
    if cols.shape[1] >= TRANSPOSED_WEIGHT_GRAD_FIELDS:
        return (d.T @ cols).T
    return cols.T @ d


def images_per_block(numbers_per_image, dtype):
    return block_size(numbers_per_image * np.dtype(dtype).itemsize)


def forward(x, w, b, stride: int, padding: int, workspace: dict, epilogue=None) -> np.ndarray | None:
    """x: (N, H, W, C) -> (N, Ho, Wo, F); w: (F, C, K, K), b: (F,). With ``epilogue``,
    each block's output, (n, Ho, Wo, F), goes to ``epilogue(lo, hi, block)`` while in
    cache instead (a fused max-pool), and the result is None."""
    N, H, W, C = x.shape
    F, _, K, _ = w.shape
    S, P = stride, padding
    Ho, Wo = (H + 2 * P - K) // S + 1, (W + 2 * P - K) // S + 1
    xp = zero_bordered(workspace, "xp", (N, H + 2 * P, W + 2 * P, C), w.dtype)
    out = None if epilogue else np.empty((N * Ho * Wo, F), w.dtype)
    # [W; b]: W as a (kh, kw, c) x F matrix, matching the column order of the im2col
    # rows, then b against their column of ones.
    w_mat = np.concatenate([w.transpose(2, 3, 1, 0).reshape(K * K * C, F), b[None, :]])
    rows = Ho * Wo

    def block(lo, hi):
        put(xp[lo:hi, P:P + H, P:P + W, :], x[lo:hi])
        cols = with_ones((hi - lo) * rows, K * K * C, w.dtype)
        im2col(xp[lo:hi], cols, K, S, Ho, Wo)
        if epilogue:
            epilogue(lo, hi, (cols @ w_mat).reshape(hi - lo, Ho, Wo, F))
        else:
            np.matmul(cols, w_mat, out=out[lo * rows:hi * rows])

    over_blocks(block, N, images_per_block(rows * K * K * C, w.dtype))
    return None if epilogue else out.reshape(N, Ho, Wo, F)


def backward(dout, x_shape, w, stride: int, padding: int, workspace: dict, input_grad: bool = True,
             prologue=None):
    """dout: (N, Ho, Wo, F) -> (dx: (N, H, W, C) or None without ``input_grad``,
    dw: (F, C, K, K), db: (F,)), reading the padded input the forward left in the
    workspace. Block by block: the im2col rows again (cheaper than keeping them:
    they stay in cache), their share of dW and db, and the block's input gradient.
    With ``prologue``, dout is None and ``prologue(lo, hi)`` makes each block of it,
    (n, Ho, Wo, F) channels-last (a fused max-pool's backward); stride 1, or no
    input gradient."""
    N, H, W, C = x_shape
    K = w.shape[2]
    S, P = stride, padding
    Ho, Wo = (H + 2 * P - K) // S + 1, (W + 2 * P - K) // S + 1
    F = w.shape[0]
    dtype = w.dtype
    xp = workspace["xp"]
    dflat = None if prologue else dout.reshape(N * Ho * Wo, F)  # a view when dout is NHWC memory
    rows = Ho * Wo
    by_convolution = input_grad and S == 1 and P <= K - 1
    if prologue and input_grad and not by_convolution:
        raise ValueError("a fused backward takes stride 1 and padding < kernel size, or no input gradient")
    if by_convolution:
        Q = K - 1 - P
        dx = np.empty((N, H, W, C), dtype)
        dp = zero_bordered(workspace, "dp", (N, Ho + 2 * Q, Wo + 2 * Q, F), dtype)
        w_flipped = w[:, :, ::-1, ::-1].transpose(2, 3, 0, 1).reshape(K * K * F, C)

    def block(lo, hi):
        d = prologue(lo, hi).reshape(-1, F) if prologue else dflat[lo * rows:hi * rows]
        cols = with_ones((hi - lo) * rows, K * K * C, dtype)
        im2col(xp[lo:hi], cols, K, S, Ho, Wo)
        if by_convolution:
            _input_grad_by_convolution(d.reshape(hi - lo, Ho, Wo, F), dp[lo:hi], w_flipped, dx[lo:hi], K, P)
        return weight_grad(cols, d)     # [dW; db]

    per_image = rows * K * K * max(C, F if by_convolution else 0)
    parts = over_blocks(block, N, images_per_block(per_image, dtype))
    dw_db = sum_in_order(parts)
    dw, db = dw_db[:-1], dw_db[-1]
    dw = np.ascontiguousarray(dw.reshape(K, K, C, F).transpose(3, 2, 0, 1))
    if not input_grad:
        return None, dw, db
    if by_convolution:
        return dx, dw, db
    return _input_grad_by_col2im(dflat, w, N, H, W, Ho, Wo, S, P), dw, db


def _input_grad_by_col2im(dflat, w, N, H, W, Ho, Wo, S, P):
    """dx for any stride: dcols = dout @ W^T, then col2im. Each kernel offset (kh, kw)
    adds one strided slab; K*K vectorised adds, no np.add.at."""
    F, C, K, _ = w.shape
    w_mat = w.transpose(2, 3, 1, 0).reshape(K * K * C, F)
    dcols = dflat @ w_mat.T
    dxp = np.zeros((N, H + 2 * P, W + 2 * P, C), dflat.dtype)
    dc = dcols.reshape(N, Ho, Wo, K, K, C)
    for kh in range(K):
        for kw in range(K):
            dxp[:, kh:kh + S * (Ho - 1) + 1:S, kw:kw + S * (Wo - 1) + 1:S, :] += dc[:, :, :, kh, kw, :]
    return dxp[:, P:P + H, P:P + W, :]


def _input_grad_by_convolution(dout, dp, w_flipped, dx, K, P):
    """dx: (n, H, W, C) for stride 1, written in place: the upstream gradient
    dout: (n, Ho, Wo, F), zero-padded by K-1-P into ``dp`` (its borders zero),
    correlated with the kernel flipped in space and transposed in channels
    (``w_flipped``: (K*K*F, C)) -- one im2col and one matrix product, like the
    forward. (A col2im instead scatters K*K strided slabs of a 6-D array into
    dx, which is memory-bound and several times slower.)"""
    n, Ho, Wo, F = dout.shape
    _, H, W, C = dx.shape
    Q = K - 1 - P
    dp[:, Q:Q + Ho, Q:Q + Wo, :] = dout
    cols = np.empty((n * H * W, K * K * F), dout.dtype)
    im2col(dp, cols, K, 1, H, W)
    np.matmul(cols, w_flipped, out=dx.reshape(n * H * W, C))
