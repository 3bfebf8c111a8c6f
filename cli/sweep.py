"""``nnx sweep``: a grid of ``nnx train`` runs, in parallel and resumable."""
from __future__ import annotations

import contextlib
import math
import signal
import threading
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from cli.common import console, fail, usage_error
from cli.options import parse_options, with_config_options
from cli.progress import fmt
from experiments.errors import ConfigError, NnxError
from experiments.store import SweepStore
from experiments.sweep import (
    Sweep,
    SweepCallback,
    SweepError,
    SweepOutcome,
    Trial,
    build_sweep,
    format_value,
    parse_fixed,
    plan,
    run_sweep,
)

GRID, SWEEP_RUN = "Grid", "Sweep"


@with_config_options(fixed=True)
def sweep_command(
    options: dict,
    grid: list[str] | None = typer.Option(None, "--grid", metavar="NAME=V1,V2", help="An axis: any "
                                          "nnx train option and its values, e.g. hidden=3,6,20 "
                                          "(64x64 for two layers) or reg=0.001,0.01. Repeat for more "
                                          "axes \\[default: the default grid on the spiral].",
                                          rich_help_panel=GRID),
    seeds: str | None = typer.Option(None, help="The seed axis: 0-9 or 0,3,5.", rich_help_panel=GRID),
    config: Path | None = typer.Option(None, "--config", help="TOML sweep file: name, seeds, a "
                                       "\\[fixed] and a \\[grid] table (as the sweep.toml a sweep "
                                       "writes).", rich_help_panel=GRID),
    name: str | None = typer.Option(None, help="Name of the sweep; names its default --out.",
                                    rich_help_panel=GRID),
    set_: list[str] | None = typer.Option(None, "--set", metavar="NAME=VALUE", help="Fix any nnx "
                                          "train option, e.g. --set patience=20 (the same as "
                                          "--patience 20; repeatable).", rich_help_panel=GRID),
    out: Path | None = typer.Option(None, help="Output directory \\[default: runs/sweep-<name>, or "
                                    "runs/sweep-<data>-<axes>-<id> derived from the trials, so "
                                    "the same command resumes].", rich_help_panel=SWEEP_RUN),
    workers: int | None = typer.Option(None, min=0, help="Local worker processes, one BLAS thread "
                                       "each; 0 runs the trials in this process "
                                       "\\[default: the number of cores].", rich_help_panel=SWEEP_RUN),
    scheduler: str | None = typer.Option(None, metavar="tcp://HOST:PORT", help="Run the trials on "
                                         "this Dask cluster (needs the dask extra).",
                                         rich_help_panel=SWEEP_RUN),
    stack_size: int | None = typer.Option(None, min=1, help="Train up to N compatible MLP trials "
                                          "(same data and steps) together as one computation; 1 "
                                          "trains each alone \\[default: as many as fit in cache, "
                                          "up to 64].", rich_help_panel=SWEEP_RUN),
    retry_failed: bool = typer.Option(False, help="Run failed trials again.", rich_help_panel=SWEEP_RUN),
    force: bool = typer.Option(False, help="Replace a different sweep in --out (the trials the "
                               "two share are kept).", rich_help_panel=SWEEP_RUN),
    dry_run: bool = typer.Option(False, help="List the trials and exit.", rich_help_panel=SWEEP_RUN),
):
    """Train a grid of networks, several seeds each; write results.csv, summary.csv, curves
    and models. Every nnx train option may be fixed (--epochs 2000) or an axis (--grid).
    Re-running the same command resumes."""
    try:
        fixed = parse_options(options)
        for option_name, value in parse_fixed(set_ or []).items():
            if option_name in fixed:
                raise SweepError(option_name, f"{option_name} is fixed twice (--set and its own "
                                              "option); give it once", f"--set {option_name}")
            fixed[option_name] = value
        definition = build_sweep(grid or [], seeds, config, fixed, name)
        trials, out_dir = plan(definition, out)
    except ConfigError as exc:
        raise usage_error(exc) from None
    if dry_run:
        show_trials(definition, trials, out_dir)
        return
    outcome = run_with_progress(definition, out_dir, workers, scheduler, retry_failed, force,
                                stack_size)
    show_sweep_summary(definition, outcome)
    failed = outcome.count("failed")
    if failed:
        fail(f"{failed} trial(s) failed (see the error column of {outcome.out / 'results.csv'}); "
             "--retry-failed runs them again")


def run_with_progress(definition: Sweep, out_dir, workers, scheduler, retry_failed, force,
                      stack_size=None) -> SweepOutcome:
    try:
        with terminate_as_interrupt(), SweepProgress(console) as progress:
            return run_sweep(definition, out_dir, workers=workers, scheduler=scheduler,
                             retry_failed=retry_failed, force=force, callback=progress,
                             stack_size=stack_size)
    except ConfigError as exc:
        raise usage_error(exc) from None
    except KeyboardInterrupt:
        fail(f"interrupted; the finished trials are saved in {out_dir}: run the same command "
             "again to resume", 130)
    except (NnxError, RuntimeError) as exc:     # a lost cluster, a busy directory, a dead worker
        fail(str(exc))


@contextlib.contextmanager
def terminate_as_interrupt():
    """SIGTERM (``kill``, a batch system's time limit) stops the sweep as Ctrl-C does:
    the workers are stopped, the finished trials are kept, and the same command resumes.
    Python lets only the main thread set signal handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---- progress ------------------------------------------------------------------
class SweepProgress(SweepCallback):
    """A Rich bar (done/total, failed, best validation accuracy, ETA) on a terminal;
    one plain line per finished trial when piped."""

    def __init__(self, console: Console):
        self.console = console
        self.progress = None
        self.done = self.total = self.failed = 0
        self.best = math.nan

    def __enter__(self):
        if self.console.is_terminal:
            self.progress = Progress(
                TextColumn("[bold]sweep"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                console=self.console)
            self.progress.start()
        return self

    def __exit__(self, *exc):
        if self.progress:
            self.progress.stop()

    def on_sweep_begin(self, total, skipped, todo, rows):
        self.total, self.done = total, skipped
        for row in rows:
            self._count(row)
        if skipped:
            self.console.print(f"skipping {skipped} finished trial(s) of {total}; {todo} to run",
                               highlight=False)
        if self.progress:
            self.task = self.progress.add_task("sweep", total=total, completed=skipped,
                                               stats=self._stats())

    def on_trial_end(self, trial: Trial, row: dict):
        self.done += 1
        self._count(row)
        if self.progress:
            self.progress.update(self.task, advance=1, stats=self._stats())
        else:
            self.console.print(trial_line(self.done, self.total, trial, row), highlight=False,
                               soft_wrap=True)

    def _count(self, row: dict):
        self.failed += row["status"] == "failed"
        acc = _number(row["final_val_acc"])
        if row["status"] == "ok" and not math.isnan(acc) and not acc <= self.best:
            self.best = acc

    def _stats(self) -> str:
        return f"failed {self.failed}  best val_acc {fmt(self.best, '.3f')}"


def trial_line(done: int, total: int, trial: Trial, row: dict) -> str:
    line = f"[{done}/{total}] {trial.key} {trial.describe()}  {row['status']}"
    if row["status"] == "failed":
        return line + f"  {row['error']}"
    return (line + f"  train_acc {fmt(_number(row['final_train_acc']))}"
            f"  val_acc {fmt(_number(row['final_val_acc']))}  {_number(row['seconds']):.1f}s")


def _number(text: str) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


# ---- output --------------------------------------------------------------------
def show_trials(definition: Sweep, trials: list[Trial], out_dir: Path) -> None:
    """--dry-run: every trial, and whether ``out_dir`` already holds its result."""
    rows = SweepStore(out_dir).read_rows() if out_dir.is_dir() else {}
    table = Table(title=f"{len(trials)} trials -> {out_dir}")
    for column in ("#", "trial key", *definition.grid, "status"):
        table.add_column(column, justify="right" if column == "#" else "left")
    for i, trial in enumerate(trials, 1):
        values = [format_value(k, v) for k, v in trial.params.items()]
        status = rows[trial.key]["status"] if trial.key in rows else "to run"
        table.add_row(str(i), trial.key, *values, status)
    console.print(table)
    fixed = " ".join(f"{k}={format_value(k, v)}" for k, v in definition.fixed.items())
    console.print(f"fixed: {fixed or '(nnx train defaults)'}", highlight=False, soft_wrap=True)


def show_sweep_summary(definition: Sweep, outcome: SweepOutcome) -> None:
    """The summary table over seeds, then where the files are."""
    import pandas as pd

    summary = pd.read_csv(outcome.out / "summary.csv")
    axes = [a for a in definition.grid if a != "seed"]
    has_val = summary["mean_final_val_acc"].notna().any()
    split = "val" if has_val else "train"
    metrics = [f"{split}_acc", f"{split}_loss"] + (["train_acc"] if has_val else [])
    best = ["best val_acc", "best epoch"] if has_val else []
    table = Table(title=f"Sweep summary (mean ± std over seeds), {split} accuracy at the last epoch"
                        + (" and at the best validation epoch" if has_val else ""))
    for column in (*axes, "seeds", metrics[0], *best, *metrics[1:], "seconds"):
        table.add_column(column, justify="left" if column in axes else "right")
    for _, row in summary.iterrows():
        seeds = f"{int(row['n_ok'])}" + _problems(row)
        cells = [_mean_std(row, f"final_{m}") for m in metrics]
        if has_val:
            cells[1:1] = [_mean_std(row, "best_val_acc"), fmt(row["mean_best_epoch"], ".0f")]
        table.add_row(*(_cell(row[a]) for a in axes), seeds, *cells, fmt(row["mean_seconds"], ".2f"))
    console.print(table)
    n = len(outcome.trials)
    counts = ", ".join(f"{outcome.count(s)} {s}" for s in ("ok", "diverged", "failed"))
    console.print(f"{n} trials: {counts}; ran {outcome.ran}, skipped {outcome.skipped} "
                  f"in {outcome.seconds:.1f}s", highlight=False)
    console.print(f"results: {outcome.out / 'results.csv'}, {outcome.out / 'summary.csv'}, "
                  f"curves/ and models/ in {outcome.out}", highlight=False, soft_wrap=True)


def _problems(row) -> str:
    notes = [f"{int(row[f'n_{s}'])} {s}" for s in ("diverged", "failed") if row[f"n_{s}"]]
    return f" ({', '.join(notes)})" if notes else ""


def _cell(value) -> str:
    return "none" if isinstance(value, float) and math.isnan(value) else str(value)


def _mean_std(row, metric: str) -> str:
    mean, std = row[f"mean_{metric}"], row[f"std_{metric}"]
    return "-" if math.isnan(mean) else f"{mean:.3f}±{std:.3f}"

