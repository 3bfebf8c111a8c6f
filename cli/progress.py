"""Training progress on screen: a Rich bar on a terminal, plain lines when piped."""
from __future__ import annotations

import math
import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from mlp.train import Callback


def fmt(value: float, spec: str = ".4f") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def epoch_line(record: dict, epochs: int) -> str:
    line = (f"epoch {record['epoch']}/{epochs}  loss {fmt(record['train_loss'])}  "
            f"train_acc {fmt(record['train_acc'])}")
    if not math.isnan(record["val_acc"]):
        line += f"  val_loss {fmt(record['val_loss'])}  val_acc {fmt(record['val_acc'])}"
    return line + f"  lr {record['lr']:.3g}  {record['seconds']:.2f}s"


class TrainingProgress(Callback):
    """A Callback that draws progress; use as a context manager around training.

    On a terminal: one bar over all batches with epoch, loss, accuracy,
    images/s and ETA. Piped: one plain line every ``log_every`` epochs.
    """

    def __init__(self, console: Console, log_every: int = 1):
        self.console, self.log_every = console, max(1, log_every)
        self.live = console.is_terminal
        self.progress = None
        self.epochs = 0
        self.samples, self.started = 0, time.perf_counter()

    def __enter__(self):
        if self.live:
            self.progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                console=self.console, transient=False)
            self.progress.start()
        return self

    def __exit__(self, *exc):
        if self.progress:
            self.progress.stop()

    def on_train_begin(self, epochs, batches_per_epoch, start_epoch):
        self.epochs = epochs
        self.started = time.perf_counter()
        if self.progress:
            self.task = self.progress.add_task("train", total=epochs * batches_per_epoch,
                                               completed=start_epoch * batches_per_epoch, stats="")
            self.batches_per_epoch = batches_per_epoch
            self.last_draw = 0.0

    def on_plan(self, epochs):
        self.epochs = epochs
        if self.progress:
            self.progress.update(self.task, total=epochs * self.batches_per_epoch)

    def on_batch_end(self, epoch, batch, batches, samples, loss):
        self.samples += samples
        if self.progress:
            now = time.perf_counter()
            self.progress.advance(self.task)
            if batches > 1 and now - self.last_draw > 0.2:
                rate = self.samples / max(now - self.started, 1e-9)
                self.progress.update(self.task, description=f"epoch {epoch + 1}/{self.epochs}",
                                     stats=f"loss {loss:.4f}  {rate:,.0f} img/s")
                self.last_draw = now

    def on_epoch_end(self, record):
        if self.progress:
            stats = f"loss {fmt(record['train_loss'])} acc {fmt(record['train_acc'], '.3f')}"
            if not math.isnan(record["val_acc"]):
                stats += f" val {fmt(record['val_acc'], '.3f')}"
            self.progress.update(self.task, description=f"epoch {record['epoch']}/{self.epochs}",
                                 stats=stats)
        elif record["epoch"] % self.log_every == 0 or record["epoch"] == self.epochs:
            self.console.print(epoch_line(record, self.epochs), highlight=False, soft_wrap=True)
