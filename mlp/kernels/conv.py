"""Which algorithm a convolution runs, and the channels-last layout around it.

Layers take and return NCHW-shaped arrays. Inside, convolutions work
channels-last: a conv's output is an NCHW-shaped *view* of NHWC memory, and
the elementwise layers and the max-pool keep that memory order, so the next
conv gets its NHWC input without a transposing copy.

Algorithms:
  im2col      any kernel, stride and padding (mlp/kernels/im2col.py)
  im2col2     im2col over 2x2 tiles of outputs, one row per tile: kernels of 3 and
              more, stride 1, padding < kernel size; more multiplications in a wider
              product, for convs with few channels (mlp/kernels/im2col_tiles.py)
  winograd2   Winograd F(2x2, 3x3) or F(2x2, 5x5): 3x3 and 5x5 kernels, stride 1,
              padding < kernel size (mlp/kernels/winograd.py)
  winograd4   Winograd F(4x4, 3x3) or F(4x4, 5x5): fewer multiplications and smaller
              transforms per output than winograd2, more rounding

A layer's algorithm is chosen the first time it runs, by timing the
candidates on its real input (forward and backward, in turns, the best of
two after a warm-up, and of more rounds for the two best where they are close),
as the network will run it: with the 2x2 max-pool after it, fused, where it
fuses with one (unpooled, im2col and im2col2 came out even on cs231n-3layer's
7x7 conv and either was chosen; pooled, im2col2's tiles go to the pool as they
are and it won 6 times in 6). The choice is kept per layer shape for the
process and recorded with the layer (``Conv2D.algorithm``, saved in model files
and checkpoints, listed in a run's config.json), so a resumed run or a loaded
model computes with the same rounding. ``NNX_CONV_ALGORITHM`` = auto (the
default), im2col, im2col2, winograd2 or winograd4 forces one for every layer
it applies to (others run im2col), overriding a recorded choice.

Small layers (under ``MIN_MEASURED_FLOPS``) run im2col unmeasured: timing them
measures noise. Layers with few channels are not offered Winograd, whose
transforms cost more than the multiplications they save there.
"""
from __future__ import annotations

import os
import time
import warnings

import numpy as np

from mlp import parallel
from mlp.kernels import im2col, im2col_tiles, winograd

ALGORITHMS = ("im2col", "im2col2", "winograd2", "winograd4")
ALGORITHM_ENV = "NNX_CONV_ALGORITHM"
# Direct-conv multiply-adds x 2 of the batch, forward. Layers this small are a few ms of
# forward + backward, where timing still picks reliably: convnetjs's 20 -> 20 5x5 conv on a
# shard of 64 images (82 MFLOP) chose F(4x4, 5x5) in 8 of 8 choices, 2.0x faster than the
# im2col it ran unmeasured under the old 100 MFLOP; at 41 and 20 MFLOP, 8 of 8 too (1.6x,
# 1.3x: a one-off script). Below this, little is at stake and timing measures noise.
MIN_MEASURED_FLOPS = 40e6
# Input and output channels both. With F(4x4, 5x5) Winograd pays from 8 channels:
# forward + backward with the pool, 64 images on one thread (a one-off script), 8 -> 16
# 5x5 at 16x16 6.7 ms against im2col2's 8.9, 12 -> 24 11.0 against 17.3, 8 -> 16 3x3
# F(4x4, 3x3) 4.1 against 4.8; even at 6 -> 16 and 8 -> 8 at 32x32; on 3 channels
# (convnetjs's first conv) 22.9 against 17.3 ms.
MIN_WINOGRAD_CHANNELS = 8
_TILE = {"winograd2": 2, "winograd4": 4}
_chosen: dict[tuple, str] = {}
_warned: set[str] = set()


def nhwc(x: np.ndarray) -> np.ndarray:
    """x: (N, C, H, W) -> the (N, H, W, C) view of the same memory."""
    return x.transpose(0, 2, 3, 1)


def nchw(x: np.ndarray) -> np.ndarray:
    """x: (N, H, W, C) -> the (N, C, H, W) view of the same memory."""
    return x.transpose(0, 3, 1, 2)


def applies(algorithm: str, kernel_size: int, stride: int, padding: int) -> bool:
    if algorithm == "im2col2":
        return kernel_size >= 3 and stride == 1 and padding < kernel_size
    return algorithm == "im2col" or (algorithm in _TILE and winograd.supports(
        kernel_size, stride, padding, _TILE[algorithm]))


def candidates(kernel_size: int, stride: int, padding: int) -> tuple[str, ...]:
    """The algorithms that apply to a conv of this kernel size, stride and padding."""
    return tuple(name for name in ALGORITHMS if applies(name, kernel_size, stride, padding))


def forced_algorithm() -> str | None:
    """The algorithm ``NNX_CONV_ALGORITHM`` forces, or None for auto (unset, empty or
    "auto"). Any other value is named in a warning (once) and ignored."""
    value = os.environ.get(ALGORITHM_ENV, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value in ALGORITHMS:
        return value
    if value not in _warned:
        _warned.add(value)
        warnings.warn(f"{ALGORITHM_ENV}={value!r} is not one of auto, {', '.join(ALGORITHMS)}; "
                      "choosing by measurement", stacklevel=2)
    return None


def algorithm_for(recorded: str | None, x, w, stride: int, padding: int, input_grad: bool,
                  pooled: bool = False) -> str:
    """The algorithm a layer runs: the forced one where it applies (else im2col), else
    the layer's recorded one, else the measured choice for this shape (``pooled``: with
    the fused 2x2 max-pool after it, as it will run)."""
    K = w.shape[2]
    forced = forced_algorithm()
    if forced is not None:
        return forced if applies(forced, K, stride, padding) else "im2col"
    if recorded is not None:
        return recorded
    return choose(x, w, stride, padding, input_grad, pooled)


def choose(x, w, stride: int, padding: int, input_grad: bool = True, pooled: bool = False) -> str:
    """The fastest algorithm for a conv on inputs like x: (N, C, H, W), measured once per
    shape (and thread count) in this process; ``pooled``: followed by a 2x2 max-pool it
    fuses with where it can, which favours some algorithms (im2col2's tiles are the
    pooling windows)."""
    F, C, K, _ = w.shape
    N, _, H, W = x.shape
    offered = tuple(name for name in candidates(K, stride, padding)
                    if name not in _TILE or min(C, F) >= MIN_WINOGRAD_CHANNELS)
    Ho, Wo = (H + 2 * padding - K) // stride + 1, (W + 2 * padding - K) // stride + 1
    if offered == ("im2col",) or 2 * N * Ho * Wo * F * C * K * K < MIN_MEASURED_FLOPS:
        return "im2col"
    key = (x.shape, w.shape, stride, padding, x.dtype.str, input_grad, pooled, parallel.THREADS)
    if key not in _chosen:
        _chosen[key] = fastest(x, w, stride, padding, input_grad, offered, pooled=pooled)
    return _chosen[key]


# Candidates this close after the first rounds are timed again, the two of them, for as
# many rounds more: on a busy machine three rounds picked the slower of cs231n-3layer's
# 7x7 conv's two (about 10 % apart) three times in ten.
CLOSE = 1.15


def fastest(x, w, stride, padding, input_grad, candidates=ALGORITHMS, rounds: int = 3,
            pooled: bool = False) -> str:
    """The candidate with the shortest forward + backward on x, timed in turns (so a
    noisy neighbour slows all alike); the first round warms up, the best of the rest
    counts; the two best again if they are within ``CLOSE``. ``pooled``: with the 2x2
    max-pool after it, fused where the candidate fuses."""
    seconds = timings(x, w, stride, padding, input_grad, candidates, rounds, pooled)
    best = {name: min(seconds[name][1:]) for name in candidates}
    ranked = sorted(candidates, key=best.get)
    if len(ranked) > 1 and best[ranked[1]] < CLOSE * best[ranked[0]]:
        again = timings(x, w, stride, padding, input_grad, ranked[:2], rounds + 1, pooled)
        for name in ranked[:2]:
            best[name] = min(best[name], *again[name][1:])
    return min(candidates, key=best.get)


def timings(x, w, stride, padding, input_grad, candidates=ALGORITHMS, rounds: int = 3,
            pooled: bool = False) -> dict[str, list[float]]:
    """{candidate: seconds of each round} of a conv's forward + backward on x: (N, C, H,
    W), the candidates in turns each round (as ``fastest`` measures them)."""
    from mlp.kernels import pool as pool_kernels  # it imports this module's layout helpers
    F, _, K, _ = w.shape
    N, _, H, W = x.shape
    Ho, Wo = (H + 2 * padding - K) // stride + 1, (W + 2 * padding - K) // stride + 1
    b = np.zeros(F, w.dtype)
    rng = np.random.default_rng(0)
    shape = (N, Ho // 2, Wo // 2, F) if pooled else (N, Ho, Wo, F)
    dout = nchw(rng.standard_normal(shape).astype(w.dtype))
    workspaces = {name: {} for name in candidates}
    seconds = {name: [] for name in candidates}

    def step(name):
        if pooled and fuses(name, x.shape, w.shape, stride, padding, input_grad, w.dtype):
            pool, _, pool_cache = pool_kernels.tournament_epilogue(N, Ho, Wo, F, w.dtype)
            _, cache = forward(name, x, w, b, stride, padding, workspaces[name], epilogue=pool)
            backward(None, cache, input_grad, pool_kernels.backward_prologue(dout, pool_cache))
            return
        out, cache = forward(name, x, w, b, stride, padding, workspaces[name])
        d = dout
        if pooled:
            _, pool_cache = pool_kernels.maxpool_forward(out, 2, 2)
            (d,) = pool_kernels.maxpool_backward(dout, pool_cache)
        backward(d, cache, input_grad)

    with parallel.single_blas_thread():
        for _ in range(rounds):
            for name in candidates:
                started = time.perf_counter()
                step(name)
                seconds[name].append(time.perf_counter() - started)
    return seconds


def forward(algorithm: str, x, w, b, stride: int, padding: int, workspace: dict, train: bool = True,
            epilogue=None):
    """x: (N, C, H, W) in any memory order -> (out: (N, F, Ho, Wo) as a view of NHWC
    memory, cache for ``backward``). With ``epilogue``, each block of images' output,
    (n, Ho, Wo, F) channels-last, goes to ``epilogue(lo, hi, block)`` while it is in
    cache, and out is None (the layer after the conv, fused: see ``fuses``)."""
    xt, kept = nhwc(x), None
    if algorithm == "im2col":
        out = im2col.forward(xt, w, b, stride, padding, workspace, epilogue)
    elif algorithm == "im2col2":
        out = im2col_tiles.forward(xt, w, b, padding, workspace, epilogue=epilogue)
    else:
        out, kept = winograd.forward(xt, w, b, padding, _TILE[algorithm], keep=train, workspace=workspace,
                                     epilogue=epilogue)
    return (None if out is None else nchw(out)), (algorithm, xt, w, stride, padding, workspace, kept)


def backward(dout, cache, input_grad: bool = True, prologue=None):
    """dout: (N, F, Ho, Wo) -> (dx: (N, C, H, W) or None without ``input_grad``,
    dw: (F, C, K, K), db: (F,)). With ``prologue``, dout is None and
    ``prologue(lo, hi)`` makes each block of it, (n, Ho, Wo, F) channels-last, when
    the block is worked on (the fused layer's backward)."""
    algorithm, xt, w, stride, padding, workspace, kept = cache
    dt = None if dout is None else nhwc(dout)
    if algorithm == "im2col":
        dx, dw, db = im2col.backward(dt, xt.shape, w, stride, padding, workspace, input_grad, prologue)
    elif algorithm == "im2col2":
        dx, dw, db = im2col_tiles.backward(dt, xt.shape, w, padding, workspace, input_grad=input_grad,
                                           prologue=prologue)
    else:
        dx, dw, db = winograd.backward(dt, xt, w, padding, _TILE[algorithm], input_grad, kept, prologue)
    return (None if dx is None else nchw(dx)), dw, db


# A fused layer's passes over each block of the conv's output are a dozen NumPy calls;
# under this many bytes of output per block they cost more than the cache saves
# (measured, forward + backward of conv and pool: F(2x2, 5x5) 32 -> 64 at 16x16, blocks
# of 2 images, 128 KiB: 3 % slower fused; 64 -> 128 at 8x8, 256 KiB: even; F(4x4, 3x3)
# 32 -> 64 at 16x16, blocks of 9 images, 576 KiB: 1.03-1.11x faster; bench/bench_fusion.py).
MIN_FUSED_BLOCK_BYTES = 512 << 10


def fuses(algorithm: str, x_shape, w_shape, stride: int, padding: int, input_grad: bool, dtype) -> bool:
    """Whether a conv on inputs of x_shape: (N, C, H, W) fuses the layer after it: its
    kernels take an epilogue and a prologue (all do, except where the input gradient
    goes by col2im -- stride above 1, or padding of the kernel size or more -- which
    reads the whole upstream gradient at once) and its blocks of output are at least
    ``MIN_FUSED_BLOCK_BYTES``."""
    N, C, H, W = x_shape
    F, _, K, _ = w_shape
    if input_grad and not (stride == 1 and padding <= K - 1):
        return False
    Ho, Wo = (H + 2 * padding - K) // stride + 1, (W + 2 * padding - K) // stride + 1
    if algorithm == "im2col":
        images = im2col.images_per_block(Ho * Wo * K * K * C, dtype)
    elif algorithm == "im2col2":
        images = im2col_tiles.images_per_block(H, W, C, F, K, padding, dtype, input_grad=False)
    else:
        m = _TILE[algorithm]
        images = winograd.images_per_block(N, m + K - 1, winograd.tiles(Ho, m), winograd.tiles(Wo, m), C, F,
                                           np.dtype(dtype).itemsize)
    return min(images, N) * Ho * Wo * F * np.dtype(dtype).itemsize >= MIN_FUSED_BLOCK_BYTES
