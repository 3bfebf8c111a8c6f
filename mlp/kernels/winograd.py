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
mlp.conv, is gathered into its tiles D: (a, a, n, Th, Tw, C), D[r, s] holding
entry (r, s) of every tile: a*a strided copies. Each transform is then two
matrix products with the small matrix along an axis of contiguous slabs
(B^T D = B^T @ D.reshape(a, -1), and per row the same along the columns), so
BLAS streams the data twice; NumPy's elementwise adds over the same slabs
took two to three times as long (measured here). GEMM rows are the tiles in
(n, th, tw) order, the order of x's memory, so the gathers copy runs of C
numbers in the order they lie.

Work goes through the batch in blocks of images (their transforms stay in
cache between the passes), shared out among threads by mlp.parallel; block
boundaries depend only on the shapes, so no number depends on the thread
count.
"""
from __future__ import annotations

import functools

import numpy as np

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


@functools.lru_cache(maxsize=4096)
def _inside(r: int, pad: int, size: int, m: int, T: int):
    """The tiles t in [first, stop) whose entry r, row m*t + r - pad of the unpadded
    input, lies inside it (0 <= row < size); and that row for t = first."""
    first = max(0, -(-(pad - r) // m))
    stop = max(first, min(T, -(-(size + pad - r) // m)))
    return first, stop, m * first + r - pad


def gather_tiles(x, m: int, pad: int, Th: int, Tw: int):
    """x: (n, H, W, C) -> D: (a, a, n, Th, Tw, C), D[r, s, :, th, tw] = xpad[:, m*th + r,
    m*tw + s], xpad x zero-padded by ``pad`` (and beyond, for the last tiles)."""
    a = m + 2
    n, H, W, C = x.shape
    D = np.empty((a, a, n, Th, Tw, C), x.dtype)
    for r in range(a):
        t0, t1, h0 = _inside(r, pad, H, m, Th)
        for s in range(a):
            u0, u1, w0 = _inside(s, pad, W, m, Tw)
            d = D[r, s]
            if t1 > t0 and u1 > u0:
                d[:, t0:t1, u0:u1] = x[:, h0:h0 + m * (t1 - t0 - 1) + 1:m, w0:w0 + m * (u1 - u0 - 1) + 1:m]
            d[:, :t0] = d[:, t1:] = d[:, :, :u0] = d[:, :, u1:] = 0
    return D


def scatter_tiles(dD, m: int, pad: int, dx):
    """The transpose of gather_tiles: dx: (n, H, W, C) = the sum of every tile entry
    dD[r, s, :, th, tw] at its place (entries that overlap add up; padding is dropped).
    The entries r, s < m tile the input once and are written; the first stray rows
    and columns past them are zeroed; the overlapping entries are then added."""
    a = m + 2
    _, H, W, _ = dx.shape
    Th, Tw = dD.shape[3:5]
    order = [(r, s) for r in range(m) for s in range(m)]
    order += [(r, s) for r in range(a) for s in range(a) if r >= m or s >= m]
    for k, (r, s) in enumerate(order):
        if k == m * m:
            dx[:, max(0, m * Th - pad):] = 0
            dx[:, :, max(0, m * Tw - pad):] = 0
        t0, t1, h0 = _inside(r, pad, H, m, Th)
        u0, u1, w0 = _inside(s, pad, W, m, Tw)
        if t1 == t0 or u1 == u0:
            continue
        target = dx[:, h0:h0 + m * (t1 - t0 - 1) + 1:m, w0:w0 + m * (u1 - u0 - 1) + 1:m]
        source = dD[r, s, :, t0:t1, u0:u1]
        if k < m * m:
            target[...] = source
        else:
            target += source


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


def forward(x, w, b, padding: int, m: int, keep: bool = False):
    """x: (N, H, W, C) channels-last -> (out: (N, Ho, Wo, F), Ho = H + 2*padding - 2,
    the transformed input V of every block when ``keep``, else None).
    w: (F, C, 3, 3), b: (F,). The backward needs V again: kept, it is read back
    instead of gathered and transformed a second time (measured here: 5-10 % of a
    training step; it costs 2.25x (F(4x4)) or 4x (F(2x2)) the layer's input in memory)."""
    N, H, W, C = x.shape
    F = w.shape[0]
    Ho, Wo = H + 2 * padding - 2, W + 2 * padding - 2
    Th, Tw = tiles(Ho, m), tiles(Wo, m)
    a = m + 2
    U = filter_transform(w, m)
    b_tiles = np.tile(b, Th * Tw)
    out = np.empty((N, Ho, Wo, F), x.dtype)

    def block(lo, hi):
        V = input_transform(gather_tiles(x[lo:hi], m, padding, Th, Tw), m).reshape(a * a, -1, C)
        M = np.matmul(V, U)
        Y = output_transform(M.reshape(a, a, -1), m).reshape(m, m, hi - lo, Th, Tw, F)
        Y.reshape(-1, Th * Tw * F)[...] += b_tiles   # long rows: see im2col.forward
        scatter_tiles_exact(Y, out[lo:hi])
        return V if keep else None

    kept = over_blocks(block, N, _images_per_block(N, m, Th, Tw, C, F, x.itemsize))
    return out, (kept if keep else None)


def scatter_tiles_exact(Y, out):
    """out: (n, Ho, Wo, F) <- the output tiles Y: (m, m, n, Th, Tw, F), which do not
    overlap; the parts of the last tiles past Ho or Wo are dropped."""
    m = Y.shape[0]
    _, Ho, Wo, _ = out.shape
    for p in range(m):
        for q in range(m):
            out[:, p::m, q::m] = Y[p, q, :, :len(range(p, Ho, m)), :len(range(q, Wo, m))]


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
            V = input_transform(gather_tiles(x[lo:hi], m, padding, Th, Tw), m).reshape(a * a, -1, C)
        dY = _output_tiles(dout[lo:hi], m, Th, Tw)
        dM = output_transform_adjoint(dY, m).reshape(a * a, -1, F)
        dU = np.matmul(V.transpose(0, 2, 1), dM)
        db = np.ones(n * Ho * Wo, dout.dtype) @ dout[lo:hi].reshape(-1, F)
        if input_grad:
            dV = np.matmul(dM, U_T).reshape(a, a, -1)
            dD = input_transform_adjoint(dV, m).reshape(a, a, n, Th, Tw, C)
            scatter_tiles(dD, m, padding, dx[lo:hi])
        return dU, db

    parts = over_blocks(block, N, images)
    if kept:
        kept.clear()   # used: its memory goes back before the next forward makes more
    dU, db = sum_in_order([p[0] for p in parts]), sum_in_order([p[1] for p in parts])
    return dx, filter_transform_adjoint(dU, m), db


def _output_tiles(dout, m, Th, Tw):
    """dout: (n, Ho, Wo, F) -> its m x m tiles dY: (m, m, n, Th, Tw, F), zeros past Ho, Wo."""
    n, Ho, Wo, F = dout.shape
    dY = np.zeros((m, m, n, Th, Tw, F), dout.dtype)
    for p in range(m):
        for q in range(m):
            dY[p, q, :, :len(range(p, Ho, m)), :len(range(q, Wo, m))] = dout[:, p::m, q::m]
    return dY
