"""Statistics over seeds, computed one way for every table and figure.

Seeds are treated as scikit-learn treats folds: per configuration, the mean,
the standard deviation with ddof 0 (the spread of these seeds, not an estimate
of a population's), the min and the max; missing values are skipped.
"""
from __future__ import annotations

import pandas as pd

STATS = ("mean", "std", "min", "max")


def over_seeds(frame: pd.DataFrame, by: list[str], columns: list[str],
               stats: tuple[str, ...] = STATS) -> pd.DataFrame:
    """Per group of rows with equal ``by`` values (first-seen order): each statistic of
    each column, named ``{stat}_{column}`` (``count`` counts the non-missing values),
    indexed by ``by``."""
    groups = frame.groupby(by, sort=False, dropna=False)
    return pd.DataFrame({f"{stat}_{column}": (groups[column].std(ddof=0) if stat == "std"
                                              else getattr(groups[column], stat)())
                         for column in columns for stat in stats})
