"""Issue 20's "done when": the same CIFAR-10 images (2,000 with LABELSIEVE_TEST_SOURCES_N=2000, as the issue asks;
1,000 in the default run, to keep the suite under 10 minutes on 2 cores) audited as a folder, as 4 WebDataset
shards, as 2 Parquet files and as a Hugging Face hub snapshot folder of symbolic links give the same flags and
p_clean; apply writes the same labels from each (and cleaned copies in the input's format); train --clean and
predict run from the shard audit; re-packed shards re-extract nothing; audit --pred-probs and detect(pred_probs=)
audit a model's probabilities, with clear errors for probabilities of the wrong shape or rows that do not sum to 1."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import labelsieve
from labelsieve import api, testing
from labelsieve.cli import main
from labelsieve.core.errors import DataError
from labelsieve.data import load_images
from labelsieve.detectors.confident_learning import prune_by_noise_rate

N = int(os.environ.get("LABELSIEVE_TEST_SOURCES_N", "1000"))  # a multiple of 4; 2,000 passed on 2026-12-05
pytestmark = pytest.mark.slow  # N images through the mini CLIP once (2,000: about 2 minutes on 2 cores), then cached
#: A cheap detector on the cached features: kNN's vote (the flags), calibrated p_clean, near-duplicates on.
AUDIT = {"method": "knn", "num_workers": 2, "progress": False, "quiet": True}


def _key(path: str) -> str:
    """The WebDataset member testing.write_shards gives an image file's path (KEY and extension)."""
    stem, ext = os.path.splitext(path)
    return stem.replace("/", "_") + ext.lower()


@pytest.fixture(scope="module")
def sources(tmp_path_factory, mini_clip_dir):
    """The first N CIFAR-10 training images as a folder + CSV, 4 shards, 2 Parquet files and a hub snapshot,
    each audited into one shared feature store (the folder first)."""
    tmp = tmp_path_factory.mktemp("sources")
    root, csv = testing.extract_subset("cifar10", N, first=True)
    ref = load_images(root, csv)
    testing.write_shards(root, csv, tmp / "shards", shards=4)
    testing.write_parquet(root, csv, tmp / "parquet", files=2)
    snap = tmp / "hub" / "snapshots" / "0123abcd"
    for p in ref.paths:  # a hub snapshot: every file a symbolic link into ../blobs/
        data = (root / p).read_bytes()
        blob = tmp / "hub" / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snap / p
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    # LABELSIEVE_TEST_SOURCES_CACHE keeps the features between runs while developing (content-addressed: reuse is safe)
    cache = Path(os.environ.get("LABELSIEVE_TEST_SOURCES_CACHE", tmp / "cache"))
    common = {**AUDIT, "model": str(mini_clip_dir), "cache_dir": cache}
    audits = {"folder": api.audit(root, csv, out_dir=tmp / "a-folder", **common),
              "shards": api.audit(tmp / "shards", out_dir=tmp / "a-shards", **common),
              "parquet": api.audit(tmp / "parquet", out_dir=tmp / "a-parquet", **common),
              "snapshot": api.audit(snap, csv, out_dir=tmp / "a-snapshot", **common)}
    return {"root": root, "csv": csv, "ref": ref, "tmp": tmp, "cache": cache, "audits": audits, "snap": snap}


def _by_image(table: pd.DataFrame, ref_paths: list[str], kind: str) -> pd.DataFrame:
    """The audit's rows in the folder's input order, whatever names the source gave them."""
    if kind == "shards":
        names = {f"shard-{k // (N // 4):06d}.tar/{_key(p)}": i for k, (i, p) in enumerate(enumerate(ref_paths))}
    elif kind == "parquet":
        names = {f"train-{i // (N // 2):05d}-of-00002.parquet#{i % (N // 2)}": i for i in range(len(ref_paths))}
    else:
        names = {p: i for i, p in enumerate(ref_paths)}
    order = table["path"].map(names)
    assert order.notna().all() and len(table) == len(ref_paths)
    return table.assign(_i=order.to_numpy()).sort_values("_i").reset_index(drop=True)


def test_folder_shards_parquet_and_hub_snapshot_give_the_same_audit(sources):
    ref, audits = sources["ref"], sources["audits"]
    folder = _by_image(audits["folder"].table, ref.paths, "folder")
    assert 0 < folder["is_noisy"].sum() < N
    for kind in ("shards", "parquet", "snapshot"):
        a = audits[kind]
        assert a.summary["n_extracted"] == 0  # content-addressed: the folder's features serve every source
        t = _by_image(a.table, ref.paths, kind)
        assert (t["is_noisy"].to_numpy() == folder["is_noisy"].to_numpy()).all(), kind
        assert np.abs(t["p_clean"].to_numpy() - folder["p_clean"].to_numpy()).max() <= 1e-6, kind
        for col in ("given_label", "suggested_label", "issue", "duplicate_group"):
            assert t[col].astype(str).tolist() == folder[col].astype(str).tolist(), (kind, col)
        assert a.summary["input"]["kind"] == {"shards": "webdataset", "parquet": "parquet", "snapshot": "files"}[kind]
        # the same image bytes in the same order, whatever holds them
        assert a.summary["input"]["images_hash"] == audits["folder"].summary["input"]["images_hash"], kind
    page = (sources["tmp"] / "a-shards" / "audit.html").read_text()
    assert page.count("data:image/jpeg;base64,") > 10  # thumbnails read from inside the shards


def test_apply_writes_the_same_labels_from_each_source_and_cleaned_copies(sources, tmp_path):
    tmp, ref = sources["tmp"], sources["ref"]
    folder = _by_image(pd.read_csv(tmp / "a-folder" / "audit.csv", dtype=str, keep_default_na=False), ref.paths,
                       "folder")
    flagged = folder.index[folder["is_noisy"].str.lower() == "true"].tolist()
    decisions = {flagged[0]: "drop", flagged[1]: "keep", flagged[2]: "relabel"}
    labels = {}
    for kind in ("folder", "shards", "parquet"):
        audit_csv = tmp_path / kind / "audit.csv"
        audit_csv.parent.mkdir()
        (tmp_path / kind / "audit.json").write_text((tmp / f"a-{kind}" / "audit.json").read_text())
        t = pd.read_csv(tmp / f"a-{kind}" / "audit.csv", dtype=str, keep_default_na=False)
        by = _by_image(t, ref.paths, kind)
        for i, d in decisions.items():
            t.loc[t["path"] == by.loc[i, "path"], "review"] = d
        t.to_csv(audit_csv, index=False)
        copy = {"shards": {"write_shards": tmp_path / "copy-shards"},
                "parquet": {"write_parquet": tmp_path / "copy-parquet"}}.get(kind, {})
        counts = api.apply_review(audit_csv, out_csv=tmp_path / kind / "clean.csv", drop_unreviewed_flagged=True,
                                  cache_dir=sources["cache"], **copy)
        clean = pd.read_csv(tmp_path / kind / "clean.csv", dtype=str, keep_default_na=False)
        labels[kind] = dict(zip(clean["path"], clean["label"], strict=True))
        assert counts["relabelled"] == 1 and counts["kept"] + counts["relabelled"] == len(clean)
        if copy:
            assert counts["copy_samples"] == len(clean)
    names = {"shards": {f"shard-{i // (N // 4):06d}.tar/{_key(p)}": p for i, p in enumerate(ref.paths)},
             "parquet": {f"train-{i // (N // 2):05d}-of-00002.parquet#{i % (N // 2)}": p
                         for i, p in enumerate(ref.paths)}}
    for kind in ("shards", "parquet"):
        assert {names[kind][p]: lab for p, lab in labels[kind].items()} == labels["folder"], kind
    # the cleaned copies hold exactly the kept samples with their final labels
    for kind, folder_name in (("shards", "copy-shards"), ("parquet", "copy-parquet")):
        copy = load_images(tmp_path / folder_name, cache_dir=sources["cache"])
        assert len(copy) == len(labels["folder"])
        if kind == "shards":  # same shard and member names: the labels file names the copy's samples too
            assert dict(zip(copy.paths, copy.label_names(), strict=True)) == labels["shards"]
        else:
            assert sorted(copy.label_names()) == sorted(labels["folder"].values())


def test_train_clean_and_predict_run_from_the_shard_audit(sources, tmp_path, lite0_file):
    tmp = sources["tmp"]
    report = api.train_from_audit(tmp / "a-shards" / "audit.csv", backbone="lite0", pretrained=str(lite0_file),
                                  out_dir=tmp_path / "model", epochs=1, image_size=32, num_workers=2, progress=False,
                                  cache_dir=sources["cache"])
    kept = pd.read_csv(tmp / "a-shards" / "audit.csv")
    assert report.n_train + report.n_val == int((~kept["is_noisy"].astype(bool)).sum())
    assert (tmp_path / "model" / "model.safetensors").is_file()
    names = [f"train-00001-of-00002.parquet#{r}" for r in range(0, N // 2, 5)]  # rows of the second file
    listing = tmp_path / "some.csv"
    listing.write_text("path\n" + "\n".join(names) + "\n")
    out = api.predict(tmp_path / "model", tmp / "parquet", labels_csv=listing, out_dir=tmp_path / "pred",
                      progress=False, cache_dir=sources["cache"])
    pred = pd.read_csv(out)
    assert pred["path"].tolist() == names and pred["error"].isna().all()
    truth = [sources["ref"].label_names()[N // 2 + r] for r in range(0, N // 2, 5)]
    assert np.mean(pred["predicted_label"].to_numpy() == np.array(truth)) > 0.15  # one epoch at 32 px; chance 0.1
    # a folder of symbolic links into a blob store (a hub snapshot), which predict used to refuse
    links = tmp_path / "links"
    links.mkdir()
    for p in sources["ref"].paths[:20]:
        (links / Path(p).name).symlink_to(sources["snap"] / p)
    out = api.predict(tmp_path / "model", links, out_dir=tmp_path / "pred-links", progress=False)
    assert len(pd.read_csv(out)) == 20 and pd.read_csv(out)["error"].isna().all()


def test_repacked_shards_extract_nothing(sources, tmp_path, mini_clip_dir):
    ref = sources["ref"]
    order = list(range(N))[::-1]  # other shards, other names, other order: the same image bytes
    testing.write_shards(sources["root"], sources["csv"], tmp_path / "re", shards=7, name="repacked-{:04d}.tar",
                         order=order)
    again = api.audit(str(tmp_path / "re" / "repacked-{0000..0006}.tar"), model=str(mini_clip_dir),
                      cache_dir=sources["cache"], out_dir=None, duplicate_threshold=None, **AUDIT)
    assert again.summary["n_extracted"] == 0 and len(again.table) == len(ref)


def test_pred_probs_audit_and_detect(sources, tmp_path):
    ref = sources["ref"]
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(N, ref.n_classes)) + 3.0 * np.eye(ref.n_classes)[ref.labels]
    noisy = rng.random(N) < 0.1
    logits[noisy] = rng.normal(size=(int(noisy.sum()), ref.n_classes))  # the model disagrees with these labels
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    np.save(tmp_path / "probs.npy", probs.astype(np.float32))
    res = labelsieve.detect(labels=ref.label_names(), pred_probs=tmp_path / "probs.npy")
    assert (res.is_noisy == prune_by_noise_rate(ref.labels, probs.astype(np.float32))).all()
    assert res.is_noisy[noisy].mean() > 3 * res.is_noisy[~noisy].mean()
    assert main(["audit", "--pred-probs", str(tmp_path / "probs.npy"), str(sources["csv"]), str(sources["root"]),
                 "-o", str(tmp_path / "a"), "--no-progress"]) == 0
    summary = json.loads((tmp_path / "a" / "audit.json").read_text())
    assert summary["method"] == "confident_learning" and summary["pred_probs"]["class_order"] == "sorted class names"
    table = pd.read_csv(tmp_path / "a" / "audit.csv")
    assert int(table["is_noisy"].sum()) == int(res.is_noisy.sum())
    assert "data:image/jpeg;base64," in (tmp_path / "a" / "audit.html").read_text()  # thumbnails with ROOT


@pytest.mark.parametrize("bad, message", [
    (lambda p: p[:-1], rf"{N - 1} rows of probabilities for the {N} rows of the labels CSV"),
    (lambda p: p[:, :-1], r"9 columns of probabilities for the 10 classes .*sorted order: airplane, automobile"),
    (lambda p: p * 2, rf"{N} row\(s\) do not sum to 1 \(row 0 sums to 2"),
    (lambda p: np.log(p), r"hold values that are not probabilities"),
    (lambda p: p[:, 0], r"must be a float array of shape \(n, C\)"),
])
def test_pred_probs_of_the_wrong_shape_or_not_summing_to_one_are_refused(sources, tmp_path, bad, message):
    ref = sources["ref"]
    probs = np.full((N, ref.n_classes), 1.0 / ref.n_classes)
    np.save(tmp_path / "p.npy", bad(probs))
    with pytest.raises(DataError, match=message):
        api.audit_pred_probs(tmp_path / "p.npy", sources["csv"], out_dir=tmp_path / "a", quiet=True, progress=False)
    assert not (tmp_path / "a" / "audit.csv").exists()


def test_an_undecodable_image_inside_a_shard_is_reported_unreadable(sources, tmp_path, mini_clip_dir):
    root, csv = sources["root"], sources["csv"]
    lines = csv.read_text().splitlines()[:41]
    small = tmp_path / "small.csv"
    small.write_text("\n".join(lines) + "\n")
    bad = Path(lines[5].split(",")[0])
    broken = tmp_path / "broken"
    (broken / bad).parent.mkdir(parents=True)
    for line in lines[1:]:
        p = Path(line.split(",")[0])
        (broken / p).parent.mkdir(parents=True, exist_ok=True)
        (broken / p).write_bytes(b"not an image" if p == bad else (root / p).read_bytes())
    testing.write_shards(broken, small, tmp_path / "s", shards=2)
    a = api.audit(tmp_path / "s", model=str(mini_clip_dir), cache_dir=tmp_path / "cache", out_dir=tmp_path / "a",
                  **AUDIT)
    row = a.table[a.table["issue"] == "unreadable"]
    name = f"shard-000000.tar/{_key(str(bad))}"
    assert row["path"].tolist() == [name] and int(row["rank"].iloc[0]) == 1
    assert name in a.summary["unreadable"][name] and "cannot decode image" in a.summary["unreadable"][name]


def test_export_copies_the_exported_rows_images_out_of_the_containers(sources, tmp_path):
    ref, tmp = sources["ref"], sources["tmp"]
    original = {"shards": {f"shard-{i // (N // 4):06d}.tar/{_key(p)}": p for i, p in enumerate(ref.paths)},
                "parquet": {f"train-{i // (N // 2):05d}-of-00002.parquet#{i % (N // 2)}": p
                            for i, p in enumerate(ref.paths)}}
    for kind in ("shards", "parquet"):
        res = api.export_audit(tmp / f"a-{kind}" / "audit.csv", to="labelstudio", out_dir=tmp_path / kind)
        tasks = json.loads(Path(res["tasks"]).read_text())
        flagged = set(sources["audits"][kind].table.loc[sources["audits"][kind].table["is_noisy"], "path"])
        assert len(tasks) == res["n_tasks"] >= len(flagged)  # the flagged rows, and the check sample's
        assert flagged <= {t["data"]["path"] for t in tasks}
        for task in tasks[:50]:
            name = task["data"]["path"]  # the audit's sample name, which apply --from-labelstudio maps back
            shown = Path(res["document_root"]) / task["data"]["image"].split("?d=", 1)[1]
            assert shown.read_bytes() == (sources["root"] / original[kind][name]).read_bytes()


def test_rows_deleted_from_a_shard_audit_are_named(sources, tmp_path, capsys):
    tmp = sources["tmp"]
    t = pd.read_csv(tmp / "a-shards" / "audit.csv", dtype=str, keep_default_na=False)
    gone = t["path"].iloc[[3, 7]].tolist()
    t.drop(index=[3, 7]).to_csv(tmp_path / "audit.csv", index=False)
    (tmp_path / "audit.json").write_text((tmp / "a-shards" / "audit.json").read_text())
    counts = api.apply_review(tmp_path / "audit.csv", out_csv=tmp_path / "clean.csv", cache_dir=sources["cache"])
    assert counts["missing"] == 2
    err = capsys.readouterr().err
    assert "2 row(s) of the audit were deleted from the sheet" in err and gone[0] in err
