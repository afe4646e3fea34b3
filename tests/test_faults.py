"""The fault corpus (issue 9): bad files, faults and hostile names, and what labelsieve promises about them.

Each test reproduces one way a reviewer's work could be lost, a cache could give a wrong answer, a
command could crash instead of explaining, or a file could be read or written where it should not.
docs/promises.md lists every promise with the test here that holds it. Real images (Imagenette, EuroSAT
subsets) and the mini CLIP; the audits use label_match, the cheapest detector.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from labelsieve.audit.review import apply_review
from labelsieve.audit.schema import read_audit
from labelsieve.cli import main
from labelsieve.core.errors import DataError, ModelError, OutputError
from labelsieve.core.io import FORMULA_PREFIXES, neutralise_cell, restore_cell
from labelsieve.core.progress import console
from labelsieve.core.spreadsheet import is_convertible
from labelsieve.data import hashing, load_images, read_labels_csv
from labelsieve.data.hashing import ContentHasher
from labelsieve.features import extract_features
from labelsieve.train import predict, train_from_audit

PROJECT = Path(__file__).resolve().parents[1]
#: OWASP's list of first characters that make a spreadsheet evaluate a cell.
OWASP_PREFIXES = ["=", "+", "-", "@", "\t", "\r"]


def write_rows(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def raw_cells(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        return list(csv.reader(f))


@pytest.fixture(scope="module")
def images3(imagenette_small, tmp_path_factory):
    """24 Imagenette images (8 of each of 3 classes) in a fresh folder, one of them a zero-byte file."""
    src_root, src_csv = imagenette_small
    df = pd.read_csv(src_csv)
    df = df[df["label"].isin(sorted(df["label"].unique())[:3])].groupby("label").head(8).reset_index(drop=True)
    root = tmp_path_factory.mktemp("images3") / "imgs"
    for p in df["path"]:
        (root / p).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src_root / p, root / p)
    (root / df.loc[5, "path"]).write_bytes(b"")
    df.to_csv(root.parent / "labels.csv", index=False)
    return root, root.parent / "labels.csv", df


@pytest.fixture(scope="module")
def audited(images3, mini_clip_dir, feature_cache, tmp_path_factory):
    """``labelsieve audit`` of ``images3``: the output folder (audit.csv, audit.json)."""
    root, labels, _ = images3
    out = tmp_path_factory.mktemp("audited") / "out"
    assert main(["audit", str(root), str(labels), "--method", "label_match", "--model", str(mini_clip_dir), "-o",
                 str(out), "--cache-dir", str(feature_cache), "--no-progress", "--no-html"]) == 0
    return out


def reviewed_copy(audited: Path, dest: Path, reviews: dict[int, str] | None = None) -> Path:
    """A copy of the audit folder at ``dest`` with ``reviews`` ({row: value}) typed into audit.csv."""
    shutil.copytree(audited, dest)
    table = pd.read_csv(dest / "audit.csv", dtype=str, keep_default_na=False)
    for i, v in (reviews or {}).items():
        table.loc[i, "review"] = v
    table.to_csv(dest / "audit.csv", index=False)
    return dest / "audit.csv"


# --------------------------------------------------------------------------- data loss


def test_audit_never_replaces_a_reviewed_audit_without_force(images3, audited, tmp_path, mini_clip_dir,
                                                             feature_cache, capsys):
    root, labels, _ = images3
    audit_csv = reviewed_copy(audited, tmp_path / "out", {0: "drop", 3: "keep"})
    reviewed = audit_csv.read_bytes()
    argv = ["audit", str(root), str(labels), "--method", "label_match", "--model", str(mini_clip_dir),
            "-o", str(tmp_path / "out"), "--no-progress", "--no-html"]
    capsys.readouterr()
    assert main([*argv, "--cache-dir", str(tmp_path / "fresh-cache")]) == 2
    err = capsys.readouterr().err
    assert "holds 2 review decision(s)" in err and "--force" in err and "Traceback" not in err
    assert audit_csv.read_bytes() == reviewed
    assert not (tmp_path / "fresh-cache").exists()  # refused before any work: nothing extracted
    assert main([*argv, "--cache-dir", str(feature_cache), "--force"]) == 0
    backups = list((tmp_path / "out").glob("audit.reviewed-*.csv"))
    assert len(backups) == 1 and backups[0].read_bytes() == reviewed
    assert "copied to" in capsys.readouterr().err
    assert (read_audit(audit_csv)["review"] == "").all()
    # An audit nobody reviewed is the tool's own output: replaced without a copy.
    assert main([*argv, "--cache-dir", str(feature_cache)]) == 0
    assert len(list((tmp_path / "out").glob("audit.reviewed-*.csv"))) == 1


def test_apply_never_writes_over_review_decisions(audited, tmp_path, capsys):
    audit_csv = reviewed_copy(audited, tmp_path / "out", {1: "drop", 2: "relabel"})
    reviewed = audit_csv.read_bytes()
    for target in (audit_csv, Path(os.path.join(tmp_path, "out", ".", "audit.csv"))):
        assert main(["apply", str(audit_csv), "-o", str(target)]) == 2
        assert "over the reviewed audit they come from" in capsys.readouterr().err
    other = tmp_path / "other-review.csv"
    shutil.copy(audit_csv, other)
    with pytest.raises(OutputError, match="holds 2 review decision"):
        apply_review(audit_csv, out_csv=other)
    assert audit_csv.read_bytes() == reviewed == other.read_bytes()
    plain = write_rows(tmp_path / "labels.clean.csv", ["path", "label"], [["x.jpg", "cat"]])
    assert main(["apply", str(audit_csv), "-o", str(plain)]) == 0  # a labels file is replaced as asked
    assert len(read_labels_csv(plain)[0]) == 24 - 2  # the dropped row and the unreadable one


def test_review_column_matches_whatever_its_case_and_refuses_two(audited, tmp_path):
    audit_csv = reviewed_copy(audited, tmp_path / "out", {1: "drop", 2: "drop", 3: "keep"})
    expected = apply_review(audit_csv, out_csv=tmp_path / "a.csv")
    text = audit_csv.read_text()
    audit_csv.write_text(text.replace(",review,", ",Review ,", 1))
    assert apply_review(audit_csv, out_csv=tmp_path / "b.csv") == expected
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    assert expected["dropped"] == 3  # two reviewed drops and the unreadable image
    table = pd.read_csv(audit_csv, dtype=str, keep_default_na=False)
    table["review"] = ""
    table.to_csv(audit_csv, index=False)
    with pytest.raises(DataError, match=r"columns \['Review', 'review'\] differ only in case"):
        apply_review(audit_csv, out_csv=tmp_path / "c.csv")


def test_rows_deleted_or_added_in_the_sheet_are_reported(audited, tmp_path, capsys):
    audit_csv = reviewed_copy(audited, tmp_path / "out")
    table = pd.read_csv(audit_csv, dtype=str, keep_default_na=False)
    gone = table["path"].iloc[[4, 9]].tolist()
    table.drop(index=[4, 9]).to_csv(audit_csv, index=False)
    capsys.readouterr()
    counts = apply_review(audit_csv, out_csv=tmp_path / "l.csv")
    err = capsys.readouterr().err
    assert counts["missing"] == 2 and "2 row(s) of the audit were deleted from the sheet" in err
    assert all(p in err for p in gone)
    assert not set(gone) & set(read_labels_csv(tmp_path / "l.csv")[0])
    # A row pasted in with a path the audit never had is reported too.
    extra = table.iloc[[0]].assign(path="train/never-audited.jpg")
    pd.concat([table, extra]).to_csv(audit_csv, index=False)
    counts = apply_review(audit_csv, out_csv=tmp_path / "l.csv")
    err = capsys.readouterr().err
    assert counts["missing"] == 0 and "name images the audit did not have (train/never-audited.jpg)" in err
    # Without a readable input to name them, the rows are still counted (from audit.json's n_images).
    record = json.loads((tmp_path / "out" / "audit.json").read_text())
    record["input"]["labels"] = str(tmp_path / "moved.csv")
    (tmp_path / "out" / "audit.json").write_text(json.dumps(record))
    table.drop(index=[0, 1, 2]).to_csv(audit_csv, index=False)
    assert apply_review(audit_csv, out_csv=tmp_path / "l.csv")["missing"] == 3
    assert "the audit wrote 24 (audit.json): 3 row(s) were deleted" in capsys.readouterr().err


def test_keep_on_an_unreadable_row_is_reported_not_silently_dropped(audited, tmp_path, capsys):
    table = pd.read_csv(audited / "audit.csv", dtype=str, keep_default_na=False)
    i = int(np.flatnonzero(table["issue"] == "unreadable")[0])
    audit_csv = reviewed_copy(audited, tmp_path / "out", {i: "keep"})
    capsys.readouterr()
    counts = apply_review(audit_csv, out_csv=tmp_path / "l.csv")
    err = capsys.readouterr().err
    assert counts["dropped"] == 1 and "1 row(s) marked keep or relabel are unreadable images" in err
    assert f"line {i + 2}: 'keep'" in err


def test_spreadsheet_error_cells_are_refused_with_their_lines(audited, images3, tmp_path):
    audit_csv = reviewed_copy(audited, tmp_path / "out", {0: "#NAME?", 3: "keep"})
    table = pd.read_csv(audit_csv, dtype=str, keep_default_na=False)
    table.loc[2, "given_label"] = "#REF!"
    table.loc[6, "path"] = "#VALUE!"
    table.to_csv(audit_csv, index=False)
    with pytest.raises(DataError, match=r"3 cell\(s\) hold a spreadsheet error") as e:
        apply_review(audit_csv, out_csv=tmp_path / "l.csv")
    for part in ("line 2, column 'review': '#NAME?'", "line 4, column 'given_label': '#REF!'",
                 "line 8, column 'path': '#VALUE!'"):
        assert part in str(e.value)
    root, _, df = images3
    rows = [[p, lab] for p, lab in zip(df["path"], df["label"], strict=True)]
    rows[3][1] = "#N/A"
    with pytest.raises(DataError, match=r"line 5: '#N/A'"):
        load_images(root, write_rows(tmp_path / "l.csv", ["path", "label"], rows))


def test_one_image_listed_twice_is_refused_by_audit_and_apply(images3, audited, tmp_path):
    root, _, df = images3
    rows = [[p, lab] for p, lab in zip(df["path"], df["label"], strict=True)]
    other = next(lab for lab in df["label"] if lab != rows[0][1])
    two_labels = write_rows(tmp_path / "a.csv", ["path", "label"], [*rows, [rows[0][0], other]])
    with pytest.raises(DataError, match=rf"1 with different labels \(line 26 repeats line 2: {rows[0][0]} labelled"):
        load_images(root, two_labels)
    spelled = write_rows(tmp_path / "b.csv", ["path", "label"], [*rows, ["./" + rows[1][0], rows[1][1]]])
    with pytest.raises(DataError, match="line 26 repeats line 3"):
        load_images(root, spelled)
    audit_csv = reviewed_copy(audited, tmp_path / "out")
    table = pd.read_csv(audit_csv, dtype=str, keep_default_na=False)
    pasted = pd.concat([table, table.iloc[[3]].assign(review="drop")])
    pasted.to_csv(audit_csv, index=False)
    with pytest.raises(DataError, match=rf"listed more than once \({table.loc[3, 'path']} on lines 5, 26\)"):
        apply_review(audit_csv, out_csv=tmp_path / "l.csv")


class _Crash(BaseException):
    """A process killed at this point: raised by a write, and by every write after it (no clean-up runs)."""


class _FailWrites:
    """Makes the ``at``-th file-system change (``os.replace`` / ``os.unlink``, the last step of every write and
    removal) fail: ``crash`` raises :class:`_Crash` there and at every later change (a killed process: nothing
    cleans up); ``enospc`` raises ``OSError(ENOSPC)`` there only (a full disk: clean-up code runs)."""

    def __init__(self, monkeypatch, at: int | None, mode: str = "crash") -> None:
        self.calls, self.at, self.mode, self.failed = 0, at, mode, False
        self.replace, self.unlink = os.replace, os.unlink
        monkeypatch.setattr(os, "replace", self._wrap(self.replace))
        monkeypatch.setattr(os, "unlink", self._wrap(self.unlink))

    def _wrap(self, real):
        def step(*args, **kwargs):
            if self.at is not None and (self.calls == self.at or (self.failed and self.mode == "crash")):
                self.calls += 1
                self.failed = True
                if self.mode == "crash":
                    raise _Crash()
                import errno

                raise OSError(errno.ENOSPC, "No space left on device", str(args[0]))
            self.calls += 1
            return real(*args, **kwargs)
        return step


@pytest.fixture(scope="module")
def two_audits(images3, mini_clip_dir, feature_cache, tmp_path_factory):
    """Two audits of different inputs (Audit objects, not written): all 24 rows, and 16 rows with other labels."""
    from labelsieve.api import audit

    root, labels, df = images3
    other = tmp_path_factory.mktemp("other") / "labels.csv"
    sub = df.iloc[6:22].copy()
    sub["label"] = np.roll(sub["label"].to_numpy(), 3)
    sub.to_csv(other, index=False)
    kw = {"method": "label_match", "model": str(mini_clip_dir), "cache_dir": feature_cache, "out_dir": None,
          "progress": False, "quiet": True}
    return root, audit(root, labels, **kw), audit(root, other, **kw)


def _audit_seen(folder: Path) -> str:
    """The audit_id of the one audit a reader sees in ``folder`` (every file of the set checked to be that audit),
    or "refused" when the readers refuse with a message."""
    from labelsieve.audit.auditset import open_audit
    from labelsieve.core.errors import LabelsieveError

    try:
        table, record = open_audit(folder / "audit.csv")
    except LabelsieveError:
        return "refused"
    aid = record["audit_id"]
    assert set(table["audit_id"]) == {aid}
    if (folder / "audit.xlsx").exists():
        assert set(read_audit(folder / "audit.xlsx", required=("audit_id",))["audit_id"]) == {aid}
    if (folder / "audit.html").exists():
        assert f'"audit_id":"{aid}"' in (folder / "audit.html").read_text(encoding="utf-8")
    return aid


@pytest.mark.parametrize("mode", ["crash", "enospc"])
def test_a_failure_between_any_two_writes_leaves_one_whole_audit(two_audits, tmp_path, monkeypatch, mode):
    """An audit's files replace the previous audit's as one unit: a failure at each file-system change of the
    replacement (a killed process, or a full disk) leaves the previous audit or the new one, whole; never audit.csv
    of one beside audit.json of the other. Readers (apply, train --clean, export, evaluate, the page) check it."""
    from labelsieve.audit.auditset import AUDIT_FILES, write_audit_set

    root, a, b = two_audits
    base = tmp_path / "base"
    write_audit_set(a, base, image_root=root, html=True, xlsx=True)  # the previous audit: csv, xlsx, html, json
    assert _audit_seen(base) == a.summary["audit_id"]
    probe = tmp_path / "probe"
    shutil.copytree(base, probe)
    with monkeypatch.context() as m:
        counter = _FailWrites(m, None)
        write_audit_set(b, probe, image_root=root, html=True, xlsx=False)  # the new one removes audit.xlsx
        steps = counter.calls
    assert _audit_seen(probe) == b.summary["audit_id"] and not (probe / "audit.xlsx").exists()
    assert steps >= 8  # 3 staged files, the journal, 3 renames, 1 removal, the journal's removal
    seen = []
    for at in range(steps):
        out = tmp_path / f"{mode}-{at}"
        shutil.copytree(base, out)
        with monkeypatch.context() as m:
            _FailWrites(m, at, mode)
            with pytest.raises((_Crash, OutputError)):
                write_audit_set(b, out, image_root=root, html=True, xlsx=False)
        who = _audit_seen(out)
        assert who in (a.summary["audit_id"], b.summary["audit_id"]), (at, who)
        seen.append("new" if who == b.summary["audit_id"] else "old")
        clean = tmp_path / f"clean-{mode}-{at}.csv"
        assert main(["apply", str(out / "audit.csv"), "-o", str(clean)]) == 0
        expected = b if who == b.summary["audit_id"] else a
        assert sorted(pd.read_csv(clean, dtype=str)["path"]) == sorted(expected.table.loc[
            expected.table["issue"] != "unreadable", "path"])
        left = sorted(f.name for f in out.iterdir() if f.name.startswith("."))
        assert left == [] or (mode == "crash" and all(n.endswith((".tmp", ".new")) for n in left)), (at, left)
        assert {f.name for f in out.iterdir() if not f.name.startswith(".")} <= {*AUDIT_FILES}, at
    # before the commit point the previous audit stays; after it, the new one is finished by the next reader
    assert seen[0] == "old" and seen[-1] == "new" and seen == sorted(seen, key=lambda s: s == "new"), seen


def test_a_mixed_audit_set_is_refused_by_every_reader(two_audits, tmp_path, lite0_file, capsys):
    """audit.csv of one audit beside audit.json of another (copied by hand, or left by an older labelsieve):
    apply, train --clean, export and evaluate refuse it, naming both audits; rows pasted from another audit
    are named by line."""
    from labelsieve.audit.auditset import write_audit_set

    root, a, b = two_audits
    write_audit_set(a, tmp_path / "a", image_root=root, html=False)
    write_audit_set(b, tmp_path / "b", image_root=root, html=False)
    shutil.copy(tmp_path / "b" / "audit.json", tmp_path / "a" / "audit.json")
    sheet = tmp_path / "a" / "audit.csv"
    truth = write_rows(tmp_path / "truth.csv", ["path", "true_label"],
                       [[p, g] for p, g in zip(a.table["path"], a.table["given_label"], strict=True)])
    mixed = (f"is from audit {a.summary['audit_id']}, but the audit.json beside it is from audit "
             f"{b.summary['audit_id']}")
    for argv in (["apply", str(sheet), "-o", str(tmp_path / "clean.csv")],
                 ["train", "--clean", str(sheet), "--backbone", "lite0", "--pretrained", str(lite0_file), "-o",
                  str(tmp_path / "m")],
                 ["export", str(sheet), "--to", "labelstudio", "-o", str(tmp_path / "ls")],
                 ["evaluate", str(sheet), "--truth", str(truth)]):
        capsys.readouterr()
        assert main(argv) == 2, argv[0]
        err = capsys.readouterr().err
        assert mixed in " ".join(err.split()), (argv[0], err)
    assert not (tmp_path / "clean.csv").exists() and not (tmp_path / "m").exists()
    # rows pasted into a sheet from another audit
    write_audit_set(a, tmp_path / "c", image_root=root, html=False)
    table = pd.read_csv(tmp_path / "c" / "audit.csv", dtype=str, keep_default_na=False)
    pasted = pd.read_csv(tmp_path / "b" / "audit.csv", dtype=str, keep_default_na=False).iloc[:2]
    pd.concat([table, pasted]).to_csv(tmp_path / "c" / "audit.csv", index=False)
    with pytest.raises(DataError, match=rf"2 row\(s\) come from another audit .*line 26: {b.summary['audit_id']}"):
        apply_review(tmp_path / "c" / "audit.csv", out_csv=tmp_path / "clean.csv")


def test_a_failure_between_the_writes_of_an_export_leaves_one_whole_model(tmp_path, monkeypatch):
    """train -o's export (model.safetensors + model.json) is one unit too: a failure at each step leaves the
    previous model or the new one, and weights of one export beside the description of another are refused."""
    import torch

    from labelsieve.core.errors import ModelError
    from labelsieve.train.export import export_classifier, load_classifier

    spec = {"family": "timm", "name": "lite0", "arch": "tf_efficientnet_lite0", "weights": "none", "tag": None,
            "file": None}

    def meta(classes):
        return {"spec": spec, "num_classes": len(classes), "classes": classes,
                "preprocessing": {"image_size": 32}}

    def model(n):
        from labelsieve.models.classifiers import create_classifier
        from labelsieve.models.loader import ModelSpec

        torch.manual_seed(n)
        return create_classifier(ModelSpec(**spec), num_classes=n, image_size=32)[0]

    base = tmp_path / "base"
    export_classifier(model(2), base, meta(["a", "b"]))
    new = model(3)
    with monkeypatch.context() as m:
        counter = _FailWrites(m, None)
        export_classifier(new, tmp_path / "probe", meta(["a", "b", "c"]))
        steps = counter.calls
    seen = set()
    for mode in ("crash", "enospc"):
        for at in range(steps):
            out = tmp_path / f"{mode}-{at}"
            shutil.copytree(base, out)
            with monkeypatch.context() as m:
                _FailWrites(m, at, mode)
                with pytest.raises((_Crash, OutputError)):
                    export_classifier(new, out, meta(["a", "b", "c"]))
            loaded, got = load_classifier(out)
            assert got["classes"] in (["a", "b"], ["a", "b", "c"]) and got["num_classes"] == len(got["classes"])
            seen.add(len(got["classes"]))
    assert seen == {2, 3}
    mixed = tmp_path / "mixed"
    shutil.copytree(base, mixed)
    shutil.copy(tmp_path / "probe" / "model.json", mixed / "model.json")
    with pytest.raises(ModelError, match="come from two different trainings"):
        load_classifier(mixed)


def test_a_failure_while_apply_writes_leaves_the_previous_labels(audited, tmp_path, monkeypatch):
    """apply writes one file, atomically: a failure leaves the previous labels.clean.csv whole (or none)."""
    sheet = reviewed_copy(audited, tmp_path / "out", {0: "drop"})
    out = tmp_path / "labels.clean.csv"
    old = "path,label\nold.jpg,cat\n"
    with monkeypatch.context() as m:
        counter = _FailWrites(m, None)
        apply_review(sheet, out_csv=tmp_path / "probe.csv")
        steps = counter.calls  # the writability probe's removal, then the labels file put in place
    for mode in ("crash", "enospc"):
        for at in range(steps):
            out.write_text(old)
            with monkeypatch.context() as m:
                _FailWrites(m, at, mode)
                with contextlib.suppress(_Crash, OutputError):
                    apply_review(sheet, out_csv=out)
            text = out.read_text()
            assert text == old or text == (tmp_path / "probe.csv").read_text(), (mode, at)
            assert text == old or at < steps - 1


# --------------------------------------------------------------------------- caches: never wrong


def test_digest_memo_sees_a_file_replaced_with_same_size_and_mtime(images3, tmp_path, mini_clip, monkeypatch):
    monkeypatch.setattr(hashing, "RACY_SECONDS", 0.0)
    src, _, df = images3
    root = tmp_path / "imgs"
    root.mkdir()
    files = sorted((src / p for p in df["path"][6:12]), key=lambda p: p.stat().st_size)
    big, small = files[-1], files[0]
    shutil.copy(big, root / "a.jpg")
    shutil.copy(small, root / "b.jpg")
    write_rows(tmp_path / "l.csv", ["path", "label"], [["a.jpg", "x"], ["b.jpg", "y"]])
    images = load_images(root, tmp_path / "l.csv")
    first = extract_features(images, mini_clip, cache_dir=tmp_path / "c", num_workers=0, progress=False)
    old_a = np.asarray(first.vectors[0], np.float32).copy()
    reads = []
    monkeypatch.setattr(ContentHasher, "_digest_file", staticmethod(lambda p: reads.append(p) or b"x" * 16))
    assert extract_features(images, mini_clip, cache_dir=tmp_path / "c", progress=False).n_extracted == 0
    assert reads == []  # the memo answered: no file was read
    monkeypatch.undo()
    monkeypatch.setattr(hashing, "RACY_SECONDS", 0.0)
    st = (root / "a.jpg").stat()
    data = small.read_bytes()
    (root / "a.jpg").write_bytes(data + b"\0" * (st.st_size - len(data)))  # b's picture, a's size
    os.utime(root / "a.jpg", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (root / "a.jpg").stat().st_size == st.st_size and (root / "a.jpg").stat().st_mtime_ns == st.st_mtime_ns
    again = extract_features(images, mini_clip, cache_dir=tmp_path / "c", num_workers=0, progress=False)
    assert again.n_extracted == 1 and again.digests[0] != first.digests[0]
    new_a = np.asarray(again.vectors[0], np.float32)
    np.testing.assert_allclose(new_a, np.asarray(again.vectors[1], np.float32), atol=2e-3)  # b's picture
    assert not np.allclose(new_a, old_a, atol=2e-2)


def test_vectors_are_stored_under_the_bytes_actually_read(images3, tmp_path, mini_clip, monkeypatch):
    """A file that changes between hashing and decoding is stored under the content it had when decoded."""
    src, labels, _ = images3
    images = load_images(src, labels).subset(np.arange(6, 10))
    real = ContentHasher.digests
    monkeypatch.setattr(ContentHasher, "digests",
                        lambda self, paths, **kw: [b"stale-digest-000", *real(self, paths[1:])])
    got = extract_features(images, mini_clip, cache_dir=tmp_path / "c", num_workers=0, progress=False)
    monkeypatch.undo()
    again = extract_features(images, mini_clip, cache_dir=tmp_path / "c", num_workers=0, progress=False)
    assert got.digests == again.digests and again.n_extracted == 0 and got.digests[0] != b"stale-digest-000"


@pytest.fixture(scope="module")
def store16(images3, mini_clip, tmp_path_factory):
    """16 readable images, their features in a cache of two 8-image chunks, and the features."""
    root, labels, _ = images3
    images = load_images(root, labels).subset(np.arange(6, 22))
    cache = tmp_path_factory.mktemp("store16") / "cache"
    feats = extract_features(images, mini_clip, cache_dir=cache, batch_size=8, chunk_images=8, num_workers=0,
                             progress=False)
    return images, cache, np.asarray(feats.vectors, np.float32).copy()


def _damage(cache: Path, what: str) -> None:
    store = next((cache / "features").iterdir())
    chunk = sorted(store.glob("chunk-*.manifest.json"))[0].name[: -len(".manifest.json")]
    view = next((store / "views").glob("*.npy"))
    rng = np.random.default_rng(0)
    if what == "view: noise, same size":
        view.write_bytes(rng.bytes(view.stat().st_size))
    elif what == "view: truncated":
        view.write_bytes(view.read_bytes()[:1000])
    elif what == "chunk: truncated, view intact":
        (store / f"{chunk}.npy").write_bytes((store / f"{chunk}.npy").read_bytes()[:4000])
    elif what == "chunk: noise, same size":
        data = (store / f"{chunk}.npy").read_bytes()
        (store / f"{chunk}.npy").write_bytes(data[:128] + rng.bytes(len(data) - 128))
        view.unlink()  # the next request must read the chunk
    elif what == "digests: truncated":
        (store / f"{chunk}.digests.npy").write_bytes(b"\x93NUMPY")
    elif what == "manifest: truncated":
        (store / f"{chunk}.manifest.json").write_text('{"format": 2, "n"')
    elif what == "hashes.sqlite: truncated":
        (cache / "hashes.sqlite").write_bytes((cache / "hashes.sqlite").read_bytes()[:3000])
    elif what == "hashes.sqlite: not a database":
        (cache / "hashes.sqlite").write_bytes(b"garbage" * 1000)


@pytest.mark.parametrize("what,rebuilt,re_extracted", [
    ("view: noise, same size", "view", 0),
    ("view: truncated", "view", 0),
    ("chunk: truncated, view intact", "chunk", 8),
    ("chunk: noise, same size", "chunk", 8),
    ("digests: truncated", "chunk", 8),
    ("manifest: truncated", "chunk", 8),
    ("hashes.sqlite: truncated", "memo", 0),
    ("hashes.sqlite: not a database", "memo", 0),
])
def test_damaged_cache_is_rebuilt_with_a_warning_never_used(store16, tmp_path, mini_clip, capsys, what, rebuilt,
                                                             re_extracted):
    images, cache, expected = store16
    work = tmp_path / "cache"
    shutil.copytree(cache, work)
    _damage(work, what)
    capsys.readouterr()
    got = extract_features(images, mini_clip, cache_dir=work, batch_size=8, num_workers=0, progress=False)
    err = capsys.readouterr().err
    assert got.n_extracted == re_extracted and got.warnings and "warning:" in err
    assert {"view": "view", "chunk": "chunk", "memo": "file-digest memo"}[rebuilt] in got.warnings[0]
    np.testing.assert_allclose(np.asarray(got.vectors, np.float32), expected, atol=2e-3)
    again = extract_features(images, mini_clip, cache_dir=work, progress=False)
    assert again.n_extracted == 0 and again.warnings == []  # rebuilt for good


def test_store_from_before_manifests_is_adopted(store16, tmp_path, mini_clip):
    images, cache, expected = store16
    work = tmp_path / "cache"
    shutil.copytree(cache, work)
    store = next((work / "features").iterdir())
    for m in store.glob("chunk-*.manifest.json"):  # the layout labelsieve wrote before issue 9
        name = m.name[: -len(".manifest.json")]
        (store / f"{name}.digests.npy").rename(store / f"{name}.keys.npy")
        m.unlink()
    shutil.rmtree(store / "views")
    (store / "views").mkdir()
    got = extract_features(images, mini_clip, cache_dir=work, progress=False)
    assert got.n_extracted == 0 and got.warnings == [] and len(list(store.glob("*.manifest.json"))) == 2
    np.testing.assert_array_equal(np.asarray(got.vectors, np.float32), expected)


def test_kill_9_mid_extraction_loses_only_uncommitted_work(eurosat_small, tmp_path, mini_clip):
    """A process extracting features is killed with SIGKILL mid-run; the rerun extracts only what no committed
    chunk holds, and gives the features an uninterrupted run gives. The process is a fork of this one (the
    model already loaded), so the test pays no interpreter start-up."""
    root, src_csv = eurosat_small
    labels = tmp_path / "l.csv"
    labels.write_text("\n".join(src_csv.read_text().splitlines()[:25]) + "\n")  # 24 images
    images = load_images(root, labels)
    cache = tmp_path / "cache"
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: extract slowly, reporting progress, until killed
        os.close(read_end)

        def slow(done: int) -> None:
            os.write(write_end, f"{done}\n".encode())
            time.sleep(0.25)

        try:
            extract_features(images, mini_clip, cache_dir=cache, batch_size=4, num_workers=0, progress=False,
                             commit_seconds=0.1, on_batch=slow)
        except BaseException as exc:  # reported to the parent, which fails the test
            os.write(write_end, f"error {exc!r}\n".encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as progress:
        for line in progress:
            assert not line.startswith("error"), line
            if int(line) >= 8:  # two batches done, each committed (0.25 s apart, commit_seconds=0.1)
                os.kill(pid, signal.SIGKILL)
                break
        _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    store = next((cache / "features").iterdir())
    committed = sum(json.loads(m.read_text())["n"] for m in store.glob("chunk-*.manifest.json"))
    assert 8 <= committed < 24
    resumed = extract_features(images, mini_clip, cache_dir=cache, batch_size=4, num_workers=0, progress=False)
    assert resumed.n_extracted == 24 - committed  # only the unfinished part
    fresh = extract_features(images, mini_clip, cache_dir=tmp_path / "fresh", batch_size=4, num_workers=0,
                             progress=False)
    np.testing.assert_array_equal(np.asarray(resumed.vectors), np.asarray(fresh.vectors))


# --------------------------------------------------------------------------- messages, not crashes


def test_output_locations_are_checked_before_any_work(images3, audited, tmp_path, mini_clip_dir, lite0_file, capsys):
    root, labels, _ = images3
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    cache = tmp_path / "cache"
    audit = ["audit", str(root), str(labels), "--method", "label_match", "--model", str(mini_clip_dir),
             "--no-progress"]
    runs = {
        "audit -o file": [*audit, "-o", str(a_file), "--cache-dir", str(cache)],
        "audit --cache-dir file": [*audit, "-o", str(tmp_path / "o"), "--cache-dir", str(a_file / "sub")],
        "apply -o folder": ["apply", str(audited / "audit.csv"), "-o", str(tmp_path)],
        "apply -o under a file": ["apply", str(audited / "audit.csv"), "-o", str(a_file / "l.csv")],
        "train -o file": ["train", "--clean", str(audited / "audit.csv"), "--backbone", "lite0", "--pretrained",
                          str(lite0_file), "-o", str(a_file)],
        "predict -o file": ["predict", str(tmp_path / "no-model"), str(root), "-o", str(a_file)],
        "noise -o under a file": ["noise", str(labels), "--rate", "0.1", "-o", str(a_file / "n.csv")],
    }
    for name, argv in runs.items():
        capsys.readouterr()
        assert main(argv) == 2, name
        err = capsys.readouterr().err
        assert "Cannot write" in err and "Traceback" not in err, (name, err)
    assert not cache.exists() and not (tmp_path / "o").exists()


CHECKS_AS_NOBODY = """
import json, os, sys
from labelsieve.core.errors import OutputError
from labelsieve.core.paths import check_output_dir, check_output_file
if os.geteuid() == 0:  # root may write anywhere: check as an ordinary user
    os.setgid(65534)
    os.setuid(65534)
out = []
for kind, path in json.loads(sys.argv[1]):
    try:
        (check_output_dir if kind == "dir" else check_output_file)(path, what="the output")
        out.append("ok")
    except OutputError as exc:
        out.append(str(exc))
print(json.dumps(out))
"""


def test_read_only_output_and_cache_folders_are_refused(tmp_path):
    """The check every command makes first (test_output_locations_are_checked_before_any_work shows they do)
    refuses a folder the user cannot write: run as a user who cannot (root could write anywhere)."""
    base = Path(tempfile.mkdtemp(prefix="labelsieve-ro-"))
    try:
        ro, rw = base / "ro", base / "rw"
        ro.mkdir()
        rw.mkdir()
        for d, mode in ((base, 0o755), (ro, 0o555), (rw, 0o777)):
            os.chmod(d, mode)
        checks = [["dir", str(ro / "out")], ["dir", str(ro)], ["file", str(ro / "labels.csv")],
                  ["dir", str(rw / "cache")], ["file", str(rw / "labels.csv")]]
        env = {**os.environ, "PYTHONPATH": str(PROJECT)}
        proc = subprocess.run([sys.executable, "-c", CHECKS_AS_NOBODY, json.dumps(checks)], capture_output=True,
                              text=True, env=env, timeout=120)
        leftovers = list(rw.iterdir()) + list(ro.iterdir())  # the probes leave nothing behind
    finally:
        os.chmod(base / "ro", 0o755)
        shutil.rmtree(base)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got[3:] == ["ok", "ok"] and leftovers == []
    for msg in got[:3]:
        assert msg.startswith("Cannot write the output at") and "is not writable (Permission denied)" in msg, msg


def _disk_full_under(monkeypatch, folder: Path) -> None:
    """Writes under ``folder`` fail as on a full disk: fsync (where a full disk reports delayed allocation, and the
    last step of every atomic write) raises OSError(ENOSPC)."""
    import errno

    real = os.fsync

    def fsync(fd):
        try:
            where = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            where = ""
        if where.startswith(str(folder)):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def test_a_full_disk_is_one_message(images3, audited, tmp_path, mini_clip_dir, feature_cache, monkeypatch, capsys):
    """ENOSPC in the output folder, the cache folder and apply's -o: one message naming the file and what to do,
    exit status 2, no traceback, nothing half-written, the previous files unchanged."""
    root, labels, _ = images3
    out = tmp_path / "out"
    shutil.copytree(audited, out)
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    kw = ["--method", "label_match", "--model", str(mini_clip_dir), "--no-progress", "--no-html"]
    with monkeypatch.context() as m:
        _disk_full_under(m, out)
        capsys.readouterr()
        assert main(["audit", str(root), str(labels), "-o", str(out), "--cache-dir", str(feature_cache), *kw]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"No space left on the disk while writing {out / 'audit.csv'}" in err and "Traceback" not in err
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    cache = tmp_path / "cache"
    with monkeypatch.context() as m:
        _disk_full_under(m, cache / "features")
        assert main(["audit", str(root), str(labels), "-o", str(tmp_path / "o2"), "--cache-dir", str(cache),
                     *kw]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"No space left on the disk while writing {cache / 'features'}" in err and "--cache-dir" in err
    assert not (tmp_path / "o2" / "audit.csv").exists()
    dest = tmp_path / "labels" / "clean.csv"
    dest.parent.mkdir()
    dest.write_text("path,label\nold.jpg,cat\n")
    with monkeypatch.context() as m:
        _disk_full_under(m, dest.parent)
        assert main(["apply", str(audited / "audit.csv"), "-o", str(dest)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"No space left on the disk while writing {dest}" in err and dest.read_text() == "path,label\nold.jpg,cat\n"
    assert sorted(f.name for f in dest.parent.iterdir()) == ["clean.csv"]


def test_reviewed_keep_on_a_class_the_input_lacks_is_a_message(images3, audited, tmp_path, mini_clip_dir,
                                                                 feature_cache, capsys):
    """audit --reviewed with `keep` decided on a class the new input does not have (a KeyError before): the
    decision was made on another label, so it is named and not used."""
    root, labels, df = images3
    sheet = reviewed_copy(audited, tmp_path / "v1", {0: "keep"})
    table = pd.read_csv(sheet, dtype=str, keep_default_na=False)
    table.loc[0, "given_label"] = "zebra"  # decided when the row was labelled zebra
    table.to_csv(sheet, index=False)
    (sheet.parent / "audit.json").unlink()  # a reviews file without its record
    capsys.readouterr()
    assert main(["audit", str(root), str(labels), "--method", "label_match", "--model", str(mini_clip_dir), "-o",
                 str(tmp_path / "v2"), "--cache-dir", str(feature_cache), "--no-progress", "--no-html",
                 "--reviewed", str(sheet)]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "decided on the given label 'zebra' (giving 'zebra')" in err and "Traceback" not in err


def test_the_summary_shows_the_rule_that_made_the_flags(images3, audited, tmp_path, mini_clip_dir, feature_cache):
    """A threshold detector's flags are exactly p_clean < the threshold audit.json shows; confident learning, whose
    flags are its own set decision (rows with p_clean .78 can be flagged), shows no threshold: audit.json and the
    page say the decision is the detector's own, and the rule says which."""
    record = json.loads((audited / "audit.json").read_text())
    table = read_audit(audited / "audit.csv", optional=("p_clean", "issue"))
    readable = table[table["issue"] != "unreadable"]
    flags = readable["is_noisy"].str.lower() == "true"
    assert record["decision"] == "p_clean < threshold" and record["threshold"] is not None
    assert (flags == (readable["p_clean"].astype(float) < record["threshold"])).all()
    root, labels, _ = images3
    out = tmp_path / "cl"
    assert main(["audit", str(root), str(labels), "--method", "confident_learning", "--model", str(mini_clip_dir),
                 "-o", str(out), "--cache-dir", str(feature_cache), "--no-progress", "-p", "epochs=5"]) == 0
    record = json.loads((out / "audit.json").read_text())
    assert record["threshold"] is None and "not a threshold on p_clean" in record["decision"]
    assert "prune-by-noise-rate decision (not a threshold on p_clean)" in record["decision_rule"]
    page = (out / "audit.html").read_text(encoding="utf-8")
    assert "threshold (p_clean &lt;)" not in page and "the detector&#x27;s own (not a threshold)" in page


def test_ctrl_c_says_how_to_resume(images3, tmp_path, mini_clip_dir, feature_cache, monkeypatch, capsys):
    """Ctrl-C (click turns it into Abort) prints what is kept and how to resume, not just "aborted"."""
    import labelsieve.api

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(labelsieve.api, "extract_features", interrupted)
    root, labels, _ = images3
    assert main(["audit", str(root), str(labels), "--method", "label_match", "--model", str(mini_clip_dir), "-o",
                 str(tmp_path / "out"), "--cache-dir", str(feature_cache), "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert "run the same command again to resume" in err and "aborted" not in err


def test_labels_differing_only_by_form_case_or_spaces_are_named_and_merged_on_request(images3, tmp_path, capsys,
                                                                                         mini_clip_dir, feature_cache):
    """'ñandú' typed in NFC and in NFD, 'cat' and 'Cat ': without --normalize-labels they stay separate classes with
    a warning naming each spelling; with it each group is one class (its most frequent spelling), recorded in
    audit.json. Paths are never touched."""
    import unicodedata

    root, _, df = images3
    nfc = unicodedata.normalize("NFC", "ñandú")
    nfd = unicodedata.normalize("NFD", "ñandú")
    assert nfc != nfd
    classes = sorted(df["label"].unique())
    spell = {classes[0]: [nfc] * 5 + [nfd] * 3, classes[1]: ["cat"] * 6 + ["Cat "] * 2, classes[2]: ["dog"] * 8}
    rows = []
    for c in classes:
        rows += [[p, lab] for p, lab in zip(df.loc[df["label"] == c, "path"], spell[c], strict=True)]
    labels = write_rows(tmp_path / "labels.csv", ["path", "label"], rows)
    capsys.readouterr()
    plain = load_images(root, labels)
    err = " ".join(capsys.readouterr().err.split())
    assert len(plain.classes) == 5 and "2 class(es) are spelled several ways" in err
    assert f"{nfc!r} (5 rows) / {nfd!r} (NFD) (3 rows)" in err and "'cat' (6 rows) / 'Cat ' (2 rows)" in err
    merged = load_images(root, labels, normalize_labels=True)
    assert sorted(merged.classes) == sorted([nfc, "cat", "dog"]) and merged.label_merges == {nfd: nfc, "Cat ": "cat"}
    assert merged.paths == plain.paths
    out = tmp_path / "out"
    assert main(["audit", str(root), str(labels), "--method", "label_match", "--model", str(mini_clip_dir), "-o",
                 str(out), "--cache-dir", str(feature_cache), "--no-progress", "--no-html", "--normalize-labels"]) == 0
    record = json.loads((out / "audit.json").read_text())
    assert record["input"]["label_merges"] == {nfd: nfc, "Cat ": "cat"} and len(record["classes"]) == 3


def test_paths_and_labels_are_byte_exact_end_to_end(images3, tmp_path, mini_clip_dir, feature_cache, capsys):
    """Class folders ' Forest' and 'River ' round-trip through labels.clean.csv; a CSV naming ' lead.jpg' (and a
    label with spaces) is audited, applied, read back and evaluated: nothing is trimmed."""
    src, _, df = images3
    root = tmp_path / "folders"
    classes = sorted(df["label"].unique())
    names = {classes[0]: " Forest", classes[1]: "River ", classes[2]: "SeaLake"}
    for k, (p, lab) in enumerate(zip(df["path"], df["label"], strict=True)):
        if k == 5:
            continue  # the zero-byte file
        (root / names[lab]).mkdir(parents=True, exist_ok=True)
        shutil.copy(src / p, root / names[lab] / f"{k:02d}.jpg")
    out = tmp_path / "out"
    assert main(["audit", str(root), "--method", "label_match", "--model", str(mini_clip_dir), "-o", str(out),
                 "--cache-dir", str(feature_cache), "--no-progress", "--no-html"]) == 0
    assert main(["apply", str(out / "audit.csv"), "-o", str(tmp_path / "clean.csv")]) == 0
    back = load_images(root, tmp_path / "clean.csv")  # was: "12 image file(s) not found"
    first = load_images(root)
    pairs = sorted(zip(first.paths, first.label_names(), strict=True))
    assert sorted(zip(back.paths, back.label_names(), strict=True)) == pairs
    assert set(back.classes) == {" Forest", "River ", "SeaLake"}
    # a CSV naming ' lead.jpg', labelled ' lead class'
    flat = tmp_path / "flat"
    flat.mkdir()
    rows = []
    for k, (p, lab) in enumerate(zip(df["path"], df["label"], strict=True)):
        if k == 5:
            continue
        name = " lead.jpg" if k == 0 else f"{k:02d}.jpg"
        shutil.copy(src / p, flat / name)
        rows.append([name, " lead class" if lab == classes[0] else lab])
    labels = write_rows(tmp_path / "labels.csv", ["path", "label"], rows)
    out2 = tmp_path / "out2"
    assert main(["audit", str(flat), str(labels), "--method", "label_match", "--model", str(mini_clip_dir), "-o",
                 str(out2), "--cache-dir", str(feature_cache), "--no-progress", "--no-html"]) == 0
    table = read_audit(out2 / "audit.csv")
    assert " lead.jpg" in set(table["path"]) and " lead class" in set(table["given_label"])
    assert main(["apply", str(out2 / "audit.csv"), "-o", str(tmp_path / "clean2.csv")]) == 0
    again = load_images(flat, tmp_path / "clean2.csv")
    assert sorted(zip(again.paths, again.label_names(), strict=True)) == sorted(map(tuple, rows))
    truth = write_rows(tmp_path / "truth.csv", ["path", "true_label"], rows)
    capsys.readouterr()
    assert main(["evaluate", str(out2 / "audit.csv"), "--truth", str(truth), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == len(rows)


def test_symlink_loops_and_nul_bytes_get_one_message(images3, tmp_path, capsys, mini_clip_dir):
    """A symbolic-link loop in an ImageFolder tree and a NUL byte in a CSV path: one message naming the row, no
    traceback."""
    src, _, df = images3
    root = tmp_path / "tree"
    for k, (p, lab) in enumerate(zip(df["path"], df["label"], strict=True)):
        (root / lab).mkdir(parents=True, exist_ok=True)
        if k != 5:
            shutil.copy(src / p, root / lab / f"{k:02d}.jpg")
    loop = root / df["label"][0] / "loop.jpg"
    loop.symlink_to(loop.name)
    capsys.readouterr()
    assert main(["audit", str(root), "--method", "label_match", "--model", str(mini_clip_dir), "-o",
                 str(tmp_path / "o"), "--no-progress"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"{df['label'][0]}/loop.jpg (a symbolic-link loop)" in err and "Traceback" not in err
    loop.unlink()
    labels = tmp_path / "nul.csv"
    labels.write_text("path,label\n" + "".join(f"{df['label'][0]}/{k:02d}.jpg,a\n" for k in range(3))
                      + "bad\0name.jpg,b\n", encoding="utf-8")
    assert main(["audit", str(root), str(labels), "--method", "label_match", "--model", str(mini_clip_dir), "-o",
                 str(tmp_path / "o"), "--no-progress"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "line 5: 'bad\\x00name.jpg' holds a NUL byte" in err


def test_a_decision_made_on_an_older_label_never_reverts_a_later_fix(images3, audited, tmp_path, mini_clip_dir,
                                                                   feature_cache, capsys):
    """`keep` decided on label X, then the label fixed to Y in the input: `audit --reviewed` and `apply --reviews`
    follow one rule: the decision is stale (named, not used) and Y stays; a `relabel:Y` decided on X agrees with Y."""
    root, labels, df = images3
    sheet = reviewed_copy(audited, tmp_path / "v1")
    table = pd.read_csv(sheet, dtype=str, keep_default_na=False)
    readable = table.index[table["issue"] != "unreadable"][:7]
    classes = sorted(df["label"].unique())
    fixed = {}
    for i in readable[:5]:
        table.loc[i, "review"] = "keep"  # decided on the old label ...
        fixed[table.loc[i, "path"]] = next(c for c in classes if c != table.loc[i, "given_label"])
    agree_path = table.loc[readable[5], "path"]
    agree_to = next(c for c in classes if c != table.loc[readable[5], "given_label"])
    table.loc[readable[5], "review"] = f"relabel:{agree_to}"
    fixed[agree_path] = agree_to
    table.to_csv(sheet, index=False)
    new_labels = df.assign(label=[fixed.get(p, lab) for p, lab in zip(df["path"], df["label"], strict=True)])
    new_labels.to_csv(tmp_path / "labels.v2.csv", index=False)  # ... and the labels fixed later
    v2 = tmp_path / "v2"
    capsys.readouterr()
    assert main(["audit", str(root), str(tmp_path / "labels.v2.csv"), "--method", "label_match", "--model",
                 str(mini_clip_dir), "-o", str(v2), "--cache-dir", str(feature_cache), "--no-progress", "--no-html",
                 "--reviewed", str(sheet)]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "5 reviewed decision(s) were made on another row than this input's and were not used" in err
    record = json.loads((v2 / "audit.json").read_text())
    assert record["reviewed"]["n_stale"] == 5 and record["reviewed"]["n_decided"] == 1  # trusted or held out (check)
    new = read_audit(v2 / "audit.csv").set_index("path")
    assert not any(new.loc[p, "review"].startswith("relabel:") for p in list(fixed)[:5])  # was relabel:<old label>
    assert new.loc[agree_path, "review"] == "keep"
    assert main(["apply", str(v2 / "audit.csv"), "-o", str(tmp_path / "clean.csv")]) == 0
    out = dict(zip(*read_labels_csv(tmp_path / "clean.csv")[:2], strict=True))
    assert all(out[p] == y for p, y in fixed.items())  # was: the old label written back for 5 of 5
    # apply --reviews: the same rule (it used to refuse the whole file: "made on another given label")
    plain = tmp_path / "v2b"
    shutil.copytree(v2, plain)
    t = pd.read_csv(plain / "audit.csv", dtype=str, keep_default_na=False).assign(review="")
    t.to_csv(plain / "audit.csv", index=False)
    capsys.readouterr()
    assert main(["apply", str(plain / "audit.csv"), "--reviews", str(sheet), "-o", str(tmp_path / "c2.csv")]) == 0
    captured = capsys.readouterr()
    assert "stale_decisions: 5" in captured.out and "5 decision(s) were made on another row" in " ".join(
        captured.err.split())
    assert dict(zip(*read_labels_csv(tmp_path / "c2.csv")[:2], strict=True)) == out


def test_reviews_of_another_audit_with_replaced_images_are_not_applied(images3, tmp_path, mini_clip_dir,
                                                                       feature_cache, capsys):
    """Reviews carry their audit's identity and each decided image's digest: applied to another audit of the same
    paths and labels whose decided images were replaced by other pictures, those decisions are named and not used
    (apply --reviews and audit --reviewed alike)."""
    src, labels, df = images3
    kw = ["--method", "label_match", "--model", str(mini_clip_dir), "--cache-dir", str(feature_cache),
          "--no-progress", "--no-html"]
    assert main(["audit", str(src), str(labels), "-o", str(tmp_path / "a"), *kw]) == 0
    a = pd.read_csv(tmp_path / "a" / "audit.csv", dtype=str, keep_default_na=False)
    decided = a.index[a["issue"] != "unreadable"][:8]
    a.loc[decided, "review"] = ["keep", "drop", "keep", "drop", "keep", "drop", "keep", "keep"]
    reviews = a.loc[decided, ["path", "given_label", "suggested_label", "review", "digest", "audit_id"]]
    reviews.to_csv(tmp_path / "reviews.csv", index=False)  # what the page downloads
    root = tmp_path / "b-images"
    shutil.copytree(src, root)
    replaced = list(a.loc[decided[:6], "path"])
    donor = [p for p in df["path"] if p not in set(a.loc[decided, "path"]) and (src / p).stat().st_size][1:7]
    for p, d in zip(replaced, donor, strict=True):
        shutil.copy(src / d, root / p)  # same path, another picture
    assert main(["audit", str(root), str(labels), "-o", str(tmp_path / "b"), *kw]) == 0
    capsys.readouterr()
    assert main(["apply", str(tmp_path / "b" / "audit.csv"), "--reviews", str(tmp_path / "reviews.csv"), "-o",
                 str(tmp_path / "clean.csv")]) == 0
    out, err = capsys.readouterr()
    err = " ".join(err.split())
    assert "stale_decisions: 6" in out and "decisions_merged: 2" in out
    assert "6 decision(s) were made on another row" in err and "is another picture now" in err
    assert all(p in err for p in replaced[:5])  # named (the first five)
    kept = set(read_labels_csv(tmp_path / "clean.csv")[0])
    assert set(replaced) <= kept  # their 'drop' decisions were not applied to the new pictures
    capsys.readouterr()
    assert main(["audit", str(root), str(labels), "-o", str(tmp_path / "b2"), *kw,
                 "--reviewed", str(tmp_path / "reviews.csv")]) == 0
    assert json.loads((tmp_path / "b2" / "audit.json").read_text())["reviewed"]["n_stale"] == 6


def _sheet_audit(tmp_path: Path, classes: list[str], rows: list[tuple[str, str, str]]) -> Path:
    """A written audit (audit.csv + audit.json, no images) of ``rows`` (path, given, suggested), with its input
    labels CSV, so that readers can name rows."""
    from labelsieve.audit.auditset import new_audit_id, write_audit_set
    from labelsieve.audit.schema import paths_hash
    from labelsieve.audit.table import Audit
    from labelsieve.data.images import input_hash

    labels = write_rows(tmp_path / "labels.csv", ["path", "label"], [[p, g] for p, g, _ in rows])
    n = len(rows)
    table = pd.DataFrame({"path": [r[0] for r in rows], "given_label": [r[1] for r in rows],
                          "p_clean": np.linspace(0.1, 0.9, n), "is_noisy": [r[1] != r[2] for r in rows],
                          "suggested_label": [r[2] for r in rows], "suggested_prob": 0.9, "issue": "",
                          "rank": np.arange(1, n + 1), "review": ""})
    ih = input_hash([r[0] for r in rows], [r[1] for r in rows])
    summary = {"audit_id": new_audit_id(ih, "now"), "created": "now", "classes": classes, "n_images": n,
               "input": {"root": str(tmp_path), "labels": str(labels), "input_hash": ih,
                         "paths_hash": paths_hash([r[0] for r in rows])}}
    write_audit_set(Audit(table=table, summary=summary), tmp_path / "out", image_root=tmp_path, html=False)
    return tmp_path / "out" / "audit.csv"


def test_labels_a_spreadsheet_changed_are_repaired_or_refused_with_their_rows(tmp_path, capsys):
    """Given, suggested and relabel classes are checked against audit.json's classes: a value one class explains
    as a spreadsheet change (a number, a date, another case) is read as that class, with the rows named; others
    are refused with their rows; the "did you mean" hint names the class, not the damaged value. A label changed
    into another class (0012 -> 12 where both are classes) is caught by the audit's labels_hash."""
    classes = ["0012", "12", "1e5", "3/4", "Cat"]
    rows = [("a.jpg", "1e5", "1e5"), ("b.jpg", "3/4", "0012"), ("c.jpg", "Cat", "Cat"), ("d.jpg", "0012", "3/4"),
            ("e.jpg", "12", "12")]
    sheet = _sheet_audit(tmp_path, classes, rows)
    original = pd.read_csv(sheet, dtype=str, keep_default_na=False)

    def edited(cells):
        t = original.copy()
        for (row, col), value in cells.items():
            t.loc[row, col] = value
        t.to_csv(sheet, index=False)
        capsys.readouterr()
        return main(["apply", str(sheet), "-o", str(tmp_path / "clean.csv")]), " ".join(capsys.readouterr().err.split())

    rc, err = edited({(0, "given_label"): "100000", (3, "suggested_label"): "2026-03-04",
                        (2, "given_label"): "CAT", (1, "review"): "relabel:1.00E+05"})
    assert rc == 0, err
    assert "given_label '100000' is read as '1e5' (read as the number 100000)" in err
    assert "suggested_label '2026-03-04' is read as '3/4' (read as the date 2026-03-04)" in err
    assert "given_label 'CAT' is read as 'Cat' (another case)" in err
    assert "'relabel:1.00E+05' is read as 'relabel:1e5'" in err
    assert dict(zip(*read_labels_csv(tmp_path / "clean.csv")[:2], strict=True)) == {
        "a.jpg": "1e5", "b.jpg": "1e5", "c.jpg": "Cat", "d.jpg": "0012", "e.jpg": "12"}
    rc, err = edited({(4, "review"): "relabel:cta"})
    assert rc == 2 and "unknown class 'cta' in 'relabel:cta'; did you mean 'Cat'?" in err
    rc, err = edited({(1, "review"): "relabel:100"})
    assert rc == 2 and "unknown class '100'" in err and "did you mean" not in err  # no damaged value offered
    rc, err = edited({(2, "given_label"): "zzz"})
    assert rc == 2 and "line 4: given_label 'zzz' is not a class of this audit" in err
    rc, err = edited({(3, "given_label"): "12"})  # 0012 -> 12, and 12 is a class too
    assert rc == 2 and "line 5 (d.jpg): '12', the audit's input says '0012'" in err
    assert not (tmp_path / "clean.csv").exists() or rc == 2


#: LibreOffice round trips: (import filter, export filter) per conversion. The default import keeps dates; with
#: "detect special numbers" (the 8th CSV token) 3/4 becomes a date, and "save as shown" writes 1e5 as 1.00E+05.
_SPECIAL_IN = "CSV:44,34,76,1,,1033,false,true"
_SHOWN_OUT = "csv:Text - txt - csv (StarCalc):44,34,76,1,,1033,false,true,true"
_ROUND_TRIPS = {
    "csv-csv": [(None, "csv")],
    "csv-csv special numbers": [(_SPECIAL_IN, _SHOWN_OUT)],
    "csv-xlsx-csv": [(None, "xlsx"), (None, "csv")],
    "csv-xlsx-csv special numbers": [(_SPECIAL_IN, "xlsx"), (None, _SHOWN_OUT)],
}


def _libreoffice(src: Path, dest_dir: Path, steps: list[tuple[str | None, str]], profile: Path) -> Path:
    """``src`` converted by LibreOffice Calc, headless, through ``steps``; the last result lands in ``dest_dir``."""
    cur = src
    for k, (infilter, convert) in enumerate(steps):
        out = dest_dir if k == len(steps) - 1 else src.parent / f"step{k}"
        args = ["soffice", f"-env:UserInstallation={profile.as_uri()}", "--headless", "--norestore"]
        args += [f"--infilter={infilter}"] if infilter else []
        subprocess.run([*args, "--convert-to", convert, "--outdir", str(out), str(cur)], check=True,
                       capture_output=True, timeout=240)
        cur = out / (cur.stem + "." + convert.split(":")[0])
        assert cur.is_file(), (steps, k)
    return cur


def test_a_libreoffice_round_trip_keeps_the_labels_or_is_refused(images3, tmp_path, mini_clip_dir, feature_cache,
                                                                 capsys):
    """An audit with mangle-prone class names (0012, 1e5, 3/4) and file names (007, 3-4, 1e5, TRUE, ' lead.jpg',
    =cmd.jpg), reviewed, saved back by LibreOffice Calc (CSV->CSV and CSV->XLSX->CSV, with and without "detect
    special numbers"): apply gives exactly the labels of the original sheet. With the cells' protecting ' removed
    first (a tool that drops it), the changed labels and paths are repaired, naming the rows, or refused."""
    if shutil.which("soffice") is None:
        from helpers import unavailable

        unavailable("LibreOffice is not installed (apt-get install libreoffice-calc)")
    src, _, df = images3
    root = tmp_path / "imgs"
    root.mkdir()
    classes = dict(zip(sorted(df["label"].unique()), ["0012", "1e5", "3/4"], strict=True))
    special = {0: "007", 1: "3-4", 2: "1e5", 3: "TRUE", 4: " lead.jpg", 6: "=cmd.jpg"}
    rows = []
    for k, (p, lab) in enumerate(zip(df["path"], df["label"], strict=True)):
        if k == 5:
            continue  # the zero-byte file
        name = special.get(k, f"{k:02d}.jpg")
        shutil.copy(src / p, root / name)
        rows.append([name, classes[lab]])
    labels = write_rows(tmp_path / "labels.csv", ["path", "label"], rows)
    out = tmp_path / "out"
    assert main(["audit", str(root), str(labels), "--method", "label_match", "--model", str(mini_clip_dir), "-o",
                 str(out), "--cache-dir", str(feature_cache), "--no-progress", "--no-html"]) == 0
    # a reviewer's decisions, typed into the sheet as written (the protecting ' stays where labelsieve put it)
    cells = raw_cells(out / "audit.csv")
    head = cells[0]
    ip, ig, ir = head.index("path"), head.index("given_label"), head.index("review")
    by_path = {restore_cell(r[ip]): r for r in cells[1:]}
    for name, review in [("007", "relabel:3/4"), ("3-4", "relabel:0012"), ("1e5", "drop"), (" lead.jpg", "keep"),
                         ("TRUE", "relabel:1e5")]:
        by_path[name][ir] = review
    assert {by_path["007"][ig], by_path["3-4"][ip]} <= {"'0012", "'1e5", "'3/4", "'3-4"}  # protected as text
    write_rows(out / "audit.csv", head, cells[1:])
    assert main(["apply", str(out / "audit.csv"), "-o", str(tmp_path / "clean0.csv")]) == 0
    expected = (tmp_path / "clean0.csv").read_bytes()
    got = {(r[0], r[1]) for r in raw_cells(tmp_path / "clean0.csv")[1:]}
    assert ("'3-4", "'0012") in got and ("'007", "'3/4") in got and not any(p == "'1e5" for p, _ in got)
    profile = tmp_path / "lo-profile"
    results = {}
    for name, steps in _ROUND_TRIPS.items():
        for lost in (False, True):
            work = tmp_path / f"rt-{len(results)}"
            shutil.copytree(out, work)
            sheet = tmp_path / f"in-{len(results)}" / "audit.csv"
            sheet.parent.mkdir()
            rows_in = raw_cells(out / "audit.csv")
            if lost:  # a tool that drops the ' of numbers and dates (not of formulas: those would run)
                rows_in = [[c[1:] if c[:1] == "'" and is_convertible(c[1:]) else c for c in r] for r in rows_in]
            write_rows(sheet, rows_in[0], rows_in[1:])
            (work / "audit.csv").unlink()
            back = _libreoffice(sheet, work, steps, profile)
            assert back == work / "audit.csv"
            capsys.readouterr()
            clean = tmp_path / f"clean-{len(results)}.csv"
            rc = main(["apply", str(back), "-o", str(clean)])
            err = " ".join(capsys.readouterr().err.split())
            if rc == 0:
                assert clean.read_bytes() == expected, (name, lost, err)
                results[(name, lost)] = "same labels" + (" (repaired, rows named)" if "line " in err else "")
            else:
                assert rc == 2 and "line " in err, (name, lost, err)
                results[(name, lost)] = "refused, rows named"
    # with the protecting ' kept, LibreOffice changes nothing; without it, values were changed and repaired
    assert all(results[(n, False)] == "same labels" for n in _ROUND_TRIPS), results
    assert all(results[(n, True)] in ("same labels (repaired, rows named)", "refused, rows named")
               for n in _ROUND_TRIPS), results


# --------------------------------------------------------------------------- security


class _Payload:
    """Unpickling this creates ``marker`` (``open(marker, "w")``): the proof that a file ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant(path: Path, marker: Path, kind: str) -> Path:
    """A file at ``path`` whose loading by pickle would create ``marker``: ``torch`` (torch.save's zip),
    ``pickle`` or ``npy`` (an object array)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "torch":
        import torch

        torch.save({"model": _Payload(marker)}, path)
    elif kind == "pickle":
        import pickle

        path.write_bytes(pickle.dumps(_Payload(marker)))
    else:
        with open(path, "wb") as f:
            np.save(f, np.array([_Payload(marker)], dtype=object), allow_pickle=True)
    return path


def test_the_planted_payloads_do_run_when_unpickled(tmp_path):
    """The payloads of the next test are real: loaded the unsafe way, each creates its marker."""
    import pickle

    import torch

    marker = tmp_path / "ran"
    for kind, load in [("torch", lambda f: torch.load(f, weights_only=False)),
                       ("pickle", lambda f: pickle.loads(f.read_bytes())),
                       ("npy", lambda f: np.load(f, allow_pickle=True))]:
        load(_plant(tmp_path / f"x.{kind}", marker, kind))
        assert marker.exists(), kind
        marker.unlink()


def test_the_package_unpickles_nothing():
    """Every loader call in labelsieve's source: no torch.load, pickle, joblib, shelve or marshal; every np.load
    says allow_pickle=False (the allow-list is empty)."""
    import ast

    bad = []
    for f in sorted((PROJECT / "labelsieve").rglob("*.py")):
        tree = ast.parse(f.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                bad += [f"{f.name}:{node.lineno} imports {n}" for n in names
                        if n and n.split(".")[0] in ("pickle", "dill", "joblib", "shelve", "marshal", "cloudpickle")]
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                owner = ast.unparse(node.func.value)
                if node.func.attr == "load" and owner == "torch":
                    bad.append(f"{f.name}:{node.lineno} torch.load")
                if node.func.attr == "load" and owner in ("np", "numpy"):
                    kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
                    if kw.get("allow_pickle") != "False":
                        bad.append(f"{f.name}:{node.lineno} np.load without allow_pickle=False")
    assert bad == []


def test_no_payload_runs_from_any_file_labelsieve_reads(audited, images3, store16, tmp_path, lite0_file,
                                                        mini_clip_dir, mini_clip, capsys):
    """A pickle planted in every file labelsieve reads: the training checkpoint (new and old names), an exported
    model's weights, --pretrained weight files (timm and an open_clip folder), audit --features, every file of the
    feature store and of the decoded-image cache, the digest memo, audit.json. No payload runs; each is refused
    with a message or ignored with a warning and rebuilt."""
    from labelsieve.api import audit_features
    from labelsieve.core.errors import LabelsieveError
    from labelsieve.data.imagecache import DecodedImageCache
    from labelsieve.models.encoders import create_encoder

    marker = tmp_path / "PAYLOAD-RAN"
    # 1. train -o DIR: a planted checkpoint (the name labelsieve writes, and the old checkpoint.pt)
    model_dir = tmp_path / "model"
    _plant(model_dir / "checkpoint.safetensors", marker, "torch")
    _plant(model_dir / "checkpoint.pt", marker, "torch")
    capsys.readouterr()
    report = train_from_audit(audited / "audit.csv", backbone="lite0", pretrained=str(lite0_file), out_dir=model_dir,
                              epochs=1, batch_size=8, image_size=64, num_workers=0, cache_dir=tmp_path / "c1",
                              progress=True)
    err = capsys.readouterr()
    assert report.epochs == 1 and not marker.exists()
    assert "cannot read checkpoint" in err.err and "checkpoint.pt is ignored" in err.err
    # 2. an exported model whose weights are a pickle
    bad_model = tmp_path / "bad-model"
    shutil.copytree(model_dir, bad_model)
    (bad_model / "checkpoint.pt").unlink()
    _plant(bad_model / "model.safetensors", marker, "torch")
    with pytest.raises(LabelsieveError):
        predict(bad_model, images3[0], out_dir=tmp_path / "pred", progress=False)
    # 3. --pretrained weight files: timm (train) and an open_clip model folder (audit)
    for kind in ("torch", "pickle"):
        with pytest.raises(LabelsieveError, match="Cannot load"):
            train_from_audit(audited / "audit.csv", backbone="lite0", pretrained=str(_plant(tmp_path / f"w-{kind}.pth",
                             marker, kind)), out_dir=tmp_path / "m2", epochs=1, progress=False)
        clip = tmp_path / f"clip-{kind}"
        clip.mkdir()
        shutil.copy(mini_clip_dir / "open_clip_config.json", clip)
        _plant(clip / "open_clip_pytorch_model.bin", marker, kind)
        with pytest.raises(LabelsieveError, match="Cannot load"):
            create_encoder(str(clip), device="cpu")
    # 4. audit --features with an object array
    with pytest.raises(LabelsieveError, match="not a .npy array|float array"):
        audit_features(_plant(tmp_path / "feats.npy", marker, "npy"), images3[1], out_dir=None, quiet=True)
    # 5. every file of the feature store, the digest memo, and a store from before manifests
    images, cache, expected = store16
    for target in ("view", "vectors", "digests", "legacy keys", "memo"):
        work = tmp_path / f"cache-{target.replace(' ', '-')}"
        shutil.copytree(cache, work)
        store = next((work / "features").iterdir())
        chunk = sorted(store.glob("chunk-*.manifest.json"))[0].name[: -len(".manifest.json")]
        if target == "view":
            _plant(next((store / "views").glob("*.npy")), marker, "npy")
        elif target == "vectors":
            _plant(store / f"{chunk}.npy", marker, "npy")
            shutil.rmtree(store / "views")
        elif target == "digests":
            _plant(store / f"{chunk}.digests.npy", marker, "npy")
        elif target == "legacy keys":
            (store / f"{chunk}.manifest.json").unlink()
            (store / f"{chunk}.digests.npy").unlink()
            _plant(store / f"{chunk}.keys.npy", marker, "npy")
            shutil.rmtree(store / "views")
        else:
            _plant(work / "hashes.sqlite", marker, "pickle")
        got = extract_features(images, mini_clip, cache_dir=work, batch_size=8, num_workers=0, progress=False)
        assert got.warnings, target
        np.testing.assert_allclose(np.asarray(got.vectors, np.float32), expected, atol=2e-3)
    # 6. the decoded-image cache (train's and the tower detectors')
    files = [images.abspath(i) for i in range(4)]
    work = tmp_path / "dcache"
    first = DecodedImageCache.open(files, size=16, cache_dir=work, num_workers=0, progress=False)
    pixels = np.array(first.array)
    for name in ("images.npy", "ok.npy", "done.npy"):
        _plant(first.root / name, marker, "npy")
        if name == "done.npy":
            (first.root / "meta.json").unlink()  # an unfinished build reads done.npy
        capsys.readouterr()
        again = DecodedImageCache.open(files, size=16, cache_dir=work, num_workers=0, progress=False)
        assert "decoded-image cache" in capsys.readouterr().err and np.array_equal(np.array(again.array), pixels)
    # 7. the audit's record
    copy = reviewed_copy(audited, tmp_path / "rec")
    _plant(copy.with_name("audit.json"), marker, "pickle")
    assert main(["apply", str(copy), "-o", str(tmp_path / "clean.csv")]) == 2
    assert not marker.exists()


def test_formula_prefixes_are_neutralised_and_restored_exactly():
    for prefix in OWASP_PREFIXES:
        assert prefix in FORMULA_PREFIXES
        value = f"{prefix}HYPERLINK(\"http://x\")"
        assert neutralise_cell(value) == "'" + value and restore_cell(neutralise_cell(value)) == value
        assert restore_cell(value) == value  # as a spreadsheet saves it back (the ' dropped)
        for quoted in ("'" + value, "''" + value):  # names that really start with quotes survive the round trip
            assert restore_cell(neutralise_cell(quoted)) == quoted
    for plain in ("cat", "'cat", "", "a=b", " =x"):
        assert neutralise_cell(plain) == plain == restore_cell(plain)


def test_hostile_names_end_to_end(images3, tmp_path, mini_clip_dir, feature_cache, capsys, monkeypatch):
    """Files and classes named like formulas and like rich markup: audited, applied, read back, evaluated."""
    monkeypatch.setattr(console, "width", 200)
    src, _, df = images3
    classes = {lab: name for lab, name in zip(sorted(df["label"].unique()),
                                               ["=cmd|' /C calc'!A0", "@SUM(1+1)*cmd", "[/bold]"], strict=True)}
    root = tmp_path / "imgs"
    root.mkdir()
    rows, truth = [], []
    for k, (p, lab) in enumerate(zip(df["path"], df["label"], strict=True)):
        if k == 5:
            continue  # the zero-byte file
        name = ["=HYPERLINK(x)", "+1", "-1", "@A1", "plain"][k % 5] + f"-{k}.jpg"
        shutil.copy(src / p, root / name)
        rows.append([name, classes[lab]])
        truth.append([name, classes[lab], classes[lab]])
    labels = write_rows(tmp_path / "labels.csv", ["path", "label"], rows)
    out = tmp_path / "out"
    assert main(["audit", str(root), str(labels), "--method", "label_match", "--model", str(mini_clip_dir), "-o",
                 str(out), "--cache-dir", str(feature_cache), "--no-progress"]) == 0
    assert "[/bold]" in capsys.readouterr().err  # printed in the summary, not parsed as markup
    cells = [c for r in raw_cells(out / "audit.csv")[1:] for c in r]
    assert not [c for c in cells if c[:1] in FORMULA_PREFIXES and not _is_number(c)]
    table = read_audit(out / "audit.csv")
    assert sorted(table["path"]) == sorted(r[0] for r in rows)
    assert set(table["given_label"]) == set(classes.values())
    assert main(["apply", str(out / "audit.csv"), "-o", str(tmp_path / "clean.csv")]) == 0
    assert not [c for r in raw_cells(tmp_path / "clean.csv")[1:] for c in r if c[:1] in FORMULA_PREFIXES]
    back = load_images(root, tmp_path / "clean.csv")  # the labels file reads back as the names it holds
    assert sorted(back.paths) == sorted(r[0] for r in rows) and set(back.classes) == set(classes.values())
    write_rows(tmp_path / "truth.csv", ["path", "label", "true_label"], truth)
    capsys.readouterr()
    assert main(["evaluate", str(out / "audit.csv"), "--truth", str(tmp_path / "truth.csv"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == len(rows)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def test_train_and_predict_read_nothing_outside_the_image_root(audited, images3, tmp_path, lite0_file):
    """A list of paths (an edited audit, a CSV) that leads out of the image folder is refused; a symbolic link the
    folder's owner placed inside it is followed, wherever it points (a hub snapshot, DVC, git-annex); a FIFO is
    refused and never opened."""
    root, _, df = images3
    outside = root.parent / "outside.jpg"
    shutil.copy(root / df.loc[0, "path"], outside)
    link = root / "train" / "link.jpg"
    link.symlink_to(outside)
    pipe = root / "train" / "pipe.jpg"
    try:
        for bad in ("../outside.jpg", str(outside)):
            audit_csv = reviewed_copy(audited, tmp_path / f"out-{abs(hash(bad))}")
            table = pd.read_csv(audit_csv, dtype=str, keep_default_na=False)
            table.loc[7, "path"] = bad
            table.to_csv(audit_csv, index=False)
            with pytest.raises(DataError, match=rf"point outside the image folder .*line 9: {bad}"):
                train_from_audit(audit_csv, backbone="lite0", pretrained=str(lite0_file), out_dir=tmp_path / "m")
            listing = write_rows(tmp_path / "p.csv", ["path"], [[df.loc[1, "path"]], [bad]])
            with pytest.raises(DataError, match=rf"point outside the image folder .*line 3: {bad}"):
                predict(tmp_path / "no-model", root, labels_csv=listing, out_dir=tmp_path / "p", progress=False)
        assert not (tmp_path / "m").exists()
        # the link inside the folder passes the path rule: predict goes on to load its (missing) model
        listing = write_rows(tmp_path / "p.csv", ["path"], [[df.loc[1, "path"]], ["train/link.jpg"]])
        with pytest.raises(ModelError):
            predict(tmp_path / "no-model", root, labels_csv=listing, out_dir=tmp_path / "p", progress=False)
        with pytest.raises(ModelError):
            predict(tmp_path / "no-model", root, out_dir=tmp_path / "p", progress=False)
        os.mkfifo(pipe)
        with pytest.raises(DataError, match=r"not a regular file \(line \d+: train/pipe.jpg \(a FIFO\)\)"):
            predict(tmp_path / "no-model", root, out_dir=tmp_path / "p", progress=False)
    finally:
        link.unlink()
        if pipe.exists():
            pipe.unlink()


def test_train_refuses_a_class_that_keeps_one_image(audited, tmp_path, lite0_file, capsys):
    table = pd.read_csv(audited / "audit.csv", dtype=str, keep_default_na=False)
    classes = sorted(table["given_label"].unique())
    rows = np.flatnonzero((table["given_label"] == classes[0]) & (table["issue"] != "unreadable"))
    reviews = {int(i): "drop" for i in np.flatnonzero(table["given_label"] == classes[0]) if i != rows[0]}
    reviews.update({int(i): "drop" for i in np.flatnonzero(table["given_label"] == classes[1])})  # none of the second
    audit_csv = reviewed_copy(audited, tmp_path / "out", reviews)
    capsys.readouterr()
    with pytest.raises(DataError, match=rf"1 class\(es\) keep fewer than 2 images \('{classes[0]}': 1\)"):
        train_from_audit(audit_csv, backbone="lite0", pretrained=str(lite0_file), out_dir=tmp_path / "m",
                         drop_unreviewed_flagged=False)
    assert f"keeps no image of 1 class(es) ({classes[1]})" in capsys.readouterr().err
