"""Batch-parallel layer kernels: split the batch into chunks and work on them in threads.

Only the matrix products of a convnet run on all cores by themselves (BLAS is
threaded); the im2col copies, the pooling, the batch-norm arithmetic and the
ReLUs run on one. NumPy releases the GIL inside its loops and BLAS calls, so
a few Python threads, each taking whole images of the batch through copy *and*
product, keep every core busy all the time: that is how PyTorch's CPU kernels
work too (OpenMP over the batch). While chunks run, BLAS is held to one thread
so that the chunks' products do not fight over the cores.

The number of threads is the number BLAS was started with (``NNX_THREADS``
overrides it), so a process that limits BLAS (``OPENBLAS_NUM_THREADS=1``, as
sweep workers do) runs serially. Results never depend on it: work that sums
over the batch is cut into blocks whose boundaries are fixed by the sizes
alone, and the blocks' results are added in block order.
"""
from __future__ import annotations

import contextlib
import os
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np  # BLAS must be loaded before threadpoolctl looks for it
from threadpoolctl import ThreadpoolController

# Below this many numbers a layer's work is too small to be worth a thread hand-off.
MIN_PARALLEL_SIZE = 1 << 16

_blas = [lib for lib in ThreadpoolController().lib_controllers if lib.user_api == "blas"]
_BLAS_THREADS = max([lib.num_threads for lib in _blas] or [1])


def _default_threads() -> int:
    env = os.environ.get("NNX_THREADS", "").strip()
    if not env:
        return _BLAS_THREADS
    if not env.isdigit() or int(env) < 1:
        # Read at import, before any command can report it: say so and go on.
        warnings.warn(f"NNX_THREADS={env!r} is not a positive whole number; using {_BLAS_THREADS} "
                      "threads", stacklevel=2)
        return _BLAS_THREADS
    return int(env)


THREADS = _default_threads()
_pool: ThreadPoolExecutor | None = None
_lock = threading.Lock()


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(THREADS, thread_name_prefix="nnx-chunk")
        return _pool


# Work on a few MiB of im2col rows at a time: they stay in cache between the copy
# that writes them and the product that reads them (measured here: 8 images of a
# CIFAR-sized layer ran 1.4-2x faster than the whole batch at once). im2col's budget;
# im2col over tiles and Winograd keep their own (``BLOCK_BYTES`` in their modules;
# bench/bench_blocks.py times any of them).
BLOCK_BYTES = 3 << 20


def block_size(bytes_per_image: int, budget: int | None = None) -> int:
    """Images per block so that a block's scratch is about ``budget`` bytes (default
    ``BLOCK_BYTES``)."""
    return max(1, (BLOCK_BYTES if budget is None else budget) // max(1, bytes_per_image))


# Blocks come in a multiple of this many (where there are more than one, and images
# enough), as even as they come: 2 or 4 threads then get equal shares of a batch.
# Measured here: conv6bn's first conv ran 5 blocks of 28 images, one thread taking 72
# of the 128 images and the other 56, and its Winograd layers 10 blocks of 14
# (70 against 58 images).
BLOCK_MULTIPLE = 4


def block_bounds(n: int, block: int) -> list[tuple[int, int]]:
    """The blocks (lo, hi) of at most ``block`` images that cover range(n): the fewest,
    rounded up to a multiple of BLOCK_MULTIPLE (at most n of them), sized as evenly as
    they come. A function of n and block only, never of the thread count."""
    count = -(-n // block)
    if count > 1:
        count = min(n, -(-count // BLOCK_MULTIPLE) * BLOCK_MULTIPLE)
    return [(n * i // count, n * (i + 1) // count) for i in range(count)]


def over_blocks(fn: Callable[[int, int], object], n: int, block: int) -> list:
    """``[fn(lo, hi) for (lo, hi) in block_bounds(n, block)]``.

    The blocks are shared out among the threads, each taking a contiguous run;
    the results come back in block order. Block boundaries do not depend on the
    number of threads, so neither does any sum a caller makes over the results.
    BLAS runs single-threaded inside blocks, in parallel or not, for the same
    reason. ``fn`` must write only to its own rows of shared outputs.
    """
    return share_out(fn, block_bounds(n, block))


def share_out(fn: Callable[[int, int], object], blocks: list[tuple[int, int]]) -> list:
    """``[fn(lo, hi) for (lo, hi) in blocks]``, contiguous runs of the blocks in threads
    (as ``over_blocks``, for callers that cut their own blocks)."""

    def run(group):
        return [fn(lo, hi) for lo, hi in group]

    with single_blas_thread():
        if THREADS == 1 or len(blocks) == 1:
            return run(blocks)
        edges = [len(blocks) * i // THREADS for i in range(THREADS + 1)]
        groups = [blocks[a:b] for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]
        futures = [_executor().submit(run, group) for group in groups[1:]]
        results = run(groups[0])
        for future in futures:
            results += future.result()
        return results


# Rows per block of a large matrix product (a fixed number, so that the split --
# and with it every bit of the product -- does not depend on the thread count:
# OpenBLAS takes different kernels for different shapes).
MATMUL_BLOCK_ROWS = 64


def matmul(a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """a @ b for 2-D arrays (into ``out`` if given); a large product is computed in
    blocks of rows shared out among the threads, a small one in a single call."""
    if a.size + a.shape[0] * b.shape[1] < MIN_PARALLEL_SIZE:
        return np.matmul(a, b, out=out)
    if out is None:
        out = np.empty((a.shape[0], b.shape[1]), np.result_type(a, b))

    def rows(lo, hi):
        np.matmul(a[lo:hi], b, out=out[lo:hi])

    n = a.shape[0]
    share_out(rows, [(lo, min(lo + MATMUL_BLOCK_ROWS, n)) for lo in range(0, n, MATMUL_BLOCK_ROWS)])
    return out


def over_batch(fn: Callable[[int, int], object], n: int, size: int = MIN_PARALLEL_SIZE) -> list:
    """As ``over_blocks`` with one block per thread, for elementwise work of ``size``
    numbers in all; small work (and batch 1) runs as one block in this thread."""
    if THREADS == 1 or n < 2 or size < MIN_PARALLEL_SIZE:
        return [fn(0, n)]
    k = min(n, THREADS)
    return share_out(fn, [(n * i // k, n * (i + 1) // k) for i in range(k)])


_held = 0            # threads inside single_blas_thread blocks, nested blocks counted each
_held_lock = threading.Lock()
_held_before: list[int] = []


class single_blas_thread(contextlib.ContextDecorator):
    """Hold BLAS to one thread inside the block; nested blocks cost a counter only.

    A network's forward and backward, and the whole training loop, run inside
    one: the layers share the batch out among threads themselves, and a single
    threaded BLAS call is enough to leave OpenBLAS's workers spinning for a
    while after it, taking the cores from the chunks (measured here: conv6bn's
    step took 256 ms with them, 157 ms without). BLAS's thread count belongs to
    the whole process, so the count of blocks is too: the first block in sets
    it, the last one out restores it, whichever threads they run in (a Dask
    worker trains several networks in threads of one process). threadpoolctl
    lets only the first thread that set OpenBLAS's count set it again; from
    other threads the count stays as it is (the Dask test finds the same numbers).
    """

    def __enter__(self):
        # The count is process-wide, not per instance, so one instance may serve
        # as a decorator for every call.
        global _held
        with _held_lock:
            _held += 1
            if _held == 1 and _BLAS_THREADS > 1:
                _held_before[:] = [lib.num_threads for lib in _blas]
                for lib in _blas:
                    lib.set_num_threads(1)
        return self

    def __exit__(self, *exc):
        global _held
        with _held_lock:
            _held -= 1
            if _held == 0 and _BLAS_THREADS > 1:
                for lib, n in zip(_blas, _held_before, strict=True):
                    lib.set_num_threads(n)


_shard = threading.local()


def across_shards(part: np.ndarray, count: int, combine=None) -> tuple[np.ndarray, int]:
    """Inside a sharded training step (mlp/shards.py), every shard's ``part`` of the batch
    combined, in shard order, and the sum of ``count``: ``combine(parts, counts)`` ->
    (result, count), by default the parts' sum. Elsewhere the same of this part alone.
    A batch norm's statistics are over the whole batch: this is where a shard's part
    meets the others'."""
    peer = getattr(_shard, "peer", None)
    if peer is None:
        return combine([part], [count]) if combine else (part, count)
    return peer.combine(part, count, combine)


def sum_in_order(parts: list) -> np.ndarray:
    """Arrays (the blocks' fresh results) summed in list order, into the first of them:
    a fixed order, so the same numbers every run and whatever the thread count."""
    total = parts[0]
    for part in parts[1:]:
        total += part
    return total
