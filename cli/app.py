"""The ``nnx`` command: parse options, call experiments/mlp, show the outcome."""
from __future__ import annotations

import math
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import mlp
from cli.progress import TrainingProgress, fmt
from experiments.checkpoint import CHECKPOINT, parse_duration
from experiments.config import TrainConfig, parse_hidden, resolve
from experiments.errors import ConfigError, DataError
from experiments.runner import default_run_dir, prepare_run_dir, resumable_config, run, save_run, start_run
from mlp.arch import PRESETS
from mlp.network import ModelFileError

app = typer.Typer(name="nnx", no_args_is_help=True, add_completion=False,
                  help="Train and study neural networks written from scratch in NumPy.")
console = Console()
err_console = Console(stderr=True)

DATA, MODEL, OPTIM, RUN = "Data", "Model", "Optimisation", "Run"


def usage_error(exc: ConfigError) -> typer.BadParameter:
    """A ConfigError as Click's 'Invalid value for --option' (exit code 2)."""
    return typer.BadParameter(str(exc), param_hint=f"'{exc.flag}'")


def fail(message: str, code: int = 1):
    """One red line on stderr and a non-zero exit, for errors that are not usage errors."""
    err_console.print(f"[red]Error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def version_callback(value: bool):
    if value:
        console.print(f"nnx {mlp.__version__}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=version_callback,
                                      is_eager=True, help="Show the version and exit.")):
    """Train and study neural networks written from scratch in NumPy."""


@app.command()
def train(
    data: str = typer.Option("spiral", help="Data set: spiral, circle, xor, blobs, moons or cifar10.",
                             rich_help_panel=DATA),
    points: int = typer.Option(100, help="2D data: points per class.", rich_help_panel=DATA),
    classes: int = typer.Option(3, help="2D data: classes (spiral and blobs; the others have 2).",
                                rich_help_panel=DATA),
    noise: float | None = typer.Option(None, help="2D data: noise std that moves the points "
                                          "[default: per data set, spiral 0.2].", rich_help_panel=DATA),
    val_fraction: float | None = typer.Option(None, help="Fraction of each class held out for "
                                                 "validation [default: 0].", rich_help_panel=DATA),
    data_seed: int = typer.Option(0, help="Seed of the data generator and split.", rich_help_panel=DATA),
    data_dir: str | None = typer.Option(None, envvar="NNX_DATA_DIR", help="CIFAR-10: where "
                                           "`nnx data download` put it [default: ~/.cache/nnx].",
                                           rich_help_panel=DATA),
    val_size: int = typer.Option(5000, help="CIFAR-10: validation images carved from the "
                                 "training batches.", rich_help_panel=DATA),
    limit: int | None = typer.Option(None, help="CIFAR-10: use only the first N training "
                                        "images (quick runs).", rich_help_panel=DATA),
    augment: bool = typer.Option(False, help="CIFAR-10: random flips and shifts of up to 2 px.",
                                 rich_help_panel=DATA),
    model: str | None = typer.Option(None, help="ConvNet architecture: a preset ("
                                        f"{', '.join(PRESETS)}) or a spec such as conv16x5-pool2-fc10 "
                                        "[default for cifar10: convnetjs].", rich_help_panel=MODEL),
    hidden: str | None = typer.Option(None, help="MLP hidden sizes: 100, 64,64, or none for a "
                                         "linear classifier [default: 100].", rich_help_panel=MODEL),
    activation: str = typer.Option("relu", help="relu, leaky_relu, tanh, sigmoid or gelu (tanh form).",
                                   rich_help_panel=MODEL),
    init: str = typer.Option("auto", help="Weight init: auto (He for ReLU, Xavier for tanh/"
                             "sigmoid), he, xavier, or normal (std --weight-scale).",
                             rich_help_panel=MODEL),
    weight_scale: float = typer.Option(1e-2, help="Std of --init normal.", rich_help_panel=MODEL),
    dropout: float = typer.Option(0.0, help="Drop probability after each hidden layer "
                                  "(inverted dropout).", rich_help_panel=MODEL),
    loss: str = typer.Option("softmax", help="softmax (cross-entropy) or svm (multiclass hinge).",
                             rich_help_panel=MODEL),
    reg: float | None = typer.Option(None, help="L2 strength: adds 0.5 * reg * sum(W**2) over "
                                        "weights (not biases), gradient reg * W "
                                        "[default: 1e-3; cifar10 5e-4].", rich_help_panel=MODEL),
    label_smoothing: float = typer.Option(0.0, help="Softmax label smoothing.", rich_help_panel=MODEL),
    dtype: str = typer.Option("auto", help="auto (float64 for MLPs, float32 for ConvNets), "
                              "float32 or float64.", rich_help_panel=MODEL),
    optimizer: str | None = typer.Option(None, help="sgd, momentum, nesterov, adagrad, rmsprop, "
                                            "adam or adadelta [default: sgd; cifar10 nesterov].",
                                            rich_help_panel=OPTIM),
    lr: float | None = typer.Option(None, help="Learning rate [default: 1.0 for 2D data, 0.02 "
                                       "for cifar10].", rich_help_panel=OPTIM),
    momentum: float = typer.Option(0.9, help="Momentum for momentum/nesterov.", rich_help_panel=OPTIM),
    schedule: str | None = typer.Option(None, help="constant, step (x gamma every step-size "
                                        "epochs) or cosine (with --warmup epochs) [default: "
                                        "constant; cifar10 cosine].", rich_help_panel=OPTIM),
    step_size: int = typer.Option(10, help="Epochs between step decays.", rich_help_panel=OPTIM),
    gamma: float = typer.Option(0.1, help="Step decay factor.", rich_help_panel=OPTIM),
    warmup: float | None = typer.Option(None, help="Cosine: linear warm-up epochs [default: 0; "
                                        "cifar10 0.5].", rich_help_panel=OPTIM),
    min_lr: float = typer.Option(0.0, help="Cosine: final learning rate.", rich_help_panel=OPTIM),
    epochs: int | None = typer.Option(None, help="Epochs [default: 10000 for 2D data, 10 for "
                                         "cifar10].", rich_help_panel=OPTIM),
    iterations: int | None = typer.Option(None, help="Train for this many updates instead of "
                                             "--epochs.", rich_help_panel=OPTIM),
    batch_size: int | None = typer.Option(None, help="Minibatch size; 0 = full batch "
                                             "[default: 0 for 2D data, 128 for cifar10].",
                                             rich_help_panel=OPTIM),
    patience: int | None = typer.Option(None, help="Early stopping: epochs without a better "
                                           "validation accuracy.", rich_help_panel=OPTIM),
    seed: int = typer.Option(0, help="Seed of initialisation, shuffling and dropout.",
                             rich_help_panel=OPTIM),
    time_budget: str | None = typer.Option(None, help="Fit the epochs and the schedule to this "
                                              "wall time (90s, 45m, 1.5h), measured from the "
                                              "first batches' speed.", rich_help_panel=OPTIM),
    checkpoint_every: int | None = typer.Option(None, help="Write checkpoint.npz every N epochs; "
                                                   "0 = never [default: 1 for cifar10, 0 for 2D].",
                                                   rich_help_panel=RUN),
    resume: Path | None = typer.Option(None, help="Continue the killed run in this directory "
                                          "from its last checkpoint (other options are ignored).",
                                          rich_help_panel=RUN),
    out: Path | None = typer.Option(None, help="Output directory [default: runs/<data>-<model>-"
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
        budget = parse_duration(time_budget) if time_budget is not None else None
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="'--time-budget'") from None
    try:
        config = TrainConfig(
            data=data, points=points, classes=classes, noise=noise, val_fraction=val_fraction,
            data_seed=data_seed, data_dir=data_dir, val_size=val_size, limit=limit,
            augment=augment, model=model,
            hidden=parse_hidden(hidden) if hidden is not None else None,
            activation=activation, init=init, weight_scale=weight_scale, dropout=dropout,
            loss=loss, reg=reg, label_smoothing=label_smoothing, dtype=dtype,
            optimizer=optimizer, lr=lr, momentum=momentum, schedule=schedule,
            step_size=step_size, gamma=gamma, warmup=warmup, min_lr=min_lr, epochs=epochs,
            iterations=iterations, batch_size=batch_size, patience=patience, seed=seed,
            time_budget=budget, checkpoint_every=checkpoint_every)
        config = resolve(config)
        run_dir = prepare_run_dir(out or default_run_dir(config), overwrite)
    except ConfigError as exc:
        raise usage_error(exc) from None
    start_run(run_dir, config)
    train_and_save(config, run_dir, log_every)


def resume_run(run_dir: Path, log_every: int) -> None:
    try:
        config = resumable_config(run_dir)
    except ConfigError as exc:
        raise usage_error(exc) from None
    console.print(f"resuming {run_dir} from its last checkpoint", highlight=False)
    train_and_save(config, run_dir, log_every)


def train_and_save(config: TrainConfig, run_dir: Path, log_every: int) -> None:
    try:
        with TrainingProgress(console, log_every) as progress:
            outcome = run(config, callback=progress, checkpoint=run_dir / CHECKPOINT)
    except (DataError, ModelFileError) as exc:
        fail(str(exc))
    except ConfigError as exc:
        raise usage_error(exc) from None
    save_run(run_dir, outcome)
    show_summary(outcome, run_dir)
    if outcome.status != "ok":
        fail(f"training diverged at epoch {outcome.result.epochs_run + 1} (loss became NaN or "
             "infinite); try a smaller --lr")


def show_summary(outcome, run_dir: Path) -> None:
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
    table.add_row("seconds", f"{outcome.seconds:.2f}")
    table.add_row("output", str(run_dir))
    console.print(table)


@app.command()
def gradcheck(seed: int = typer.Option(0, help="Seed of the random inputs and weights.")):
    """Check every layer, loss and a small network against numerical gradients."""
    from mlp.gradcheck import run_all_checks
    results = run_all_checks(seed)
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
    """Commands that live in their own modules (which import this one's console)."""
    from cli.data import data_app
    from cli.evaluate import evaluate_command
    from cli.plots import register_plot_commands
    from cli.sweep import sweep
    app.command("evaluate")(evaluate_command)
    app.command()(sweep)
    register_plot_commands(app)
    app.add_typer(data_app, name="data")


_mount_subcommands()
