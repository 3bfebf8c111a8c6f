"""Block budgets of the conv kernels, timed as training runs them: whole sharded steps.

im2col, im2col over 2x2 tiles (``im2col2``) and Winograd go through the batch a
block of images at a time, about a budget of bytes per block (of im2col rows:
``parallel.BLOCK_BYTES`` for im2col, ``im2col_tiles.BLOCK_BYTES`` for tiles; of
transformed tiles: ``winograd.BLOCK_BYTES``), so that a block's copies and the
products that read them meet in cache. The best budget
depends on the CPU's caches and on what else runs beside it (in training, a second
shard in another process), so this times whole training steps at batch 128 in
shards, as ``nnx train`` and ``bench_conv.py`` run them, one network per budget, all
in turns; the first budget is the reference. The conv algorithms are chosen once,
by the first network, and shared (a budget is compared on the same algorithms), or
with ``--own-choice`` by each network under its own budget, as a run with that
budget would choose them (``NNX_CONV_ALGORITHM`` forces them for all). Compare in both
orders (``--sizes 3072,1536`` and ``--sizes 1536,3072``): with identical budgets, the
networks made later came out up to 8 % faster in some runs here.

    python bench/bench_blocks.py [--kernel tiles|im2col|winograd] [--sizes 3072,1536] [--own-choice]
                                 [--nets convnetjs cs231n-3layer] [--reps 11]
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.bench_conv import BATCH, CLASSES, SHAPE, SPECS, close, interleaved, machine, nnx_step  # noqa: E402
from mlp import parallel  # noqa: E402
from mlp._allocator import keep_freed_arrays_in_the_heap  # noqa: E402
from mlp.arch import resolve_arch  # noqa: E402
from mlp.kernels import conv as conv_kernels  # noqa: E402
from mlp.kernels import im2col_tiles, winograd  # noqa: E402

# the module whose BLOCK_BYTES each kernel's blocks follow
BUDGETS = {"im2col": parallel, "tiles": im2col_tiles, "winograd": winograd}


def with_budget(step, module, size: int):
    """``step`` with ``module.BLOCK_BYTES`` = size here (a shard's worker, forked at the
    step's first call, keeps the value it was forked with)."""
    def run():
        module.BLOCK_BYTES = size
        step()
    run.sharded = step.sharded
    return run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernel", choices=sorted(BUDGETS), default="tiles")
    parser.add_argument("--sizes", default="3072,1536", help="budgets in KiB, the first the reference")
    parser.add_argument("--nets", nargs="*", default=["convnetjs", "cs231n-3layer"],
                        help="presets, bench_conv.SPECS names (wide5x5) or specs")
    parser.add_argument("--reps", type=int, default=11)
    parser.add_argument("--own-choice", action="store_true", help="each budget's network chooses its "
                        "conv algorithms itself")
    args = parser.parse_args(argv)
    keep_freed_arrays_in_the_heap()   # as training does
    module = BUDGETS[args.kernel]
    sizes = [int(s) << 10 for s in args.sizes.split(",")]
    rng = np.random.default_rng(0)
    X = rng.standard_normal((BATCH, *SHAPE)).astype(np.float32)
    y = rng.integers(0, CLASSES, BATCH)
    print(machine())
    print(f"{args.kernel} block budget; whole sharded training steps, batch {BATCH}, float32, in turns, "
          f"median of {args.reps} x 3 steps; ratio = this budget's time / the first's (< 1: faster)")
    default = module.BLOCK_BYTES
    for name in args.nets:
        spec = resolve_arch(SPECS.get(name, name))
        steps, nets = {}, []
        try:
            for i, size in enumerate(sizes):
                module.BLOCK_BYTES = size
                if args.own_choice:
                    conv_kernels._chosen.clear()    # measured again, under this budget
                net, step = nnx_step(spec, X, y)
                step()                  # chooses the algorithms (the first network) and forks
                steps["nnx" if i == 0 else i] = with_budget(step, module, size)
                nets.append(net)
            medians, ratios, turns = interleaved(steps, 1, args.reps, 3)
        finally:
            module.BLOCK_BYTES = default
            for step in steps.values():
                close(step)
        algorithms = [",".join(net.conv_algorithms().values()) for net in nets]
        print(f"{name}: {sizes[0] >> 10} KiB ({algorithms[0]}) {medians['nnx'] * 1e3:.1f} ms; " + "; ".join(
            f"{sizes[i] >> 10} KiB ({algorithms[i]}) {medians[i] * 1e3:.1f} ms ({ratios[i]:.3f}x, faster in "
            f"{np.sum(turns[i] < 1)} of {len(turns[i])} turns)" for i in range(1, len(sizes))), flush=True)


if __name__ == "__main__":
    main()
