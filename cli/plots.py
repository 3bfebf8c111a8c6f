"""`nnx plot-*` and `nnx reproduce`: read a run or sweep directory, draw, say where."""
from __future__ import annotations

from pathlib import Path

import typer

from cli.common import console, fail, finite, usage_error
from cli.options import config_option, parse_option
from experiments.errors import ConfigError
from experiments.files import check_output_file

FORMAT_HELP = "png, svg or pdf (ignored when --out names a file with one of these extensions)."
OUT_HELP = ("Image file to write, or a folder for the default name \\[default: {name}.<format> "
            "inside the directory drawn].")
ROWS_HELP = ("Sweeps: the option whose values are the rows \\[default: the first option the sweep "
             "varies, seed aside, in the order of nnx train's options: hidden before reg].")
COLS_HELP = "Sweeps: the option whose values are the columns \\[default: the second option the sweep varies]."
WHERE_HELP = ("Sweeps: keep trials with NAME=VALUE (repeatable), for options that vary but are "
              "not rows or columns.")


def output_path(source: Path, name: str, out: Path | None, fmt: str) -> Path:
    """--out if given (a folder: ``name``.``fmt`` in it), else ``source``/``name``.``fmt``
    (next to a model file)."""
    from experiments.plots import FORMATS
    if fmt not in FORMATS:
        raise typer.BadParameter(f"{fmt!r} is not one of {', '.join(FORMATS)}", param_hint="'--format'")
    if out is not None:
        if out.is_dir():
            out = out / f"{name}.{fmt}"
        elif out.suffix.lstrip(".").lower() not in FORMATS:
            out = out.with_suffix(f".{fmt}")
        try:
            return check_output_file(out)       # refused before anything is drawn
        except ConfigError as exc:
            raise usage_error(exc) from None
    folder = source if source.is_dir() else source.parent
    return folder / f"{name}.{fmt}"


def draw(function, *args, **kwargs):
    """Call a plots function and return what it returns. A refusal is one red line: exit
    code 2 for a bad option (an unknown column) and for a path of the wrong kind (a
    CIFAR-10 model for decision regions, a run where a sweep is needed), 1 otherwise
    (nothing finished yet, a file missing, an output file that could not be written)."""
    from experiments.boundary import NotDrawableError, WrongKindError
    from experiments.errors import NotWritableError
    try:
        return function(*args, **kwargs)
    except WrongKindError as exc:
        fail(str(exc), 2)
    except (NotDrawableError, NotWritableError) as exc:
        fail(str(exc))
    except ConfigError as exc:
        raise usage_error(exc) from None
    except OSError as exc:
        fail(f"cannot write {exc.filename or 'the figure'}: {exc.strerror or exc}")


def parse_where(items: list[str]) -> dict[str, str]:
    where = {}
    for item in items:
        name, eq, value = item.partition("=")
        if not eq or not name.strip():
            raise typer.BadParameter(f"{item!r} is not NAME=VALUE", param_hint="'--where'")
        where[name.strip().replace("-", "_")] = value.strip()
    return where


def plot_boundary_command(
    path: Path = typer.Argument(..., help="A run directory (nnx train) or a sweep directory (nnx sweep)."),
    out: Path | None = typer.Option(None, help=OUT_HELP.format(name="boundary")),
    format: str = typer.Option("png", "--format", help=FORMAT_HELP),
    resolution: int | None = typer.Option(None, min=2, max=4000, help="Grid points per axis "
                                          "\\[default: 200, 120 for --animate]."),
    margin: float = typer.Option(0.1, min=0.0, max=10.0, callback=finite, help="Grid margin "
                                 "beyond the data, as a fraction of the data's span on each side."),
    rows: str | None = typer.Option(None, help=ROWS_HELP),
    cols: str | None = typer.Option(None, help=COLS_HELP),
    seed: str | None = config_option("seed", help="Sweeps: the seed to draw \\[default: the smallest]."),
    where: list[str] = typer.Option([], help=WHERE_HELP),
    animate: Path | None = typer.Option(None, metavar="FILE.gif|FILE.mp4", help="Instead of the "
                                        "final regions, write an animation of them forming, from "
                                        "the snapshots of a run or sweep trained with "
                                        "--snapshot-every N (.mp4 needs ffmpeg)."),
    fps: int = typer.Option(20, min=1, max=100, help="--animate: frames per second."),
    max_frames: int = typer.Option(200, min=2, help="--animate: at most this many frames (the "
                                   "snapshots thinned evenly, the first and last kept)."),
):
    """Draw a 2D model's decision regions with its training points; a sweep as a grid.
    With --animate, watch them form during training (beside the loss curve for a run)."""
    from experiments.plots import check_dir, is_sweep_dir, plot_run_boundary, plot_sweep_boundaries
    draw(check_dir, path)
    seed = parse_option("seed", seed)
    seed = None if seed is None else str(seed)
    if animate is not None:
        from experiments.animation import ANIMATION_FORMATS, animate_run, animate_sweep
        if animate.suffix.lstrip(".").lower() not in ANIMATION_FORMATS:
            raise typer.BadParameter(f"{animate} is not a .gif or .mp4 file name",
                                     param_hint="'--animate'")
        try:
            check_output_file(animate, "animate")       # refused before any frame is drawn
        except ConfigError as exc:
            raise usage_error(exc) from None
        size = {"resolution": resolution or 120, "margin": margin, "fps": fps, "max_frames": max_frames}
        if is_sweep_dir(path):
            draw(animate_sweep, path, animate, rows=rows, cols=cols, seed=seed,
                 where=parse_where(where), **size)
        else:
            draw(animate_run, path, animate, **size)
        console.print(f"animation written to {animate}")
        return
    target = output_path(path, "boundary", out, format)
    if is_sweep_dir(path):
        draw(plot_sweep_boundaries, path, target, rows=rows, cols=cols, seed=seed,
             where=parse_where(where), resolution=resolution or 200, margin=margin)
    else:
        draw(plot_run_boundary, path, target, resolution=resolution or 200, margin=margin)
    console.print(f"decision regions drawn to {target}")


def plot_variance_command(
    path: Path = typer.Argument(..., help="A sweep directory with several seeds per configuration."),
    out: Path | None = typer.Option(None, help=OUT_HELP.format(name="variance")),
    format: str = typer.Option("png", "--format", help=FORMAT_HELP),
    x: str = typer.Option("hidden", help="The option along the x axis."),
    line: str = typer.Option("reg", help="One line per value of this option."),
    metric: str = typer.Option("final_train_loss", help="The results.csv column to spread out "
                               "(final_val_acc, best_val_acc, best_epoch, ...)."),
):
    """Final loss of every seed against hidden size, and its std across seeds."""
    from experiments.plots import plot_variance
    target = output_path(path, "variance", out, format)
    draw(plot_variance, path, target, x=x, line=line, metric=metric)
    console.print(f"spread across seeds drawn to {target}")


def plot_curves_command(
    path: Path = typer.Argument(..., help="A run directory or a sweep directory."),
    out: Path | None = typer.Option(None, help=OUT_HELP.format(name="curves")),
    format: str = typer.Option("png", "--format", help=FORMAT_HELP),
    rows: str | None = typer.Option(None, help=ROWS_HELP),
    cols: str | None = typer.Option(None, help=COLS_HELP + " A third option that varies "
                                    "colours the lines."),
    where: list[str] = typer.Option([], help=WHERE_HELP),
):
    """Loss and accuracy per epoch; a sweep as small multiples, one panel per configuration
    with the mean over seeds and a +-1 std band, a star at the best validation epoch."""
    from experiments.plots import plot_curves
    target = output_path(path, "curves", out, format)
    draw(plot_curves, path, target, rows=rows, cols=cols, where=parse_where(where))
    console.print(f"learning curves drawn to {target}")


def plot_sweep_command(
    path: Path = typer.Argument(..., help="A sweep directory."),
    out: Path | None = typer.Option(None, help=OUT_HELP.format(name="heatmap")),
    format: str = typer.Option("png", "--format", help=FORMAT_HELP),
    x: str = typer.Option("reg", help="The option along the columns."),
    y: str = typer.Option("hidden", help="The option along the rows."),
    metric: str = typer.Option("mean_final_val_acc", help="A summary.csv column: mean_final_val_acc "
                               "(at the last epoch), mean_best_val_acc (at each trial's best "
                               "validation epoch), mean_best_epoch, std_final_val_acc, ... \\[falls "
                               "back to mean_final_train_acc when the sweep had no validation data]."),
):
    """A heatmap of a summary.csv column over two axes, each cell annotated."""
    from experiments.plots import plot_sweep
    target = output_path(path, "heatmap", out, format)
    draw(plot_sweep, path, target, x=x, y=y, metric=metric)
    console.print(f"heatmap drawn to {target}")


def plot_filters_command(
    model: Path = typer.Argument(..., help="A model.npz of an image model, or its run directory."),
    out: Path | None = typer.Option(None, help=OUT_HELP.format(name="filters")),
    format: str = typer.Option("png", "--format", help=FORMAT_HELP),
):
    """The first conv layer's filters as a tiled image."""
    from experiments.plots import load_model, plot_filters
    target = output_path(model, "filters", out, format)
    draw(lambda: plot_filters(load_model(model), target))
    console.print(f"filters drawn to {target}")


def reproduce_command(
    target: str = typer.Argument(..., help="What to reproduce: cs231n (the neural-networks notes' "
                                 "capacity, regularization and seed-variance figures)."),
    out: Path = typer.Option(Path("docs/cs231n"), help="Folder for the figures, report.md and the "
                             "three sweep directories."),
    workers: int = typer.Option(2, min=1, help="Worker processes."),
    quick: bool = typer.Option(False, help="A few seconds' version with fewer seeds and epochs "
                               "(for trying it out; the claims may not hold)."),
):
    """Run the cs231n notes' three experiments and write figures plus a Markdown report."""
    from experiments.reproduce import TARGETS, reproduce_cs231n
    if target not in TARGETS:
        raise typer.BadParameter(f"{target!r} is not one of {', '.join(TARGETS)}", param_hint="'TARGET'")
    try:
        report = reproduce_cs231n(out, workers=workers, quick=quick, log=console.print)
    except ConfigError as exc:
        raise usage_error(exc) from None
    for claim in report.claims:
        verdict = "[green]held[/green]" if claim.held else "[red]did not hold[/red]"
        console.print(f"{claim.name}: {verdict} ({claim.evidence})")
    console.print(f"report written to {report.path}")
    if not quick and not all(c.held for c in report.claims):
        fail("not every claim held; see the report")


def register_plot_commands(app: typer.Typer) -> None:
    for command in (plot_boundary_command, plot_variance_command, plot_curves_command,
                    plot_sweep_command, plot_filters_command):
        app.command(command.__name__.removesuffix("_command").replace("_", "-"))(command)
    app.command("reproduce")(reproduce_command)
