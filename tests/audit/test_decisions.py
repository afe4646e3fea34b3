"""Decisions made elsewhere (reviews CSV, Label Studio, FiftyOne) merged onto an audit; --reviewed mapping."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from test_review import read_out, row, write_audit

from labelsieve.audit.decisions import merge_reviews, normalise_review, read_reviews, reviews_frame
from labelsieve.audit.review import apply_review, kept_rows
from labelsieve.audit.reviewed import mark_reviewed, resolve_reviewed, widen_result
from labelsieve.audit.schema import read_audit
from labelsieve.cli import main
from labelsieve.core.errors import DataError
from labelsieve.data import LabeledImages
from labelsieve.detectors.common.base import DetectionResult


@pytest.fixture()
def audit_csv(tmp_path):
    return write_audit(tmp_path / "audit.csv", [
        row("a.jpg", "cat", noisy=True, sugg="dog"),
        row("b.jpg", "dog", noisy=True, sugg="cat"),
        row("c.jpg", "cat", noisy=True, sugg="bird"),
        row("d.jpg", "bird", noisy=False, review="keep"),
        row("e.jpg", "dog", noisy=False),
    ])


def write_reviews(path, rows):
    pd.DataFrame(rows, columns=["path", "given_label", "suggested_label", "review"]).to_csv(path, index=False)
    return path


def test_reviews_csv_applies_like_the_review_column(audit_csv, tmp_path):
    """A reviews CSV (what audit.html downloads) gives the labels the same values in the review column give."""
    rev = write_reviews(tmp_path / "reviews.csv", [("a.jpg", "cat", "dog", "relabel:dog"),
                                                    ("b.jpg", "dog", "cat", "drop"), ("c.jpg", "cat", "bird", "keep"),
                                                    ("d.jpg", "bird", "bird", "keep")])
    counts = apply_review(audit_csv, out_csv=tmp_path / "via-file.csv", reviews=[read_reviews(rev)])
    filled = read_audit(audit_csv)
    filled.loc[filled["path"] == "a.jpg", "review"] = "relabel:dog"
    filled.loc[filled["path"] == "b.jpg", "review"] = "drop"
    filled.loc[filled["path"] == "c.jpg", "review"] = "keep"
    assert read_out(tmp_path / "via-file.csv") == list(kept_rows(filled).itertuples(index=False, name=None))
    assert read_out(tmp_path / "via-file.csv") == [("a.jpg", "dog"), ("c.jpg", "cat"), ("d.jpg", "bird"),
                                                   ("e.jpg", "dog")]
    assert counts["dropped"] == 1 and counts["relabelled"] == 1 and counts["unreviewed_flagged"] == 0


def test_cli_apply_reviews_and_train_share_the_merge(audit_csv, tmp_path, capsys):
    rev = write_reviews(tmp_path / "reviews.csv", [("a.jpg", "cat", "dog", "relabel")])
    assert main(["apply", str(audit_csv), "--reviews", str(rev), "-o", str(tmp_path / "clean.csv")]) == 0
    assert "decisions_merged: 1" in capsys.readouterr().out
    assert read_out(tmp_path / "clean.csv")[0] == ("a.jpg", "dog")


def test_a_bare_relabel_keeps_the_suggestion_the_reviewer_saw(audit_csv, tmp_path):
    """'relabel' means the suggestion as seen when deciding; merged onto an audit with another suggestion it is
    written out explicitly."""
    rev = reviews_frame(["a.jpg"], ["relabel"], source="old", given=["cat"], suggested=["bird"])
    merged = merge_reviews(read_audit(audit_csv), rev)
    assert merged.loc[merged["path"] == "a.jpg", "review"].item() == "relabel:bird"
    assert kept_rows(merged).set_index("path").loc["a.jpg", "label"] == "bird"


def test_merge_never_overrides_or_drops_a_decision(audit_csv, tmp_path):
    audit = read_audit(audit_csv)
    # the same decision twice is fine (case and the relabel spelling do not matter)
    same = reviews_frame(["d.jpg"], [" KEEP "], source="again")
    assert merge_reviews(audit, same).loc[audit["path"] == "d.jpg", "review"].item() == "KEEP"
    with pytest.raises(DataError, match=r"differ from the review already in .*line 5 \(d.jpg\): 'keep'.*'drop'"):
        merge_reviews(audit, reviews_frame(["d.jpg"], ["drop"], source="page"), where="audit.csv")
    with pytest.raises(DataError, match=r"not in audit.*zzz.jpg.*another audit"):
        merge_reviews(audit, reviews_frame(["zzz.jpg"], ["keep"], source="page"))
    # a keep decided on another given label is stale: named, not used (docs: the one rule, decisions.stale_reason)
    stale = merge_reviews(audit, reviews_frame(["a.jpg"], ["keep"], source="page", given=["dog"]))
    assert stale.loc[stale["path"] == "a.jpg", "review"].item() == "" and stale.attrs["stale_decisions"] == 1
    with pytest.raises(DataError, match="two different decisions"):
        reviews_frame(["a.jpg", "a.jpg"], ["keep", "drop"], source="page")
    # a failed merge writes nothing
    out = tmp_path / "clean.csv"
    with pytest.raises(DataError):
        apply_review(audit_csv, out_csv=out, reviews=[reviews_frame(["d.jpg"], ["drop"], source="page")])
    assert not out.exists()


def test_normalise_review():
    assert normalise_review(" Relabel : Forest ") == "relabel:forest"
    assert normalise_review("relabel", "River") == "relabel:river"
    assert normalise_review("KEEP") == "keep" and normalise_review("maybe") == "maybe"


def _images(paths, labels, classes):
    idx = {c: i for i, c in enumerate(classes)}
    return LabeledImages(root=".", paths=list(paths), labels=np.array([idx[x] for x in labels]), classes=classes,
                         classnames=classes, source="labels.csv")


def test_reviewed_rows_map_onto_a_new_input(tmp_path):
    classes = ["bird", "cat", "dog"]
    # the new input: e.jpg already carries its corrected label; x.jpg is new; q.jpg was reviewed but is gone
    images = _images(["a.jpg", "b.jpg", "c.jpg", "e.jpg", "x.jpg"], ["cat", "dog", "cat", "bird", "dog"], classes)
    old = reviews_frame(["a.jpg", "b.jpg", "c.jpg", "e.jpg", "q.jpg"],
                        ["relabel", "drop", "keep", "relabel:bird", "keep"], source="old audit.csv",
                        given=["cat", "dog", "cat", "dog", "cat"],
                        suggested=["dog", "cat", "bird", "bird", "cat"])
    rev = resolve_reviewed(images, [old])
    assert rev.labels.tolist() == [2, 2, 1, 0, 2]               # a relabelled to dog; b's label unchanged (dropped)
    assert rev.trusted.tolist() == [True, False, True, True, False]
    assert rev.dropped.tolist() == [False, True, False, False, False]
    # written in the new audit's terms: e's given label is already bird, so its decision reads keep
    assert rev.review.tolist() == ["relabel:dog", "drop", "keep", "keep", ""]
    assert rev.not_in_input == ["q.jpg"] and rev.describe()["n_not_in_input"] == 1
    # two files disagreeing on one image is an error; agreeing is fine
    agree = reviews_frame(["a.jpg"], ["relabel:dog"], source="page")
    assert resolve_reviewed(images, [old, agree]).labels[0] == 2
    with pytest.raises(DataError, match="different decisions in two reviewed files.*a.jpg"):
        resolve_reviewed(images, [old, reviews_frame(["a.jpg"], ["keep"], source="page")])
    with pytest.raises(DataError, match="unknown class 'fish'"):
        resolve_reviewed(images, [reviews_frame(["a.jpg"], ["relabel:fish"], source="page")])


def test_mark_reviewed_reports_decisions_and_ranks_them_last():
    classes = ["bird", "cat", "dog"]
    images = _images(["a.jpg", "b.jpg", "c.jpg", "d.jpg"], ["cat", "dog", "cat", "bird"], classes)
    rev = resolve_reviewed(images, [reviews_frame(["a.jpg", "b.jpg", "c.jpg"], ["relabel:dog", "drop", "keep"],
                                                  source="r")])
    fitted = ~rev.dropped
    inner = DetectionResult(p_clean=np.array([0.1, 0.2, 0.9]), probs=np.eye(3)[[2, 1, 0]], threshold=0.5,
                            columns={"agreement": np.array([1.0, 0.5, 0.0])})
    wide = widen_result(inner, fitted)
    assert wide.p_clean.tolist() == [0.1, 0.0, 0.2, 0.9] and np.isnan(wide.columns["agreement"][1])
    table = pd.DataFrame({"path": images.paths, "given_label": images.label_names(), "p_clean": wide.p_clean,
                          "is_noisy": wide.is_noisy, "suggested_label": ["dog", "bird", "cat", "bird"],
                          "suggested_prob": wide.suggested_prob, "issue": ["label", "label", "label", ""],
                          "rank": [1, 2, 3, 4], "review": ""})
    out = mark_reviewed(table, images, rev).set_index("path")
    assert out.loc["d.jpg", "rank"] == 1 and out.loc["d.jpg", "review"] == ""
    assert out.loc[["a.jpg", "b.jpg", "c.jpg"], "rank"].tolist() == [2, 3, 4]
    assert out.loc[["a.jpg", "b.jpg", "c.jpg"], "review"].tolist() == ["relabel:dog", "drop", "keep"]
    assert out.loc[["a.jpg", "b.jpg", "c.jpg"], "p_clean"].tolist() == [0.0, 0.0, 1.0]
    assert out.loc[["a.jpg", "b.jpg", "c.jpg"], "is_noisy"].tolist() == [True, True, False]
    assert out.loc["a.jpg", "suggested_label"] == "dog" and (out.loc[["a.jpg", "b.jpg", "c.jpg"], "issue"]
                                                             == "reviewed").all()
