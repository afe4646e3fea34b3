"""labelsieve apply: every review decision, error messages with line numbers, order, atomic writes."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from labelsieve.audit.review import apply_review, kept_rows
from labelsieve.audit.schema import read_audit
from labelsieve.core.errors import DataError, ParameterError

HEADER = ["rank", "path", "given_label", "p_clean", "is_noisy", "suggested_label", "suggested_prob", "issue",
          "review"]


def write_audit(path: Path, rows: list[dict[str, object]], *, header: list[str] | None = None,
                delimiter: str = ",", bom: bool = False) -> Path:
    """Write an audit CSV; missing fields are empty, rank follows the row order."""
    header = header or HEADER
    with open(path, "w", newline="", encoding="utf-8-sig" if bom else "utf-8") as f:
        w = csv.DictWriter(f, fieldnames=header, delimiter=delimiter, extrasaction="ignore")
        w.writeheader()
        for i, r in enumerate(rows, start=1):
            w.writerow({"rank": i, "p_clean": 0.5, "suggested_prob": 0.5, "issue": "", "review": "", **r})
    return path


def row(path: str, given: str, *, noisy: bool, sugg: str | None = None, review: str = "", issue: str = "",
        **extra: object) -> dict[str, object]:
    return {"path": path, "given_label": given, "is_noisy": noisy, "suggested_label": given if sugg is None else sugg,
            "review": review, "issue": issue or ("label" if noisy else ""), **extra}


def read_out(path: Path) -> list[tuple[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        r = csv.reader(f)
        assert next(r) == ["path", "label"]
        return [(a, b) for a, b in r]


@pytest.fixture()
def every_decision(tmp_path) -> Path:
    """One row per decision path (line numbers in comments: header is line 1)."""
    return write_audit(tmp_path / "audit.csv", [
        row("f.jpg", "cat", noisy=True, sugg="dog", review="relabel"),          # line 2 -> dog
        row("e.jpg", "cat", noisy=True, sugg="dog", review="keep"),             # line 3 -> cat
        row("d.jpg", "dog", noisy=True, sugg="cat", review="drop"),             # line 4 -> dropped
        row("c.jpg", "dog", noisy=True, sugg="cat", review="relabel:bird"),     # line 5 -> bird
        row("b.jpg", "cat", noisy=True, sugg="dog"),                            # line 6 unreviewed flagged
        row("h.jpg", "bird", noisy=True, sugg="", issue="unreadable"),          # line 7 -> dropped always
        row("a.jpg", "bird", noisy=False),                                      # line 8 -> bird
        row("g.jpg", "dog", noisy=False, review="keep"),                        # line 9 -> dog
    ])


def test_every_decision_with_defaults(every_decision, tmp_path):
    out = tmp_path / "labels.clean.csv"
    counts = apply_review(every_decision, out_csv=out)
    assert read_out(out) == [("a.jpg", "bird"), ("b.jpg", "cat"), ("c.jpg", "bird"), ("e.jpg", "cat"),
                             ("f.jpg", "dog"), ("g.jpg", "dog")]
    assert counts == {"kept": 4, "relabelled": 2, "dropped": 2, "unreviewed_flagged": 1, "missing": 0}


def test_drop_unreviewed_flagged(every_decision, tmp_path):
    out = tmp_path / "o.csv"
    counts = apply_review(every_decision, out_csv=out, drop_unreviewed_flagged=True)
    assert ("b.jpg", "cat") not in read_out(out) and len(read_out(out)) == 5
    assert counts == {"kept": 3, "relabelled": 2, "dropped": 3, "unreviewed_flagged": 1, "missing": 0}


def test_accept_suggestions(every_decision, tmp_path):
    out = tmp_path / "o.csv"
    counts = apply_review(every_decision, out_csv=out, accept_suggestions=True)
    assert dict(read_out(out))["b.jpg"] == "dog"
    # Explicit decisions still win over the suggestion.
    assert dict(read_out(out))["e.jpg"] == "cat" and "d.jpg" not in dict(read_out(out))
    assert counts == {"kept": 3, "relabelled": 3, "dropped": 2, "unreviewed_flagged": 1, "missing": 0}


def test_both_treatments_of_unreviewed_rows_is_a_parameter_error(every_decision, tmp_path):
    with pytest.raises(ParameterError, match="'accept_suggestions' parameter of apply_review"):
        apply_review(every_decision, out_csv=tmp_path / "o.csv", drop_unreviewed_flagged=True,
                     accept_suggestions=True)
    assert not (tmp_path / "o.csv").exists()


def test_unreadable_rows_are_dropped_whatever_the_review(tmp_path):
    audit = write_audit(tmp_path / "a.csv", [
        row("x.jpg", "cat", noisy=True, sugg="", issue="unreadable", review="keep"),
        row("y.jpg", "cat", noisy=False, issue="UNREADABLE"),
        row("z.jpg", "dog", noisy=False),
    ])
    counts = apply_review(audit, out_csv=tmp_path / "o.csv", accept_suggestions=True)
    assert read_out(tmp_path / "o.csv") == [("z.jpg", "dog")]
    assert counts == {"kept": 1, "relabelled": 0, "dropped": 2, "unreviewed_flagged": 0, "missing": 0}


def test_review_values_are_trimmed_and_case_insensitive(tmp_path):
    audit = write_audit(tmp_path / "a.csv", [
        row("1.jpg", "cat", noisy=True, sugg="dog", review="  KEEP "),
        row("2.jpg", "cat", noisy=True, sugg="dog", review="Relabel"),
        row("3.jpg", "cat", noisy=True, sugg="dog", review=" Drop"),
        row("4.jpg", "cat", noisy=True, sugg="dog", review="RELABEL: Dog "),
        row("5.jpg", "cat", noisy=True, sugg="dog", review="relabel : DOG"),  # class matched case-insensitively
        row("6.jpg", "dog", noisy=False, review=" "),
    ])
    counts = apply_review(audit, out_csv=tmp_path / "o.csv")
    assert read_out(tmp_path / "o.csv") == [("1.jpg", "cat"), ("2.jpg", "dog"), ("4.jpg", "dog"),
                                            ("5.jpg", "dog"), ("6.jpg", "dog")]
    assert counts == {"kept": 2, "relabelled": 3, "dropped": 1, "unreviewed_flagged": 0, "missing": 0}


def test_relabel_to_same_label_counts_as_kept(tmp_path):
    audit = write_audit(tmp_path / "a.csv", [row("1.jpg", "cat", noisy=True, sugg="cat", review="relabel"),
                                              row("2.jpg", "dog", noisy=True, sugg="cat", review="relabel:dog")])
    counts = apply_review(audit, out_csv=tmp_path / "o.csv")
    assert counts == {"kept": 2, "relabelled": 0, "dropped": 0, "unreviewed_flagged": 0, "missing": 0}


def test_unknown_review_value_names_line_and_allowed_values(every_decision, tmp_path):
    df = pd.read_csv(every_decision, dtype=str, keep_default_na=False)
    df.loc[3, "review"] = "kep"      # CSV line 5
    df.loc[6, "review"] = "delete"   # CSV line 8
    bad = tmp_path / "bad.csv"
    df.to_csv(bad, index=False)
    out = tmp_path / "o.csv"
    with pytest.raises(DataError) as err:
        apply_review(bad, out_csv=out)
    msg = str(err.value)
    assert str(bad) in msg and "line 5: 'kep' (did you mean 'keep'?)" in msg and "line 8: 'delete'" in msg
    assert "keep, relabel, relabel:<class>, drop" in msg
    assert not out.exists()


def test_line_numbers_count_blank_lines(tmp_path):
    p = tmp_path / "a.csv"
    p.write_text("path,given_label,is_noisy,suggested_label,review\n"
                 "a.jpg,cat,False,cat,\n"
                 "\n"
                 "b.jpg,cat,True,dog,maybe\n")
    with pytest.raises(DataError, match=r"line 4: 'maybe'"):
        apply_review(p, out_csv=tmp_path / "o.csv")


def test_relabel_to_unknown_class_names_line_and_class(every_decision, tmp_path):
    df = pd.read_csv(every_decision, dtype=str, keep_default_na=False)
    df.loc[1, "review"] = "relabel:hamster"  # line 3
    df.loc[2, "review"] = "relabel:Dgo"      # line 4
    df.loc[4, "review"] = "relabel:"         # line 6
    bad = tmp_path / "bad.csv"
    df.to_csv(bad, index=False)
    with pytest.raises(DataError) as err:
        apply_review(bad, out_csv=tmp_path / "o.csv")
    msg = str(err.value)
    assert "line 3: unknown class 'hamster'" in msg
    assert "line 4: unknown class 'Dgo'" in msg and "did you mean 'dog'" in msg
    assert "line 6: 'relabel:' names no class" in msg
    assert "Known classes: bird, cat, dog" in msg


def test_classes_argument_defines_the_known_classes(every_decision, tmp_path):
    df = pd.read_csv(every_decision, dtype=str, keep_default_na=False)
    df.loc[1, "review"] = "relabel:hamster"
    audit = tmp_path / "a.csv"
    df.to_csv(audit, index=False)
    apply_review(audit, out_csv=tmp_path / "o.csv", classes=["bird", "cat", "dog", "hamster"])
    assert dict(read_out(tmp_path / "o.csv"))["e.jpg"] == "hamster"
    # relabel:bird (line 5) is refused when the class list does not contain bird.
    with pytest.raises(DataError, match=r"line 5: unknown class 'bird'"):
        apply_review(audit, out_csv=tmp_path / "o2.csv", classes=["cat", "dog", "hamster"])
    assert not (tmp_path / "o2.csv").exists()


def test_relabel_without_suggestion_is_an_error(tmp_path):
    audit = write_audit(tmp_path / "a.csv", [row("a.jpg", "cat", noisy=False),
                                              row("b.jpg", "cat", noisy=True, sugg="", review="relabel")])
    with pytest.raises(DataError, match=r"without a suggested_label \(line 3\)"):
        apply_review(audit, out_csv=tmp_path / "o.csv")


def test_ambiguous_case_insensitive_class_is_an_error(tmp_path):
    audit = write_audit(tmp_path / "a.csv", [row("a.jpg", "Cat", noisy=False),
                                              row("b.jpg", "cat", noisy=False, review="relabel:CAT")])
    with pytest.raises(DataError, match=r"line 3: class 'CAT' is ambiguous"):
        apply_review(audit, out_csv=tmp_path / "o.csv")


def test_output_follows_index_column_when_present(tmp_path):
    header = [*HEADER, "index"]
    audit = write_audit(tmp_path / "a.csv", [
        row("z.jpg", "cat", noisy=True, sugg="dog", review="relabel", index=2),
        row("a.jpg", "dog", noisy=False, index=0),
        row("m.jpg", "cat", noisy=False, index=3),
        row("q.jpg", "dog", noisy=True, sugg="cat", review="drop", index=1),
    ], header=header)
    apply_review(audit, out_csv=tmp_path / "o.csv")
    assert read_out(tmp_path / "o.csv") == [("a.jpg", "dog"), ("z.jpg", "dog"), ("m.jpg", "cat")]


def test_non_numeric_row_column_is_an_error(tmp_path):
    audit = write_audit(tmp_path / "a.csv", [row("a.jpg", "cat", noisy=False, row="x"),
                                              row("b.jpg", "dog", noisy=False, row="1")],
                        header=[*HEADER, "row"])
    with pytest.raises(DataError, match=r"line 2: the 'row' column holds 'x'"):
        apply_review(audit, out_csv=tmp_path / "o.csv")


def test_spreadsheet_exports_semicolons_bom_and_text_booleans(tmp_path):
    audit = write_audit(tmp_path / "a.csv", [
        row("b.jpg", "NA", noisy="TRUE", sugg="None", review=""),
        row("a.jpg", "None", noisy="FALSE", review=""),
        row("c.jpg", "NA", noisy="1", sugg="None", review="relabel"),
    ], delimiter=";", bom=True)
    counts = apply_review(audit, out_csv=tmp_path / "o.csv", accept_suggestions=True)
    # Labels such as NA and None stay text (never NaN); the BOM does not leak into the header.
    assert read_out(tmp_path / "o.csv") == [("a.jpg", "None"), ("b.jpg", "None"), ("c.jpg", "None")]
    assert counts == {"kept": 1, "relabelled": 2, "dropped": 0, "unreviewed_flagged": 1, "missing": 0}


def test_bad_is_noisy_value_and_missing_columns(tmp_path):
    audit = write_audit(tmp_path / "a.csv", [row("a.jpg", "cat", noisy="perhaps")])
    with pytest.raises(DataError, match=r"line 2: 'perhaps'.*Write True or False"):
        apply_review(audit, out_csv=tmp_path / "o.csv")
    p = tmp_path / "b.csv"
    p.write_text("path,label\na.jpg,cat\n")
    with pytest.raises(DataError, match=r"no column 'given_label', 'is_noisy'"):
        apply_review(p, out_csv=tmp_path / "o.csv")
    with pytest.raises(DataError, match="Audit file not found"):
        apply_review(tmp_path / "missing.csv", out_csv=tmp_path / "o.csv")
    assert not (tmp_path / "o.csv").exists()


def test_failing_write_leaves_no_partial_file(every_decision, tmp_path, monkeypatch):
    out = tmp_path / "out" / "labels.clean.csv"
    out.parent.mkdir()
    out.write_text("path,label\nprevious.jpg,cat\n")

    def half_write(self, buf, *args, **kwargs):
        buf.write("path,label\nf.jpg,do")
        raise OSError("No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_csv", half_write)
    with pytest.raises(OSError, match="No space left"):
        apply_review(every_decision, out_csv=out)
    assert out.read_text() == "path,label\nprevious.jpg,cat\n"
    assert [p.name for p in out.parent.iterdir()] == ["labels.clean.csv"]
    monkeypatch.undo()
    apply_review(every_decision, out_csv=out)
    assert len(read_out(out)) == 6
    assert [p.name for p in out.parent.iterdir()] == ["labels.clean.csv"]


def test_kept_rows_on_an_in_memory_audit_matches_apply(every_decision, tmp_path):
    from_csv = pd.read_csv(every_decision)  # real bools, NaN for empty cells
    assert from_csv["is_noisy"].dtype == bool and from_csv["review"].isna().any()
    got = kept_rows(from_csv, accept_suggestions=True)
    apply_review(every_decision, out_csv=tmp_path / "o.csv", accept_suggestions=True)
    assert list(got.columns) == ["path", "label"]
    assert list(got.itertuples(index=False, name=None)) == read_out(tmp_path / "o.csv")
    assert got.index.equals(pd.RangeIndex(len(got)))


def test_kept_rows_messages_cite_rows_or_lines(every_decision):
    df = pd.read_csv(every_decision, dtype=str, keep_default_na=False)
    df.loc[0, "review"] = "nope"
    with pytest.raises(DataError, match=r"run-1: 1 unknown review value\(s\) \(row 0: 'nope'\)"):
        kept_rows(df, source="run-1")
    lined = read_audit(every_decision)
    lined.loc[2, "review"] = "nope"
    with pytest.raises(DataError, match=r"line 2: 'nope'"):
        kept_rows(lined)


def test_kept_rows_is_vectorised_on_a_large_audit():
    n = 300_000
    rng = np.random.default_rng(0)
    noisy = rng.random(n) < 0.1
    review = np.where(noisy & (rng.random(n) < 0.5), "Relabel", "")
    audit = pd.DataFrame({"path": [f"{i:07d}.jpg" for i in range(n)], "given_label": "cat",
                          "is_noisy": noisy, "suggested_label": np.where(noisy, "dog", "cat"), "review": review})
    got = kept_rows(audit, drop_unreviewed_flagged=True)
    assert len(got) == n - int((noisy & (review == "")).sum())
    assert int((got["label"] == "dog").sum()) == int((review == "Relabel").sum())
