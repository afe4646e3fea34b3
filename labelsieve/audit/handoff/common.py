"""What both hand-offs share: which audit rows go to the tool, and the audit's values as plain Python."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from labelsieve.audit.schema import flagged_mask
from labelsieve.core.errors import DataError, LabelsieveError

__all__ = ["check_order", "export_rows", "missing_extra", "number", "row_values", "text"]


def check_order(table: pd.DataFrame) -> np.ndarray:
    """Each row's place in the audit's check sample (1 … K), 0 for rows outside it."""
    if "check" not in table.columns:
        return np.zeros(len(table), dtype=np.int64)
    return pd.to_numeric(table["check"], errors="coerce").fillna(0).to_numpy(dtype=np.int64)


def export_rows(table: pd.DataFrame, *, all_rows: bool, where: str) -> pd.DataFrame:
    """The rows a reviewer gets in the tool: the check sample first, in its review order (flagged or not: its
    review measures the audit), then the flagged rows (every readable one with ``all_rows``), worst first.
    Unreadable rows are left out: no tool can show them, and ``apply`` drops them."""
    unreadable = (text(table, "issue") == "unreadable").to_numpy()
    check = check_order(table)
    keep = ~unreadable & ((np.ones(len(table), dtype=bool) if all_rows else flagged_mask(table, where=where))
                          | (check > 0))
    rows = table.loc[keep]
    rank = (pd.to_numeric(rows["rank"], errors="coerce").fillna(np.inf).to_numpy() if "rank" in rows.columns
            else np.arange(len(rows), dtype=np.float64))
    c = check[keep]
    rows = rows.iloc[np.lexsort((rank, np.where(c > 0, c, np.iinfo(np.int64).max)))]
    if rows.empty:
        raise DataError(f"{where}: no {'readable' if all_rows else 'flagged readable'} rows to export"
                        + ("" if all_rows else "; pass --all-rows to export every readable row") + ".")
    return rows


def text(table: pd.DataFrame, column: str, *, strip: bool = True) -> pd.Series:
    """A column as strings ("" for missing values or an absent column), stripped unless ``strip`` is False
    (paths and labels are data: byte for byte)."""
    if column not in table.columns:
        return pd.Series("", index=table.index, dtype=object)
    col = table[column]
    out = col.astype(object).where(col.notna(), "").astype(str)
    return out.str.strip() if strip else out


def number(value: Any) -> float | None:
    """A finite float, or None (JSON has no NaN)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def missing_extra(package: str, extra: str, exc: ImportError, hint: str = "") -> LabelsieveError:
    """The error for an optional dependency that is not installed."""
    return LabelsieveError(f"{package} is not installed ({exc}). Install it with: pip install 'labelsieve[{extra}]'"
                           + (f" {hint}" if hint else "") + ".")


def row_values(rows: pd.DataFrame) -> dict[str, list[Any]]:
    """The audit fields a tool shows, as plain Python lists: ``path``, ``given``, ``sugg``, ``issue``, ``review``
    (strings), ``digest`` and ``audit_id`` (strings, "" when the audit has none), ``p_clean``, ``s_prob``,
    ``agreement`` (floats or None), ``rank`` (ints) and ``check`` (the check sample's review order, or None)."""
    n = len(rows)

    def numbers(column: str) -> list[float | None]:
        return [number(v) for v in rows[column].tolist()] if column in rows.columns else [None] * n

    rank = numbers("rank") if "rank" in rows.columns else list(range(1, n + 1))
    return {"path": text(rows, "path", strip=False).tolist(), "given": text(rows, "given_label", strip=False).tolist(),
            "sugg": text(rows, "suggested_label", strip=False).tolist(), "issue": text(rows, "issue").tolist(),
            "review": text(rows, "review").tolist(), "digest": text(rows, "digest").tolist(),
            "audit_id": text(rows, "audit_id").tolist(), "p_clean": numbers("p_clean"),
            "s_prob": numbers("suggested_prob"), "agreement": numbers("agreement"), "rank": [int(r or 0) for r in rank],
            "check": [int(c) if c > 0 else None for c in check_order(rows)]}
