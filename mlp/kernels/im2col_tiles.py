"""Convolution as im2col over m x m tiles of outputs (stride 1): one row per tile.

A conv with few channels makes a narrow product in im2col (``im2col.py``): F
columns (16-32) against K*K*C numbers a row, which BLAS runs well below its
peak, and an im2col copy K*K times the size of the input. Here a row holds the
A x A x C inputs (A = K + m - 1) that an m x m tile of outputs reads, and the
product's m*m*F columns are the tile's outputs:
``cols @ W_m``, W_m the kernel placed at each of the tile's m*m offsets in an
(A*A*C, m*m*F) matrix, zeros elsewhere. That is (A/K)^2 times the
multiplications (m = 2: 1.44x for 5x5, 1.78x for 3x3), in a product m*m times
wider, from a copy m*m (K/A)^2 times smaller. Which one is faster depends on the
layer; ``conv.choose`` measures (``bench/profile_conv.py --algorithms`` shows both).

Arrays are channels-last, as in im2col.py, whose ``im2col`` gathers the tiles'
fields (an A x A kernel at stride m) and whose padded-input workspace this
shares the idea of. The input gradient is a convolution of the padded upstream
gradient with the kernel flipped in space and transposed in channels: the same
tiled product.
"""
from __future__ import annotations

import numpy as np

from mlp.kernels.im2col import im2col, put, weight_grad, with_ones, zero_bordered
from mlp.parallel import block_size, over_blocks, sum_in_order

TILE = 2
# Bytes of im2col rows per block: half of im2col's (parallel.BLOCK_BYTES). A block's tiled
# product is wider than its rows' share of the copy (m*m*F columns), so more of its
# working set is output, and two shards' blocks share the last-level cache. Measured
# here, whole sharded training steps at 1.5 against 3 MiB, in turns (bench/bench_blocks.py
# with NNX_CONV_ALGORITHM=im2col2): convnetjs 1.07-1.08x, cs231n-3layer 1.11-1.13x faster;
# 1, 1.5 and 2 MiB within 3 % of each other.
BLOCK_BYTES = 3 << 19


def tiles(n: int, m: int) -> int:
    return -(-n // m)


def tiled_weights(w, m: int) -> np.ndarray:
    """w: (F, C, K, K) -> W_m: (A*A*C, m*m*F), rows in the (row, column, channel) order
    of an A x A field, columns in the (row, column, filter) order of the tile's outputs."""
    F, C, K, _ = w.shape
    A = K + m - 1
    big = np.zeros((A, A, C, m, m, F), w.dtype)
    kernel = w.transpose(2, 3, 1, 0)                 # (K, K, C, F)
    for py in range(m):
        for px in range(m):
            big[py:py + K, px:px + K, :, py, px, :] = kernel
    return big.reshape(A * A * C, m * m * F)


def fold_weights(big, m: int, K: int) -> np.ndarray:
    """The adjoint of ``tiled_weights``: the gradient of W_m: (A*A*C, m*m*F) -> that of w:
    (F, C, K, K), each offset's share added in a fixed order."""
    A = K + m - 1
    C, F = big.shape[0] // (A * A), big.shape[1] // (m * m)
    big = big.reshape(A, A, C, m, m, F)
    dw = np.zeros((K, K, C, F), big.dtype)
    for py in range(m):
        for px in range(m):
            dw += big[py:py + K, px:px + K, :, py, px, :]
    return np.ascontiguousarray(dw.transpose(3, 2, 0, 1))


def _product(xp, w_big, A, m, Th, Tw):
    """The tiled product of one block: xp: (n, m*Th + A - m, m*Tw + A - m, C') ->
    (n, Th, Tw, m, m, F'); w_big: (A*A*C' [+ 1 for a bias row], m*m*F')."""
    n, _, _, C = xp.shape
    rows, fields = n * Th * Tw, A * A * C
    cols = with_ones(rows, fields, xp.dtype) if len(w_big) > fields else np.empty((rows, fields), xp.dtype)
    im2col(xp, cols, A, m, Th, Tw)
    return (cols @ w_big).reshape(n, Th, Tw, m, m, w_big.shape[1] // (m * m))


def _untile(y, dest):
    """y: (n, Th, Tw, m, m, F), the tiles' outputs -> dest: (n, Ho, Wo, F), cropping
    the last tiles where they reach past it."""
    n, Th, Tw, m, _, F = y.shape
    Ho, Wo = dest.shape[1:3]
    rows = y.transpose(0, 1, 3, 2, 4, 5)              # (n, Th, m, Tw, m, F): NHWC order
    if Ho == m * Th and Wo == m * Tw and dest.flags.c_contiguous:
        np.copyto(dest.reshape(n, Th, m, Tw, m, F), rows)
    else:
        dest[...] = rows.reshape(n, m * Th, m * Tw, F)[:, :Ho, :Wo]


def _tile(d, m, Th, Tw):
    """d: (n, Ho, Wo, F) -> (n*Th*Tw, m*m*F), the rows of the tiles' outputs, zeros past
    Ho, Wo (the adjoint of ``_untile``)."""
    n, Ho, Wo, F = d.shape
    out = np.empty((n, Th, Tw, m, m, F), d.dtype)
    if Ho == m * Th and Wo == m * Tw:
        np.copyto(out.transpose(0, 1, 3, 2, 4, 5), d.reshape(n, Th, m, Tw, m, F))
    else:
        padded = np.zeros((n, m * Th, m * Tw, F), d.dtype)
        padded[:, :Ho, :Wo] = d
        np.copyto(out.transpose(0, 1, 3, 2, 4, 5), padded.reshape(n, Th, m, Tw, m, F))
    return out.reshape(n * Th * Tw, m * m * F)


def images_per_block(H, W, C, F, K, padding, dtype, m: int = TILE, input_grad: bool = True) -> int:
    """Images per block: about ``BLOCK_BYTES`` of im2col rows (the forward's, or the
    input gradient's if larger)."""
    A = K + m - 1
    Ho, Wo = H + 2 * padding - K + 1, W + 2 * padding - K + 1
    numbers = tiles(Ho, m) * tiles(Wo, m) * A * A * C
    if input_grad:
        numbers = max(numbers, tiles(H, m) * tiles(W, m) * A * A * F)
    return block_size(numbers * np.dtype(dtype).itemsize, BLOCK_BYTES)


def forward(x, w, b, padding: int, workspace: dict, m: int = TILE, epilogue=None) -> np.ndarray | None:
    """x: (N, H, W, C) -> (N, Ho, Wo, F), stride 1; w: (F, C, K, K), b: (F,). With
    ``epilogue``, each block's output goes to ``epilogue(lo, hi, block)`` instead and the
    result is None (as im2col.forward). ``workspace`` keeps the zero-bordered padded
    input, which the backward reads."""
    N, H, W, C = x.shape
    F, _, K, _ = w.shape
    P, A = padding, K + m - 1
    Ho, Wo = H + 2 * P - K + 1, W + 2 * P - K + 1
    Th, Tw = tiles(Ho, m), tiles(Wo, m)
    xp = zero_bordered(workspace, "tiles_xp", (N, m * Th + K - 1, m * Tw + K - 1, C), w.dtype)
    w_big = np.concatenate([tiled_weights(w, m), np.tile(b, m * m)[None, :]])
    out = None if epilogue else np.empty((N, Ho, Wo, F), w.dtype)

    tiles_epilogue = getattr(epilogue, "tiles", None) if m == 2 else None

    def block(lo, hi):
        put(xp[lo:hi, P:P + H, P:P + W, :], x[lo:hi])
        y = _product(xp[lo:hi], w_big, A, m, Th, Tw)
        if tiles_epilogue:                  # a 2x2 max-pool takes the tiles as they are
            tiles_epilogue(lo, hi, y)
            return
        dest = np.empty((hi - lo, Ho, Wo, F), w.dtype) if epilogue else out[lo:hi]
        _untile(y, dest)
        if epilogue:
            epilogue(lo, hi, dest)

    over_blocks(block, N, images_per_block(H, W, C, F, K, P, w.dtype, m, input_grad=False))
    return out


def backward(dout, x_shape, w, padding: int, workspace: dict, m: int = TILE, input_grad: bool = True,
             prologue=None):
    """dout: (N, Ho, Wo, F) -> (dx: (N, H, W, C) or None without ``input_grad``, dw: (F, C,
    K, K), db: (F,)), reading the padded input the forward left in the workspace. With
    ``prologue``, dout is None and ``prologue(lo, hi)`` makes each block of it."""
    N, H, W, C = x_shape
    F, _, K, _ = w.shape
    P, A = padding, K + m - 1
    Ho, Wo = H + 2 * P - K + 1, W + 2 * P - K + 1
    Th, Tw = tiles(Ho, m), tiles(Wo, m)
    xp = workspace["tiles_xp"]
    if input_grad:
        Q = K - 1 - P            # the upstream gradient's padding for the input gradient
        if Q < 0:
            raise ValueError("the tiled input gradient takes padding < kernel size")
        Hx, Wx = tiles(H, m), tiles(W, m)
        dx = np.empty((N, H, W, C), w.dtype)
        dp = zero_bordered(workspace, "tiles_dp", (N, m * Hx + K - 1, m * Wx + K - 1, F), w.dtype)
        flipped = tiled_weights(w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3), m)

    tiles_prologue = getattr(prologue, "tiles", None) if m == 2 else None

    def block(lo, hi):
        cols = with_ones((hi - lo) * Th * Tw, A * A * C, w.dtype)
        im2col(xp[lo:hi], cols, A, m, Th, Tw)
        if tiles_prologue and not input_grad:       # a 2x2 max-pool's gradient, made as tiles
            return weight_grad(cols, tiles_prologue(lo, hi).reshape(-1, m * m * F))
        d = prologue(lo, hi) if prologue else dout[lo:hi]
        grads = weight_grad(cols, _tile(d, m, Th, Tw))   # [dW_m; db per offset]
        if input_grad:
            dp[lo:hi, Q:Q + Ho, Q:Q + Wo, :] = d
            y = _product(dp[lo:hi], flipped, A, m, Hx, Wx)
            _untile(y, dx[lo:hi])
        return grads

    parts = over_blocks(block, N, images_per_block(H, W, C, F, K, P, w.dtype, m, input_grad))
    grads = sum_in_order(parts)
    dw = fold_weights(grads[:-1], m, K)
    db = sum_in_order(list(grads[-1].reshape(m * m, F)))
    return (dx if input_grad else None), dw, db
