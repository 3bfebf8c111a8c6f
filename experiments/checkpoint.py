"""Checkpoints of a training run, and fitting a run to a wall-clock budget.

A checkpoint is a model file (``Network.save``) with the optimizer state and
the trainer's progress stored beside the parameters, rewritten atomically after
every ``every`` epochs, so a killed run loses at most that much work and resumes
to the same numbers an uninterrupted run gives.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from mlp.network import ModelFileError, Network
from mlp.optim import Momentum, Optimizer
from mlp.train import Callback, Decision, TrainResult

CHECKPOINT = "checkpoint.npz"
_STATE_KEY = "__train_state__"


class Checkpointer(Callback):
    """Writes ``path`` after every ``every``-th epoch and after the last one."""

    def __init__(self, path: Path, net: Network, optimizer: Optimizer, state: TrainResult,
                 every: int = 1):
        self.path, self.net, self.optimizer, self.state = Path(path), net, optimizer, state
        self.every = every

    def on_train_begin(self, epochs, batches_per_epoch, start_epoch):
        self.epochs = epochs

    def on_plan(self, epochs):
        self.epochs = epochs

    def on_epoch_end(self, record):
        if record["epoch"] % self.every == 0 or record["epoch"] == self.epochs:
            save_checkpoint(self.path, self.net, self.optimizer, self.state)


def save_checkpoint(path: Path, net: Network, optimizer: Optimizer, state: TrainResult) -> None:
    progress = {"history": state.history, "status": state.status, "iterations": state.iterations,
                "best_epoch": state.best_epoch, "best_val_acc": state.best_val_acc,
                "best_val_loss": state.best_val_loss, "first_loss": state.first_loss,
                "lr": optimizer.lr, "velocity": "raw gradients"}
    extra = {_STATE_KEY: np.array(json.dumps(progress))}
    extra.update({f"optim:{k}": v for k, v in optimizer.state_dict().items()})
    extra.update({f"best:{k}": v for k, v in (state.best_params or {}).items()})
    extra.update(snapshot_arrays(state.snapshots, prefix="snapshot:"))
    extra.update({f"average:{k}": v for k, v in (state.average or {}).items()})
    net.save(path, extra)


def snapshot_arrays(snapshots: list[tuple[int, dict]], prefix: str = "") -> dict[str, np.ndarray]:
    """Snapshots as arrays for an .npz file: ``epochs``: (S,), and per parameter its S
    copies stacked, (S, *shape), named by the parameter's name."""
    if not snapshots:
        return {}
    arrays = {f"{prefix}epochs": np.array([epoch for epoch, _ in snapshots])}
    for name in snapshots[0][1]:
        arrays[f"{prefix}{name}"] = np.stack([params[name] for _, params in snapshots])
    return arrays


def read_snapshot_arrays(data, prefix: str = "") -> list[tuple[int, dict[str, np.ndarray]]]:
    """The inverse of ``snapshot_arrays``, from an open .npz (or a dict of arrays)."""
    keys = [k for k in data.keys() if k.startswith(prefix)] if prefix else list(data.keys())
    if f"{prefix}epochs" not in keys:
        return []
    epochs = [int(e) for e in data[f"{prefix}epochs"]]
    names = [k for k in keys if k != f"{prefix}epochs"]
    stacked = {k[len(prefix):]: data[k] for k in names}
    return [(epoch, {name: values[i] for name, values in stacked.items()})
            for i, epoch in enumerate(epochs)]


def load_checkpoint(path: Path, optimizer: Optimizer) -> tuple[Network, TrainResult]:
    """The network and trainer state in ``path``; ``optimizer`` gets its saved state."""
    net = Network.load(path)
    with np.load(path, allow_pickle=False) as data:
        if _STATE_KEY not in data.files:
            raise ModelFileError(f"{path}: a model file, not a training checkpoint")
        progress = json.loads(str(data[_STATE_KEY]))
        optimizer.load_state_dict({k[6:]: data[k] for k in data.files if k.startswith("optim:")})
        best = {k[5:]: data[k] for k in data.files if k.startswith("best:")}
        snapshots = read_snapshot_arrays(data, prefix="snapshot:")
        average = {k[8:]: data[k] for k in data.files if k.startswith("average:")}
    optimizer.lr = progress["lr"]
    if isinstance(optimizer, Momentum) and "velocity" not in progress:
        # nnx 0.1 kept the cs231n velocity v = mu * v - lr * dw; today's holds raw gradients
        for slots in optimizer.state.values():
            slots["v"] = slots["v"] / -optimizer.lr
    state = TrainResult(history=progress["history"], status=progress["status"],
                        iterations=progress["iterations"], best_epoch=progress["best_epoch"],
                        best_val_acc=progress["best_val_acc"], best_params=best or None,
                        best_val_loss=progress.get("best_val_loss", math.nan),
                        first_loss=progress.get("first_loss"), snapshots=snapshots,
                        average=average or None)
    return net, state


class TimeBudget(Callback):
    """Fits the run into ``budget`` seconds of wall time.

    After every epoch it re-plans from the mean epoch time so far and returns
    the new plan (the trainer moves the schedule's end with it, so a cosine
    still anneals to its end); it stops training once the plan is done. Through the first half of the plan it
    re-plans either way: the probe before training times a few batches only and
    may be off by a fifth or more (measured here: 84 s per epoch planned, 66 s
    run), and a machine busy with other work early on would otherwise leave the
    budget unused. In the second half it only shortens the plan, when the run
    falls behind: lengthening a cosine that has come down would lift its
    learning rate again.
    """

    def __init__(self, budget: float, planned_epochs: int, limit: int | None = None):
        self.budget, self.planned = budget, planned_epochs
        self.limit = limit or planned_epochs  # the most epochs the trainer will run
        self.started = time.perf_counter()
        self.done = 0

    def on_train_begin(self, epochs, batches_per_epoch, start_epoch):
        self.first_epoch = start_epoch

    def on_epoch_end(self, record):
        self.done = record["epoch"]
        elapsed = time.perf_counter() - self.started
        per_epoch = elapsed / max(1, self.done - self.first_epoch)
        fits = min(self.limit, self.done + int((self.budget - elapsed) / per_epoch))
        first_half = self.done <= self.planned / 2
        if (fits < self.planned or first_half) and max(self.done, fits) != self.planned:
            self.planned = max(self.done, fits)
        return Decision(stop=self.done >= self.planned, plan=self.planned)


def estimate_epoch_seconds(net: Network, optimizer: Optimizer, X, y, X_val, batch_size: int,
                           augment=None, probe_batches: int = 6, train_epoch=None) -> float:
    """Seconds one epoch (training plus validation) takes, from timing a few
    batches on a copy of ``net``: the real network and optimizer are untouched.
    ``train_epoch(net, optimizer, X, y, batch_size)`` trains one epoch as the run
    will (default: ``mlp.train.train``)."""
    import copy

    from mlp.train import train
    if train_epoch is None:
        def train_epoch(net, optimizer, X, y, batch_size):
            train(net, optimizer, X, y, epochs=1, batch_size=batch_size, augment=augment)
    net, optimizer = copy.deepcopy(net), copy.deepcopy(optimizer)
    bs = len(X) if batch_size <= 0 else min(batch_size, len(X))
    batches_per_epoch = math.ceil(len(X) / bs)
    probe = min(probe_batches, batches_per_epoch)
    subset = slice(0, probe * bs)
    train_epoch(net, optimizer, X[:bs], y[:bs], bs)   # warm-up
    started = time.perf_counter()
    train_epoch(net, optimizer, X[subset], y[subset], bs)
    per_batch = (time.perf_counter() - started) / probe
    eval_seconds = 0.0
    if X_val is not None and len(X_val):
        sample = X_val[:min(len(X_val), 1000)]
        started = time.perf_counter()
        net.scores(sample)
        eval_seconds = (time.perf_counter() - started) * len(X_val) / len(sample)
    return per_batch * batches_per_epoch + eval_seconds
