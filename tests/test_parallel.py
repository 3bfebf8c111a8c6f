"""The batch-parallel kernels: coverage, order, and numbers independent of the thread count."""
import threading

import numpy as np
import pytest
from helpers import assert_close, parallel_hand_offs

from mlp import parallel
from mlp.arch import build_convnet

pytestmark = pytest.mark.numerics


@pytest.fixture
def three_blas_threads(monkeypatch):
    """BLAS on three threads, whatever this machine or OPENBLAS_NUM_THREADS gave it, so
    that holding it to one thread is a visible change even on a one-core machine."""
    if not parallel._blas:
        pytest.skip("threadpoolctl finds no BLAS library to control")
    before = [lib.num_threads for lib in parallel._blas]
    for lib in parallel._blas:
        lib.set_num_threads(3)
    monkeypatch.setattr(parallel, "_BLAS_THREADS", 3)
    assert [lib.num_threads for lib in parallel._blas] == [3] * len(parallel._blas)
    yield
    for lib, n in zip(parallel._blas, before, strict=True):
        lib.set_num_threads(n)


def test_over_blocks_covers_the_batch_in_order(monkeypatch):
    monkeypatch.setattr(parallel, "THREADS", 3)
    assert parallel.over_blocks(lambda lo, hi: (lo, hi), 10, 3) == [(0, 2), (2, 5), (5, 7), (7, 10)]
    assert parallel.over_blocks(lambda lo, hi: (lo, hi), 2, 5) == [(0, 2)]
    assert parallel.over_blocks(lambda lo, hi: (lo, hi), 3, 1) == [(0, 1), (1, 2), (2, 3)]


@pytest.mark.parametrize("n", [1, 2, 7, 64, 128, 1000])
@pytest.mark.parametrize("block", [1, 3, 9, 14, 28, 37, 113, 128, 5000])
def test_blocks_are_even_and_come_in_a_multiple_that_two_or_four_threads_share_equally(n, block):
    bounds = parallel.block_bounds(n, block)
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
    sizes = [hi - lo for lo, hi in bounds]
    assert max(sizes) <= block and max(sizes) - min(sizes) <= 1
    assert len(bounds) == 1 or len(bounds) % parallel.BLOCK_MULTIPLE == 0 or len(bounds) == n
    if len(bounds) % 4 == 0 and n % 4 == 0:       # conv6bn's first conv: 5 blocks of 28 before
        for threads in (2, 4):
            edges = [len(bounds) * i // threads for i in range(threads + 1)]
            assert len({sum(sizes[a:b]) for a, b in zip(edges, edges[1:], strict=False)}) == 1


def test_over_batch_uses_several_threads_for_large_work_only(monkeypatch):
    monkeypatch.setattr(parallel, "THREADS", 2)
    seen = []

    def record(lo, hi):
        seen.append(threading.current_thread().name)
        return hi - lo

    assert sum(parallel.over_batch(record, 100, size=parallel.MIN_PARALLEL_SIZE)) == 100
    assert len(set(seen)) == 2
    seen.clear()
    assert parallel.over_batch(record, 100, size=10) == [100]
    assert seen == [threading.current_thread().name]


def test_single_blas_thread_nests_and_restores_the_thread_count(three_blas_threads):
    with parallel.single_blas_thread():
        with parallel.single_blas_thread():
            assert all(lib.num_threads == 1 for lib in parallel._blas)
        assert all(lib.num_threads == 1 for lib in parallel._blas)   # the outer block still holds
    assert all(lib.num_threads == 3 for lib in parallel._blas)


def test_matmul_equals_numpy(monkeypatch):
    rng = np.random.default_rng(0)
    monkeypatch.setattr(parallel, "THREADS", 2)
    handed_off = parallel_hand_offs(monkeypatch)
    a, b = rng.standard_normal((300, 400)), rng.standard_normal((400, 50))
    # Blocks of rows may take another BLAS kernel than the whole product: equal up to
    # float64 rounding, scaled to the product's magnitude.
    assert_close(parallel.matmul(a, b), a @ b, rtol=1e-13)
    c = rng.standard_normal((300, 200))
    assert_close(parallel.matmul(a.T, c), a.T @ c, rtol=1e-13)      # a strided left operand
    assert handed_off, "the products ran in one block: the blocked path was not tested"


@pytest.mark.parametrize("algorithm", ["im2col", "winograd2", "winograd4"])
@pytest.mark.parametrize("threads", [2, 3])
def test_a_training_step_is_bit_identical_whatever_the_thread_count(monkeypatch, threads, algorithm):
    """Blocks have fixed boundaries and sums over them a fixed order, so the
    number of threads cannot change a single bit of the loss or the gradients,
    whichever algorithm the 3x3 and 5x5 convs run."""
    from mlp.kernels import im2col_tiles, winograd
    rng = np.random.default_rng(0)
    x = rng.standard_normal((37, 3, 16, 16)).astype(np.float32)  # odd batch: uneven blocks
    y = rng.integers(0, 10, 37)
    spec = "conv8x3-pool2-bn-conv16x3-bn-conv16x5-pool2-fc32-bn-fc10"
    monkeypatch.setenv("NNX_CONV_ALGORITHM", algorithm)
    monkeypatch.setattr(winograd, "BLOCK_BYTES", 20_000)
    monkeypatch.setattr(winograd, "MIN_ROWS", 8)

    handed_off = parallel_hand_offs(monkeypatch)

    def step(n):
        monkeypatch.setattr(parallel, "THREADS", n)
        monkeypatch.setattr(parallel, "BLOCK_BYTES", 20_000)  # several blocks per layer
        monkeypatch.setattr(im2col_tiles, "BLOCK_BYTES", 20_000)
        monkeypatch.setattr(parallel, "MIN_PARALLEL_SIZE", 1)
        net = build_convnet(spec, (3, 16, 16), 10, seed=1)
        loss, grads = net.loss(x, y)
        assert list(net.conv_algorithms().values()) == [algorithm, algorithm, algorithm]
        return loss, {k: g.copy() for k, g in grads.items()}, net.scores(x)

    loss_1, grads_1, scores_1 = step(1)
    assert not handed_off                                # one thread: all of it in this one
    loss_n, grads_n, scores_n = step(threads)
    assert len(handed_off) >= threads - 1, "the parallel path did not run"
    assert loss_1 == loss_n
    for name in grads_1:
        assert np.array_equal(grads_1[name], grads_n[name]), name
    assert np.array_equal(scores_1, scores_n)


@pytest.mark.parametrize("value, expected", [("3", 3), ("", 7), (" ", 7)])
def test_nnx_threads_sets_the_thread_count_else_blas_does(monkeypatch, value, expected):
    monkeypatch.setattr(parallel, "_BLAS_THREADS", 7)       # as if BLAS had started 7 threads
    monkeypatch.setenv("NNX_THREADS", value)
    assert parallel._default_threads() == expected


def test_a_bad_nnx_threads_is_named_and_ignored(monkeypatch):
    monkeypatch.setattr(parallel, "_BLAS_THREADS", 7)
    monkeypatch.setenv("NNX_THREADS", "lots")
    with pytest.warns(UserWarning, match="NNX_THREADS='lots'"):
        assert parallel._default_threads() == 7


def test_single_blas_thread_from_several_threads_at_once(three_blas_threads):
    """A Dask worker trains several networks in threads of one process: blocks
    opened and closed in any interleaving leave BLAS as it was."""
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    errors = []

    def first():
        try:
            with parallel.single_blas_thread():
                first_in.set()
                second_in.wait(5)
            first_out.set()
        except Exception as exc:  # noqa: BLE001  reported by the assertion below
            errors.append(exc)

    def second():
        try:
            first_in.wait(5)
            with parallel.single_blas_thread():
                second_in.set()
                first_out.wait(5)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not errors
    assert all(lib.num_threads == 3 for lib in parallel._blas)
