"""Fused training steps against the same layers apart: one pair of layers at a time.

Forward + backward at batch 128, float32, on the threads nnx uses (BLAS's count or
NNX_THREADS), fused and apart timed in turns; medians and the fastest turn of each.
The pairs: conv + 2x2 max-pool on conv6bn's and wide5x5's pooled convs (each conv
forced to the algorithm named), batch norm + ReLU and + GELU on conv6bn- and
airbench-sized activations. A conv whose blocks are under
``MIN_FUSED_BLOCK_BYTES`` is still timed fused here (a network would not fuse it:
its row says so). Whole training steps: ``bench_conv.py --unfused``.

    python bench/bench_fusion.py [--reps 25]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mlp import parallel  # noqa: E402
from mlp._allocator import keep_freed_arrays_in_the_heap  # noqa: E402
from mlp.conv import BatchNorm, Conv2D, MaxPool2D  # noqa: E402
from mlp.kernels import conv as conv_kernels  # noqa: E402
from mlp.layers import GELU, ReLU  # noqa: E402

BATCH = 128
CONVS = [  # (in channels, filters, size, kernel, algorithm)
    (3, 32, 32, 3, "im2col"), (32, 64, 16, 3, "winograd4"), (64, 128, 8, 3, "winograd4"),
    (3, 32, 32, 5, "im2col"), (32, 64, 16, 5, "winograd2"), (64, 128, 8, 5, "winograd2"),
]
NORMS = [(32, 16), (64, 8), (64, 16), (256, 8)]   # (channels, size)


def turns(contenders: dict, reps: int) -> dict:
    """{name: (median, fastest) ms} of each contender, timed in turns after two warm-ups."""
    for _ in range(2):
        for run in contenders.values():
            run()
    times = {name: [] for name in contenders}
    for _ in range(reps):
        for name, run in contenders.items():
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    return {name: (1e3 * float(np.median(t)), 1e3 * min(t)) for name, t in times.items()}


def report(label: str, result: dict, note: str = "") -> None:
    (fused, fused_min), (apart, apart_min) = result["fused"], result["apart"]
    print(f"{label:<46} fused {fused:6.2f} ms (fastest {fused_min:6.2f})  apart {apart:6.2f} ms "
          f"(fastest {apart_min:6.2f})  gain {apart / fused:4.2f}x{note}", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=25, help="turns of each contender")
    args = parser.parse_args(argv)
    keep_freed_arrays_in_the_heap()   # as training does
    rng = np.random.default_rng(0)
    print(f"batch {BATCH}, float32, forward + backward, {parallel.THREADS} thread(s); medians of "
          f"{args.reps} turns")
    with parallel.single_blas_thread():
        for C, F, H, K, algorithm in CONVS:
            x = rng.standard_normal((BATCH, C, H, H)).astype(np.float32)
            conv = Conv2D(C, F, K, padding=K // 2, rng=rng, input_grad=C != 3)
            conv.algorithm = algorithm
            pool = MaxPool2D(2)
            dout = rng.standard_normal((BATCH, F, H // 2, H // 2)).astype(np.float32)
            fuses = conv_kernels.fuses(algorithm, x.shape, conv.params["W"].shape, 1, K // 2,
                                       conv.input_grad, np.float32)
            result = turns({
                "fused": lambda conv=conv, x=x, pool=pool, dout=dout: (
                    conv.forward_fused(x, pool), conv.backward_fused(dout)),
                "apart": lambda conv=conv, x=x, pool=pool, dout=dout: (
                    pool.forward(conv.forward(x, True), True), conv.backward(pool.backward(dout))),
            }, args.reps)
            report(f"conv {C}->{F} {K}x{K} at {H}x{H} {algorithm} + pool", result,
                   "" if fuses else "  (blocks too small: a network runs it apart)")
        for C, H in NORMS:
            x = rng.standard_normal((BATCH, H, H, C)).astype(np.float32).transpose(0, 3, 1, 2)
            dout = rng.standard_normal((BATCH, H, H, C)).astype(np.float32).transpose(0, 3, 1, 2)
            bn = BatchNorm(C)
            for activation in (ReLU(), GELU()):
                result = turns({
                    "fused": lambda bn=bn, x=x, a=activation, dout=dout: (
                        bn.forward_fused(x, a), bn.backward_fused(dout)),
                    "apart": lambda bn=bn, x=x, a=activation, dout=dout: (
                        a.forward(bn.forward(x, True), True), bn.backward(a.backward(dout))),
                }, args.reps)
                report(f"batchnorm + {activation.kind} {C}x{H}x{H} ({x.nbytes / 2**20:.1f} MiB)", result)


if __name__ == "__main__":
    main()
