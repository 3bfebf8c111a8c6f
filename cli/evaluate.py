"""`nnx evaluate`: accuracy, per-class accuracy and confusion matrix of a saved model."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from cli.common import console, fail, usage_error
from cli.options import config_option, parse_option
from experiments.errors import ConfigError, DataError
from experiments.evaluate import SPLITS, Evaluation, evaluate
from experiments.files import check_output_file
from mlp.network import ModelFileError, Network


def evaluate_command(
    model: Path = typer.Argument(..., help="A model.npz written by nnx train (or a run directory)."),
    data: str | None = config_option("data", help="The data set; must be the one the model was "
                                     "trained on \\[default: read from the model]."),
    split: str = typer.Option("test", help="train, val or test (2D data: a fresh draw)."),
    data_dir: str | None = config_option("data_dir"),
    flip_average: bool = typer.Option(False, "--flip-average", help="Images: average the "
                                      "predictions on each image and its mirror image."),
    tta: bool = typer.Option(False, "--tta", help="Images: test-time augmentation as airbench's: "
                             "logits of six views (the image and its mirror, each also moved a "
                             "pixel up-left and down-right), the unmoved ones weighted twice."),
    plot: Path | None = typer.Option(None, help="Also draw the confusion matrix to this "
                                        "image file (PNG, SVG or PDF by extension)."),
):
    """Score a saved model: accuracy, per-class accuracy and the confusion matrix."""
    data, data_dir = parse_option("data", data), parse_option("data_dir", data_dir)
    if split not in SPLITS:
        raise typer.BadParameter(f"{split!r} is not one of {', '.join(SPLITS)}", param_hint="'--split'")
    path = model / "model.npz" if model.is_dir() else model
    if plot is not None:
        try:
            if plot.suffix.lstrip(".").lower() not in ("png", "svg", "pdf"):
                raise ConfigError("plot", f"{plot}: choose a .png, .svg or .pdf file name")
            check_output_file(plot, "plot")
        except ConfigError as exc:
            raise usage_error(exc) from None
    try:
        net = Network.load(path)
    except ModelFileError as exc:
        fail(str(exc))
    trained_on = net.metadata.get("data")
    if (tta or flip_average) and tuple(net.input_shape or ()) == (2,):
        flag = "--tta" if tta else "--flip-average"
        raise typer.BadParameter(f"test-time augmentation shifts and mirrors images; this model "
                                 f"takes 2D points ({trained_on})", param_hint=f"'{flag}'")
    if tta and flip_average:
        raise typer.BadParameter("--tta already includes the mirror images; give one of the two",
                                 param_hint="'--tta'")
    if data is not None and data != trained_on:
        raise typer.BadParameter(f"the model was trained on {trained_on}, not {data}",
                                 param_hint="'--data'")
    try:
        result = evaluate(net, split, data_dir, flip_average, tta)
    except (DataError, ValueError) as exc:   # a stored config or shape that does not fit
        fail(f"{path}: {exc}")
    show(result, trained_on)
    if plot is not None:
        from experiments.errors import NotWritableError
        from experiments.plots import plot_confusion
        try:
            plot_confusion(result.confusion, result.class_names, plot)
        except NotWritableError as exc:
            fail(str(exc))
        console.print(f"confusion matrix drawn to {plot}")


def show(result: Evaluation, data: str) -> None:
    console.print(f"[bold]{data}[/bold] {result.split} split: {result.count:,} examples, "
                  f"accuracy [bold]{result.accuracy:.2%}[/bold]"
                  + (f" ({result.views})" if result.views else ""), highlight=False)
    per_class = Table(title="Per-class accuracy")
    per_class.add_column("class")
    per_class.add_column("examples", justify="right")
    per_class.add_column("accuracy", justify="right")
    for name, total, acc in zip(result.class_names, result.confusion.sum(axis=1),
                                result.per_class_accuracy, strict=True):
        per_class.add_row(name, str(total), f"{acc:.2%}")
    console.print(per_class)
    confusion = Table(title="Confusion matrix (rows: true class, columns: predicted)")
    confusion.add_column("")
    for name in result.class_names:
        confusion.add_column(name, justify="right")
    for name, row in zip(result.class_names, result.confusion, strict=True):
        confusion.add_row(name, *map(str, row))
    console.print(confusion)
