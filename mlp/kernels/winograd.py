"""Winograd convolution F(m x m, r x r) (Lavin and Gray, 2015): F(2x2, 3x3),
F(4x4, 3x3), F(2x2, 5x5) and F(4x4, 5x5).

An r x r stride-1 convolution computes each m x m tile of output from an
a x a tile of the padded input (a = m + r - 1, neighbouring tiles overlapping
by r - 1). Winograd's minimal filtering does it with a*a multiplications per
(input channel, filter) pair instead of r*r*m*m:

    Y = A^T [ (G g G^T) . (B^T d B) ] A          (. elementwise)

d an a x a input tile, g an r x r filter, Y the m x m output tile. Summed over
input channels, the elementwise product is, for each of the a*a positions xi
of a tile, one matrix product over channels:

    M[xi] = V[xi] @ U[xi]    V: (tiles, C) transformed input, U: (C, F) filters

so a layer is an input transform, a*a GEMMs and an output transform.
F(2x2, 3x3) needs 16 multiplications per 4 outputs (2.25x fewer than
direct), F(4x4, 3x3) 36 per 16 (4x fewer), F(2x2, 5x5) 36 per 4 (2.8x
fewer), F(4x4, 5x5) 64 per 16 (6.25x fewer), paid for by the transforms
(memory-bound) and by float32 rounding that grows with a (the a = 6 matrices
hold 1/24 and 8, or 16; the a = 8 ones 1/90, 21/4 and 8). The transforms'
work per output falls with m too: an a x a input tile serves m*m outputs (9
numbers per output for F(2x2, 5x5), 4 for F(4x4, 5x5)), which is where a 5x5
layer of 16-20 channels spends its time.

The gradients are the exact gradients of this forward (so a float64
gradient check passes through it):
    filters: dU[xi] = V[xi]^T @ dM[xi],  dM = A dY A^T,  dg = G^T dU G
    input:   dV[xi] = dM[xi] @ U[xi]^T,  dd = B dV B^T, overlapping tiles added

Layout. A block of n images (n, H, W, C), channels-last as everywhere in
mlp.conv, is copied into a zero-padded buffer and gathered into its tiles
D: (a, a, n, Th, Tw, C), D[i, j] holding entry (i, j) of every tile: one copy
from a strided view. Each transform is then two matrix products with the small
matrix along an axis of contiguous slabs (B^T D = B^T @ D.reshape(a, -1), and
per row the same along the columns), so BLAS streams the data twice; NumPy's
elementwise adds over the same slabs took two to three times as long
(measured here). GEMM rows are the tiles in (n, th, tw) order, the order of
x's memory. Few, large NumPy calls per block matter on two threads: the Python
between calls holds the GIL (with ~50 small copies per block, narrow layers
ran hardly faster on two threads than on one).

Work goes through the batch in blocks of images (their transforms stay in
cache between the passes), shared out among threads by mlp.parallel; block
boundaries depend only on the shapes, so no number depends on the thread
count.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import as_strided

from mlp.kernels.im2col import put, zero_bordered
from mlp.parallel import block_bounds, block_size, over_blocks, sum_in_order

# Transform matrices (B^T: a x a, G: a x r, A^T: m x a). The a = 6 transforms use the
# points 0, 1, -1, 2, -2 and infinity (so F(4x4, 3x3) and F(2x2, 5x5) share B^T); G's rows
# are the points' powers over the Lagrange denominators 4, -6, -6, 24, 24.
_BT6 = np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                 [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], float)
_F2 = (np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], float),
       np.array([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]]),
       np.array([[1, 1, 1, 0], [0, 1, -1, -1]], float))
_F4 = (_BT6,
       np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                 [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]]),
       np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0],
                 [0, 1, -1, 8, -8, 1]], float))
_F2_5 = (_BT6,
         np.array([[1 / 4, 0, 0, 0, 0], [-1 / 6, -1 / 6, -1 / 6, -1 / 6, -1 / 6],
                   [-1 / 6, 1 / 6, -1 / 6, 1 / 6, -1 / 6], [1 / 24, 1 / 12, 1 / 6, 1 / 3, 2 / 3],
                   [1 / 24, -1 / 12, 1 / 6, -1 / 3, 2 / 3], [0, 0, 0, 0, 1]]),
         np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 1]], float))
# The a = 8 transform of F(4x4, 5x5): the points 0, 1, -1, 2, -2, 1/2, -1/2 and infinity (the
# usual ones for a = 8, which keep the entries within 1/90 and 8), B^T's rows the coefficients
# of the products of (x - p) over the other points, G's rows the powers of each point over
# its Lagrange denominator, the first row of both negated (the point 0's denominator is -1;
# the product is the same) (made exactly with fractions; tests/test_kernels.py checks the
# identity A^T [(G g) . (B^T d)] = g correlated with d to float64's rounding).
_BT8 = np.array([[1, 0, -21 / 4, 0, 21 / 4, 0, -1, 0],
                 [0, 1, 1, -17 / 4, -17 / 4, 1, 1, 0],
                 [0, -1, 1, 17 / 4, -17 / 4, -1, 1, 0],
                 [0, 1 / 2, 1 / 4, -5 / 2, -5 / 4, 2, 1, 0],
                 [0, -1 / 2, 1 / 4, 5 / 2, -5 / 4, -2, 1, 0],
                 [0, 2, 4, -5 / 2, -5, 1 / 2, 1, 0],
                 [0, -2, 4, 5 / 2, -5, -1 / 2, 1, 0],
                 [0, -1, 0, 21 / 4, 0, -21 / 4, 0, 1]])
_F4_5 = (_BT8,
         np.array([[1, 0, 0, 0, 0], [-2 / 9, -2 / 9, -2 / 9, -2 / 9, -2 / 9],
                   [-2 / 9, 2 / 9, -2 / 9, 2 / 9, -2 / 9],
                   [1 / 90, 1 / 45, 2 / 45, 4 / 45, 8 / 45], [1 / 90, -1 / 45, 2 / 45, -4 / 45, 8 / 45],
                   [32 / 45, 16 / 45, 8 / 45, 4 / 45, 2 / 45], [32 / 45, -16 / 45, 8 / 45, -4 / 45, 2 / 45],
                   [0, 0, 0, 0, 1]]),
         np.array([[1, 1, 1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 1 / 2, -1 / 2, 0],
                   [0, 1, 1, 4, 4, 1 / 4, 1 / 4, 0], [0, 1, -1, 8, -8, 1 / 8, -1 / 8, 1]]))
MATRICES = {(2, 3): _F2, (4, 3): _F4, (2, 5): _F2_5, (4, 5): _F4_5}   # (m, r): (B^T, G, A^T)

# Bytes of transformed input and output (V and M) per block of images. Smaller
# blocks keep the transforms in cache, larger ones make taller GEMMs; measured
# on conv6bn's and airbench's layers (see bench/profile_conv.py). F(4x4, 5x5) on
# convnetjs and wide5x5: 1, 2 and 4 MiB within the order effect of whole sharded steps
# (bench/bench_blocks.py --kernel winograd, both orders; 0.96-1.05x).
BLOCK_BYTES = 2 << 20
MIN_ROWS = 128     # GEMM rows per block at least (tiles x images), cache or not


def tile_sizes(kernel_size: int) -> tuple[int, ...]:
    """The output tile sizes m with a Winograd form for r x r kernels here."""
    return tuple(m for m, r in MATRICES if r == kernel_size)


def supports(kernel_size: int, stride: int, padding: int, m: int | None = None) -> bool:
    """Whether a conv can run as Winograd here (with tile m, if given): a 3x3 or 5x5
    kernel, stride 1, padding 0 to r - 1."""
    sizes = tile_sizes(kernel_size)
    return (bool(sizes) and stride == 1 and 0 <= padding <= kernel_size - 1
            and (m is None or m in sizes))


def tiles(size: int, m: int) -> int:
    """Tiles of m outputs covering ``size`` outputs along one axis."""
    return -(-size // m)


def _tile_view(padded, m: int, rows: int, cols: int, Th: int, Tw: int, writeable: bool = False):
    """padded: (n, Hp, Wp, C) -> the (rows, cols, n, Th, Tw, C) view whose [i, j, :, th, tw]
    is padded[:, m*th + i, m*tw + j]: entry (i, j) of every tile, tiles m apart. With
    rows or cols above m, two entries of the view are one number of ``padded`` (tiles
    overlap): such a view is only read; the ones written have rows, cols <= m."""
    sN, sH, sW, sC = padded.strides
    return as_strided(padded, (rows, cols, padded.shape[0], Th, Tw, padded.shape[3]),
                      (sH, sW, sN, m * sH, m * sW, sC), writeable=writeable)


def gather_tiles(padded, m: int, r: int, Th: int, Tw: int):
    """padded: (n, m*Th + r - 1, m*Tw + r - 1, C), the input with its zero padding (and
    zeros past it for the last tiles) -> D: (a, a, n, Th, Tw, C), a = m + r - 1,
    D[i, j, :, th, tw] = padded[:, m*th + i, m*tw + j]: one strided copy."""
    a = m + r - 1
    D = np.empty((a, a, padded.shape[0], Th, Tw, padded.shape[3]), padded.dtype)
    np.copyto(D, _tile_view(padded, m, a, a, Th, Tw))
    return D


def scatter_tiles(dD, m: int, dxp):
    """The transpose of gather_tiles: dxp: (n, m*Th + r - 1, m*Tw + r - 1, C) = the sum of
    every tile entry dD[i, j, :, th, tw] at its place, overlapping entries added.
    A tile's rows and columns go in runs of m: run (p, q) of every tile lands on
    the first m x m entries of the tile p rows and q columns further on, so within
    a run no two entries coincide and it is one strided pass. Run (0, 0) tiles
    dxp once and is written; the others are added."""
    a, n, Th, Tw, C = dD.shape[0], *dD.shape[2:]
    dxp[:, m * Th:] = 0
    dxp[:, :m * Th, m * Tw:] = 0
    np.copyto(dxp[:, :m * Th, :m * Tw].reshape(n, Th, m, Tw, m, C), dD[:m, :m].transpose(2, 3, 0, 4, 1, 5))
    for i in range(0, a, m):
        for j in range(0, a, m):
            if i or j:
                rows, cols = min(m, a - i), min(m, a - j)
                _tile_view(dxp[:, i:, j:], m, rows, cols, Th, Tw, writeable=True)[...] += \
                    dD[i:i + rows, j:j + cols]


def _two_sided(left, right_t, D):
    """left @ D @ right_t^T over the two leading axes of D: (p, q, ...) -> (i, j, ...),
    out[i, j] = sum_{p,q} left[i, p] right_t[j, q] D[p, q]: one matrix product along
    the first axis, a batch of them along the second."""
    p, q = D.shape[:2]
    rest = D.shape[2:]
    rows = (left @ D.reshape(p, -1)).reshape(len(left), q, -1)     # (i, q, rest)
    return np.matmul(right_t, rows).reshape(len(left), len(right_t), *rest)


def input_transform(D, m: int, r: int):
    """V = B^T d B for every tile. D: (a, a, ...) -> V: (a, a, ...)."""
    BT = MATRICES[m, r][0].astype(D.dtype)
    return _two_sided(BT, BT, D)


def input_transform_adjoint(dV, m: int, r: int):
    """dd = B dV B^T for every tile (the transpose of input_transform)."""
    B = MATRICES[m, r][0].T.astype(dV.dtype)
    return _two_sided(B, B, dV)


def output_transform(M, m: int, r: int):
    """Y = A^T M A for every tile. M: (a, a, ...) -> Y: (m, m, ...)."""
    AT = MATRICES[m, r][2].astype(M.dtype)
    return _two_sided(AT, AT, M)


def output_transform_adjoint(dY, m: int, r: int):
    """dM = A dY A^T for every tile (the transpose of output_transform): (m, m, ...) -> (a, a, ...)."""
    A = MATRICES[m, r][2].T.astype(dY.dtype)
    return _two_sided(A, A, dY)


def filter_transform(w: np.ndarray, m: int) -> np.ndarray:
    """U = G g G^T per (filter, channel). w: (F, C, r, r) -> U: (a*a, C, F).
    Two products with G along the kernel's rows, then its columns, over all
    (channel, filter) pairs at once; pass w.transpose(1, 0, 2, 3) for U^T: (a*a, F, C)."""
    F, C, r, _ = w.shape
    G = MATRICES[m, r][1].astype(w.dtype)
    a = len(G)
    g = np.ascontiguousarray(w.transpose(2, 3, 1, 0)).reshape(r, r * C * F)   # (kh, kw, c, f)
    rows = (G @ g).reshape(a, r, C * F)                                        # (i, kw, c f)
    return np.matmul(G, rows).reshape(a * a, C, F)                             # (i, j, c, f)


def filter_transform_adjoint(dU: np.ndarray, m: int, r: int) -> np.ndarray:
    """The transpose of filter_transform: dg = G^T dU G. dU: (a*a, C, F) -> (F, C, r, r)."""
    G = MATRICES[m, r][1].astype(dU.dtype)
    a = len(G)
    C, F = dU.shape[1:]
    cols = np.matmul(G.T, dU.reshape(a, a, C * F))                 # (i, kw, c f)
    dg = (G.T @ cols.reshape(a, r * C * F)).reshape(r, r, C, F)    # (kh, kw, c, f)
    return np.ascontiguousarray(dg.transpose(3, 2, 0, 1))


# ---- the layer's forward and backward -----------------------------------------------

def images_per_block(N, a, Th, Tw, C, F, itemsize):
    """About BLOCK_BYTES of V and M, at least MIN_ROWS tiles, at most a quarter of the
    batch (so that the blocks keep both threads busy); a function of the shapes only."""
    per_image = a ** 2 * Th * Tw * (C + F) * itemsize
    images = max(block_size(per_image, BLOCK_BYTES), -(-MIN_ROWS // (Th * Tw)))
    return min(images, -(-N // 4))


def forward(x, w, b, padding: int, m: int, keep: bool = False, workspace: dict | None = None,
            epilogue=None):
    """x: (N, H, W, C) channels-last -> (out: (N, Ho, Wo, F), Ho = H + 2*padding - r + 1,
    the transformed input V of every block when ``keep``, else None). With ``epilogue``,
    each block's output goes to ``epilogue(lo, hi, block)`` while in cache instead (a
    fused max-pool), and out is None.
    w: (F, C, r, r), b: (F,). The backward needs V again: kept, it is read back
    instead of gathered and transformed a second time (measured here: 5-10 % of a
    training step; it costs (a/m)^2 times the layer's input in memory).
    ``workspace`` keeps the zero-padded input between calls (see im2col.zero_bordered)."""
    N, H, W, C = x.shape
    F, _, r, _ = w.shape
    Ho, Wo = H + 2 * padding - r + 1, W + 2 * padding - r + 1
    Th, Tw = tiles(Ho, m), tiles(Wo, m)
    a = m + r - 1
    U = filter_transform(w, m)
    b_tiles = np.tile(b, Th * Tw)
    out = None if epilogue else np.empty((N, Ho, Wo, F), x.dtype)
    # The input padded by ``padding`` and, for the last tiles, with zeros to m*T + r - 1.
    xp = zero_bordered({} if workspace is None else workspace, "winograd_xp",
                       (N, m * Th + r - 1, m * Tw + r - 1, C), x.dtype)

    def block(lo, hi):
        n = hi - lo
        put(xp[lo:hi, padding:padding + H, padding:padding + W], x[lo:hi])
        V = input_transform(gather_tiles(xp[lo:hi], m, r, Th, Tw), m, r).reshape(a * a, -1, C)
        M = np.matmul(V, U)
        Y = output_transform(M.reshape(a, a, -1), m, r).reshape(m, m, n, Th, Tw, F)
        # b repeated for every tile, added to whole rows: NumPy loops long (added to each
        # (F,) row, it would loop F numbers at a time)
        Y.reshape(-1, Th * Tw * F)[...] += b_tiles
        tiled = Y.transpose(2, 3, 0, 4, 1, 5)          # (n, Th, m, Tw, m, F): NHWC order
        dest = np.empty((n, Ho, Wo, F), x.dtype) if epilogue else out[lo:hi]
        if Ho == m * Th and Wo == m * Tw:
            np.copyto(dest.reshape(n, Th, m, Tw, m, F), tiled)
        else:   # the last tiles reach past the output: crop
            dest[...] = tiled.reshape(n, m * Th, m * Tw, F)[:, :Ho, :Wo]
        if epilogue:
            epilogue(lo, hi, dest)
        return V if keep else None

    kept = over_blocks(block, N, images_per_block(N, a, Th, Tw, C, F, x.itemsize))
    return out, (kept if keep else None)


def backward(dout, x, w, padding: int, m: int, input_grad: bool = True, kept=None, prologue=None):
    """dout: (N, Ho, Wo, F), x: (N, H, W, C) the forward's input, both channels-last,
    ``kept`` the forward's transformed input if it kept it (emptied here) ->
    (dx: (N, H, W, C) or None without ``input_grad``, dw: (F, C, r, r), db: (F,)).
    With ``prologue``, dout is None and ``prologue(lo, hi)`` makes each block of it,
    (n, Ho, Wo, F) channels-last (a fused max-pool's backward)."""
    N, H, W, C = x.shape
    F, _, r, _ = w.shape
    Ho, Wo = H + 2 * padding - r + 1, W + 2 * padding - r + 1
    Th, Tw = tiles(Ho, m), tiles(Wo, m)
    a = m + r - 1
    U_T = filter_transform(w.transpose(1, 0, 2, 3), m) if input_grad else None
    dx = np.empty((N, H, W, C), x.dtype) if input_grad else None
    images = images_per_block(N, a, Th, Tw, C, F, x.itemsize)
    index = {lo: i for i, (lo, _) in enumerate(block_bounds(N, images))}   # of kept's blocks

    def block(lo, hi):
        n = hi - lo
        if kept:
            V = kept[index[lo]]
        else:
            xp = np.zeros((n, m * Th + r - 1, m * Tw + r - 1, C), x.dtype)
            put(xp[:, padding:padding + H, padding:padding + W], x[lo:hi])
            V = input_transform(gather_tiles(xp, m, r, Th, Tw), m, r).reshape(a * a, -1, C)
        d = prologue(lo, hi) if prologue else dout[lo:hi]
        dY = _output_tiles(d, m, Th, Tw)
        dM = output_transform_adjoint(dY, m, r).reshape(a * a, -1, F)
        dU = np.matmul(V.transpose(0, 2, 1), dM)
        db = np.ones(n * Ho * Wo, x.dtype) @ d.reshape(-1, F)
        if input_grad:
            dV = np.matmul(dM, U_T).reshape(a, a, -1)
            dxp = np.empty((n, m * Th + r - 1, m * Tw + r - 1, C), x.dtype)
            scatter_tiles(input_transform_adjoint(dV, m, r).reshape(a, a, n, Th, Tw, C), m, dxp)
            dx[lo:hi] = dxp[:, padding:padding + H, padding:padding + W]
        return dU, db

    parts = over_blocks(block, N, images)
    if kept:
        kept.clear()   # used: its memory goes back before the next forward makes more
    dU, db = sum_in_order([p[0] for p in parts]), sum_in_order([p[1] for p in parts])
    return dx, filter_transform_adjoint(dU, m, r), db


def _output_tiles(dout, m, Th, Tw):
    """dout: (n, Ho, Wo, F) -> its m x m tiles dY: (m, m, n, Th, Tw, F), zeros past Ho, Wo."""
    n, Ho, Wo, F = dout.shape
    if Ho != m * Th or Wo != m * Tw:
        padded = np.zeros((n, m * Th, m * Tw, F), dout.dtype)
        padded[:, :Ho, :Wo] = dout
        dout = padded
    dY = np.empty((m, m, n, Th, Tw, F), dout.dtype)
    np.copyto(dY, dout.reshape(n, Th, m, Tw, m, F).transpose(2, 4, 0, 1, 3, 5))
    return dY
