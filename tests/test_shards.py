"""Training steps over shards of the batch (mlp/shards.py): the same numbers in worker
processes as in threads, the unsharded step's numbers to rounding, batch norms over the
whole batch, and failures reported, not waited for."""
import os
import signal
import time

import numpy as np
import pytest
from helpers import assert_close

from mlp import parallel, shards
from mlp.arch import build_convnet
from mlp.network import build_mlp
from mlp.optim import SGD
from mlp.shards import ShardedStep, ShardFailure, shard_bounds, shard_count, shardable
from mlp.train import Trainer

pytestmark = pytest.mark.numerics

SHAPE = (3, 8, 8)
BN_NET = "conv6x3-pool2-bn-conv8x3-bn-pool2-fc5"       # fused conv-pool, bn-relu, a lone bn
PLAIN_NET = "conv6x3-pool2-conv8x3-pool2-fc5"
can_fork = pytest.mark.skipif("fork" not in __import__("multiprocessing").get_all_start_methods(),
                              reason="worker processes are forked")


def data(n, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, *SHAPE)).astype(dtype), rng.integers(0, 5, n)


def sharded_step(monkeypatch, spec, X, y, threads, dtype=np.float64, steps=2):
    """Loss, scores, gradients and buffers after ``steps`` sharded SGD steps of a fresh net
    (same seed), the shards in processes (threads >= 2) or in threads (threads = 1)."""
    monkeypatch.setattr(parallel, "THREADS", threads)
    net = build_convnet(spec, SHAPE, 5, seed=3, dtype=dtype)
    net.reg = 1e-3
    opt = SGD(0.1)
    with ShardedStep(net, len(X), X.shape[1:], 2) as step:
        assert step.in_processes == (threads >= 2)
        with parallel.single_blas_thread():
            for _ in range(steps):
                loss, scores, grads = step.loss_and_scores(X, y)
                grads = {k: v.copy() for k, v in grads.items()}
                opt.step(net.params, grads)
    return loss, scores.copy(), grads, {k: v.copy() for k, v in net.buffers.items()}, net


@can_fork
@pytest.mark.parametrize("spec", [BN_NET, PLAIN_NET])
@pytest.mark.parametrize("n", [10, 11])      # shards of 5 and 5, and of 5 and 6
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_processes_and_threads_give_the_same_numbers_bit_for_bit(monkeypatch, spec, n, dtype):
    X, y = data(n, dtype)
    in_processes = sharded_step(monkeypatch, spec, X, y, 2, dtype)
    in_threads = sharded_step(monkeypatch, spec, X, y, 1, dtype)
    assert in_processes[0] == in_threads[0]
    assert np.array_equal(in_processes[1], in_threads[1])
    for name in in_threads[2]:
        assert np.array_equal(in_processes[2][name], in_threads[2][name]), name
    for name in in_threads[3]:
        assert np.array_equal(in_processes[3][name], in_threads[3][name]), name


@pytest.mark.parametrize("spec", [BN_NET, PLAIN_NET])
@pytest.mark.parametrize("threads", [1, 2])
def test_a_sharded_step_is_the_whole_batch_step_to_rounding(monkeypatch, spec, threads):
    """Float64: loss, scores, every gradient (batch norms' included) and the running
    statistics of one step equal the unsharded step's to 1e-10 of each array's size."""
    if threads > 1 and "fork" not in __import__("multiprocessing").get_all_start_methods():
        pytest.skip("worker processes are forked")
    X, y = data(11, np.float64)
    loss, scores, grads, buffers, _ = sharded_step(monkeypatch, spec, X, y, threads, steps=1)
    net = build_convnet(spec, SHAPE, 5, seed=3, dtype=np.float64)
    net.reg = 1e-3
    expected_loss, expected_scores, expected = net.loss_and_scores(X, y, train=True)
    assert loss == pytest.approx(expected_loss, rel=1e-12)
    assert_close(scores, expected_scores, 1e-10)
    largest = max(float(np.abs(g).max()) for g in expected.values())
    for name, grad in expected.items():
        # a conv bias before a batch norm has no gradient: its entries are rounding noise
        assert_close(grads[name], grad, 1e-10, name, scale=largest if name.endswith(".b") else 0.0)
    for name, buffer in net.buffers.items():
        assert_close(buffers[name], buffer, 1e-10, name)


def test_batch_norm_statistics_are_the_whole_batchs_not_a_shards(monkeypatch):
    """Two shards with different data: normalised over each shard alone, the scores would
    differ from the whole batch's far beyond rounding."""
    X, y = data(12, np.float64)
    X[6:] = 3 * X[6:] + 2
    _, scores, _, _, _ = sharded_step(monkeypatch, BN_NET, X, y, 1, steps=1)
    net = build_convnet(BN_NET, SHAPE, 5, seed=3, dtype=np.float64)
    assert_close(scores, net.forward(X, train=True), 1e-10)
    alone = np.concatenate([build_convnet(BN_NET, SHAPE, 5, seed=3, dtype=np.float64).forward(part, True)
                            for part in (X[:6], X[6:])])
    assert np.abs(alone - scores).max() > 1e-3


class Watch:
    """A callback that notes, each epoch, whether its trainer's shards run in processes."""

    def __init__(self, trainer):
        self.trainer, self.seen = trainer, []

    def on_epoch_end(self, record):
        self.seen.append(self.trainer.sharded.in_processes)

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


@can_fork
def test_training_in_shards_gives_the_same_run_in_processes_and_in_threads(monkeypatch):
    X, y = data(40, np.float32, seed=1)
    runs = []
    for threads in (2, 1):
        monkeypatch.setattr(parallel, "THREADS", threads)
        net = build_convnet(BN_NET, SHAPE, 5, seed=0, dtype=np.float32)
        trainer = Trainer(net, SGD(0.05), X, y, X_val=X[:8], y_val=y[:8], batch_size=16)
        watch = Watch(trainer)
        trainer.train(2, callback=watch)
        seen = watch.seen
        assert seen == [threads >= 2] * 2 and trainer.sharded is None    # closed after the run
        runs.append((trainer.result.history, {k: v.copy() for k, v in net.params.items()}))
    (history_p, params_p), (history_t, params_t) = runs
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in history_p] == \
        [{k: v for k, v in r.items() if k != "seconds"} for r in history_t]
    for name in params_t:
        assert np.array_equal(params_p[name], params_t[name]), name


def test_nnx_shards_1_trains_the_whole_batch_here(monkeypatch):
    monkeypatch.setenv("NNX_SHARDS", "1")
    assert shard_count() == 1
    net = build_convnet(PLAIN_NET, SHAPE, 5, seed=0, dtype=np.float32)
    assert not shardable(net, shard_count())
    monkeypatch.setenv("NNX_SHARDS", "two")
    with pytest.warns(UserWarning, match="NNX_SHARDS='two' is not a positive whole number"):
        assert shard_count() == shards.DEFAULT_SHARDS
    monkeypatch.delenv("NNX_SHARDS")
    assert shard_count() == 2 and shardable(net, 2)


def test_what_trains_unsharded(monkeypatch):
    assert not shardable(build_mlp(2, [10], 3), 2)                       # no conv layer
    assert not shardable(build_convnet("conv4x3-dropout0.5-fc5", SHAPE, 5), 2)
    monkeypatch.setenv("NNX_KERNELS", "reference")
    assert not shardable(build_convnet(PLAIN_NET, SHAPE, 5), 2)


def test_shards_are_even_and_cover_the_batch():
    assert shard_bounds(11, 2) == [(0, 5), (5, 11)]
    assert shard_bounds(128, 2) == [(0, 64), (64, 128)]
    assert shard_bounds(7, 3) == [(0, 2), (2, 4), (4, 7)]


def test_a_batch_too_small_to_shard_trains_whole(monkeypatch):
    """Three examples make a shard of one, too few for a batch norm: the step is the
    whole batch's, here."""
    monkeypatch.setattr(parallel, "THREADS", 1)
    X, y = data(3, np.float64)
    net = build_convnet(BN_NET, SHAPE, 5, seed=3, dtype=np.float64)
    with ShardedStep(net, 16, X.shape[1:], 2) as step:
        loss, _, _ = step.loss_and_scores(X, y)
        assert not step.workers
    assert loss == build_convnet(BN_NET, SHAPE, 5, seed=3, dtype=np.float64).loss(X, y)[0]


def test_examples_of_another_shape_are_refused(monkeypatch):
    monkeypatch.setattr(parallel, "THREADS", 1)
    net = build_convnet(PLAIN_NET, SHAPE, 5, seed=3)
    with ShardedStep(net, 8, SHAPE, 2) as step, pytest.raises(ValueError, match="examples of shape"):
        step.loss_and_scores(np.zeros((8, 3, 9, 9), np.float32), np.zeros(8, int))


@can_fork
def test_a_worker_that_dies_is_reported_not_waited_for(monkeypatch):
    monkeypatch.setattr(parallel, "THREADS", 2)
    X, y = data(10, np.float32)
    net = build_convnet(BN_NET, SHAPE, 5, seed=3)
    with ShardedStep(net, 10, X.shape[1:], 2) as step:
        with parallel.single_blas_thread():
            step.loss_and_scores(X, y)
            os.kill(step.workers[0].handle.pid, signal.SIGKILL)
            started = time.monotonic()
            with pytest.raises(ShardFailure, match="worker"):
                step.loss_and_scores(X, y)
    assert time.monotonic() - started < 30


@pytest.mark.parametrize("threads", [1, 2])
def test_a_workers_error_is_raised_here_with_its_message(monkeypatch, threads):
    """A label out of range in the worker's shard only: the worker's loss fails, and the
    main process says so (after the batch norms' sums of the backward, where it waits)."""
    if threads > 1 and "fork" not in __import__("multiprocessing").get_all_start_methods():
        pytest.skip("worker processes are forked")
    monkeypatch.setattr(parallel, "THREADS", threads)
    X, y = data(10, np.float32)
    y[7] = 99
    for spec in (PLAIN_NET, BN_NET):
        net = build_convnet(spec, SHAPE, 5, seed=3)
        with ShardedStep(net, 10, X.shape[1:], 2) as step, parallel.single_blas_thread():
            with pytest.raises(ShardFailure, match="IndexError"):
                step.loss_and_scores(X, y)


def test_moments_of_parts_combine_into_the_whole_batchs():
    """Chan, Golub and LeVeque's pairwise formula: the parts' means and squared deviations
    give the whole's, in float64 to rounding; a single part comes back as it is."""
    from mlp.kernels.batchnorm import combine_moments
    rng = np.random.default_rng(5)
    parts = [rng.normal(3.0, 2.0, (n, 4)) for n in (7, 12, 5)]
    moments = [np.stack([p.mean(0), ((p - p.mean(0)) ** 2).sum(0)]) for p in parts]
    combined, m = combine_moments(moments, [len(p) for p in parts])
    whole = np.concatenate(parts)
    assert m == len(whole)
    assert_close(combined[0], whole.mean(0), 1e-14)
    assert_close(combined[1], ((whole - whole.mean(0)) ** 2).sum(0), 1e-13)
    alone, count = combine_moments(moments[:1], [7])
    assert alone is moments[0] and count == 7
