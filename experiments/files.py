"""The files of a run, in the formats every part of nnx reads and writes them."""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from experiments.errors import ConfigError
from mlp.history import History
from mlp.train import HISTORY_COLUMNS


def history_csv(history) -> str:
    """metrics.csv and curves/<trial>.csv: one row per epoch, floats written by repr.
    ``history``: a list of per-epoch dicts or a ``History`` (the same text, faster)."""
    if isinstance(history, History):
        return history.to_csv()
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=HISTORY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in row.items()})
    return buf.getvalue()


def read_history_csv(text: str) -> list[dict]:
    """The inverse of ``history_csv``: epoch as int, every other column as float
    (floats were written by repr, so they read back bit for bit)."""
    return [{k: int(v) if k == "epoch" else float(v) for k, v in row.items()}
            for row in csv.DictReader(io.StringIO(text))]


def make_dir(path: str | Path, option: str = "out") -> Path:
    """Create the output directory ``path`` (with its parents); a path that cannot be one
    (a file on the way, no permission, a read-only or virtual file system) is a
    ConfigError naming ``option``."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(option, f"{path} is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ConfigError(option, f"cannot create {path}: a file stands where a directory "
                                  "must be") from None
    except OSError as exc:
        raise ConfigError(option, f"cannot create {path}: {exc.strerror or exc}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(option, f"cannot write into {path}: permission denied")
    return path


def check_output_file(path: str | Path, option: str = "out") -> Path:
    """Make sure a file can be written at ``path`` (its folder created), before the work
    that produces it is done; ConfigError naming ``option`` otherwise."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(option, f"{path} is a directory; give a file name")
    make_dir(path.parent, option)
    existed = path.exists()
    try:                        # the one sure test: open it for writing (root passes os.access)
        with open(path, "ab"):
            pass
    except OSError as exc:
        raise ConfigError(option, f"cannot write {path}: {exc.strerror or exc}") from None
    if not existed:
        path.unlink()
    return path
