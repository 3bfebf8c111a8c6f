"""How far float32 convolutions land from the exact result, per algorithm, on real layer shapes.

For each 3x3 layer of conv6bn and airbench, each 5x5 layer of the bench's
wide5x5 net and of convnetjs, and cs231n-3layer's 7x7 (batch 16): inputs like
a trained net's (ReLU of unit normals), He-initialised weights, a unit-normal
upstream gradient; forward, input gradient and weight gradient from im2col,
im2col over 2x2 tiles and Winograd (F(2x2, 3x3) / F(4x4, 3x3); F(2x2, 5x5) / F(4x4, 5x5)) in
float32, against the direct convolution in float64. The error is
max |ours - exact| / max |exact| over the whole array (the tolerance
tests/helpers.assert_close applies).

    python bench/conv_numerics.py
"""
from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mlp import reference  # noqa: E402
from mlp.kernels import conv as conv_kernels  # noqa: E402

# (H = W, C, F, K) of the convs: conv6bn's and airbench's 3x3, wide5x5's and convnetjs's
# 5x5, cs231n-3layer's 7x7.
LAYERS = [(16, 32, 32, 3), (16, 32, 64, 3), (8, 64, 64, 3), (8, 64, 128, 3), (4, 128, 128, 3),
          (31, 24, 64, 3), (15, 64, 64, 3), (15, 64, 256, 3), (7, 256, 256, 3), (3, 256, 256, 3),
          (16, 32, 64, 5), (8, 64, 128, 5), (32, 3, 16, 5), (16, 16, 20, 5), (8, 20, 20, 5),
          (32, 3, 32, 7)]
BATCH = 16


def relative_error(ours, exact) -> float:
    return float(np.max(np.abs(ours - exact)) / np.max(np.abs(exact)))


def main():
    rng = np.random.default_rng(0)
    print(f"max |float32 - exact| / max |exact|, batch {BATCH}; exact = direct conv in float64")
    print(f"{'layer':<18} " + " ".join(f"{name + ' out/dx/dw':>27}" for name in conv_kernels.ALGORITHMS))
    worst = {}
    for H, C, F, K in LAYERS:
        x = np.maximum(rng.standard_normal((BATCH, C, H, H)), 0)
        w = rng.standard_normal((F, C, K, K)) * np.sqrt(2 / (K * K * C))
        b = np.zeros(F)
        exact, cache = reference.conv_forward(x, w, b, 1, K // 2)
        dout = rng.standard_normal(exact.shape)
        exact_dx, exact_dw, _ = reference.conv_backward(dout, cache)
        cells = []
        for name in conv_kernels.ALGORITHMS:
            if not conv_kernels.applies(name, K, 1, K // 2):
                cells.append("-")
                continue
            x32, w32 = x.astype(np.float32), w.astype(np.float32)
            out, fast = conv_kernels.forward(name, x32, w32, b.astype(np.float32), 1, K // 2, {})
            dx, dw, _ = conv_kernels.backward(dout.astype(np.float32), fast)
            errors = [relative_error(out, exact), relative_error(dx, exact_dx), relative_error(dw, exact_dw)]
            key = f"{name} ({K}x{K})"
            worst[key] = max(worst.get(key, 0.0), *errors)
            cells.append("/".join(f"{e:.0e}" for e in errors))
        print(f"{f'{H}x{H} {C}->{F} {K}x{K}':<18} " + " ".join(f"{c:>27}" for c in cells))
    print("worst: " + ", ".join(f"{name} {e:.1e}" for name, e in worst.items()))


if __name__ == "__main__":
    main()
