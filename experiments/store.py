"""The results of one sweep on disk, written by the driver process only.

Layout of a sweep directory::

    sweep.toml          the sweep (``nnx sweep --config`` reads it back)
    results.csv         one row per finished trial, RESULT_COLUMNS
    summary.csv         one row per configuration, aggregated over seeds
    curves/<trial>.csv  per-epoch history (epoch, train_loss, ..., lr, seconds)
    models/<trial>.npz  the trained network (``Network.load``), for ok trials
    snapshots/<trial>.npz  the network every snapshot_every epochs, when asked for
    environment.json    the machine of each run of the sweep command (nnx, NumPy, BLAS, CPU)

Crash safety: a trial's curve and model are written atomically first, then
its row is appended as one line, flushed and fsynced. A row therefore always
has its files; files without a row (a kill in between) are removed on the
next open and their trial runs again. A kill mid-append leaves a torn last
line, which ``repair`` cuts off on resume; every complete line before it is kept.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import os
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import mlp
from experiments.config import OPTIONS, format_option
from experiments.errors import ConfigError
from experiments.files import history_csv, make_dir, read_history_csv
from experiments.locks import directory_lock
from mlp.network import atomic_write_bytes

# Every TrainConfig field is a column (the resolved value), seed last: the table
# describes each run on its own and its columns never depend on the sweep.
OPTION_COLUMNS = (*(name for name in OPTIONS if name != "seed"), "seed")
FINAL_COLUMNS = ("final_train_loss", "final_train_acc", "final_val_loss", "final_val_acc")
# The epoch of highest validation accuracy (the first on ties) and its numbers: what
# early stopping would have kept, next to where the run ended.
BEST_COLUMNS = ("best_val_acc", "best_val_loss", "best_epoch")
METRIC_COLUMNS = (*FINAL_COLUMNS, *BEST_COLUMNS, "epochs_run", "seconds")
RESULT_COLUMNS = ("trial_key", "status", *OPTION_COLUMNS, *METRIC_COLUMNS, "error", "nnx_version",
                  "finished")
GROUP_COLUMNS = tuple(c for c in OPTION_COLUMNS if c != "seed")
STATUSES = ("ok", "diverged", "failed")
HEADER = ",".join(RESULT_COLUMNS) + "\n"
ENVIRONMENT = "environment.json"

# Part of every trial key: bump it when a result row would mean something else
# for the same config (new columns, different metrics), so old rows re-run
# unless ``upgrade_row`` can carry them over. 3: the best_* columns.
RESULT_SCHEMA_VERSION = 3
KEY_LENGTH = 16


# Options added since sweeps were first stored, left out of the key at the value that
# computes as before, so the trials of a sweep stored earlier keep their keys (and
# re-running its command resumes it).
KEYLESS_DEFAULTS = {"conv_algorithms": "auto"}


def trial_key(config) -> str:
    """The hash of a resolved config (a TrainConfig) and the result schema: equal keys,
    equal results. It names the trial's row (the trial_key column) and its files."""
    values = {name: value for name, value in config.to_dict().items()
              if not (name in KEYLESS_DEFAULTS and value == KEYLESS_DEFAULTS[name])}
    payload = {"schema": RESULT_SCHEMA_VERSION, "config": values}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()[:KEY_LENGTH]


class SweepStore:
    """Read and write one sweep directory. Use ``SweepStore.open(path)``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.results_path = self.path / "results.csv"
        self.summary_path = self.path / "summary.csv"
        self.sweep_file = self.path / "sweep.toml"
        self.curves_dir = self.path / "curves"
        self.models_dir = self.path / "models"
        self.snapshots_dir = self.path / "snapshots"

    @classmethod
    @contextlib.contextmanager
    def open(cls, path: str | Path) -> Iterator[SweepStore]:
        """Create the directory and hold its lock while the block runs: one driver at a
        time (BusyError for a second one)."""
        store = cls(path)
        make_dir(store.path)
        with directory_lock(store.path):
            yield store

    # ---- sweep ------------------------------------------------------------------
    def read_sweep_file(self) -> str | None:
        return self.sweep_file.read_text() if self.sweep_file.exists() else None

    def write_sweep_file(self, text: str) -> None:
        atomic_write_bytes(self.sweep_file, text.encode())

    def has_foreign_files(self) -> bool:
        """Whether the directory holds anything but a sweep's own files."""
        ours = {"results.csv", "summary.csv", "sweep.toml", ENVIRONMENT, "curves", "models", "snapshots"}
        return any(p.name not in ours and not p.name.startswith(".tmp-") for p in self.path.iterdir())

    def record_environment(self, env: dict) -> None:
        """Append ``env`` (``experiments.environment``) to environment.json, a list: one
        entry per run of the sweep command that trained trials, the machine it ran on."""
        path = self.path / ENVIRONMENT
        try:
            sessions = json.loads(path.read_text())
        except (OSError, ValueError):
            sessions = []
        sessions = sessions if isinstance(sessions, list) else []
        atomic_write_bytes(path, (json.dumps([*sessions, env], indent=2) + "\n").encode())

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
            if self.upgrade():
                return 0
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

    def upgrade(self) -> bool:
        """Rewrite a results.csv of an older nnx (0.1, schema 2 without the best_*
        columns, or schema 3 without options added since) in today's columns; False
        when the file is not one. Each kept row gets
        its new trial key, its best_* from its curve, and its curve, model and snapshots
        are renamed to match (files first: a kill in between leaves the old results.csv,
        which is upgraded again, finding the files already renamed)."""
        try:
            text = self.results_path.read_text(encoding="utf-8")
            old = list(csv.DictReader(io.StringIO(text[:text.rfind("\n") + 1])))
            reader = csv.DictReader(io.StringIO(text))
            columns = set(reader.fieldnames or ())
        except (OSError, UnicodeDecodeError, csv.Error):
            return False
        key_column = "trial" if "trial" in columns else "trial_key"
        if not {key_column, "status", *FINAL_COLUMNS} <= columns:
            return False
        if set(BEST_COLUMNS) <= columns and not columns < set(RESULT_COLUMNS):
            return False    # today's schema with columns this nnx does not write
        # Today's schema less the options added since (--conv-algorithms): their
        # defaults compute as the file's nnx did, and are left out of the keys.
        try:
            pairs = [(row[key_column], upgrade_row(row)) for row in old
                     if None not in row.values() and row["status"] in STATUSES]
        except (ConfigError, KeyError, TypeError, ValueError):
            return False
        pairs = [(key, row) for key, row in pairs if row is not None]
        for key, row in pairs:
            if row["status"] != "failed":     # a failed trial has no numbers, as when it fails today
                history = self.read_history(key) or self.read_history(row["trial_key"])
                row.update({name: cell(name, value) for name, value in best_of_history(history).items()})
        for folder, suffix in ((self.curves_dir, ".csv"), (self.models_dir, ".npz"),
                               (self.snapshots_dir, ".npz")):
            for key, row in pairs:
                source = folder / f"{key}{suffix}"
                if source.exists():
                    os.replace(source, folder / f"{row['trial_key']}{suffix}")
        atomic_write_bytes(self.results_path, (HEADER + "".join(format_line(r) for _, r in pairs)).encode())
        return True

    def read_history(self, key: str) -> list[dict]:
        """The per-epoch history in curves/<key>.csv; [] when there is none or it is not
        one (damaged): its trial then has no best epoch, rather than stopping the reader."""
        path = self.curves_dir / f"{key}.csv"
        try:
            return read_history_csv(path.read_text(encoding="utf-8")) if path.is_file() else []
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
            return []

    def read_rows(self) -> dict[str, dict]:
        """trial key -> row (strings) for every complete row; a later row for a key wins."""
        if not self.results_path.exists():
            return {}
        text = self.results_path.read_text()
        text = text[:text.rfind("\n") + 1]      # a torn last line is not a row yet
        rows = {}
        for row in csv.DictReader(io.StringIO(text)):
            if None not in row and None not in row.values() and row["status"] in STATUSES:
                rows[row["trial_key"]] = row
        return rows

    def append(self, trial, record: dict) -> dict:
        """Write a finished trial: curve and model first, then its row (one fsynced line)."""
        self.curves_dir.mkdir(exist_ok=True)
        atomic_write_bytes(self.curves_dir / f"{trial.key}.csv", history_csv(record["history"]).encode())
        if record.get("model") is not None:
            self.models_dir.mkdir(exist_ok=True)
            atomic_write_bytes(self.models_dir / f"{trial.key}.npz", record["model"])
        if record.get("snapshots") is not None:
            self.snapshots_dir.mkdir(exist_ok=True)
            atomic_write_bytes(self.snapshots_dir / f"{trial.key}.npz", record["snapshots"])
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
            rows = {row["trial_key"]: row for row in kept}
        for folder, suffix in ((self.curves_dir, ".csv"), (self.models_dir, ".npz"),
                               (self.snapshots_dir, ".npz")):
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
    over the ``ok`` trials (``experiments.stats``); n_ok, n_diverged and n_failed
    count the trials of each status. ``results``: results.csv as a DataFrame of strings."""
    import pandas as pd

    from experiments.stats import over_seeds
    ok = results["status"] == "ok"
    metrics = results[list(METRIC_COLUMNS)].apply(pd.to_numeric, errors="coerce").where(ok)
    frame = pd.concat([results[list(GROUP_COLUMNS)], metrics], axis=1)
    counts = {f"n_{status}": (results["status"] == status).astype(int) for status in STATUSES}
    frame = frame.assign(**counts)
    table = over_seeds(frame, list(GROUP_COLUMNS), list(METRIC_COLUMNS))
    table = table.join(over_seeds(frame, list(GROUP_COLUMNS), list(counts), ("sum",)))
    return table.rename(columns={f"sum_{c}": c for c in counts}).reset_index()


# ---- rows ----------------------------------------------------------------------
def upgrade_row(old: dict) -> dict | None:
    """A results.csv row of an older nnx in today's columns with its new key, best_*
    as NaN (``SweepStore.upgrade`` computes them from the trial's curve); None when
    today's nnx would measure the trial differently, so that it runs again. Rows of
    nnx 0.1 (old option names, the key in column "trial"): 2D trials with a
    validation split run again (the split is now drawn by the one stratified split
    all data sets use). Rows of schema 2 (key in "trial_key") all carry over."""
    from experiments.config import TrainConfig, resolve
    nnx_0_1 = "trial" in old
    not_options = ("trial", "trial_key", "status", *METRIC_COLUMNS, "error", "nnx_version", "finished")
    config = resolve(TrainConfig.from_dict({name: text for name, text in old.items()
                                            if name not in not_options and text != ""}))
    if nnx_0_1 and not config.is_image and config.val_size:
        return None
    row = {"trial_key": trial_key(config), "status": old["status"]}
    row.update({name: cell(name, getattr(config, name)) for name in OPTION_COLUMNS})
    row.update({name: old.get(name, cell(name, math.nan)) for name in METRIC_COLUMNS})
    row.update(error=old.get("error", ""), nnx_version=old.get("nnx_version", ""),
               finished=old.get("finished", ""))
    return row


def best_of_history(history: list[dict]) -> dict:
    """best_epoch, best_val_acc and best_val_loss of a finished trial, from its
    per-epoch history, as the trainer tracks them while it runs
    (``TrainResult.note_validation``, which never sees an epoch whose validation
    loss is not finite)."""
    from experiments.runner import best_metrics
    from mlp.train import TrainResult
    result = TrainResult()
    for record in history:
        if math.isfinite(record["val_loss"]):
            result.note_validation(record)
    return best_metrics(result)


def make_row(trial, record: dict) -> dict:
    """A results.csv row (strings) for ``trial`` (key, resolved config) and a run record."""
    config = trial.config.to_dict()
    row = {"trial_key": trial.key, "status": record["status"]}
    row.update({name: cell(name, config[name]) for name in OPTION_COLUMNS})
    row.update({name: cell(name, record.get(name, math.nan)) for name in METRIC_COLUMNS})
    row["error"] = " ".join(str(record.get("error") or "").split())   # one line, always
    row["nnx_version"] = mlp.__version__
    row["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return row


def cell(name: str, value) -> str:
    """How a value is written in a CSV cell: an option's value as its formatter writes
    it (floats round-trip, hidden is 64x64), a metric by repr; None is empty."""
    if value is None:
        return ""
    if name in OPTIONS:
        return format_option(name, value)
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
