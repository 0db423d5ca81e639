"""`StatisticsHistory`: the in-memory, tidy record kept by the statistics callbacks."""

from __future__ import annotations

import math
from collections.abc import Sequence


class StatisticsHistory:
    """Rows of statistics, one per (record step, layer), with fixed columns.

    The layout is "tidy" (one observation per row), so it converts directly to
    a `pandas.DataFrame`. Every row has every column; a statistic that does not
    apply to a row holds `nan`.

    Args:
        columns: The column names, in order.

    Example:

    >>> history = StatisticsHistory(["step", "layer", "p50"])
    >>> history.append({"step": 0, "layer": "dense", "p50": 0.1})
    >>> history.as_dict()
    {'step': [0], 'layer': ['dense'], 'p50': [0.1]}
    """

    def __init__(self, columns: Sequence[str]):
        self.columns = tuple(columns)
        self._rows: list[tuple] = []

    def append(self, row: dict) -> None:
        """Adds one row; `row` must have exactly the history's columns."""
        if set(row) != set(self.columns):
            raise ValueError(
                f"A history row needs the columns {list(self.columns)}. "
                f"Received: {sorted(row)}"
            )
        self._rows.append(tuple(row[c] for c in self.columns))

    def clear(self) -> None:
        """Removes every row (the callbacks keep their rows across `fit` calls)."""
        self._rows.clear()

    def __len__(self) -> int:
        return len(self._rows)

    def rows(self) -> list[dict]:
        """Returns the rows as a list of `{column: value}` dicts."""
        return [dict(zip(self.columns, r, strict=True)) for r in self._rows]

    def as_dict(self) -> dict[str, list]:
        """Returns `{column: [values...]}`, e.g. for `pandas.DataFrame(...)`."""
        return {c: [r[i] for r in self._rows] for i, c in enumerate(self.columns)}

    def to_dataframe(self):
        """Returns the history as a `pandas.DataFrame` (needs pandas)."""
        try:
            import pandas as pd
        except ModuleNotFoundError as e:
            raise ModuleNotFoundError(
                "`to_dataframe()` needs pandas: pip install pandas"
            ) from e
        return pd.DataFrame(self.as_dict(), columns=list(self.columns))

    def series(self, layer: str, column: str) -> tuple[list, list]:
        """Returns `(steps, values)` of one column for one layer, in step order."""
        if column not in self.columns:
            raise ValueError(
                f"Unknown column {column!r}; the history has {list(self.columns)}"
            )
        li, ci, si = (self.columns.index(k) for k in ("layer", column, "step"))
        pairs = sorted((r[si], r[ci]) for r in self._rows if r[li] == layer)
        return [p[0] for p in pairs], [p[1] for p in pairs]

    def layers(self) -> list[str]:
        """Returns the layer names in the order they first appear."""
        li = self.columns.index("layer")
        return list(dict.fromkeys(r[li] for r in self._rows))

    def __repr__(self) -> str:
        return f"StatisticsHistory({len(self)} rows, columns={list(self.columns)})"


def is_nan(value) -> bool:
    """True for a float NaN (used by writers to skip statistics that don't apply)."""
    return isinstance(value, float) and math.isnan(value)
