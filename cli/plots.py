"""`nnx plot-*` and `nnx reproduce`: read a run or sweep directory, draw, say where."""
from __future__ import annotations

from pathlib import Path

import typer

from cli.common import console, fail, finite, usage_error
from cli.options import config_option, parse_option
from experiments.errors import ConfigError
from experiments.files import check_output_file

FORMAT_HELP = "png, svg or pdf (ignored when --out names a file with one of these extensions)."
OUT_HELP = "Image file to write [default: {name}.<format> inside the directory drawn]."


def output_path(source: Path, name: str, out: Path | None, fmt: str) -> Path:
    """--out if given, else ``source``/``name``.``fmt`` (next to a model file)."""
    from experiments.plots import FORMATS
    if fmt not in FORMATS:
        raise typer.BadParameter(f"{fmt!r} is not one of {', '.join(FORMATS)}", param_hint="'--format'")
    if out is not None:
        out = out if out.suffix.lstrip(".").lower() in FORMATS else out.with_suffix(f".{fmt}")
        try:
            return check_output_file(out)       # refused before anything is drawn
        except ConfigError as exc:
            raise usage_error(exc) from None
    folder = source if source.is_dir() else source.parent
    return folder / f"{name}.{fmt}"


def draw(function, *args, **kwargs) -> None:
    """Call a plots function: a refusal of the directory or file drawn is one red line and
    exit code 1; a bad option (an unknown column) exit code 2."""
    from experiments.boundary import NotDrawableError
    try:
        function(*args, **kwargs)
    except NotDrawableError as exc:
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
    resolution: int = typer.Option(200, min=2, max=4000, help="Grid points per axis."),
    margin: float = typer.Option(0.1, min=0.0, max=10.0, callback=finite, help="Grid margin "
                                 "beyond the data, as a fraction of the data's span on each side."),
    rows: str = typer.Option("hidden", help="Sweeps: the option whose values are the rows."),
    cols: str = typer.Option("reg", help="Sweeps: the option whose values are the columns."),
    seed: str | None = config_option("seed", help="Sweeps: the seed to draw \\[default: the smallest]."),
    where: list[str] = typer.Option([], help="Sweeps: keep trials with NAME=VALUE (repeatable), "
                                    "for options that vary but are not rows or columns."),
):
    """Draw a 2D model's decision regions with its training points; a sweep as a grid."""
    from experiments.plots import check_dir, is_sweep_dir, plot_run_boundary, plot_sweep_boundaries
    target = output_path(path, "boundary", out, format)
    draw(check_dir, path)
    if is_sweep_dir(path):
        seed = parse_option("seed", seed)
        draw(plot_sweep_boundaries, path, target, rows=rows, cols=cols,
             seed=None if seed is None else str(seed),
             where=parse_where(where), resolution=resolution, margin=margin)
    else:
        draw(plot_run_boundary, path, target, resolution=resolution, margin=margin)
    console.print(f"decision regions drawn to {target}")


def plot_variance_command(
    path: Path = typer.Argument(..., help="A sweep directory with several seeds per configuration."),
    out: Path | None = typer.Option(None, help=OUT_HELP.format(name="variance")),
    format: str = typer.Option("png", "--format", help=FORMAT_HELP),
    x: str = typer.Option("hidden", help="The option along the x axis."),
    line: str = typer.Option("reg", help="One line per value of this option."),
    metric: str = typer.Option("final_train_loss", help="The results.csv column to spread out."),
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
):
    """Loss and accuracy per epoch; for a sweep the mean over seeds with a +-1 std band."""
    from experiments.plots import plot_curves
    target = output_path(path, "curves", out, format)
    draw(plot_curves, path, target)
    console.print(f"learning curves drawn to {target}")


def plot_sweep_command(
    path: Path = typer.Argument(..., help="A sweep directory."),
    out: Path | None = typer.Option(None, help=OUT_HELP.format(name="heatmap")),
    format: str = typer.Option("png", "--format", help=FORMAT_HELP),
    x: str = typer.Option("reg", help="The option along the columns."),
    y: str = typer.Option("hidden", help="The option along the rows."),
    metric: str = typer.Option("mean_final_val_acc", help="A summary.csv column [falls back to "
                               "mean_final_train_acc when the sweep had no validation data]."),
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
