"""im2col's two ways of gathering receptive fields, timed on the shapes of first convs.

``mlp.kernels.im2col.im2col`` copies each field's K kernel rows of K*C numbers
directly, or, for inputs of at most ``FEW_CHANNELS`` channels and kernels 3 wide or
more, in two stages (a strip of each output column's windows, then one run of K*K*C
numbers per field). This times both on one block of images, as many as the kernels
put in a block (about ``parallel.BLOCK_BYTES`` of rows for im2col,
``im2col_tiles.BLOCK_BYTES`` for im2col2), float32, one thread, in turns; medians.
The rows are the same either way (tests/test_kernels.py).

``--weight-grad`` times instead the two ways of computing a block's weight gradient,
cols^T d (fields + 1 by F), that ``mlp.kernels.im2col.weight_grad`` chooses between:
as written, or as (d^T cols)^T, which OpenBLAS packs differently.

    python bench/bench_im2col.py [--reps 60] [--weight-grad]
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.bench_conv import machine  # noqa: E402
from bench.bench_fusion import turns  # noqa: E402
from mlp import parallel  # noqa: E402
from mlp.kernels import im2col as im2col_kernels  # noqa: E402
from mlp.kernels import im2col_tiles  # noqa: E402

# (what, C, K, stride, output size): im2col's view of the layer (im2col2's 2x2 tiles are
# an im2col of (K+1)x(K+1) fields at stride 2 over the tiles)
SHAPES = [
    ("whitening 2x2 (airbench)", 3, 2, 1, 31),
    ("3x3 on RGB (conv6bn, im2col)", 3, 3, 1, 32),
    ("5x5 on RGB (convnetjs, im2col)", 3, 5, 1, 32),
    ("5x5 on RGB (convnetjs, im2col2)", 3, 6, 2, 16),
    ("7x7 on RGB (cs231n-3layer, im2col)", 3, 7, 1, 32),
    ("7x7 on RGB (cs231n-3layer, im2col2)", 3, 8, 2, 16),
    ("3x3 on grey", 1, 3, 1, 32),
    ("3x3 on 8 channels", 8, 3, 1, 32),
    ("3x3 on 16 channels", 16, 3, 1, 32),
]


# (what, fields of a row, F: the product's columns, outputs (or 2x2 tiles) per image side):
# the weight gradient's product of each preset's conv layers, as im2col and im2col2 make it
WEIGHT_GRAD_SHAPES = [
    ("whitening 2x2 (airbench)", 2 * 2 * 3, 24, 31),
    ("3x3 RGB -> 64 (conv6bn, im2col)", 3 * 3 * 3, 64, 32),
    ("5x5 3 -> 16 (convnetjs, im2col)", 5 * 5 * 3, 16, 32),
    ("5x5 3 -> 16 (convnetjs, im2col2)", 6 * 6 * 3, 4 * 16, 16),
    ("7x7 3 -> 32 (cs231n-3layer, im2col)", 7 * 7 * 3, 32, 32),
    ("7x7 3 -> 32 (cs231n-3layer, im2col2)", 8 * 8 * 3, 4 * 32, 16),
    ("5x5 16 -> 20 (convnetjs, im2col)", 5 * 5 * 16, 20, 16),
    ("5x5 16 -> 20 (convnetjs, im2col2)", 6 * 6 * 16, 4 * 20, 8),
    ("5x5 20 -> 20 (convnetjs, im2col)", 5 * 5 * 20, 20, 8),
    ("5x5 32 -> 64 (wide5x5, im2col)", 5 * 5 * 32, 64, 16),
    ("3x3 64 -> 128 (conv6bn, im2col)", 3 * 3 * 64, 128, 16),
]


def budget(what: str) -> int:
    """The block budget of the kernel that makes a shape's rows (named in ``what``)."""
    return im2col_tiles.BLOCK_BYTES if "im2col2" in what else parallel.BLOCK_BYTES


def weight_grad(reps: int, rng) -> None:
    """cols^T d against (d^T cols)^T on one block of rows, as the kernels cut them."""
    print(f"weight gradient of one block (about {parallel.BLOCK_BYTES / 2**20:g} MiB of rows for im2col, "
          f"{im2col_tiles.BLOCK_BYTES / 2**20:g} MiB for im2col2), float32, one thread; median ms of {reps} "
          f"in turns")
    print(f"{'layer':40s} {'rows':>6s} {'cols^T d':>9s} {'(d^T cols)^T':>12s} {'gain':>6s}  nnx takes")
    for what, fields, F, side in WEIGHT_GRAD_SHAPES:
        rows = parallel.block_size(side * side * (fields + 1) * 4, budget(what)) * side * side
        cols = rng.standard_normal((rows, fields + 1)).astype(np.float32)
        d = rng.standard_normal((rows, F)).astype(np.float32)
        ms = turns({"cols^T d": lambda cols=cols, d=d: cols.T @ d,
                    "(d^T cols)^T": lambda cols=cols, d=d: (d.T @ cols).T}, reps)
        plain, transposed = ms["cols^T d"][0], ms["(d^T cols)^T"][0]
        takes = "(d^T cols)^T" if fields + 1 >= im2col_kernels.TRANSPOSED_WEIGHT_GRAD_FIELDS else "cols^T d"
        print(f"{what:40s} {rows:6d} {plain:9.3f} {transposed:12.3f} {plain / transposed:5.2f}x  {takes}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=60)
    parser.add_argument("--weight-grad", action="store_true", help="time the weight gradient's two "
                        "products instead")
    args = parser.parse_args()
    from threadpoolctl import threadpool_limits
    threadpool_limits(1)
    rng = np.random.default_rng(0)
    print(machine())
    if args.weight_grad:
        weight_grad(args.reps, rng)
        return
    print(f"one block of images (about {parallel.BLOCK_BYTES / 2**20:g} MiB of rows for im2col, "
          f"{im2col_tiles.BLOCK_BYTES / 2**20:g} MiB for im2col2), float32, one thread; median ms of "
          f"{args.reps} in turns")
    print(f"{'layer':38s} {'images':>6s} {'direct':>8s} {'two stages':>10s} {'gain':>6s}  nnx takes")
    for what, C, K, S, out in SHAPES:
        images = parallel.block_size(out * out * (K * K * C + 1) * 4, budget(what))
        size = S * (out - 1) + K
        xp = rng.standard_normal((images, size, size, C)).astype(np.float32)
        cols = np.empty((images * out * out, K * K * C + 1), np.float32)
        few = im2col_kernels.FEW_CHANNELS

        def gather(channels, xp=xp, cols=cols, K=K, S=S, out=out):
            im2col_kernels.FEW_CHANNELS = channels      # the FEW_CHANNELS of each way
            im2col_kernels.im2col(xp, cols, K, S, out, out)
        try:
            ms = turns({"direct": lambda: gather(0), "two stages": lambda: gather(1 << 30)}, args.reps)
        finally:
            im2col_kernels.FEW_CHANNELS = few
        direct, staged = ms["direct"][0], ms["two stages"][0]
        takes = "two stages" if im2col_kernels.in_two_stages(C, K) else "direct"
        print(f"{what:38s} {images:6d} {direct:8.3f} {staged:10.3f} {direct / staged:5.2f}x  {takes}")


if __name__ == "__main__":
    main()
