"""The files of a run, in the formats every part of nnx reads and writes them."""
from __future__ import annotations

import csv
import io

from mlp.train import HISTORY_COLUMNS


def history_csv(history: list[dict]) -> str:
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
