"""The training loop of a stack: ``Trainer``'s loop (mlp/train.py) run for T trials at once.

Every trial keeps what it has alone: its initialisation (its own network, built
from its own seed), its shuffles ``epoch_rng(seed, epoch, 0)`` (a trial's
minibatches are its own rows, gathered per trial), its dropout streams
``epoch_rng(seed, epoch, 2 + i)``, its schedule, its ``TrainResult`` and its
callbacks with their decisions. What happens to one trial happens to it alone:

- a runaway loss (``is_runaway``, per trial) freezes the trial at once, with
  the parameters it had before the step, and records it as diverged, without
  a record for that epoch; a non-finite validation loss does so after the
  epoch's record;
- early stopping (``patience``) stops the trial ``patience`` epochs after its
  best validation accuracy and restores that epoch's parameters, as
  ``EarlyStopping`` does;
- a callback's ``Decision`` stops or re-plans that trial only.

A trial that ends leaves the stack (``MLPStack.keep``); the others go on.
Records are kept as arrays, one column per field and trial, and become each
trial's ``History``; a trial with a callback gets them as dicts every epoch,
as the solo loop gives them. Every number is the solo loop's, to rounding (see
``mlp.stack``).
"""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence

import numpy as np

from mlp.history import HISTORY_COLUMNS, History
from mlp.network import Network
from mlp.optim import Optimizer, Schedule
from mlp.parallel import single_blas_thread
from mlp.stack import MLPStack
from mlp.train import RUNAWAY_FACTOR, Callback, TrainResult, _decision, epoch_rng

_STATE = "flat"      # the stacked optimizer's one parameter: every trial's, laid out as MLPStack.flat
_RECORD_FIELDS = HISTORY_COLUMNS[1:]


class StackTrainer:
    """Minibatch (or full-batch) descent of T networks on the same X: (N, D), y: (N,).

    Give it what the solo ``Trainer`` takes, one per trial: ``nets`` (MLPs that
    can share a stack), ``optimizers`` (one kind; lr and momentum may differ),
    ``schedules``, ``seeds``, ``patience`` (early stopping, None for none),
    ``snapshot_every`` and ``states`` (TrainResults to continue, all at the same
    epoch). ``widths`` pads the hidden layers (``MLPStack``).
    """

    def __init__(self, nets: Sequence[Network], optimizers: Sequence[Optimizer], X: np.ndarray,
                 y: np.ndarray, *, X_val: np.ndarray | None = None, y_val: np.ndarray | None = None,
                 batch_size: int = 0, schedules: Sequence[Schedule | None] | None = None,
                 seeds: Sequence[int] | None = None, patience: Sequence[int | None] | None = None,
                 snapshot_every: Sequence[int] | None = None,
                 states: Sequence[TrainResult | None] | None = None,
                 widths: Sequence[int] | None = None, eval_batch_size: int = 1024):
        count = len(nets)
        self.stack = MLPStack(nets, widths)
        dtype = self.stack.dtype
        # [X, 1]: the form the stack's first layer takes, made once
        self.X = self.stack.input(np.asarray(X).reshape(len(X), -1).astype(dtype, copy=False))
        self.y = np.asarray(y)
        self.validate = X_val is not None and len(X_val) > 0
        self.X_val = self.stack.input(np.asarray(X_val).reshape(len(X_val), -1).astype(dtype, copy=False)) \
            if self.validate else None
        self.y_val = np.asarray(y_val) if self.validate else None
        n = len(self.X)
        self.batch_size = n if batch_size <= 0 or batch_size >= n else batch_size
        self.batches_per_epoch = math.ceil(n / self.batch_size)
        self.eval_batch_size = eval_batch_size
        self.nets = list(nets)
        self.optimizers = list(optimizers)
        self.schedules = list(schedules) if schedules is not None else [None] * count
        self.results = [s if s is not None else TrainResult() for s in (states or [None] * count)]
        self.callbacks: list[Callback | None] = [None] * count
        for name, values in (("optimizers", self.optimizers), ("schedules", self.schedules),
                             ("results", self.results)):
            if len(values) != count:
                raise ValueError(f"{name}: one per network ({count}), got {len(values)}")
        starts = {(r.epochs_run, r.iterations) for r in self.results}
        if len(starts) > 1:
            raise ValueError("the trials of a stack must start at the same epoch and iteration")
        self.start_epoch, self.iterations = starts.pop()
        # ---- per-trial state, over the trials still in the stack (position i is trial ids[i])
        self.ids = np.arange(count)
        self.seeds = np.array(list(seeds) if seeds is not None else [0] * count, dtype=np.int64)
        self.snapshot_every = np.array(list(snapshot_every) if snapshot_every is not None
                                       else [0] * count, dtype=np.int64)
        given = list(patience) if patience is not None else [None] * count
        self.patience = np.array([math.inf if p is None or not self.validate else p for p in given])
        self.first_loss = np.array([math.nan if r.first_loss is None else r.first_loss
                                    for r in self.results])
        self.has_first = np.array([r.first_loss is not None for r in self.results])
        self.best_epoch = np.array([r.best_epoch or 0 for r in self.results], dtype=np.int64)
        self.best_val_acc = np.array([r.best_val_acc for r in self.results], dtype=np.float64)
        self.best_val_loss = np.array([r.best_val_loss for r in self.results], dtype=np.float64)
        self.lr = np.array([o.lr for o in self.optimizers], dtype=np.float64)
        self.best_flat = None
        if np.isfinite(self.patience).any():
            self.best_flat = self.stack.flat.copy()
            for i, r in enumerate(self.results):
                for name, value in (r.best_params or {}).items():
                    self.stack.param_views(self.best_flat, i)[name][...] = value
        self.optimizer = self._stacked_optimizer()
        self._progress = float(self.start_epoch)
        self._spread()
        self._group_schedules()

    # ---- the optimizer -------------------------------------------------------------------
    # What each trial's optimizer holds for itself; everything else must be equal.
    _OWN = ("lr", "base_lr", "mu", "weight_decay", "state")

    def _stacked_optimizer(self) -> Optimizer:
        """One optimizer of the trials' kind over the whole stack: its lr and momentum are
        arrays over every parameter, each its trial's (``_spread``), its state the trials'
        states laid out as ``MLPStack.flat`` (continued where given). Weight decay is
        each trial's ``weight_decay / base_lr`` on every parameter (``_decay``)."""
        first = self.optimizers[0]
        shared = {k: v for k, v in vars(first).items() if k not in self._OWN}
        for other in self.optimizers[1:]:
            if type(other) is not type(first) or \
                    {k: v for k, v in vars(other).items() if k not in self._OWN} != shared:
                raise ValueError("the trials of a stack need one kind of optimizer (lr, momentum "
                                 "and weight decay may differ)")
        if any(o.lr_scales for o in self.optimizers):
            raise ValueError("an optimizer with per-parameter lr scales cannot train in a stack")
        stacked = copy.copy(first)
        stacked.state = {}
        self.mu = None
        if hasattr(first, "mu"):
            self.mu = np.array([o.mu for o in self.optimizers], dtype=np.float64)
        # the solo step's factor, weight_decay / (base_lr * 1.0), per trial
        self.decay = np.array([o.weight_decay / (o.base_lr * 1.0) if o.weight_decay else 0.0
                               for o in self.optimizers], dtype=np.float64)
        slots = stacked.init_state(self.stack.flat)
        if any(o.state for o in self.optimizers):
            for i, o in enumerate(self.optimizers):
                for name, state in o.state.items():
                    for slot, value in state.items():
                        if np.ndim(value) == 0:            # Adam's step count: one for the stack
                            slots[slot] = np.array(value)
                            continue
                        self.stack.param_views(slots[slot], i)[name][...] = value
        stacked.state[_STATE] = slots
        return stacked

    def _step(self) -> None:
        """One update of every trial, as its own optimizer's ``step`` makes it."""
        stack, optimizer = self.stack, self.optimizer
        dw = stack.flat_grad
        if self._decay_flat is not None:
            # dw + (weight_decay / base_lr) * w, the solo step's own sum
            dw = dw + np.multiply(self._decay_flat, stack.flat, out=stack._scratch)
        optimizer.update(stack.flat, dw, optimizer.state[_STATE], optimizer.lr)

    def _bind_optimizer(self, i: int) -> None:
        """Trial i's own optimizer shows its lr and its rows of the stacked state (for
        checkpoints), as views."""
        own, slots = self.optimizers[self.ids[i]], self.optimizer.state.get(_STATE, {})
        own.lr = float(self.lr[i])
        state: dict[str, dict] = {}
        for slot, value in slots.items():
            if value.ndim == 0:
                continue
            for name, view in self.stack.param_views(value, i).items():
                state.setdefault(name, {})[slot] = view
        for slot, value in slots.items():
            if value.ndim == 0:
                for name in state:
                    state[name][slot] = value
        own.state = state

    # ---- learning rates ------------------------------------------------------------------
    def _group_schedules(self) -> None:
        """Trials with equal schedules share one call per step."""
        keys, self._schedule_of, self._unique_schedules = {}, [], []
        for i in self.ids:
            s = self.schedules[i]
            key = ("none", self.optimizers[i].lr) if s is None else tuple(sorted(vars(s).items()))
            if key not in keys:
                keys[key] = len(self._unique_schedules)
                self._unique_schedules.append(s if s is not None else self.optimizers[i].lr)
            self._schedule_of.append(keys[key])
        self._schedule_of = np.array(self._schedule_of, dtype=np.intp)
        self._last_values = None
        self._constant_lr = False
        self._learning_rates(self._progress)
        # constant schedules (and none) give every step the same lr: set once
        self._constant_lr = all(not isinstance(s, Schedule) or s.kind == "constant"
                                for s in self._unique_schedules)

    def _learning_rates(self, progress: float) -> np.ndarray:
        """Every trial's lr ``progress`` epochs into its schedule: (T,)."""
        self._progress = progress
        values = tuple(s(progress) if isinstance(s, Schedule) else s for s in self._unique_schedules)
        if values != self._last_values:
            self._last_values = values
            self.lr = np.array(values, dtype=np.float64)[self._schedule_of]
            self._spread()
        return self.lr

    def _spread(self) -> None:
        """The stacked optimizer's lr (momentum, weight decay) on every parameter, each its
        trial's."""
        self.optimizer.lr = self.lr.astype(self.stack.dtype)[self.stack.trial_of]
        if self.mu is not None:
            self.optimizer.mu = self.mu.astype(self.stack.dtype)[self.stack.trial_of]
        self._decay_flat = self.decay.astype(self.stack.dtype)[self.stack.trial_of] \
            if self.decay.any() else None

    # ---- one epoch -----------------------------------------------------------------------
    def _orders(self, epoch: int) -> np.ndarray:
        """Each trial's shuffle of the training set this epoch: (T, N); trials of one seed share it."""
        by_seed: dict[int, np.ndarray] = {}
        for seed in self.seeds.tolist():
            if seed not in by_seed:
                by_seed[seed] = epoch_rng(seed, epoch, 0).permutation(len(self.X))
        return np.stack([by_seed[seed] for seed in self.seeds.tolist()])

    def run_epoch(self, epoch: int, max_iterations: float = math.inf) -> dict | None:
        """One pass over the training set (0-based ``epoch``) for every trial in the stack:
        the epoch's record as (T,) arrays (a number where all trials share it), or None
        when no batch ran or no trial is left. Trials whose loss runs away leave the
        stack on the spot (``status`` diverged)."""
        started = time.perf_counter()
        stack, n, bs, batches = self.stack, len(self.X), self.batch_size, self.batches_per_epoch
        in_stack = stack.size
        order = None if bs == n else self._orders(epoch)
        if any(stack.has_dropout):
            seeds = self.seeds.tolist()
            stack.reseed(lambda i, layer: epoch_rng(seeds[i], epoch, 2 + layer))
        loss_sum, correct, seen = 0.0, 0, 0
        for b in range(batches):
            if self.iterations >= max_iterations:
                break
            if order is None:
                xb, yb = self.X, self.y
            else:
                rows = order[:, b * bs:(b + 1) * bs]
                xb, yb = self.X[rows], self.y[rows]
            if not self._constant_lr:
                self._learning_rates(epoch + b / batches)
            loss, right = stack.train_step(xb, yb)
            if self._runaway_loss is None:            # the first step: every trial's first loss
                self._first_losses(loss)
            # is_runaway, per trial: NaN, infinite, or over RUNAWAY_FACTOR x the first loss
            # (a loss is never below zero, so "not <=" says all three)
            calm = loss <= self._runaway_loss
            if not np.logical_and.reduce(calm):
                runaway = ~calm
                keep = np.flatnonzero(calm)
                self._finish(np.flatnonzero(runaway), status="diverged")
                if not stack.size:
                    return None
                loss, right = loss[keep], right[keep]
                if seen:
                    loss_sum, correct = loss_sum[keep], correct[keep]
                if order is not None:
                    order, yb = order[keep], yb[keep]
            self._step()
            self.iterations += 1
            samples = yb.shape[-1]
            if batches == 1:            # one batch: the epoch's loss is the step's
                loss_sum, correct, seen = loss, right, samples
            else:
                # 0.0 + loss * samples, then sums of products, as the solo loop adds them
                loss_sum = loss_sum + loss * samples
                correct = correct + right
                seen += samples
            for i in self._watching:
                self.callbacks[self.ids[i]].on_batch_end(epoch, b, batches, samples, float(loss[i]))
        if seen == 0:
            return None
        for i in self._watching:
            self.callbacks[self.ids[i]].on_updates_end(epoch)
        record = {"train_loss": loss_sum if batches == 1 else loss_sum / seen,
                  "train_acc": correct / seen, "val_loss": math.nan, "val_acc": math.nan,
                  "lr": self.lr}
        if self.validate:
            record["val_loss"], record["val_acc"] = stack.loss_and_accuracy(
                self.X_val, self.y_val, self.eval_batch_size)
        record["seconds"] = (time.perf_counter() - started) / in_stack   # each trial's share
        return record

    def _first_losses(self, loss: np.ndarray) -> None:
        unset = ~self.has_first
        self.first_loss[unset], self.has_first[unset] = loss[unset], True
        self._runaway_loss = RUNAWAY_FACTOR * np.maximum(self.first_loss, 1e-12)

    def _positions(self) -> None:
        """What depends on which trials are in the stack: the positions of the trials
        with callbacks; whether any takes snapshots or stops early."""
        self._watching = [i for i, trial in enumerate(self.ids) if self.callbacks[trial] is not None]
        self._any_snapshots = bool(self.snapshot_every.any())
        self._any_early = bool(np.isfinite(self.patience).any())
        self._no_trial = np.zeros(self.stack.size, dtype=bool)
        self._next_end = min(int(self.plan.min(initial=self.limit)), self.limit) \
            if hasattr(self, "plan") else 0
        # until a trial leaves, position i is trial i: its table columns are a slice
        self._columns = slice(None) if np.array_equal(self.ids, np.arange(len(self.results))) else self.ids
        self._runaway_loss = None if not self.has_first.all() else \
            RUNAWAY_FACTOR * np.maximum(self.first_loss, 1e-12)

    # ---- training ------------------------------------------------------------------------
    @np.errstate(over="ignore", invalid="ignore", divide="ignore")   # runaways are detected
    @single_blas_thread()
    def train(self, epochs: int, *, iterations: int | None = None, max_epochs: int | None = None,
              callbacks: Sequence[Callback | None] | None = None) -> list[TrainResult]:
        """Run epochs until every trial is done: its plan of ``epochs`` (or ``iterations``
        updates) run, stopped by its callback or early stopping, or diverged. A trial's
        callback may re-plan it up to ``max_epochs``, its schedule's end moving with it.
        Returns the trials' TrainResults, in the order of the networks."""
        self.callbacks = list(callbacks) if callbacks is not None else [None] * len(self.results)
        if iterations is not None:
            epochs = math.ceil(iterations / self.batches_per_epoch)
        self.limit = max(epochs, max_epochs or 0)
        max_iterations = math.inf if iterations is None else iterations
        self.plan = np.full(self.stack.size, epochs, dtype=np.int64)
        self._positions()
        for callback in self.callbacks:
            if callback is not None:
                callback.on_train_begin(epochs, self.batches_per_epoch, self.start_epoch)
        self._table = {name: np.full((max(self.limit - self.start_epoch, 0), len(self.results)), math.nan)
                       for name in _RECORD_FIELDS}
        self._recorded = np.zeros(len(self.results), dtype=np.int64)   # epochs in the table, per trial
        self._pending, self._flushed = [], 0         # records not yet in the table; rows that are
        epoch = self.start_epoch
        if epoch == 0:
            self._snapshot(0)
        while self.stack.size:
            if epoch >= self._next_end:
                self._finish(np.flatnonzero(epoch >= np.minimum(self.plan, self.limit)))
                if not self.stack.size:
                    break
            record = self.run_epoch(epoch, max_iterations)
            if record is None:
                break
            self._end_epoch(epoch, record)
            epoch += 1
        self._finish(np.arange(self.stack.size))
        return self.results

    def _end_epoch(self, epoch: int, record: dict) -> None:
        """Record epoch ``epoch + 1`` of every trial and carry out what follows from it:
        best epochs, snapshots, early stopping, callbacks' decisions."""
        done, ids = epoch + 1, self.ids
        self._pending.append(record)
        val_loss, val_acc = record["val_loss"], record["val_acc"]
        broken = self._no_trial
        if self.validate:
            broken = ~np.isfinite(val_loss)
            better = (val_acc > self.best_val_acc) & ~broken        # NaN is never better
            self.best_epoch[better] = done
            self.best_val_acc[better], self.best_val_loss[better] = val_acc[better], val_loss[better]
        self._snapshot(done)
        if not (self.validate or self._any_early or self._watching):
            return                  # nothing can end a trial before its plan does
        stop = self._no_trial
        early = np.isfinite(self.patience)
        if self._any_early:
            improved = early & (self.best_epoch == done)
            if improved.any():
                self.stack.copy_rows(self.best_flat, self.stack.flat, np.flatnonzero(improved))
            stop = early & (self.best_epoch > 0) & (done - self.best_epoch >= self.patience)
        replanned = False
        for i in self._watching:
            trial = ids[i]
            row = {"epoch": done, **{name: float(np.broadcast_to(record[name], ids.shape)[i])
                                     for name in _RECORD_FIELDS}}
            result = self.results[trial]
            result.history.append(row)
            self._sync(i, status="diverged" if broken[i] else "ok")
            decision = _decision(self.callbacks[trial].on_epoch_end(row))
            if broken[i]:
                continue
            if decision.plan is not None and decision.plan != self.plan[i]:
                self.plan[i] = max(done, min(decision.plan, self.limit))
                if self.schedules[trial] is not None:
                    self.schedules[trial].total = int(self.plan[i])
                    replanned = True
                self.callbacks[trial].on_plan(int(self.plan[i]))
            if decision.stop:
                stop = stop | (np.arange(len(ids)) == i)
        if replanned:
            self._group_schedules()
        if self._watching:
            self._next_end = min(int(self.plan.min(initial=self.limit)), self.limit)
        stop = stop & ~broken
        if not np.logical_or.reduce(stop | broken):
            return
        restore = np.flatnonzero(stop & early & (self.best_epoch > 0))
        if restore.size:
            self.stack.copy_rows(self.stack.flat, self.best_flat, restore)
        ending = np.flatnonzero(broken | stop)
        if ending.size:
            self._finish(ending, status=np.where(broken[ending], "diverged", "ok").tolist(),
                         stopped_early=stop[ending].tolist())

    def _snapshot(self, epoch: int) -> None:
        """Copies of the parameters of the trials that keep one after ``epoch`` epochs."""
        every = self.snapshot_every
        if not self._any_snapshots:
            return
        for i in np.flatnonzero((every > 0) & (epoch % np.maximum(every, 1) == 0)):
            net = self.nets[self.ids[i]]
            self.results[self.ids[i]].snapshots.append((epoch, {k: v.copy() for k, v in net.params.items()}))

    def _sync(self, i: int, status: str = "ok") -> None:
        """Bring trial i's TrainResult (and its optimizer, for checkpoints) up to date."""
        trial = self.ids[i]
        result = self.results[trial]
        result.status = status
        result.iterations = self.iterations
        result.first_loss = float(self.first_loss[i]) if self.has_first[i] else None
        result.best_epoch = int(self.best_epoch[i]) or None
        result.best_val_acc, result.best_val_loss = float(self.best_val_acc[i]), float(self.best_val_loss[i])
        if self.best_flat is not None and np.isfinite(self.patience[i]) and result.best_epoch:
            result.best_params = {k: v.copy() for k, v in self.stack.param_views(self.best_flat, i).items()}
        if self.callbacks[trial] is not None:
            self._bind_optimizer(i)

    def _flush(self) -> None:
        """Move the records kept since the last flush into the table: a few array
        operations per field for many epochs, instead of one per field every epoch.
        Until the stack changes, the trials' positions are those of the records."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        rows = slice(self._flushed, self._flushed + len(pending))
        for name in _RECORD_FIELDS:
            values = np.array([record[name] for record in pending])
            self._table[name][rows, self._columns] = values if values.ndim == 2 else values[:, None]
        self._recorded[self._columns] += len(pending)
        self._flushed += len(pending)

    def _finish(self, positions: np.ndarray, status="ok", stopped_early=False) -> None:
        """Trials at ``positions`` are done: complete their results, take them out of the stack."""
        positions = np.asarray(positions, dtype=np.intp)
        if positions.size == 0:
            return
        self._flush()
        count = len(positions)
        statuses = status if isinstance(status, list) else [status] * count
        stops = stopped_early if isinstance(stopped_early, list) else [stopped_early] * count
        for i, status_i, stopped in zip(positions.tolist(), statuses, stops, strict=True):
            trial = self.ids[i]
            result = self.results[trial]
            if self.callbacks[trial] is None:
                result.history = self._history(trial, result.history)
            self._sync(i, status_i)
            result.stopped_early = result.stopped_early or stopped
            self.optimizers[trial].lr = float(self.lr[i])
        keep = np.setdiff1d(np.arange(self.stack.size), positions)
        slots = self.optimizer.state.get(_STATE, {})
        for name, value in slots.items():
            if value.ndim:
                slots[name] = self.stack.take(value, keep)
        if self.best_flat is not None:
            self.best_flat = self.stack.take(self.best_flat, keep)
        self.stack.keep(keep)
        for name in ("ids", "seeds", "snapshot_every", "patience", "first_loss", "has_first",
                     "best_epoch", "best_val_acc", "best_val_loss", "lr", "decay"):
            setattr(self, name, getattr(self, name)[keep])
        if hasattr(self, "plan"):
            self.plan = self.plan[keep]
        if self.mu is not None:
            self.mu = self.mu[keep]
        self._spread()
        self._group_schedules()
        self._positions()

    def _history(self, trial: int, before) -> History:
        """Trial ``trial``'s records: those it had before this run, then the table's."""
        ran = int(self._recorded[trial])
        new = {name: self._table[name][:ran, trial].copy() for name in _RECORD_FIELDS}
        new["epoch"] = np.arange(self.start_epoch + 1, self.start_epoch + ran + 1, dtype=np.int64)
        if not before:
            return History(new)
        old = History.from_records(list(before)).columns
        return History({name: np.concatenate([old[name], new[name]]) for name in HISTORY_COLUMNS})
