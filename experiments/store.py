"""The results of one sweep on disk, written by the driver process only.

Layout of a sweep directory::

    sweep.toml          the spec (``nnx sweep --config`` reads it back)
    results.csv         one row per finished trial, RESULT_COLUMNS
    summary.csv         one row per configuration, aggregated over seeds
    curves/<trial>.csv  per-epoch history (epoch, train_loss, ..., lr, seconds)
    models/<trial>.npz  the trained network (``Network.load``), for ok trials

Crash safety: a trial's curve and model are written atomically first, then
its row is appended as one line, flushed and fsynced. A row therefore always
has its files; files without a row (a kill in between) are removed on the
next open and their trial runs again. A kill mid-append leaves a torn last
line, which ``repair`` cuts off on resume; every complete line before it is kept.
"""
from __future__ import annotations

import contextlib
import csv
import io
import math
import os
from collections.abc import Iterator
from dataclasses import fields
from datetime import datetime, timezone
from pathlib import Path

import mlp
from experiments.config import TrainConfig, format_hidden
from experiments.errors import ConfigError
from experiments.locks import directory_lock
from experiments.runner import history_csv
from mlp.network import atomic_write_bytes

# Every TrainConfig field is a column (the resolved value), seed last: the table
# describes each run on its own and its columns never depend on the spec.
OPTION_COLUMNS = (*(f.name for f in fields(TrainConfig) if f.name not in ("extra", "seed")), "seed")
FINAL_COLUMNS = ("final_train_loss", "final_train_acc", "final_val_loss", "final_val_acc")
METRIC_COLUMNS = (*FINAL_COLUMNS, "epochs_run", "seconds")
RESULT_COLUMNS = ("trial", "status", *OPTION_COLUMNS, *METRIC_COLUMNS, "error", "nnx_version",
                  "finished")
GROUP_COLUMNS = tuple(c for c in OPTION_COLUMNS if c != "seed")
STATUSES = ("ok", "diverged", "failed")
STATS = ("mean", "std", "min", "max")
HEADER = ",".join(RESULT_COLUMNS) + "\n"


class SweepStore:
    """Read and write one sweep directory. Use ``SweepStore.open(path)``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.results_path = self.path / "results.csv"
        self.summary_path = self.path / "summary.csv"
        self.spec_path = self.path / "sweep.toml"
        self.curves_dir = self.path / "curves"
        self.models_dir = self.path / "models"

    @classmethod
    @contextlib.contextmanager
    def open(cls, path: str | Path) -> Iterator[SweepStore]:
        """Create the directory and hold its lock while the block runs: one driver at a
        time (BusyError for a second one)."""
        store = cls(path)
        if store.path.exists() and not store.path.is_dir():
            raise ConfigError("out", f"{store.path} is a file, not a directory")
        store.path.mkdir(parents=True, exist_ok=True)
        with directory_lock(store.path):
            yield store

    # ---- spec ------------------------------------------------------------------
    def read_spec(self) -> str | None:
        return self.spec_path.read_text() if self.spec_path.exists() else None

    def write_spec(self, text: str) -> None:
        atomic_write_bytes(self.spec_path, text.encode())

    def has_foreign_files(self) -> bool:
        """Whether the directory holds anything but a sweep's own files."""
        ours = {"results.csv", "summary.csv", "sweep.toml", "curves", "models"}
        return any(p.name not in ours and not p.name.startswith(".tmp-") for p in self.path.iterdir())

    # ---- results.csv -----------------------------------------------------------
    def repair(self, force: bool = False) -> int:
        """Cut a torn last line off results.csv (or create it); return the bytes cut."""
        if not self.results_path.exists() or self.results_path.stat().st_size == 0:
            atomic_write_bytes(self.results_path, HEADER.encode())
            _fsync_dir(self.path)
            return 0
        data = self.results_path.read_bytes()
        keep = data.rfind(b"\n") + 1
        if keep == 0:                            # even the header is torn
            atomic_write_bytes(self.results_path, HEADER.encode())
            return len(data)
        if data[:len(HEADER)].decode(errors="replace") != HEADER:
            if force:
                atomic_write_bytes(self.results_path, HEADER.encode())
                return len(data)
            raise ConfigError("out", f"{self.results_path} has other columns than this nnx writes; "
                                     "choose another --out, or pass --force to start it afresh")
        if keep < len(data):
            with open(self.results_path, "r+b") as f:
                f.truncate(keep)
                f.flush()
                os.fsync(f.fileno())
        return len(data) - keep

    def read_rows(self) -> dict[str, dict]:
        """trial key -> row (strings) for every complete row; a later row for a key wins."""
        if not self.results_path.exists():
            return {}
        text = self.results_path.read_text()
        text = text[:text.rfind("\n") + 1]      # a torn last line is not a row yet
        rows = {}
        for row in csv.DictReader(io.StringIO(text)):
            if None not in row and None not in row.values() and row["status"] in STATUSES:
                rows[row["trial"]] = row
        return rows

    def append(self, trial, record: dict) -> dict:
        """Write a finished trial: curve and model first, then its row (one fsynced line)."""
        self.curves_dir.mkdir(exist_ok=True)
        atomic_write_bytes(self.curves_dir / f"{trial.key}.csv", history_csv(record["history"]).encode())
        if record.get("model") is not None:
            self.models_dir.mkdir(exist_ok=True)
            atomic_write_bytes(self.models_dir / f"{trial.key}.npz", record["model"])
        row = make_row(trial, record)
        line = format_line(row).encode()
        with open(self.results_path, "ab", buffering=0) as f:
            written = 0
            while written < len(line):            # a raw write may be partial
                written += f.write(line[written:])
            os.fsync(f.fileno())
        return row

    def remove_trials(self, keys: set[str]) -> None:
        """Drop the rows of ``keys`` (rewritten atomically) and every curve or model
        without a row, so files exist exactly for the rows."""
        rows = self.read_rows()
        if keys & set(rows):
            kept = [row for key, row in rows.items() if key not in keys]
            atomic_write_bytes(self.results_path, (HEADER + "".join(map(format_line, kept))).encode())
            rows = {row["trial"]: row for row in kept}
        for folder, suffix in ((self.curves_dir, ".csv"), (self.models_dir, ".npz")):
            if folder.is_dir():
                for file in folder.iterdir():
                    if (file.suffix == suffix and file.stem not in rows) or file.name.startswith(".tmp-"):
                        file.unlink()

    # ---- summary.csv -----------------------------------------------------------
    def write_summary(self, order: list[str]) -> None:
        """summary.csv for the trials ``order`` lists, in that order."""
        import pandas as pd

        rows = self.read_rows()
        frame = pd.DataFrame([rows[k] for k in order if k in rows], columns=list(RESULT_COLUMNS))
        buf = io.StringIO()
        summarize(frame).to_csv(buf, index=False, lineterminator="\n")
        atomic_write_bytes(self.summary_path, buf.getvalue().encode())


def summarize(results):
    """One row per configuration (every option but seed), aggregated over its seeds as
    scikit-learn's cv_results_ does over folds: mean_*, std_* (ddof 0), min_*, max_*
    over the ``ok`` trials; n_seeds counts those, n_diverged and n_failed the others.
    ``results``: results.csv as a DataFrame of strings."""
    import pandas as pd

    ok = results["status"] == "ok"
    metrics = results[list(METRIC_COLUMNS)].apply(pd.to_numeric, errors="coerce").where(ok)
    frame = pd.concat([results[list(GROUP_COLUMNS)], metrics], axis=1)
    for status in STATUSES:
        frame[status] = (results["status"] == status).astype(int)
    groups = frame.groupby(list(GROUP_COLUMNS), sort=False, dropna=False)
    columns = {f"{stat}_{m}": getattr(groups[m], stat)(**({"ddof": 0} if stat == "std" else {}))
               for m in METRIC_COLUMNS for stat in STATS}
    columns.update(n_seeds=groups["ok"].sum(), n_diverged=groups["diverged"].sum(),
                   n_failed=groups["failed"].sum())
    return pd.DataFrame(columns).reset_index()


# ---- rows ----------------------------------------------------------------------
def make_row(trial, record: dict) -> dict:
    """A results.csv row (strings) for ``trial`` (key, resolved config) and a run record."""
    config = trial.config.to_dict()
    row = {"trial": trial.key, "status": record["status"]}
    row.update({name: cell(name, config[name]) for name in OPTION_COLUMNS})
    row.update({name: cell(name, record.get(name, math.nan)) for name in METRIC_COLUMNS})
    row["error"] = " ".join(str(record.get("error") or "").split())   # one line, always
    row["nnx_version"] = mlp.__version__
    row["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return row


def cell(name: str, value) -> str:
    """How a value is written in a CSV cell: floats round-trip (repr), None is empty,
    hidden is 64x64 (none for a linear classifier)."""
    if value is None:
        return ""
    if name == "hidden":
        return format_hidden(value)
    return repr(value) if isinstance(value, float) else str(value)


def format_line(row: dict) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow([row[c] for c in RESULT_COLUMNS])
    return buf.getvalue()


def _fsync_dir(path: Path) -> None:
    """Make a new file's directory entry durable (POSIX only)."""
    if os.name == "posix":
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
