"""The files of a run, in the formats every part of nnx reads and writes them."""
from __future__ import annotations

import csv
import io

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
