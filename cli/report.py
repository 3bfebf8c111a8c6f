"""`nnx report`: one self-contained HTML page for a run or a sweep."""
from __future__ import annotations

from pathlib import Path

import typer

from cli.common import console
from cli.plots import draw


def report_command(
    path: Path = typer.Argument(..., help="A run directory (nnx train) or a sweep directory (nnx sweep)."),
    out: Path | None = typer.Option(None, help="HTML file to write [default: report.html inside "
                                    "the directory]."),
):
    """Write one HTML page: the command that reruns it, the full config, the environment,
    the results (tables sort when a header is clicked) and every figure nnx draws for it,
    all embedded: it opens offline in any browser and travels as one file."""
    from experiments.report import write_report
    if out is not None and out.suffix.lower() not in (".html", ".htm"):
        raise typer.BadParameter(f"{out} is not an .html file name", param_hint="'--out'")
    written = draw(write_report, path, out, log=None)
    console.print(f"report written to {written}")
