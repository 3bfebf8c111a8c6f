"""What every command shares: the consoles, and the one way errors reach the user.

Exit codes: 0 success; 1 a run-time failure (a missing or corrupt file, a
diverged run, failed trials, a lost cluster, a busy directory); 2 a usage error
(a bad option value); 130 interrupted. Every error is one line naming the
option or file and what is wrong, never a traceback.
"""
from __future__ import annotations

import math

import typer
from rich.console import Console
from rich.markup import escape

from experiments.errors import ConfigError

console = Console()
err_console = Console(stderr=True)


def fail(message: str, code: int = 1):
    """One red line on stderr and a non-zero exit, for errors that are not usage errors."""
    err_console.print(f"[red]Error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def finite(value: float | None) -> float | None:
    """A Typer callback: Click's ranges let nan through (every comparison is false)."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"must be a finite number, got {value}")
    return value


def usage_error(exc: ConfigError) -> typer.BadParameter:
    """A ConfigError as Click's 'Invalid value for --option' (exit code 2)."""
    return typer.BadParameter(str(exc), param_hint=f"'{exc.flag}'")
