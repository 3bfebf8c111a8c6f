"""Fast kernels for the layers: cs231n's fast_layers.py to mlp/reference.py's layers.py.

The layer classes (mlp/layers.py, mlp/conv.py) hold parameters, gradients and
caches and pick a kernel; the maths of each is mlp/reference.py's plain NumPy.
The kernels here compute the same things faster, and are tested against the
reference on random shapes:

  im2col.py      convolution as im2col + one matrix product, in cache-sized
                 blocks of images on all cores (any kernel size, stride, padding)
  winograd.py    3x3 and 5x5 stride-1 convolution as Winograd F(2x2, 3x3),
                 F(4x4, 3x3) and F(2x2, 5x5)
  conv.py        which of the two a Conv2D runs (measured per layer shape, or
                 forced with NNX_CONV_ALGORITHM), and the channels-last layout
  pool.py        max-pooling: the 2x2 tournament, strided window views
  batchnorm.py   batch norm in blocks of images, sums by BLAS, fixed order
  elementwise.py ReLU and GELU over the batch in threads

``NNX_KERNELS=reference`` runs every layer on its reference instead (slow;
for debugging a kernel). Results agree up to float rounding, not bit for bit.
"""
from __future__ import annotations

import os
import warnings

KERNELS_ENV = "NNX_KERNELS"
_warned: set[str] = set()


def reference_kernels() -> bool:
    """True when ``NNX_KERNELS=reference``; read at every call, so a test or a
    debugging session may switch it. Any value but "fast", "reference" or empty is
    named in a warning (once) and ignored."""
    value = os.environ.get(KERNELS_ENV, "").strip().lower()
    if value in ("", "fast"):
        return False
    if value == "reference":
        return True
    if value not in _warned:
        _warned.add(value)
        warnings.warn(f"{KERNELS_ENV}={value!r} is not 'fast' or 'reference'; using the fast kernels",
                      stacklevel=2)
    return False
