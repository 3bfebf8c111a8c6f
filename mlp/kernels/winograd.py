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

so a layer is an input transform (adds and scalings), a*a GEMMs and an
output transform. F(2x2, 3x3) needs 16 multiplications per 4 outputs
(2.25x fewer than direct), F(4x4, 3x3) 36 per 16 (4x fewer), paid for by
the transforms (memory passes) and by float32 rounding that grows with the
tile (the F(4x4) matrices hold 1/24 and 8).

The gradients are the exact gradients of this forward (so a float64
gradient check passes through it):
    filters: dU[xi] = V[xi]^T @ dM[xi],  dM = A dY A^T,  dg = G^T dU G
    input:   dV[xi] = dM[xi] @ U[xi]^T,  dd = B dV B^T, overlapping tiles added

Layout. NumPy's elementwise loops run several times faster over contiguous
memory than over strided views, so the transforms work on a *phase-split*
copy of each block of images:  xs[rh, rw, th, tw, n, c] = xpad[n, m*th + rh,
m*tw + rw, c]. Row j of every tile is then the contiguous slab
xs[j % m, :, j // m : j // m + Th], and the transforms are a few dozen
whole-slab adds and scalings. Tiles are ordered (th, tw, n) in the GEMM rows.
Layer arrays are (n, H, W, C) channels-last, as everywhere in mlp.conv; the
copies into and out of the phase-split layout are the only strided passes.

Work goes through the batch in blocks of images (their transforms stay in
cache between the passes), shared out among threads by mlp.parallel; block
boundaries depend only on the shapes, so no number depends on the thread
count.
"""
from __future__ import annotations

import numpy as np

from mlp.parallel import block_size, over_blocks

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
MIN_ROWS = 256      # GEMM rows per block at least (tiles x images), cache or not


def supports(kernel_size: int, stride: int, padding: int) -> bool:
    """Whether a conv can run as Winograd here: 3x3, stride 1, padding 0 to 2."""
    return kernel_size == 3 and stride == 1 and 0 <= padding <= 2


# ---- linear combinations of whole arrays -------------------------------------------

def _signed_sum(out, terms):
    """out = sum of +-arrays; terms: [(sign, array)], at least one."""
    (s0, a0), rest = terms[0], terms[1:]
    if rest and s0 > 0:
        s1, a1 = rest[0]
        (np.add if s1 > 0 else np.subtract)(a0, a1, out=out)
        rest = rest[1:]
    elif rest and rest[0][0] > 0:
        np.subtract(rest[0][1], a0, out=out)
        rest = rest[1:]
    elif s0 > 0:
        np.copyto(out, a0)
    else:
        np.negative(a0, out=out)
    for s, a in rest:
        if s > 0:
            out += a
        else:
            out -= a


def combine(out, coefs, arrays):
    """out = sum_k coefs[k] * arrays[k], the zero terms skipped, in few passes and few
    temporaries: terms sharing a coefficient's magnitude are summed first and scaled
    once (e.g. -4 d1 - 4 d2 + d3 + d4 = -4 (d1 + d2) + (d3 + d4): four passes, none
    of them into a temporary)."""
    groups: dict[float, list] = {}
    for c, a in zip(coefs, arrays, strict=True):
        if c:
            groups.setdefault(abs(float(c)), []).append((1 if c > 0 else -1, a))
    unit = groups.pop(1.0, None)
    first = True
    for scale, terms in groups.items():
        target = out if first else np.empty_like(out)
        _signed_sum(target, terms)
        target *= scale
        if not first:
            out += target
        first = False
    if unit:
        if first:
            _signed_sum(out, unit)
        else:
            for s, a in unit:
                if s > 0:
                    out += a
                else:
                    out -= a


# ---- the small linear maps, applied to whole arrays ------------------------------
# Each map takes lists of equally shaped arrays, ``outs[i] = sum_j T[i, j] ins[j]``,
# T one of B^T, B, A^T, A. Generic: term by term (combine); F(4x4)'s four maps are
# written out with their common subexpressions (its points +-1 and +-2 pair up),
# about a third fewer passes.

def _map_of(matrix):
    def apply(outs, ins):
        for row, out in zip(matrix, outs, strict=True):
            combine(out, row, ins)
    return apply


def _bt4(outs, ins):
    """B^T of F(4x4, 3x3): 20 passes."""
    d0, d1, d2, d3, d4, d5 = ins
    r0, r1, r2, r3, r4, r5 = outs
    t = np.subtract(d4, d2)
    np.subtract(d0, d2, out=r0)       # r0 = 4 d0 - 5 d2 + d4 = 4 (d0 - d2) + (d4 - d2)
    r0 *= 4
    r0 += t
    np.subtract(d3, d1, out=r3)       # r3 = 2 (d3 - d1) + (d4 - d2),  r4 = -2 (d3 - d1) + (d4 - d2)
    r3 *= 2
    np.subtract(t, r3, out=r4)
    r3 += t
    np.add(d1, d2, out=r1)            # r1 = -4 (d1 + d2) + (d3 + d4)
    r1 *= -4
    np.add(d3, d4, out=t)
    r1 += t
    np.subtract(d1, d2, out=r2)       # r2 = 4 (d1 - d2) + (d4 - d3)
    r2 *= 4
    r2 += d4
    r2 -= d3
    np.subtract(d1, d3, out=r5)       # r5 = 4 d1 - 5 d3 + d5 = 4 (d1 - d3) + (d5 - d3)
    r5 *= 4
    r5 += d5
    r5 -= d3


def _b4(outs, ins):
    """B of F(4x4, 3x3) (the transpose of _bt4): 19 passes."""
    d0, d1, d2, d3, d4, d5 = ins
    o0, o1, o2, o3, o4, o5 = outs
    np.multiply(d0, 4, out=o0)
    s12, s34 = np.add(d1, d2), np.add(d3, d4)
    np.add(d0, s12, out=o4)           # o4 = d0 + d1 + d2 + d3 + d4
    o4 += s34
    np.multiply(s12, -4, out=o2)      # o2 = -5 d0 - 4 (d1 + d2) - (d3 + d4)
    o2 -= s34
    np.multiply(d0, 5, out=s12)
    o2 -= s12
    d12, d34 = np.subtract(d1, d2, out=s12), np.subtract(d3, d4, out=s34)
    np.subtract(d5, d12, out=o1)      # o1 = 4 (d5 - (d1 - d2)) - 2 (d3 - d4)
    o1 *= 4
    d34 *= 2
    o1 -= d34
    np.add(d12, d34, out=o3)          # o3 = (d1 - d2) + 2 (d3 - d4) - 5 d5
    np.multiply(d5, 5, out=d12)
    o3 -= d12
    np.copyto(o5, d5)


def _at4(outs, ins):
    """A^T of F(4x4, 3x3): 13 passes."""
    m0, m1, m2, m3, m4, m5 = ins
    y0, y1, y2, y3 = outs
    t = np.add(m1, m2)                # y0 = m0 + (m1 + m2) + (m3 + m4)
    np.add(m3, m4, out=y2)            # y2 = (m1 + m2) + 4 (m3 + m4)
    np.add(m0, t, out=y0)
    y0 += y2
    y2 *= 4
    y2 += t
    np.subtract(m1, m2, out=t)        # y1 = (m1 - m2) + 2 (m3 - m4)
    np.subtract(m3, m4, out=y3)       # y3 = (m1 - m2) + 8 (m3 - m4) + m5
    np.multiply(y3, 2, out=y1)
    y1 += t
    y3 *= 8
    y3 += t
    y3 += m5


def _a4(outs, ins):
    """A of F(4x4, 3x3) (the transpose of _at4): 13 passes."""
    y0, y1, y2, y3 = ins
    o0, o1, o2, o3, o4, o5 = outs
    even, odd = np.add(y0, y2), np.add(y1, y3)
    np.add(even, odd, out=o1)         # o1, o2 = (y0 + y2) +- (y1 + y3)
    np.subtract(even, odd, out=o2)
    np.multiply(y2, 4, out=even)      # o3, o4 = (y0 + 4 y2) +- 2 (y1 + 4 y3)
    even += y0
    np.multiply(y3, 4, out=odd)
    odd += y1
    odd *= 2
    np.add(even, odd, out=o3)
    np.subtract(even, odd, out=o4)
    np.copyto(o0, y0)
    np.copyto(o5, y3)


_MAPS = {(m, name): _map_of(matrix) for m, (BT, _, AT) in MATRICES.items()
         for name, matrix in (("BT", BT), ("B", BT.T), ("AT", AT), ("A", AT.T))}
_MAPS.update({(4, "BT"): _bt4, (4, "B"): _b4, (4, "AT"): _at4, (4, "A"): _a4})


# ---- transforms -------------------------------------------------------------------

def tiles(size: int, m: int) -> int:
    """Tiles of m outputs covering ``size`` outputs along one axis."""
    return -(-size // m)


def split_phases(x, m: int, pad: int, xs):
    """x: (n, H, W, C) -> xs: (m, m, Th+1, Tw+1, n, C) with xs[rh, rw, th, tw] =
    xpad[:, m*th + rh, m*tw + rw], xpad x zero-padded by ``pad``. Writes only where
    x lands: the caller's xs must hold zeros elsewhere."""
    _, H, W, _ = x.shape
    for rh in range(m):
        h0 = (rh - pad) % m
        th0, rows = (h0 + pad) // m, len(range(h0, H, m))
        for rw in range(m):
            w0 = (rw - pad) % m
            tw0, cols = (w0 + pad) // m, len(range(w0, W, m))
            xs[rh, rw, th0:th0 + rows, tw0:tw0 + cols] = x[:, h0::m, w0::m].transpose(1, 2, 0, 3)


def merge_phases(ys, out, pad: int = 0):
    """The inverse of split_phases: out: (n, H, W, C) <- ys: (m, m, Th', Tw', n, C)."""
    m = ys.shape[0]
    _, H, W, _ = out.shape
    for rh in range(m):
        h0 = (rh - pad) % m
        th0, rows = (h0 + pad) // m, len(range(h0, H, m))
        for rw in range(m):
            w0 = (rw - pad) % m
            tw0, cols = (w0 + pad) // m, len(range(w0, W, m))
            out[:, h0::m, w0::m] = ys[rh, rw, th0:th0 + rows, tw0:tw0 + cols].transpose(2, 0, 1, 3)


def input_transform(xs, m: int):
    """V = B^T d B for every tile. xs: (m, m, Th+1, Tw+1, n, C) -> V: (a, a, Th, Tw, n, C).
    Tile row j of every tile is the slab xs[j % m, :, j // m : j // m + Th]."""
    bt, a = _MAPS[m, "BT"], m + 2
    _, _, Th1, Tw1, n, C = xs.shape
    Th, Tw = Th1 - 1, Tw1 - 1
    R = np.empty((a, m, Th, Tw1, n, C), xs.dtype)
    bt(list(R), [xs[j % m, :, j // m:j // m + Th] for j in range(a)])
    V = np.empty((a, a, Th, Tw, n, C), xs.dtype)
    bt([V[:, j] for j in range(a)], [R[:, j % m, :, j // m:j // m + Tw] for j in range(a)])
    return V


def input_transform_adjoint(dV, m: int):
    """The transpose of input_transform: dd = B dV B^T per tile, overlapping tiles added.
    dV: (a, a, Th, Tw, n, C) -> dxs: (m, m, Th+1, Tw+1, n, C).

    Tile columns j and j + m land on the same phase, one tile apart: the slabs of
    j < m are written, those of j >= m added (the last tile column, which only
    they reach, zeroed first). Likewise for the rows."""
    b, a = _MAPS[m, "B"], m + 2
    _, _, Th, Tw, n, C = dV.shape
    dR = np.empty((a, m, Th, Tw + 1, n, C), dV.dtype)      # adjoint of the column stage
    dR[:, :, :, Tw] = 0
    targets = [dR[:, j % m, :, j // m:j // m + Tw] for j in range(a)]
    extra = [np.empty(targets[0].shape, dV.dtype) for _ in range(m, a)]
    b(targets[:m] + extra, [dV[:, j] for j in range(a)])
    for target, part in zip(targets[m:], extra, strict=True):
        target += part
    dxs = np.empty((m, m, Th + 1, Tw + 1, n, C), dV.dtype)  # adjoint of the row stage
    dxs[:, :, Th] = 0
    targets = [dxs[j % m, :, j // m:j // m + Th] for j in range(a)]
    extra = [np.empty(targets[0].shape, dV.dtype) for _ in range(m, a)]
    b(targets[:m] + extra, list(dR))
    for target, part in zip(targets[m:], extra, strict=True):
        target += part
    return dxs


def output_transform(M, m: int):
    """Y = A^T M A for every tile. M: (a, a, Th, Tw, n, F) -> Y: (m, m, Th, Tw, n, F)."""
    at, a = _MAPS[m, "AT"], m + 2
    S = np.empty((a, m) + M.shape[2:], M.dtype)
    at([S[:, q] for q in range(m)], [M[:, j] for j in range(a)])
    Y = np.empty((m, m) + M.shape[2:], M.dtype)
    at(list(Y), list(S))
    return Y


def output_transform_adjoint(dYs, m: int):
    """The transpose of output_transform: dM = A dY A^T per tile.
    dYs: (m, m, Th, Tw, n, F) -> dM: (a, a, Th, Tw, n, F)."""
    a_, a = _MAPS[m, "A"], m + 2
    S = np.empty((a, m) + dYs.shape[2:], dYs.dtype)
    a_(list(S), list(dYs))
    dM = np.empty((a, a) + dYs.shape[2:], dYs.dtype)
    a_([dM[:, j] for j in range(a)], [S[:, q] for q in range(m)])
    return dM


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

def _images_per_block(m, Th, Tw, C, F, itemsize):
    per_image = (m + 2) ** 2 * Th * Tw * (C + F) * itemsize
    return max(block_size(per_image, BLOCK_BYTES), -(-MIN_ROWS // (Th * Tw)))


def forward(x, w, b, padding: int, m: int):
    """x: (N, H, W, C) channels-last -> (N, Ho, Wo, F), Ho = H + 2*padding - 2.
    w: (F, C, 3, 3), b: (F,)."""
    N, H, W, C = x.shape
    F = w.shape[0]
    Ho, Wo = H + 2 * padding - 2, W + 2 * padding - 2
    Th, Tw = tiles(Ho, m), tiles(Wo, m)
    a = m + 2
    U = filter_transform(w, m)
    out = np.empty((N, Ho, Wo, F), x.dtype)

    def block(lo, hi):
        xs = np.zeros((m, m, Th + 1, Tw + 1, hi - lo, C), x.dtype)
        split_phases(x[lo:hi], m, padding, xs)
        V = input_transform(xs, m)
        M = np.matmul(V.reshape(a * a, -1, C), U).reshape(a, a, Th, Tw, hi - lo, F)
        Y = output_transform(M, m)
        Y += b
        merge_phases(Y, out[lo:hi])

    over_blocks(block, N, _images_per_block(m, Th, Tw, C, F, x.itemsize))
    return out


def backward(dout, x, w, padding: int, m: int, input_grad: bool = True):
    """dout: (N, Ho, Wo, F), x: (N, H, W, C) the forward's input, both channels-last ->
    (dx: (N, H, W, C) or None without ``input_grad``, dw: (F, C, 3, 3), db: (F,))."""
    N, H, W, C = x.shape
    _, Ho, Wo, F = dout.shape
    Th, Tw = tiles(Ho, m), tiles(Wo, m)
    a = m + 2
    U_T = filter_transform(w.transpose(1, 0, 2, 3), m) if input_grad else None
    dx = np.empty((N, H, W, C), x.dtype) if input_grad else None

    def block(lo, hi):
        n = hi - lo
        xs = np.zeros((m, m, Th + 1, Tw + 1, n, C), x.dtype)
        split_phases(x[lo:hi], m, padding, xs)
        V = input_transform(xs, m).reshape(a * a, -1, C)
        dys = np.zeros((m, m, Th, Tw, n, F), dout.dtype)
        split_phases(dout[lo:hi], m, 0, dys)
        dM = output_transform_adjoint(dys, m).reshape(a * a, -1, F)
        dU = np.matmul(V.transpose(0, 2, 1), dM)
        db = np.ones(n * Ho * Wo, dout.dtype) @ dout[lo:hi].reshape(-1, F)
        if input_grad:
            dV = np.matmul(dM, U_T).reshape(a, a, Th, Tw, n, C)
            merge_phases(input_transform_adjoint(dV, m), dx[lo:hi], padding)
        return dU, db

    parts = over_blocks(block, N, _images_per_block(m, Th, Tw, C, F, x.itemsize))
    dU, db = parts[0]
    for more_dU, more_db in parts[1:]:   # block order: the same sums whatever the threads
        dU += more_dU
        db += more_db
    return dx, filter_transform_adjoint(dU, m), db
