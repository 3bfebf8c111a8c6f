"""``nnx data``: fetch data sets into the data directory."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import typer
from rich import progress as rp

from cli.common import console, fail
from cli.options import config_option, parse_option
from experiments import cifar10

DOWNLOADABLE = ("cifar10",)

data_app = typer.Typer(help="Download data sets for `nnx train --data cifar10`.",
                       no_args_is_help=True, add_completion=False)


@data_app.command()
def download(
    name: str = typer.Argument(..., metavar="NAME", help="Data set to fetch: cifar10."),
    data_dir: str | None = config_option("data_dir", help="Where to keep data sets (also "
                                         "$NNX_DATA_DIR) \\[default: ~/.cache/nnx]."),
    url: str = typer.Option(cifar10.CIFAR10_URL, hidden=True),
    md5: str = typer.Option(cifar10.CIFAR10_MD5, hidden=True),
):
    """Download, verify (MD5) and extract a data set; a no-op when a verified copy is there."""
    if name not in DOWNLOADABLE:
        raise typer.BadParameter(f"unknown data set {name!r}; choose from: {', '.join(DOWNLOADABLE)}",
                                 param_hint="'NAME'")
    data_dir = parse_option("data_dir", data_dir)
    data_dir = Path(data_dir).expanduser() if data_dir else cifar10.default_data_dir()
    present = cifar10.is_verified(data_dir, md5)
    try:
        with download_progress(show=not present) as report:
            path = cifar10.download_cifar10(data_dir, url, md5, progress=report)
    except cifar10.DataError as exc:
        fail(str(exc))
    outcome = "already present and verified in" if present else "downloaded, verified and extracted to"
    console.print(f"CIFAR-10 {outcome} {path}", highlight=False, soft_wrap=True)


@contextmanager
def download_progress(show: bool = True):
    """Yield a ``progress(done, total)`` that drives a Rich bar (bytes, speed, ETA) on a
    terminal; silent when output is piped, where only the final line belongs."""
    with rp.Progress(rp.TextColumn("CIFAR-10"), rp.BarColumn(), rp.DownloadColumn(),
                     rp.TransferSpeedColumn(), rp.TimeRemainingColumn(), console=console,
                     disable=not (show and console.is_terminal), transient=True) as bar:
        task = bar.add_task("download", total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)
