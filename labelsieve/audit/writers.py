"""audit.csv, audit.xlsx and audit.json writers (atomic), and the summary printed at the end of a run."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from openpyxl import Workbook
from openpyxl.cell import WriteOnlyCell
from openpyxl.styles import Font
from openpyxl.utils import get_column_letter
from rich.table import Table

from labelsieve.core.io import atomic_open, atomic_path, line_end, neutralise_frame, write_json
from labelsieve.core.progress import console, escape, warn

__all__ = ["exact_text", "is_score_column", "print_summary", "write_csv", "write_json", "write_xlsx"]

#: Number formats of the audit's numeric columns in audit.xlsx (others: Excel's general format).
_XLSX_FORMATS = {"p_clean": "0.000", "suggested_prob": "0.000", "agreement": "0.00"}
#: Column widths (characters) in audit.xlsx; others get a width from their header and first rows.
_XLSX_WIDTHS = {"path": 40, "review": 16, "issue": 10}


def is_score_column(name: str) -> bool:
    """``p_clean`` and every ``p_clean_<member>`` column (``p_clean_raw`` included): written at full precision."""
    return name == "p_clean" or name.startswith("p_clean_")


def exact_text(values: Any) -> list[str]:
    """Numbers as the shortest text that reads back as the same float64 (``repr``), ``""`` for NaN/None."""
    out = pd.to_numeric(pd.Series(values), errors="coerce").to_numpy(dtype=np.float64).tolist()
    return ["" if v != v else repr(v) for v in out]


def write_csv(table: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Write a table as UTF-8 CSV atomically. The scores (``p_clean``, ``p_clean_*``) are written exactly (the
    shortest text that reads back as the same float64), so the file ranks rows as the detector did (the
    calibrated p_clean keeps a gap of at least 1e-13 between rows the detector ordered:
    :data:`labelsieve.detectors.common.calibration.RANK_GAP`); other floats keep 6 significant digits; text a
    spreadsheet would read as a formula gets a leading ``'`` (:func:`labelsieve.core.io.neutralise_cell`)."""
    out = neutralise_frame(table)
    for c in out.columns:
        if is_score_column(str(c)) and out[c].dtype.kind == "f":
            out[c] = exact_text(out[c])
    with atomic_open(path) as f:
        out.to_csv(f, index=False, float_format="%.6g", lineterminator=line_end(table))
    return Path(path)


def write_xlsx(table: pd.DataFrame, path: str | os.PathLike[str], *, sheet: str = "audit") -> Path:
    """Write a table as an Excel workbook atomically: one sheet, header row frozen, an autofilter on
    every column, rows in the table's order (the audit's: worst first, flagged rows before the rest).

    Text is always stored as text, never as a formula: a file or class name starting with ``=``,
    ``+``, ``-`` or ``@`` shows as written and is read back unchanged (no formula injection, and no
    escaping to undo). Booleans are Excel booleans, NaN an empty cell. Written with openpyxl in
    write-only mode, so memory stays flat with the number of rows.
    """
    wb = Workbook(write_only=True)
    ws = wb.create_sheet(sheet)
    ws.freeze_panes = "A2"
    cols = [str(c) for c in table.columns]
    for j, c in enumerate(cols, start=1):
        sample = table[c].head(50).astype(str).str.len().max() if len(table) else 0
        sample = int(sample) if pd.notna(sample) else 0  # an all-empty column (pandas 3 keeps NaN through astype)
        width = _XLSX_WIDTHS.get(c, min(40, max(len(c) + 2, sample + 2)))
        ws.column_dimensions[get_column_letter(j)].width = width
    header = []
    for c in cols:
        cell = WriteOnlyCell(ws, value=c)
        cell.font = Font(bold=True)
        header.append(cell)
    ws.append(header)
    formats = [_XLSX_FORMATS.get(c) for c in cols]
    for row in table.itertuples(index=False, name=None):
        cells = []
        for v, fmt in zip(row, formats, strict=True):
            cell = WriteOnlyCell(ws, value=_xlsx_value(v))
            if isinstance(cell.value, str):
                cell.data_type = "s"  # text, even when it starts with '=' (openpyxl would make it a formula)
            elif fmt and isinstance(cell.value, float):
                cell.number_format = fmt
            cells.append(cell)
        ws.append(cells)
    ws.auto_filter.ref = f"A1:{get_column_letter(max(1, len(cols)))}{len(table) + 1}"
    with atomic_path(path) as tmp:
        wb.save(tmp)
    return Path(path)


def _xlsx_value(v: Any) -> Any:
    """A cell value openpyxl stores as intended: numpy scalars to Python, NaN/None to an empty cell."""
    if v is None or v is pd.NA:
        return None
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return None if math.isnan(v) else float(v)
    return str(v)


def _interval(iv: Any, summary: dict[str, Any]) -> str:
    """`` (95% interval 11.0–13.6%)`` or '' when there is none."""
    if not iv or len(iv) != 2 or iv[0] == iv[1]:
        return ""
    level = summary.get("noise_rate_interval_level")
    return f" ({level:.0%} interval {iv[0]:.1%}–{iv[1]:.1%})" if level else f" ({iv[0]:.1%}–{iv[1]:.1%})"


def _interval01(iv: Any) -> str:
    """`` (0.91–0.98)`` or ''."""
    return f" ({iv[0]:.2f}–{iv[1]:.2f})" if iv and len(iv) == 2 else ""


def print_summary(summary: dict[str, Any], files: dict[str, Path], *, top: int = 10) -> None:
    """A short rich summary: counts, noise estimate, the noisiest classes, where the files are.

    Names from the user's data (classes, paths, model) are escaped: they are shown, never read as markup.
    """
    t = Table(title=escape(f"labelsieve audit — {summary.get('method')} on {summary.get('n_images')} images"),
              show_header=False)
    t.add_column(style="bold")
    t.add_column()
    model = summary.get("model") or {}
    feats = summary.get("features") or {}
    t.add_row("model", escape(str(model.get("name") if model else f"none: features from {feats.get('file')}")))
    t.add_row("flagged", f"{summary['n_flagged']} ({summary['flag_rate']:.1%} of readable images): rows to review")
    comp = summary.get("competence") or {}
    if comp.get("verdict"):
        measured = ", ".join(f"{label} {comp[k]:.0%}" for k, label in (
            ("reader_agreement", "features and class names agree"), ("probe_agreement", "probe agrees with labels"),
            ("zero_shot_agreement", "zero-shot agrees with labels")) if comp.get(k) is not None)
        if comp.get("separation") is not None:
            measured += f", separation {comp['separation']:.1f} sd"
        word = "[bold red]WEAK[/bold red]" if comp["verdict"] == "weak" else "good"
        t.add_row("model on data", f"{word} ({escape(measured)})"
                  + (f": {escape('; '.join(comp.get('reasons') or []))}" if comp["verdict"] == "weak" else ""))
        if comp.get("expected_precision") is not None:
            t.add_row("flags (model)", f"expected precision {comp['expected_precision']:.2f}, recall "
                      f"{comp.get('expected_recall') or 0:.2f} (model-based"
                      + ("; unreliable here: measure them with the check sample)" if comp["verdict"] == "weak"
                         else ")"))
        if comp.get("confirmed_precision") is not None:
            t.add_row("flags (pictures)", f"{comp['confirmed_precision']:.0%} of the flagged rows read as another "
                      "class by " + ("both readings" if comp.get("zero_shot_agreement") is not None else "the probe")
                      + (f"; they hold {comp['confirmed_recall']:.0%} of all rows read so"
                         if comp.get("confirmed_recall") is not None else "")
                      + (" (unreliable here: the readings are weak)" if comp["verdict"] == "weak" else "")
                      + (f" — [bold red]{escape(comp['flags_caution'])}[/bold red]" if comp.get("flags_caution")
                         else ""))
    if summary.get("noise_rate_basis") == "reviewed sample":
        est = summary.get("reviewed_estimate") or {}
        t.add_row("wrong labels", f"{summary['noise_rate']:.1%}{_interval(summary.get('noise_rate_interval'), summary)}"
                  f" — from {est.get('check_reviewed', 0)} reviewed check-sample rows and {est.get('exact_rows', 0)} "
                  "counted exactly; holds whatever the model (the model alone: "
                  f"{summary.get('model_noise_rate', 0):.1%})")
        if est.get("precision") is not None:
            t.add_row("flags (checked)", f"precision {est['precision']:.2f}"
                      f"{_interval01(est.get('precision_interval'))}, recall {est.get('recall') or 0:.2f}"
                      f"{_interval01(est.get('recall_interval'))} (the reviewed audit's flags)")
    else:
        t.add_row("estimated noise", f"{summary['noise_rate']:.1%}"
                  f"{_interval(summary.get('noise_rate_interval'), summary)} of the labels are wrong, says the model "
                  "(mean of 1 − calibrated p_clean; the interval covers its fit only)")
    design = summary.get("check_sample") or {}
    if design.get("size"):
        t.add_row("check sample", f"{design['size']} random rows (column 'check', first on the page): review them for "
                  "an error rate with an interval that holds whatever the model")
    t.add_row("unreadable", str(summary["n_unreadable"]))
    t.add_row("duplicates", str(summary["n_duplicates"]) + " byte-identical")
    nd = summary.get("near_duplicates") or {}
    if nd.get("threshold") is not None and nd.get("n_groups"):
        t.add_row("near-duplicates", f"{nd['n_groups']} group(s) of {nd['n_rows']} images: "
                  f"{nd['n_conflicting_groups']} with conflicting labels (ranked first), "
                  f"{nd['n_groups_across_folders']} across top-level folders (a train/val split leaks)")
    elif nd.get("threshold") is not None:
        t.add_row("near-duplicates", "none found")
    t.add_row("rule", escape(summary["decision_rule"]))
    info = summary.get("detector_info") or {}
    runs = [("", info)] + [(f"{m.get('member')}: ", m.get("info") or {}) for m in info.get("members", [])]
    paths = [f"{who}{i['path']} ({i['path_reason']})" for who, i in runs if i.get("path_reason")]
    if paths:  # which image-side path a paper-based detector ran (its paper's, or the fallback) and why
        t.add_row("path", escape("; ".join(paths)))
    timings = summary.get("timings", {})
    if timings:
        t.add_row("seconds", ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    console.print(t)
    per = sorted(summary["noise_rate_per_class"].items(), key=lambda kv: -kv[1])[:top]
    ct = Table(title="noisiest classes (estimated share of wrong labels)")
    ct.add_column("class")
    ct.add_column("estimated noise", justify="right")
    ct.add_column("flagged", justify="right")
    ct.add_column("images", justify="right")
    intervals = summary.get("noise_rate_per_class_interval") or {}
    flagged = summary.get("flag_rate_per_class") or {}
    for c, r in per:
        ct.add_row(escape(c), f"{r:.1%}{_interval(intervals.get(c), summary)}",
                   f"{flagged[c]:.1%}" if c in flagged else "", str(summary["class_counts"].get(c, "")))
    console.print(ct)
    for w in summary.get("warnings", []):
        warn(w)
    for name, path in files.items():
        console.print(f"[bold]{escape(name)}[/bold]: {escape(str(path))}")
