"""Winograd convolution F(m x m, 3 x 3) (Lavin and Gray, 2015), m = 2 or 4.

A 3x3 stride-1 convolution computes each m x m tile of output from an
a x a tile of the padded input (a = m + 2, neighbouring tiles overlapping by
two). Winograd's minimal filtering does it with a*a multiplications per
(input channel, filter) pair instead of 9*m*m:

    Y = A^T [ (G g G^T) . (B^T d B) ] A          (. elementwise)

d an a x a input tile, g a 3x3 filter, Y the m x m output tile. Summed over
input channels, the elementwise product is, for each of the a*a positions xi
of a tile, one matrix product over channels:

    M[xi] = V[xi] @ U[xi]    V: (tiles, C) transformed input, U: (C, F) filters

so a layer is an input transform, a*a GEMMs and an output transform.
F(2x2, 3x3) needs 16 multiplications per 4 outputs (2.25x fewer than
direct), F(4x4, 3x3) 36 per 16 (4x fewer), paid for by the transforms
(memory-bound) and by float32 rounding that grows with the tile (the F(4x4)
matrices hold 1/24 and 8).

The gradients are the exact gradients of this forward (so a float64
gradient check passes through it):
    filters: dU[xi] = V[xi]^T @ dM[xi],  dM = A dY A^T,  dg = G^T dU G
    input:   dV[xi] = dM[xi] @ U[xi]^T,  dd = B dV B^T, overlapping tiles added

Layout. A block of n images (n, H, W, C), channels-last as everywhere in
mlp.conv, is copied into a zero-padded buffer and gathered into its tiles
D: (a, a, n, Th, Tw, C), D[r, s] holding entry (r, s) of every tile: one copy
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

from mlp.kernels.im2col import zero_bordered
from mlp.parallel import block_size, over_blocks, sum_in_order

# Transform matrices (B^T: a x a, G: a x 3, A^T: m x a); F(4x4) uses the points 0, +-1, +-2, inf.
_F2 = (np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], float),
       np.array([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]]),
       np.array([[1, 1, 1, 0], [0, 1, -1, -1]], float))
_F4 = (np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                 [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], float),
       np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                 [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]]),
       np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0],
                 [0, 1, -1, 8, -8, 1]], float))
MATRICES = {2: _F2, 4: _F4}
TILE_SIZES = tuple(MATRICES)

# Bytes of transformed input and output (V and M) per block of images. Smaller
# blocks keep the transforms in cache, larger ones make taller GEMMs; measured
# on conv6bn's and airbench's layers (see bench/profile_conv.py).
BLOCK_BYTES = 2 << 20
MIN_ROWS = 128     # GEMM rows per block at least (tiles x images), cache or not


def supports(kernel_size: int, stride: int, padding: int) -> bool:
    """Whether a conv can run as Winograd here: 3x3, stride 1, padding 0 to 2."""
    return kernel_size == 3 and stride == 1 and 0 <= padding <= 2


def tiles(size: int, m: int) -> int:
    """Tiles of m outputs covering ``size`` outputs along one axis."""
    return -(-size // m)


def _tile_view(padded, m: int, rows: int, cols: int, Th: int, Tw: int, writeable: bool = False):
    """padded: (n, Hp, Wp, C) -> the (rows, cols, n, Th, Tw, C) view whose [r, s, :, th, tw]
    is padded[:, m*th + r, m*tw + s]: entry (r, s) of every tile, tiles m apart. With
    rows or cols above m, two entries of the view are one number of ``padded`` (tiles
    overlap): such a view is only read; the ones written have rows, cols <= m."""
    sN, sH, sW, sC = padded.strides
    return as_strided(padded, (rows, cols, padded.shape[0], Th, Tw, padded.shape[3]),
                      (sH, sW, sN, m * sH, m * sW, sC), writeable=writeable)


def gather_tiles(padded, m: int, Th: int, Tw: int):
    """padded: (n, m*Th + 2, m*Tw + 2, C), the input with its zero padding (and zeros past
    it for the last tiles) -> D: (a, a, n, Th, Tw, C), D[r, s, :, th, tw] =
    padded[:, m*th + r, m*tw + s]: one strided copy."""
    a = m + 2
    D = np.empty((a, a, padded.shape[0], Th, Tw, padded.shape[3]), padded.dtype)
    np.copyto(D, _tile_view(padded, m, a, a, Th, Tw))
    return D


def scatter_tiles(dD, m: int, dxp):
    """The transpose of gather_tiles: dxp: (n, m*Th + 2, m*Tw + 2, C) = the sum of every
    tile entry dD[r, s, :, th, tw] at its place, overlapping entries added. The entries
    r, s < m tile dxp once and are written; the two further rows and columns of each
    tile (a = m + 2) are then added onto the next tiles' first ones, in three strided
    passes whose own entries never coincide."""
    a, n, Th, Tw, C = m + 2, *dD.shape[2:]
    dxp[:, m * Th:] = 0
    dxp[:, :m * Th, m * Tw:] = 0
    np.copyto(dxp[:, :m * Th, :m * Tw].reshape(n, Th, m, Tw, m, C), dD[:m, :m].transpose(2, 3, 0, 4, 1, 5))
    _tile_view(dxp[:, :, m:], m, m, a - m, Th, Tw, writeable=True)[...] += dD[:m, m:]
    _tile_view(dxp[:, m:, :], m, a - m, m, Th, Tw, writeable=True)[...] += dD[m:, :m]
    _tile_view(dxp[:, m:, m:], m, a - m, a - m, Th, Tw, writeable=True)[...] += dD[m:, m:]


def _two_sided(left, right_t, D):
    """left @ D @ right_t^T over the two leading axes of D: (p, q, ...) -> (i, j, ...),
    out[i, j] = sum_{p,q} left[i, p] right_t[j, q] D[p, q]: one matrix product along
    the first axis, a batch of them along the second."""
    p, q = D.shape[:2]
    rest = D.shape[2:]
    rows = (left @ D.reshape(p, -1)).reshape(len(left), q, -1)     # (i, q, rest)
    return np.matmul(right_t, rows).reshape(len(left), len(right_t), *rest)


def input_transform(D, m: int):
    """V = B^T d B for every tile. D: (a, a, ...) -> V: (a, a, ...)."""
    BT = MATRICES[m][0].astype(D.dtype)
    return _two_sided(BT, BT, D)


def input_transform_adjoint(dV, m: int):
    """dd = B dV B^T for every tile (the transpose of input_transform)."""
    B = MATRICES[m][0].T.astype(dV.dtype)
    return _two_sided(B, B, dV)


def output_transform(M, m: int):
    """Y = A^T M A for every tile. M: (a, a, ...) -> Y: (m, m, ...)."""
    AT = MATRICES[m][2].astype(M.dtype)
    return _two_sided(AT, AT, M)


def output_transform_adjoint(dY, m: int):
    """dM = A dY A^T for every tile (the transpose of output_transform): (m, m, ...) -> (a, a, ...)."""
    A = MATRICES[m][2].T.astype(dY.dtype)
    return _two_sided(A, A, dY)


def filter_transform(w: np.ndarray, m: int) -> np.ndarray:
    """U = G g G^T per (filter, channel). w: (F, C, 3, 3) -> U: (a*a, C, F).
    Two products with G along the kernel's rows, then its columns, over all
    (channel, filter) pairs at once; pass w.transpose(1, 0, 2, 3) for U^T: (a*a, F, C)."""
    G, a = MATRICES[m][1].astype(w.dtype), m + 2
    F, C = w.shape[:2]
    g = np.ascontiguousarray(w.transpose(2, 3, 1, 0)).reshape(3, 3 * C * F)   # (kh, kw, c, f)
    rows = (G @ g).reshape(a, 3, C * F)                                        # (i, kw, c f)
    return np.matmul(G, rows).reshape(a * a, C, F)                             # (i, j, c, f)


def filter_transform_adjoint(dU: np.ndarray, m: int) -> np.ndarray:
    """The transpose of filter_transform: dg = G^T dU G. dU: (a*a, C, F) -> (F, C, 3, 3)."""
    G, a = MATRICES[m][1].astype(dU.dtype), m + 2
    C, F = dU.shape[1:]
    cols = np.matmul(G.T, dU.reshape(a, a, C * F))                 # (i, kw, c f)
    dg = (G.T @ cols.reshape(a, 3 * C * F)).reshape(3, 3, C, F)    # (kh, kw, c, f)
    return np.ascontiguousarray(dg.transpose(3, 2, 0, 1))


# ---- the layer's forward and backward -----------------------------------------------

def _images_per_block(N, m, Th, Tw, C, F, itemsize):
    """About BLOCK_BYTES of V and M, at least MIN_ROWS tiles, at most a quarter of the
    batch (so that the blocks keep both threads busy); a function of the shapes only."""
    per_image = (m + 2) ** 2 * Th * Tw * (C + F) * itemsize
    images = max(block_size(per_image, BLOCK_BYTES), -(-MIN_ROWS // (Th * Tw)))
    return min(images, -(-N // 4))


def forward(x, w, b, padding: int, m: int, keep: bool = False, workspace: dict | None = None):
    """x: (N, H, W, C) channels-last -> (out: (N, Ho, Wo, F), Ho = H + 2*padding - 2,
    the transformed input V of every block when ``keep``, else None).
    w: (F, C, 3, 3), b: (F,). The backward needs V again: kept, it is read back
    instead of gathered and transformed a second time (measured here: 5-10 % of a
    training step; it costs 2.25x (F(4x4)) or 4x (F(2x2)) the layer's input in memory).
    ``workspace`` keeps the zero-padded input between calls (see im2col.zero_bordered)."""
    N, H, W, C = x.shape
    F = w.shape[0]
    Ho, Wo = H + 2 * padding - 2, W + 2 * padding - 2
    Th, Tw = tiles(Ho, m), tiles(Wo, m)
    a = m + 2
    U = filter_transform(w, m)
    b_tiles = np.tile(b, Th * Tw)
    out = np.empty((N, Ho, Wo, F), x.dtype)
    # The input padded by ``padding`` and, for the last tiles, with zeros to m*T + 2.
    xp = zero_bordered({} if workspace is None else workspace, "winograd_xp",
                       (N, m * Th + 2, m * Tw + 2, C), x.dtype)

    def block(lo, hi):
        n = hi - lo
        xp[lo:hi, padding:padding + H, padding:padding + W] = x[lo:hi]
        V = input_transform(gather_tiles(xp[lo:hi], m, Th, Tw), m).reshape(a * a, -1, C)
        M = np.matmul(V, U)
        Y = output_transform(M.reshape(a, a, -1), m).reshape(m, m, n, Th, Tw, F)
        Y.reshape(-1, Th * Tw * F)[...] += b_tiles   # long rows: see im2col.forward
        tiled = Y.transpose(2, 3, 0, 4, 1, 5)          # (n, Th, m, Tw, m, F): NHWC order
        if Ho == m * Th and Wo == m * Tw:
            np.copyto(out[lo:hi].reshape(n, Th, m, Tw, m, F), tiled)
        else:   # the last tiles reach past the output: crop
            out[lo:hi] = tiled.reshape(n, m * Th, m * Tw, F)[:, :Ho, :Wo]
        return V if keep else None

    kept = over_blocks(block, N, _images_per_block(N, m, Th, Tw, C, F, x.itemsize))
    return out, (kept if keep else None)


def backward(dout, x, w, padding: int, m: int, input_grad: bool = True, kept=None):
    """dout: (N, Ho, Wo, F), x: (N, H, W, C) the forward's input, both channels-last,
    ``kept`` the forward's transformed input if it kept it (emptied here) ->
    (dx: (N, H, W, C) or None without ``input_grad``, dw: (F, C, 3, 3), db: (F,))."""
    N, H, W, C = x.shape
    _, Ho, Wo, F = dout.shape
    Th, Tw = tiles(Ho, m), tiles(Wo, m)
    a = m + 2
    U_T = filter_transform(w.transpose(1, 0, 2, 3), m) if input_grad else None
    dx = np.empty((N, H, W, C), x.dtype) if input_grad else None
    images = _images_per_block(N, m, Th, Tw, C, F, x.itemsize)

    def block(lo, hi):
        n = hi - lo
        if kept:
            V = kept[lo // images]
        else:
            xp = np.zeros((n, m * Th + 2, m * Tw + 2, C), x.dtype)
            xp[:, padding:padding + H, padding:padding + W] = x[lo:hi]
            V = input_transform(gather_tiles(xp, m, Th, Tw), m).reshape(a * a, -1, C)
        dM = output_transform_adjoint(_output_tiles(dout[lo:hi], m, Th, Tw), m).reshape(a * a, -1, F)
        dU = np.matmul(V.transpose(0, 2, 1), dM)
        db = np.ones(n * Ho * Wo, dout.dtype) @ dout[lo:hi].reshape(-1, F)
        if input_grad:
            dV = np.matmul(dM, U_T).reshape(a, a, -1)
            dxp = np.empty((n, m * Th + 2, m * Tw + 2, C), x.dtype)
            scatter_tiles(input_transform_adjoint(dV, m).reshape(a, a, n, Th, Tw, C), m, dxp)
            dx[lo:hi] = dxp[:, padding:padding + H, padding:padding + W]
        return dU, db

    parts = over_blocks(block, N, images)
    if kept:
        kept.clear()   # used: its memory goes back before the next forward makes more
    dU, db = sum_in_order([p[0] for p in parts]), sum_in_order([p[1] for p in parts])
    return dx, filter_transform_adjoint(dU, m), db


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
