"""A run's per-epoch records held as columns.

A stack of trials records every epoch of every trial; as dicts (one per trial
per epoch) they would cost more to build, to send from a worker process and
to write than the training itself. ``History`` keeps the same records as one
array per column and reads like the list of dicts it stands for.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

HISTORY_COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds")


class History(Sequence):
    """Records as columns (``HISTORY_COLUMNS``): ``history[i]`` is the dict of the i-th
    epoch, with Python ints and floats, as the solo trainer's records are."""

    def __init__(self, columns: dict[str, np.ndarray]):
        self.columns = {name: np.asarray(columns[name]) for name in HISTORY_COLUMNS}
        lengths = {len(column) for column in self.columns.values()}
        if len(lengths) > 1:
            raise ValueError(f"history columns of different lengths {sorted(lengths)}")

    @classmethod
    def from_records(cls, records: Sequence[dict]) -> History:
        return cls({name: np.array([r[name] for r in records],
                                   dtype=np.int64 if name == "epoch" else np.float64)
                    for name in HISTORY_COLUMNS})

    def __len__(self) -> int:
        return len(self.columns["epoch"])

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        index = range(len(self))[index]           # negative indices; IndexError past the end
        record = {name: column[index].item() for name, column in self.columns.items()}
        for name, value in record.items():
            if value != value:      # NaN: the solo loop's math.nan, so records compare equal
                record[name] = math.nan
        return record

    def __eq__(self, other):
        if isinstance(other, Sequence) and not isinstance(other, (str, bytes)):
            return list(self) == list(other)
        return NotImplemented

    def __repr__(self) -> str:
        return f"History({len(self)} epochs)"

    def to_csv(self) -> str:
        """The text ``experiments.files.history_csv`` writes for these records, made a
        column at a time: a column of few distinct values (an lr, an accuracy) is
        formatted once per value."""
        cells = [_reprs(self.columns["epoch"])]
        cells += [_float_reprs(self.columns[name]) for name in HISTORY_COLUMNS[1:]]
        lines = [",".join(HISTORY_COLUMNS), *map(",".join, zip(*cells, strict=True))]
        return "\n".join(lines) + "\n"


def _reprs(column: np.ndarray) -> list[str]:
    """repr() of every value, made in C by the repr of a list (the csv module writes floats
    as repr(value), ints as str(value): the same text)."""
    if len(column) == 0:
        return []
    return repr(column.tolist())[1:-1].split(", ")


def _float_reprs(column: np.ndarray) -> list[str]:
    zeros = column == 0
    if zeros.any() and np.signbit(column[zeros]).any():   # unique() would merge -0.0 and 0.0
        return _reprs(column)
    values, inverse = np.unique(column, return_inverse=True)
    if 4 * len(values) >= len(column):
        return _reprs(column)
    texts = _reprs(values)
    return [texts[i] for i in inverse.tolist()]
