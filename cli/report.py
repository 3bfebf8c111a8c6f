"""`nnx report`: one self-contained HTML page for a run or a sweep."""
from __future__ import annotations

from pathlib import Path

import typer

from cli.common import console, usage_error
from cli.plots import draw
from experiments.errors import ConfigError


def report_command(
    path: Path = typer.Argument(..., help="A run directory (nnx train) or a sweep directory (nnx sweep)."),
    out: Path | None = typer.Option(None, help="HTML file to write \\[default: report.html inside "
                                    "the directory]."),
):
    """Write one HTML page: the command that reruns it, the full config, the environment,
    the results (tables sort when a header is clicked) and every figure nnx draws for it,
    all embedded: it opens offline in any browser and travels as one file."""
    from experiments.files import check_output_file
    from experiments.report import write_report
    if out is not None and out.suffix.lower() not in (".html", ".htm"):
        raise typer.BadParameter(f"{out} is not an .html file name", param_hint="'--out'")
    if out is not None:
        try:
            check_output_file(out)                  # refused before anything is drawn
        except ConfigError as exc:
            raise usage_error(exc) from None
    written = draw(write_report, path, out, log=None)
    console.print(f"report written to {written}")
