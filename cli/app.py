"""The ``nnx`` command: parse options, call experiments/mlp, show the outcome."""
from __future__ import annotations

import contextlib
import math
from pathlib import Path

import typer
from rich.table import Table

import mlp
from cli.common import console, fail, usage_error
from cli.options import config_from_options, config_option, parse_option, with_config_options
from cli.progress import TrainingProgress, fmt
from experiments.checkpoint import CHECKPOINT
from experiments.config import RUN, TrainConfig, format_conv_algorithms, resolve
from experiments.errors import BusyError, ConfigError, DataError
from experiments.resources import check_memory
from experiments.runner import (
    claim_run_dir,
    claim_unfinished_run,
    default_run_dir,
    run,
    save_run,
    start_run,
)
from mlp.network import ModelFileError
from mlp.shards import ShardFailure
from mlp.train import RUNAWAY_FACTOR

app = typer.Typer(name="nnx", no_args_is_help=True, add_completion=False,
                  help="Train and study neural networks written from scratch in NumPy.")


def version_callback(value: bool):
    if value:
        console.print(f"nnx {mlp.__version__}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=version_callback,
                                      is_eager=True, help="Show the version and exit.")):
    """Train and study neural networks written from scratch in NumPy."""


@app.command()
@with_config_options()
def train(
    options: dict,
    resume: Path | None = typer.Option(None, help="Continue the killed run in this directory "
                                       "from its last checkpoint (other options are ignored).",
                                       rich_help_panel=RUN),
    out: Path | None = typer.Option(None, help="Output directory \\[default: runs/<data>-<arch>-"
                                    "seed<seed>-<time>].", rich_help_panel=RUN),
    overwrite: bool = typer.Option(False, help="Replace a run already in --out.", rich_help_panel=RUN),
    log_every: int = typer.Option(1, min=1, help="When piped, print one line every N epochs.",
                                  rich_help_panel=RUN),
):
    """Train one network and write model.npz, metrics.csv and config.json."""
    if resume is not None:
        resume_run(resume, log_every)
        return
    try:
        config = resolve(config_from_options(options))
        check_memory(config)
    except ConfigError as exc:
        raise usage_error(exc) from None
    with claimed(claim_run_dir(out or default_run_dir(config), overwrite)) as run_dir:
        start_run(run_dir, config)
        train_and_save(config, run_dir, log_every)


def resume_run(run_dir: Path, log_every: int) -> None:
    with claimed(claim_unfinished_run(run_dir)) as config:
        console.print(f"resuming {run_dir} from its last checkpoint", highlight=False)
        train_and_save(config, run_dir, log_every)


@contextlib.contextmanager
def claimed(claim):
    """Enter ``claim``, a context manager that locks a run directory for the whole run,
    with its errors as the user sees them: a bad directory is a usage error, one that
    another nnx process is writing a run-time failure."""
    with contextlib.ExitStack() as stack:
        try:
            value = stack.enter_context(claim)
        except ConfigError as exc:
            raise usage_error(exc) from None
        except BusyError as exc:
            fail(str(exc))
        yield value


def train_and_save(config: TrainConfig, run_dir: Path, log_every: int) -> None:
    try:
        with TrainingProgress(console, log_every) as progress:
            outcome = run(config, callback=progress, checkpoint=run_dir / CHECKPOINT)
    except (DataError, ModelFileError) as exc:
        abandon_run(run_dir)
        fail(str(exc))
    except ConfigError as exc:
        abandon_run(run_dir)
        raise usage_error(exc) from None
    except MemoryError:
        abandon_run(run_dir)
        fail("out of memory: the run needs more than this machine has free; try a smaller "
             "--batch-size or network")
    except ShardFailure as exc:
        abandon_run(run_dir)
        kept = (run_dir / CHECKPOINT).exists()
        fail(f"training stopped: {exc}" + ("; its last checkpoint is kept: continue it with --resume"
                                           if kept else "") + " (NNX_SHARDS=1 trains without workers)")
    try:
        save_run(run_dir, outcome)
    except OSError as exc:
        fail(f"cannot write the run into {run_dir}: {exc.strerror or exc}; its last checkpoint is "
             "kept: continue it with --resume once the problem is fixed")
    show_run_summary(outcome, run_dir)
    if outcome.status != "ok":
        fail(f"training diverged at epoch {outcome.result.epochs_run + 1} (the loss became NaN, "
             f"infinite or over {RUNAWAY_FACTOR:g} times its first value); try a smaller --lr")


def abandon_run(run_dir: Path) -> None:
    """After a failure before the first checkpoint, take back config.json's "running",
    which would otherwise make the directory look like a run to resume."""
    if not (run_dir / CHECKPOINT).exists():
        (run_dir / "config.json").unlink(missing_ok=True)


def show_run_summary(outcome, run_dir: Path) -> None:
    table = Table(title="Run summary", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    ended = ""
    if outcome.result.stopped_early:
        ended = " (time budget spent)" if outcome.config.time_budget else " (stopped early)"
    table.add_row("status", outcome.status + ended)
    table.add_row("epochs", str(outcome.result.epochs_run))
    for split in ("train", "val"):
        acc = outcome.final[f"final_{split}_acc"]
        if not math.isnan(acc):
            table.add_row(f"{split} loss / accuracy",
                          f"{fmt(outcome.final[f'final_{split}_loss'])} / {acc:.2%}")
    table.add_row("parameters", f"{outcome.network.num_params:,}")
    algorithms = outcome.network.conv_algorithms()
    if algorithms:      # how each conv computed, as --conv-algorithms takes it
        table.add_row("conv algorithms", format_conv_algorithms(algorithms))
    table.add_row("seconds", f"{outcome.seconds:.2f}")
    table.add_row("output", str(run_dir))
    console.print(table)


@app.command()
def gradcheck(seed: str | None = config_option("seed", help="Seed of the random inputs and weights "
                                              "\\[default: 0].")):
    """Check every layer, loss and a small network against numerical gradients."""
    from mlp.gradcheck import run_all_checks
    results = run_all_checks(parse_option("seed", seed) or 0)
    table = Table(title="Gradient check (float64, centred differences, h = 1e-5)")
    for column in ("check", "kind", "max relative error", "tolerance", "result"):
        table.add_column(column, justify="right" if "error" in column or column == "tolerance" else "left")
    for r in results:
        verdict = "[green]pass[/green]" if r.passed else "[red]FAIL[/red]"
        table.add_row(r.name, r.kind, f"{r.max_rel_error:.2e}", f"{r.tolerance:.0e}", verdict)
    console.print(table)
    failed = [r.name for r in results if not r.passed]
    if failed:
        fail(f"{len(failed)} gradient check(s) above tolerance: {', '.join(failed)}")
    console.print(f"all {len(results)} checks passed")


def _mount_subcommands():
    """Commands that live in their own modules."""
    from cli.data import data_app
    from cli.evaluate import evaluate_command
    from cli.plots import register_plot_commands
    from cli.report import report_command
    from cli.sweep import sweep_command
    app.command("evaluate")(evaluate_command)
    app.command("sweep")(sweep_command)
    app.command("report")(report_command)
    register_plot_commands(app)
    app.add_typer(data_app, name="data")


_mount_subcommands()
