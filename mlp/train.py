"""The training loop, in the shape of the cs231n Solver: a ``Trainer`` holds the
network, the optimizer, the data and the plan; ``run_epoch`` makes one pass over
the training set; ``train`` runs epochs until the plan is done or a callback
decides otherwise.

It knows nothing about layers: it asks the network for (loss, grads) and the
optimizer for a step. Callbacks watch (progress bars, checkpoints) and decide
(stop early, re-plan the run to a time budget) by *returning* a ``Decision``
from ``on_epoch_end``; the loop carries decisions out and tells every callback
about a new plan. Every source of randomness is derived from ``seed`` and the
epoch number, so epoch k is the same whether or not the run was resumed.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from mlp._allocator import keep_freed_arrays_in_the_heap
from mlp.history import HISTORY_COLUMNS  # noqa: F401  the record's fields, named here as ever
from mlp.network import Network
from mlp.optim import Optimizer, Schedule
from mlp.parallel import single_blas_thread
from mlp.shards import ShardedStep, shard_count, shardable


@dataclass(frozen=True)
class Decision:
    """What a callback wants after an epoch: ``stop`` training, and/or a new ``plan``
    (the total number of epochs the run should have; the schedule follows it)."""

    stop: bool = False
    plan: int | None = None


STOP = Decision(stop=True)


class Callback:
    """Hooks the loop calls; override what you need. ``on_epoch_end`` may return a
    Decision (True counts as ``STOP``)."""

    def on_train_begin(self, epochs: int, batches_per_epoch: int, start_epoch: int) -> None:
        pass

    def on_batch_end(self, epoch: int, batch: int, batches: int, samples: int, loss: float) -> None:
        pass

    def on_updates_end(self, epoch: int) -> None:
        """The epoch's last update is done; the epoch is evaluated next."""

    def on_epoch_end(self, record: dict) -> Decision | bool | None:
        pass

    def on_plan(self, epochs: int) -> None:
        """The run's planned number of epochs changed (a callback re-planned it)."""


@dataclass
class TrainResult:
    """What training produced so far; pass it back to ``train`` to continue a run.

    ``history``: one record (a dict) per epoch; a list here, a ``History`` (the same
    records as columns) for a trial a stack trained without callbacks.
    status: "ok", or "diverged" when the loss ran away (``is_runaway``).
    ``snapshots``: (epoch, copies of the parameters) every ``snapshot_every``
    epochs, epoch 0 being the initial network (for animations).
    ``best_*`` follow the epoch of highest validation accuracy (the first on
    ties); ``best_params`` is the snapshot early stopping restores (None without it).
    """

    history: list[dict] = field(default_factory=list)
    status: str = "ok"
    stopped_early: bool = False
    best_epoch: int | None = None
    best_val_acc: float = -1.0
    best_val_loss: float = math.nan
    best_params: dict[str, np.ndarray] | None = None
    iterations: int = 0
    first_loss: float | None = None     # the first batch's, for ``is_runaway``
    snapshots: list[tuple[int, dict[str, np.ndarray]]] = field(default_factory=list)
    average: dict[str, np.ndarray] | None = None      # ``Lookahead``'s moving average

    @property
    def epochs_run(self) -> int:
        return len(self.history)

    def note_validation(self, record: dict) -> bool:
        """Track the best epoch; True when ``record`` is a new best."""
        if not record["val_acc"] > self.best_val_acc:    # NaN (no validation) is never better
            return False
        self.best_epoch, self.best_val_acc = record["epoch"], record["val_acc"]
        self.best_val_loss = record["val_loss"]
        return True


# A loss this many times the first batch's has run away, even while finite (an
# lr far too large on the spiral grows it a hundredfold and then oscillates).
RUNAWAY_FACTOR = 100.0


def is_runaway(loss: float, first_loss: float) -> bool:
    """Divergence: a loss that is NaN or infinite, or more than RUNAWAY_FACTOR times
    the run's first training loss (a run starts near its worst loss: log(C) for softmax)."""
    return not math.isfinite(loss) or loss > RUNAWAY_FACTOR * max(first_loss, 1e-12)


def epoch_rng(seed: int, epoch: int, stream: int) -> np.random.Generator:
    """The generator for one epoch's shuffle (stream 0), augmentation (stream 1) or
    stochastic layers (stream 2 and up)."""
    return np.random.default_rng([seed, epoch, stream])


class EarlyStopping(Callback):
    """Stop after ``patience`` epochs without a better validation accuracy; the
    trainer then restores the parameters of the best epoch (kept in the result)."""

    def __init__(self, patience: int, result: TrainResult, params: dict[str, np.ndarray]):
        self.patience, self.result, self.params = patience, result, params

    def on_epoch_end(self, record):
        if record["epoch"] == self.result.best_epoch:
            self.result.best_params = {k: v.copy() for k, v in self.params.items()}
        if self.result.best_epoch is None:
            return None
        return STOP if record["epoch"] - self.result.best_epoch >= self.patience else None


class FreezeAfter(Callback):
    """After ``epochs`` epochs the optimizer stops updating the parameters ``names``
    (their learning-rate scale becomes 0), as airbench freezes its whitening bias."""

    def __init__(self, optimizer: Optimizer, names: list[str], epochs: int):
        self.optimizer, self.names, self.epochs = optimizer, list(names), epochs

    def _freeze_if_due(self, epochs_done: int) -> None:
        if epochs_done >= self.epochs:
            self.optimizer.lr_scales.update(dict.fromkeys(self.names, 0.0))

    def on_train_begin(self, epochs, batches_per_epoch, start_epoch):
        self._freeze_if_due(start_epoch)            # a resumed run past the freeze

    def on_epoch_end(self, record):
        self._freeze_if_due(record["epoch"])


class Lookahead(Callback):
    """airbench's lookahead (from hlb-CIFAR10): from epoch ``start`` on, every ``every``
    updates the weights (and BatchNorm's running statistics) are pulled to an
    exponential moving average of themselves and the average is copied back into the
    network; at the end of every epoch the network takes the average again.

    The average's decay rises through the run, ``decay ** every * (t / T) ** power``
    at update t of T planned, so it moves fast early and averages strongly at the
    end. ``arrays``: the network's params and buffers by name (updated in place);
    the average lives in ``result.average`` so checkpoints keep it.
    """

    def __init__(self, arrays: dict[str, np.ndarray], result: TrainResult, batches_per_epoch: int,
                 decay: float = 0.95, every: int = 5, start: float = 3.0, power: float = 3.0):
        self.arrays, self.result, self.batches = arrays, result, batches_per_epoch
        self.decay, self.every, self.start, self.power = decay, every, start, power

    def on_train_begin(self, epochs, batches_per_epoch, start_epoch):
        self.total = epochs * batches_per_epoch

    def on_plan(self, epochs):
        self.total = epochs * self.batches

    def on_batch_end(self, epoch, batch, batches, samples, loss):
        step = epoch * self.batches + batch + 1
        if epoch < self.start or step % self.every:
            return
        if self.result.average is None:
            self.result.average = {k: v.copy() for k, v in self.arrays.items()}
            return
        rho = self.decay ** self.every * min(step / max(self.total, 1), 1.0) ** self.power
        self._pull(rho)

    def on_updates_end(self, epoch):
        if self.result.average is not None:
            self._pull(1.0)

    def _pull(self, rho: float) -> None:
        """average = rho * average + (1 - rho) * weights; weights = average."""
        for name, value in self.arrays.items():
            average = self.result.average[name]
            average *= rho
            average += (1 - rho) * value
            value[...] = average


class Trainer:
    """Minibatch (or full-batch) descent of ``net`` on X: (N, ...), y: (N,).

    batch_size 0 (or >= N) is full-batch gradient descent. ``augment(xb, rng,
    epoch=e, index=idx) -> xb`` transforms each training batch (``idx``: the
    batch's rows in X, for augmentations that follow each example across epochs).
    ``state``, a TrainResult from an interrupted run (with the network and
    optimizer restored alongside), continues it with the numbers an
    uninterrupted run gives.
    """

    def __init__(self, net: Network, optimizer: Optimizer, X: np.ndarray, y: np.ndarray, *,
                 X_val: np.ndarray | None = None, y_val: np.ndarray | None = None,
                 batch_size: int = 0, schedule: Schedule | None = None, seed: int = 0,
                 augment: Callable | None = None, eval_batch_size: int = 1024,
                 state: TrainResult | None = None, snapshot_every: int = 0):
        self.net, self.optimizer, self.schedule = net, optimizer, schedule
        self.X, self.y = X.astype(net.dtype, copy=False), y
        self.X_val, self.y_val = X_val, y_val
        self.validate = X_val is not None and len(X_val) > 0
        n = len(X)
        self.batch_size = n if batch_size <= 0 or batch_size >= n else batch_size
        self.batches_per_epoch = math.ceil(n / self.batch_size)
        self.seed, self.augment, self.eval_batch_size = seed, augment, eval_batch_size
        self.result = state if state is not None else TrainResult()
        self.params = net.params
        self.snapshot_every = snapshot_every
        self.sharded: ShardedStep | None = None     # while ``train`` runs, for a shardable net

    def snapshot(self, epoch: int) -> None:
        """Keep a copy of the parameters after ``epoch`` epochs when the run asks for it."""
        if self.snapshot_every and epoch % self.snapshot_every == 0:
            self.result.snapshots.append((epoch, {k: v.copy() for k, v in self.params.items()}))

    def run_epoch(self, epoch: int, max_iterations: float = math.inf) -> dict | None:
        """One pass over the training set (0-based ``epoch``), stopping early at
        ``max_iterations`` updates in all; the epoch's record, or None when no batch
        ran. A runaway loss sets ``result.status`` to "diverged" and ends the
        epoch without a record; a non-finite validation loss does so with one."""
        started = time.perf_counter()
        result, n, bs = self.result, len(self.X), self.batch_size
        order = None if bs == n else epoch_rng(self.seed, epoch, 0).permutation(n)
        aug_rng = epoch_rng(self.seed, epoch, 1) if self.augment else None
        self.net.reseed(lambda i: epoch_rng(self.seed, epoch, 2 + i))
        loss_sum, correct, seen = 0.0, 0, 0
        for b in range(self.batches_per_epoch):
            if result.iterations >= max_iterations:
                break
            if order is None:
                idx, xb, yb = np.arange(n), self.X, self.y
            else:
                idx = order[b * bs:(b + 1) * bs]
                xb, yb = self.X[idx], self.y[idx]
            if self.augment:
                xb = self.augment(xb, aug_rng, epoch=epoch, index=idx)
            if self.schedule is not None:
                self.optimizer.lr = self.schedule(epoch + b / self.batches_per_epoch)
            if self.sharded is not None:
                loss, scores, grads = self.sharded.loss_and_scores(xb, yb)
            else:
                loss, scores, grads = self.net.loss_and_scores(xb, yb, train=True)
            if result.first_loss is None:
                result.first_loss = loss
            if is_runaway(loss, result.first_loss):
                result.status = "diverged"
                return None
            self.optimizer.step(self.params, grads)
            result.iterations += 1
            loss_sum += loss * len(yb)
            correct += int(np.count_nonzero(scores.argmax(axis=1) == yb))
            seen += len(yb)
            self.on_batch_end(epoch, b, self.batches_per_epoch, len(yb), loss)
        if seen == 0:
            return None
        self.on_updates_end(epoch)
        record = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_acc": correct / seen,
                  "val_loss": math.nan, "val_acc": math.nan, "lr": self.optimizer.lr,
                  "seconds": 0.0}
        if self.validate and result.status == "ok":
            record["val_loss"], record["val_acc"] = self.net.loss_and_accuracy(self.X_val, self.y_val,
                                                                      self.eval_batch_size)
            if not math.isfinite(record["val_loss"]):
                result.status = "diverged"
            else:
                result.note_validation(record)
        record["seconds"] = time.perf_counter() - started
        return record

    def on_batch_end(self, epoch, batch, batches, samples, loss):
        """Replaced by ``train`` with the callback's hook."""

    def on_updates_end(self, epoch):
        """Replaced by ``train`` with the callback's hook."""

    @np.errstate(over="ignore", invalid="ignore")   # a diverging loss is detected and reported
    @single_blas_thread()   # held once for the run, not toggled at every step
    def train(self, epochs: int, *, iterations: int | None = None, max_epochs: int | None = None,
              callback: Callback | None = None) -> TrainResult:
        """Run epochs until ``epochs`` are done (or ``iterations`` updates, the last
        epoch then partial), a callback returns STOP, or the run diverges. A callback
        may re-plan the run (``Decision(plan=...)``) up to ``max_epochs`` (default
        ``epochs``); the schedule's end moves with the plan."""
        keep_freed_arrays_in_the_heap()   # once per process; NNX_MALLOC_TUNING=0 turns it off
        callback = callback or Callback()
        self.on_batch_end, self.on_updates_end = callback.on_batch_end, callback.on_updates_end
        result = self.result
        if iterations is not None:
            epochs = math.ceil(iterations / self.batches_per_epoch)
        limit = max(epochs, max_epochs or 0)
        plan, max_iterations = epochs, math.inf if iterations is None else iterations
        callback.on_train_begin(epochs, self.batches_per_epoch, result.epochs_run)
        shards = shard_count()
        if shardable(self.net, shards):
            self.sharded = ShardedStep(self.net, self.batch_size, self.X.shape[1:], shards)
        try:
            return self._train(callback, result, plan, limit, max_iterations)
        finally:
            if self.sharded is not None:
                self.sharded.close()
                self.sharded = None

    def _train(self, callback, result, plan, limit, max_iterations) -> TrainResult:
        epoch = result.epochs_run
        if epoch == 0:
            self.snapshot(0)
        while epoch < min(plan, limit):
            record = self.run_epoch(epoch, max_iterations)
            if record is None:      # diverged, or no update left to make
                break
            result.history.append(record)
            self.snapshot(epoch + 1)
            decision = _decision(callback.on_epoch_end(record))
            if result.status != "ok":
                break
            if decision.plan is not None and decision.plan != plan:
                plan = max(epoch + 1, min(decision.plan, limit))
                if self.schedule is not None:
                    self.schedule.total = plan
                callback.on_plan(plan)
            if decision.stop:
                result.stopped_early = True
                break
            epoch += 1
        if result.stopped_early and result.best_params is not None:
            for name, value in result.best_params.items():
                self.params[name][...] = value
        return result


def _decision(value) -> Decision:
    if isinstance(value, Decision):
        return value
    return STOP if value else Decision()


def train(net: Network, optimizer: Optimizer, X: np.ndarray, y: np.ndarray, *,
          X_val: np.ndarray | None = None, y_val: np.ndarray | None = None,
          epochs: int | None = 10, iterations: int | None = None, batch_size: int = 0,
          schedule: Schedule | None = None, seed: int = 0, callback: Callback | None = None,
          patience: int | None = None, augment: Callable | None = None,
          eval_batch_size: int = 1024, state: TrainResult | None = None,
          max_epochs: int | None = None, snapshot_every: int = 0) -> TrainResult:
    """Train ``net`` in place (a ``Trainer`` run in one call). ``patience`` adds early
    stopping on validation accuracy, restoring the best parameters."""
    trainer = Trainer(net, optimizer, X, y, X_val=X_val, y_val=y_val, batch_size=batch_size,
                      schedule=schedule, seed=seed, augment=augment,
                      eval_batch_size=eval_batch_size, state=state, snapshot_every=snapshot_every)
    callbacks = [callback]
    if patience is not None and trainer.validate:
        callbacks.append(EarlyStopping(patience, trainer.result, trainer.params))
    return trainer.train(epochs, iterations=iterations, max_epochs=max_epochs,
                         callback=Callbacks(*callbacks))


class Callbacks(Callback):
    """Several callbacks as one: training stops when any asks to; the first new
    plan asked for wins."""

    def __init__(self, *callbacks: Callback | None):
        self.callbacks = [c for c in callbacks if c is not None]

    def on_train_begin(self, epochs, batches_per_epoch, start_epoch):
        for c in self.callbacks:
            c.on_train_begin(epochs, batches_per_epoch, start_epoch)

    def on_batch_end(self, epoch, batch, batches, samples, loss):
        for c in self.callbacks:
            c.on_batch_end(epoch, batch, batches, samples, loss)

    def on_updates_end(self, epoch):
        for c in self.callbacks:
            c.on_updates_end(epoch)

    def on_epoch_end(self, record):
        decisions = [_decision(c.on_epoch_end(record)) for c in self.callbacks]
        plans = [d.plan for d in decisions if d.plan is not None]
        return Decision(stop=any(d.stop for d in decisions), plan=plans[0] if plans else None)

    def on_plan(self, epochs):
        for c in self.callbacks:
            c.on_plan(epochs)
