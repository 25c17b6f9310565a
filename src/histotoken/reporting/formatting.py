"""Numbers and settings as text for the report's tables (no file is read here)."""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np
import pandas as pd

from histotoken.reporting import tables
from histotoken.reporting.blocks import Table

MISSING = "—"


def format_number(value: Any, digits: int | None = None) -> str:
    """Numbers for tables: NaN -> an em dash; without ``digits``, precision follows magnitude."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value) if value not in (None, "") else MISSING
    if np.isnan(number):
        return MISSING
    if digits is not None:
        return f"{number:.{digits}f}"
    if abs(number) >= 100:
        return f"{number:,.0f}"
    if abs(number) >= 10:
        return f"{number:.1f}"
    if 0 < abs(number) < 1:
        return f"{number:.2g}"  # small costs (e.g. 0.017 GFLOPs at 32 px) keep two significant digits
    return f"{number:.2f}"


def format_estimate(value: float, low: float, high: float, digits: int = 2) -> str:
    """``0.81 [0.75, 0.86]``; the interval is left out when the file has none."""
    if np.isnan(value):
        return MISSING
    if np.isnan(low) or np.isnan(high):
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def format_efficiency(table: pd.DataFrame) -> pd.DataFrame:
    """Rename and format the efficiency columns present in ``table``."""
    shown = pd.DataFrame(index=table.index)
    for column, heading in tables.EFFICIENCY_COLUMNS.items():
        if column not in table.columns:
            continue
        if column == "tokens_final":
            shown[heading] = [MISSING if pd.isna(v) else str(int(v)) for v in table[column]]
        else:
            shown[heading] = [format_number(v) for v in table[column]]
    return shown


def flatten(mapping: Any, prefix: str = "") -> dict[str, str]:
    """Nested dict -> ``{"a.b": "value"}`` with lists written inline."""
    if not isinstance(mapping, dict):
        return {prefix or "value": inline(mapping)}
    flat: dict[str, str] = {}
    for key, value in mapping.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name))
        else:
            flat[name] = inline(value)
    return flat


def inline(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(inline(item) for item in value) if value else "(none)"
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    if value is None:
        return MISSING
    return str(value)


def key_value_table(pairs: dict[str, str], key_heading: str = "setting") -> Table:
    return Table(pd.DataFrame({key_heading: list(pairs), "value": list(pairs.values())}))


def file_name(text: str) -> str:
    """A run id or model label as a safe file-name part (``@``, ``=``, ``+`` and ``,`` become ``_``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "unnamed"


def find_key(mapping: dict | None, names: tuple[str, ...]) -> Any | None:
    """The first of ``names`` found at the top level of ``mapping``, else one level down."""
    if not mapping:
        return None
    for name in names:
        if name in mapping:
            return mapping[name]
    for value in mapping.values():
        if isinstance(value, dict):
            for name in names:
                if name in value:
                    return value[name]
    return None


def index_to_column(frame: pd.DataFrame, name: str) -> pd.DataFrame:
    shown = frame.copy()
    shown.columns = [str(c) for c in shown.columns]
    shown.insert(0, name, [str(i) for i in shown.index])
    return shown.reset_index(drop=True)


def matrix_table(matrix: pd.DataFrame) -> pd.DataFrame:
    """Train x test matrix as text: first column ``trained on``, then ``tested on <domain>``."""
    shown = pd.DataFrame({"trained on": [str(d) for d in matrix.index]})
    for column in matrix.columns:
        shown[f"tested on {column}"] = [format_number(v, 3) for v in matrix[column]]
    return shown

