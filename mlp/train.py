"""The training loop: minibatch or full-batch descent with per-epoch history.

It knows nothing about layers: it asks the network for (loss, grads) and the
optimizer for a step. Every source of randomness is derived from ``seed`` and
the epoch number, so epoch k is the same whether or not the run was resumed.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from mlp._allocator import keep_freed_arrays_in_the_heap
from mlp.network import Network
from mlp.optim import Optimizer, Schedule
from mlp.parallel import single_blas_thread

HISTORY_COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds")


class Callback:
    """Hooks the loop calls; override what you need. ``on_epoch_end`` may return
    True to stop training after that epoch."""

    def on_train_begin(self, epochs: int, batches_per_epoch: int, start_epoch: int) -> None:
        pass

    def on_batch_end(self, epoch: int, batch: int, batches: int, samples: int, loss: float) -> None:
        pass

    def on_epoch_end(self, record: dict) -> bool | None:
        pass

    def on_plan(self, epochs: int) -> None:
        """The run's planned number of epochs changed (a time budget re-planned it)."""


@dataclass
class TrainResult:
    """What training produced so far; pass it back to ``train`` to continue a run.

    status: "ok", or "diverged" when the loss became NaN or infinite.
    ``best_params`` is the snapshot early stopping restores (None without it).
    """

    history: list[dict] = field(default_factory=list)
    status: str = "ok"
    stopped_early: bool = False
    best_epoch: int | None = None
    best_val_acc: float = -1.0
    best_params: dict[str, np.ndarray] | None = None
    iterations: int = 0

    @property
    def epochs_run(self) -> int:
        return len(self.history)


def epoch_rng(seed: int, epoch: int, stream: int) -> np.random.Generator:
    """The generator for one epoch's shuffle (stream 0), augmentation (stream 1) or
    stochastic layers (stream 2 and up)."""
    return np.random.default_rng([seed, epoch, stream])


@np.errstate(over="ignore", invalid="ignore")   # a diverging loss is detected and reported
@single_blas_thread()   # held once for the run, not toggled at every step
def train(net: Network, optimizer: Optimizer, X: np.ndarray, y: np.ndarray, *,
          X_val: np.ndarray | None = None, y_val: np.ndarray | None = None,
          epochs: int | None = 10, iterations: int | None = None, batch_size: int = 0,
          schedule: Schedule | None = None, seed: int = 0, callback: Callback | None = None,
          patience: int | None = None, augment: Callable | None = None,
          eval_batch_size: int = 1024, state: TrainResult | None = None,
          max_epochs: int | None = None) -> TrainResult:
    """Train ``net`` in place. X: (N, ...), y: (N,); validation arrays alike.

    batch_size 0 (or >= N) is full-batch gradient descent. ``iterations``, when
    given, overrides ``epochs`` (the last epoch may be partial). ``patience``
    stops after that many epochs without a better validation accuracy and
    restores the best parameters. ``augment(xb, rng) -> xb`` transforms each
    training batch. ``state``, a TrainResult from an interrupted run (with the
    network and optimizer restored alongside), continues it where it stopped,
    with the numbers an uninterrupted run would have produced; it is updated in
    place and returned. ``max_epochs`` (default ``epochs``) lets a callback that
    re-plans the run (a time budget) take it past ``epochs``; a callback then ends it.
    """
    keep_freed_arrays_in_the_heap()   # once per process; NNX_MALLOC_TUNING=0 turns it off
    n = len(X)
    bs = n if batch_size <= 0 or batch_size >= n else batch_size
    batches_per_epoch = math.ceil(n / bs)
    if iterations is not None:
        epochs = math.ceil(iterations / batches_per_epoch)
        last_epoch, total_iterations = epochs, iterations
    else:
        last_epoch = max(epochs, max_epochs or 0)
        total_iterations = last_epoch * batches_per_epoch
    callback = callback or Callback()
    result = state if state is not None else TrainResult()
    start_epoch = result.epochs_run
    callback.on_train_begin(epochs, batches_per_epoch, start_epoch)
    X = X.astype(net.dtype, copy=False)
    params = net.params
    validate = X_val is not None and len(X_val) > 0

    for epoch in range(start_epoch, last_epoch):
        started = time.perf_counter()
        order = None if bs == n else epoch_rng(seed, epoch, 0).permutation(n)
        aug_rng = epoch_rng(seed, epoch, 1) if augment else None
        net.reseed(lambda i, e=epoch: epoch_rng(seed, e, 2 + i))
        loss_sum, correct, seen = 0.0, 0, 0
        for b in range(batches_per_epoch):
            if result.iterations >= total_iterations:
                break
            if order is None:
                xb, yb = X, y
            else:
                idx = order[b * bs:(b + 1) * bs]
                xb, yb = X[idx], y[idx]
            if augment:
                xb = augment(xb, aug_rng)
            if schedule is not None:
                optimizer.lr = schedule(epoch + b / batches_per_epoch)
            loss, scores, grads = net.loss_and_scores(xb, yb, train=True)
            if not math.isfinite(loss):
                result.status = "diverged"
                break
            optimizer.step(params, grads)
            result.iterations += 1
            loss_sum += loss * len(yb)
            correct += int(np.count_nonzero(scores.argmax(axis=1) == yb))
            seen += len(yb)
            callback.on_batch_end(epoch, b, batches_per_epoch, len(yb), loss)
        if result.status == "diverged" or seen == 0:
            break
        record = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_acc": correct / seen,
                  "val_loss": math.nan, "val_acc": math.nan, "lr": optimizer.lr,
                  "seconds": 0.0}
        if validate:
            record["val_loss"], record["val_acc"] = net.evaluate(X_val, y_val, eval_batch_size)
            if not math.isfinite(record["val_loss"]):
                result.status = "diverged"
        record["seconds"] = time.perf_counter() - started
        result.history.append(record)
        if result.status == "diverged":
            callback.on_epoch_end(record)
            break
        out_of_patience = False
        if patience is not None and validate:
            if record["val_acc"] > result.best_val_acc:
                result.best_val_acc, result.best_epoch = record["val_acc"], epoch + 1
                result.best_params = {k: v.copy() for k, v in params.items()}
            out_of_patience = epoch + 1 - result.best_epoch >= patience
        if callback.on_epoch_end(record) or out_of_patience:
            result.stopped_early = True
            break
    if result.stopped_early and result.best_params is not None:
        for name, value in result.best_params.items():
            params[name][...] = value
    return result


class Callbacks(Callback):
    """Several callbacks as one; training stops when any asks to."""

    def __init__(self, *callbacks: Callback | None):
        self.callbacks = [c for c in callbacks if c is not None]

    def on_train_begin(self, epochs, batches_per_epoch, start_epoch):
        for c in self.callbacks:
            c.on_train_begin(epochs, batches_per_epoch, start_epoch)

    def on_batch_end(self, epoch, batch, batches, samples, loss):
        for c in self.callbacks:
            c.on_batch_end(epoch, batch, batches, samples, loss)

    def on_epoch_end(self, record):
        return any([bool(c.on_epoch_end(record)) for c in self.callbacks])

    def on_plan(self, epochs):
        for c in self.callbacks:
            c.on_plan(epochs)
