"""Detection metrics: hand-computed cases, undefined metrics, audit files joined with a truth file,
and the real CIFAR-10N label sets with an oracle and a random detector."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from labelsieve import testing
from labelsieve.audit.evaluate import detection_metrics, evaluate_audit, format_metrics
from labelsieve.core.errors import DataError, ParameterError


def test_hand_computed_case():
    truth = np.array([1, 1, 0, 0, 0, 1], dtype=bool)
    p = np.array([0.1, 0.6, 0.2, 0.9, 0.8, 0.3])
    m = detection_metrics(truth, p, p < 0.5)
    assert m["n"] == 6 and m["n_noisy_true"] == 3 and m["n_flagged"] == 3
    assert m["noise_rate_true"] == pytest.approx(0.5)
    # flagged {0, 2, 5}, noisy {0, 1, 5}: TP = 2
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    # scores 1 - p: noisy {.9, .4, .7} vs clean {.8, .1, .2}: 7 of 9 pairs ordered right
    assert m["auroc"] == pytest.approx(7 / 9)
    # ranking N C N N C C: AP = (1/1 + 2/3 + 3/4) / 3
    assert m["auprc"] == pytest.approx((1 + 2 / 3 + 3 / 4) / 3)
    # kept {1, 3, 4}, truly clean among them {3, 4}; truly clean {2, 3, 4}
    assert m["clean_precision"] == pytest.approx(2 / 3)
    assert m["clean_recall"] == pytest.approx(2 / 3)
    json.dumps(m)  # plain Python types


def test_uneven_precision_recall():
    truth = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0], dtype=bool)
    flag = np.array([1, 0, 0, 0, 1, 1, 0, 0, 0, 0], dtype=bool)  # TP 1, FP 2, FN 3
    m = detection_metrics(truth, np.where(flag, 0.2, 0.8), flag)
    assert m["precision"] == pytest.approx(1 / 3)
    assert m["recall"] == pytest.approx(1 / 4)
    assert m["f1"] == pytest.approx(2 * (1 / 3) * (1 / 4) / (1 / 3 + 1 / 4))
    assert m["clean_precision"] == pytest.approx(4 / 7)  # kept 7, 4 truly clean
    assert m["clean_recall"] == pytest.approx(4 / 6)


def test_undefined_metrics_are_none():
    m = detection_metrics(np.zeros(4, bool), np.full(4, 0.9), np.zeros(4, bool))
    assert m["precision"] is None and m["recall"] is None and m["f1"] is None
    assert m["auroc"] is None and m["auprc"] is None
    assert m["clean_precision"] == 1.0 and m["clean_recall"] == 1.0
    # noisy samples but nothing flagged: recall and F1 are 0, precision undefined
    m2 = detection_metrics(np.array([1, 0, 0], bool), np.ones(3), np.zeros(3, bool))
    assert m2["precision"] is None and m2["recall"] == 0.0 and m2["f1"] == 0.0
    # every sample flagged and all noisy
    m3 = detection_metrics(np.ones(3, bool), np.zeros(3), np.ones(3, bool))
    assert m3["auroc"] is None and m3["clean_precision"] is None and m3["clean_recall"] is None
    assert m3["precision"] == 1.0
    text = format_metrics(m3)
    assert "n/a" in text and "100.0%" in text


def test_validation():
    with pytest.raises(ParameterError, match="p_clean"):
        detection_metrics(np.array([True, False]), np.array([0.5, 1.5]), np.array([False, False]))
    with pytest.raises(ParameterError, match="is_noisy"):
        detection_metrics(np.array([True, False]), np.array([0.5, 0.5]), np.array([False]))
    with pytest.raises(ParameterError, match="true_noisy"):
        detection_metrics(np.array([0.5, 2.0]), np.array([0.5, 0.5]), np.array([0, 1]))
    with pytest.raises(ParameterError, match="non-empty"):
        detection_metrics(np.array([], bool), np.array([]), np.array([], bool))


@pytest.mark.parametrize(("kind", "rate"), [("aggre_label", 0.0903), ("worse_label", 0.4021)])
def test_cifar10n_oracle_and_random(shared, kind, rate):
    labels = testing.cifar10n_labels(kind)
    assert len(labels) == 50_000
    truth = np.array([noisy != clean for clean, noisy in labels.values()])
    oracle = detection_metrics(truth, 1.0 - truth, truth)
    assert oracle["n"] == 50_000
    assert oracle["noise_rate_true"] == pytest.approx(rate, abs=0.001)
    assert oracle["auroc"] == 1.0 and oracle["auprc"] == 1.0
    assert oracle["precision"] == oracle["recall"] == oracle["f1"] == 1.0
    assert oracle["clean_precision"] == oracle["clean_recall"] == 1.0
    p = np.random.default_rng(0).random(50_000)
    rand = detection_metrics(truth, p, p < 0.5)
    assert rand["auroc"] == pytest.approx(0.5, abs=0.01)
    assert rand["auprc"] == pytest.approx(rate, abs=0.01)  # AP of a random ranking = prevalence
    assert rand["precision"] == pytest.approx(rate, abs=0.01)
    assert rand["recall"] == pytest.approx(0.5, abs=0.02)
    assert rand["clean_precision"] == pytest.approx(1 - rate, abs=0.01)


def _write(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


@pytest.fixture()
def cifar10n_files(shared, tmp_path):
    """Truth CSV (path, label = CIFAR-10N worst, true_label = clean) for the first 1000 images, and an
    audit of them from a detector that is right on 90 % of the rows; 7 rows are unreadable."""
    rows = testing.read_csv_rows(shared / "data" / "cifar10" / "cifar10n.csv")[:1000]
    truth = tmp_path / "truth.csv"
    _write(truth, ["path", "label", "true_label"], [[r["path"], r["worse_label"], r["clean_label"]] for r in rows])
    rng = np.random.default_rng(0)
    noisy = np.array([r["worse_label"] != r["clean_label"] for r in rows])
    right = rng.random(1000) < 0.9
    p = np.clip(np.where(noisy == right, 0.15, 0.85) + rng.normal(0, 0.1, 1000), 0, 1)
    flag = p < 0.5
    unreadable = set(range(0, 1000, 150))
    audit_rows = []
    for i, r in enumerate(rows):
        if i in unreadable:
            audit_rows.append([r["path"], r["worse_label"], "", "", "unreadable"])
        else:
            audit_rows.append([r["path"], r["worse_label"], f"{p[i]:.6f}",
                               ("True" if flag[i] else "False") if i % 2 else str(int(flag[i])),
                               "label" if flag[i] else ""])
    audit = tmp_path / "audit.csv"
    _write(audit, ["path", "given_label", "p_clean", "is_noisy", "issue"], audit_rows[::-1])
    keep = np.array([i not in unreadable for i in range(1000)])
    return audit, truth, noisy[keep], np.round(p[keep], 6), flag[keep]


def test_evaluate_audit_round_trip(cifar10n_files, tmp_path):
    audit, truth, noisy, p, flag = cifar10n_files
    m = evaluate_audit(audit, truth)
    expected = detection_metrics(noisy, p, flag)
    for k, v in expected.items():
        assert m[k] == pytest.approx(v), k
    assert m["n"] == 993 and m["n_unreadable"] == 7
    assert m["n_truth_not_in_audit"] == 0 and m["n_given_label_mismatch"] == 0
    assert 0.35 < m["noise_rate_true"] < 0.45
    assert m["auroc"] > 0.85
    text = format_metrics(m)
    assert f"{m['auroc']:.3f}" in next(line for line in text.splitlines() if line.startswith("AUROC"))
    assert next(line for line in text.splitlines() if line.startswith("unreadable")).endswith(" 7")
    # the truth file may cover more images than the audit: counted, not an error
    lines = audit.read_text().splitlines()
    sub = tmp_path / "sub.csv"
    sub.write_text("\n".join(lines[:501]) + "\n")
    m2 = evaluate_audit(sub, truth)
    assert m2["n_truth_not_in_audit"] == 500 and m2["n"] + m2["n_unreadable"] == 500


def test_evaluate_audit_errors(cifar10n_files, tmp_path):
    audit, truth, *_ = cifar10n_files
    lines = audit.read_text().splitlines()
    extra = tmp_path / "extra.csv"
    extra.write_text("\n".join([*lines, "train/99999.jpg,cat,0.5,False,", "other/x.png,dog,0.1,True,label"]) + "\n")
    with pytest.raises(DataError, match=r"2 path\(s\) are not in the truth file.*train/99999.jpg.*other/x.png"):
        evaluate_audit(extra, truth)
    dup = tmp_path / "dup.csv"
    dup.write_text("\n".join([*lines, lines[1]]) + "\n")
    with pytest.raises(DataError, match="more than once"):
        evaluate_audit(dup, truth)
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join([lines[0], lines[1].rsplit(",", 2)[0] + ",maybe,"]) + "\n")
    with pytest.raises(DataError, match=r"'is_noisy' value that is neither true nor false \(line 2: 'maybe'\)"):
        evaluate_audit(bad, truth)
    # read as `apply` reads it: a spreadsheet's 1.0/TRUE flags and ';' separators are accepted
    sheet = tmp_path / "sheet.csv"
    sheet.write_text("\n".join(line.replace(",", ";").replace(";True;", ";1.0;").replace(";False;", ";FALSE;")
                               for line in lines) + "\n", encoding="utf-8-sig")
    assert evaluate_audit(sheet, truth) == evaluate_audit(audit, truth)
    nocol = tmp_path / "nocol.csv"
    nocol.write_text("path,given_label,p_clean\na.jpg,cat,0.5\n")
    with pytest.raises(DataError, match="'is_noisy'"):
        evaluate_audit(nocol, truth)
    with pytest.raises(DataError, match="'clean'"):
        evaluate_audit(audit, truth, truth_label_column="clean")
    with pytest.raises(DataError, match="not found"):
        evaluate_audit(tmp_path / "nope.csv", truth)


def test_evaluate_audit_label_mismatch_and_custom_column(tmp_path):
    truth = tmp_path / "t.csv"
    _write(truth, ["path", "label", "gold"],
           [["a.jpg", "cat", "cat"], ["b.jpg", "dog", "cat"], ["c.jpg", "cat", "dog"]])
    audit = tmp_path / "a.csv"
    # the audit ran on other labels for c.jpg ("dog", which is right)
    _write(audit, ["path", "given_label", "p_clean", "is_noisy", "issue"],
           [["a.jpg", "cat", "0.9", "0", ""], ["b.jpg", "dog", "0.1", "1", "label"], ["c.jpg", "dog", "0.7", "0", ""]])
    m = evaluate_audit(audit, truth, truth_label_column="gold")
    assert m["n_given_label_mismatch"] == 1
    assert m["n_noisy_true"] == 1 and m["precision"] == 1.0 and m["recall"] == 1.0 and m["auroc"] == 1.0


def test_format_metrics_order_and_values():
    text = format_metrics({"auroc": 0.91234, "n": 1200, "precision": None, "noise_rate_true": 0.25,
                           "custom": "x"})
    lines = text.splitlines()
    assert lines[0].startswith("samples scored") and lines[0].endswith("1,200")
    assert "25.0%" in lines[1] and "0.250" in lines[1]
    assert lines[2].endswith("n/a") and lines[3].endswith("0.912") and lines[4].endswith("x")
    with pytest.raises(ParameterError):
        format_metrics([1, 2])
