"""The errors nnx reports to its user, by kind; only the CLI maps them to exit codes.

Each is raised where the problem is found, with a message that names the
option or file and says what is wrong (and, where there is one, the fix). The
CLI prints that one line and exits 2 for a ``ConfigError`` (a usage error: a
bad option value) and 1 for every other ``NnxError`` (a run-time failure).
"""
from __future__ import annotations


class NnxError(Exception):
    """An error to report in one line; its message is written for the user."""


class ConfigError(NnxError, ValueError):
    """A bad option value; ``option`` is the config field (or flag) it concerns."""

    def __init__(self, option: str, message: str):
        super().__init__(message)
        self.option = option

    @property
    def flag(self) -> str:
        return "--" + self.option.replace("_", "-")


class DataError(NnxError):
    """A data set that cannot be had (missing or corrupt files); the message says what to run."""


class BusyError(NnxError):
    """Another nnx process is writing to the same directory."""


class ClusterLostError(NnxError):
    """The Dask cluster went away mid-sweep; the unfinished trials are not failures."""


class NotWritableError(NnxError):
    """An output file that cannot be written (its folder is a file, no permission, a
    read-only file system); the message names the file and the reason."""
