"""audit.xlsx: written by `labelsieve audit --xlsx` (header frozen, filters on, flagged rows first, text never a
formula), reviewed in the workbook, and read back by `labelsieve apply`."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
from openpyxl import load_workbook

from labelsieve.audit.auditset import check_audit_output, keep_reviewed_copy
from labelsieve.audit.writers import write_xlsx
from labelsieve.cli import main
from labelsieve.core.errors import OutputError


def test_audit_xlsx_round_trip_through_apply(imagenette_small, mini_clip_dir, feature_cache, tmp_path, capsys):
    src_root, src_csv = imagenette_small
    df = pd.read_csv(src_csv).groupby("label").head(4).reset_index(drop=True)
    root = tmp_path / "imgs"
    for p in df["path"]:
        (root / p).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src_root / p, root / p)
    classes = sorted(df["label"].unique())
    for i in (0, 9, 18, 27):  # four wrong labels
        df.loc[i, "label"] = classes[(classes.index(df.loc[i, "label"]) + 3) % len(classes)]
    shutil.copy(root / df.loc[5, "path"], root / "train/copy.jpg")  # the same picture twice
    df = pd.concat([df, pd.DataFrame([{"path": "train/copy.jpg", "label": df.loc[5, "label"]}])], ignore_index=True)
    df.to_csv(tmp_path / "labels.csv", index=False)
    out = tmp_path / "out"
    assert main(["audit", str(root), str(tmp_path / "labels.csv"), "--method", "label_match", "--model",
                 str(mini_clip_dir), "-o", str(out), "--cache-dir", str(feature_cache), "--no-progress",
                 "--no-html", "--xlsx"]) == 0
    csv_table = pd.read_csv(out / "audit.csv", keep_default_na=False, dtype=str)
    wb = load_workbook(out / "audit.xlsx")
    ws = wb.active
    assert ws.freeze_panes == "A2"
    assert ws.auto_filter.ref == f"A1:{ws.cell(1, ws.max_column).column_letter}{len(csv_table) + 1}"
    header = [c.value for c in ws[1]]
    assert header == list(csv_table.columns)
    rows = [[c.value for c in r] for r in ws.iter_rows(min_row=2)]
    assert [r[header.index("path")] for r in rows] == csv_table["path"].tolist()  # same order: worst first
    flags = [r[header.index("is_noisy")] for r in rows]
    assert all(isinstance(f, bool) for f in flags) and flags == sorted(flags, reverse=True) and sum(flags) >= 4
    group = {r[header.index("path")]: r[header.index("duplicate_group")] for r in rows}
    assert group["train/copy.jpg"] is not None and group["train/copy.jpg"] == group[df.loc[5, "path"]]

    # review in the workbook: drop the first flagged row, relabel the second to its true class
    review_col = header.index("review") + 1
    ws.cell(2, review_col).value = "drop"
    ws.cell(3, review_col).value = "relabel:" + classes[0]
    wb.save(out / "audit.xlsx")
    capsys.readouterr()
    assert main(["apply", str(out / "audit.xlsx"), "-o", str(tmp_path / "clean.csv")]) == 0
    clean = pd.read_csv(tmp_path / "clean.csv", keep_default_na=False)
    assert len(clean) == len(df) - 1 and rows[0][header.index("path")] not in set(clean["path"])
    assert clean.set_index("path").loc[rows[1][header.index("path")], "label"] == classes[0]


def test_xlsx_text_is_never_a_formula(tmp_path):
    table = pd.DataFrame({"path": ["=HYPERLINK(\"http://x\",\"y\").jpg", "+cmd|' /C calc'!A0", "@SUM(1)"],
                          "given_label": ["-2+3", "a", "b"], "p_clean": [0.1, np.nan, 0.9],
                          "is_noisy": [True, False, False],
                          "duplicate_group": pd.Series([1, None, 1], dtype="Int64")})
    write_xlsx(table, tmp_path / "a.xlsx")
    ws = load_workbook(tmp_path / "a.xlsx").active
    cells = {c.coordinate: c for row in ws.iter_rows() for c in row}
    for ref in ("A2", "A3", "A4", "B2"):
        assert cells[ref].data_type == "s", ref
    assert cells["A2"].value == table.loc[0, "path"] and cells["B2"].value == "-2+3"
    assert cells["C3"].value is None and cells["C2"].number_format == "0.000"
    assert [cells["E2"].value, cells["E3"].value] == [1, None]


def test_a_reviewed_audit_xlsx_is_protected_like_audit_csv(tmp_path):
    """An audit that would replace or remove an audit.xlsx holding review decisions is refused before any work
    (without --xlsx a new audit removes the old audit's audit.xlsx: it belongs to another audit); with --force a
    dated copy is kept first."""
    table = pd.DataFrame({"path": ["a.jpg", "b.jpg"], "given_label": ["cat", "dog"], "review": ["drop", ""]})
    write_xlsx(table, tmp_path / "audit.xlsx")
    check_audit_output(tmp_path, force=False, files=("audit.csv",))  # a sheet the audit does not touch
    with pytest.raises(OutputError, match=r"audit\.xlsx holds 1 review decision"):
        check_audit_output(tmp_path, force=False)
    check_audit_output(tmp_path, force=True, files=("audit.csv", "audit.xlsx"))
    copy = keep_reviewed_copy(tmp_path / "audit.xlsx")
    assert copy is not None and copy.name.startswith("audit.reviewed-") and copy.suffix == ".xlsx"
    assert pd.read_excel(copy, dtype=str, keep_default_na=False)["review"].tolist() == ["drop", ""]


def test_xlsx_column_empty_in_its_first_rows_is_written(tmp_path):
    """pandas 3 keeps missing values missing through astype(str): a column empty in its first 50 rows (the check
    sample's column, near-duplicate groups) made the column-width guess fail."""
    table = pd.DataFrame({"path": [f"{i}.jpg" for i in range(60)], "check": pd.array([pd.NA] * 59 + [1], "Int64"),
                          "duplicate_group": pd.array([pd.NA] * 60, "Int64")})
    write_xlsx(table, tmp_path / "a.xlsx")
    back = pd.read_excel(tmp_path / "a.xlsx")
    assert back["check"].isna().sum() == 59 and back["check"].iloc[-1] == 1
