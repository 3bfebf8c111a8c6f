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

In training, a network runs some pairs of layers as one step (``Layer.fuses_with``):
a conv and the 2x2 max-pool after it (the conv's output is pooled a block of
images at a time while in cache; neither it nor its gradient is written out
whole), a batch norm and the ReLU or GELU after it (the activation in the batch
norm's last pass, its derivative in the first pass back). The numbers are the
same as unfused (the same operations on the same blocks); ``NNX_FUSION=off``
runs every layer alone, for comparison.
"""
from __future__ import annotations

import os
import warnings

KERNELS_ENV = "NNX_KERNELS"
FUSION_ENV = "NNX_FUSION"
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


def fused_layers() -> bool:
    """False when ``NNX_FUSION`` is off (also "0", "false", "no") or the reference
    kernels run; read at every call. Any other value but "on" (or "1", "true",
    "yes") or empty is named in a warning (once) and ignored."""
    if reference_kernels():
        return False
    value = os.environ.get(FUSION_ENV, "").strip().lower()
    if value in ("", "on", "1", "true", "yes"):
        return True
    if value in ("off", "0", "false", "no"):
        return False
    if value not in _warned:
        _warned.add(value)
        warnings.warn(f"{FUSION_ENV}={value!r} is not 'on' or 'off'; fusing layers", stacklevel=2)
    return True
