"""`labelsieve audit --features FEATS.npy LABELS.csv`: an audit of features computed elsewhere."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from labelsieve.cli import main
from labelsieve.data import load_images
from labelsieve.features import extract_features


def _noisy_labels(imagenette_small, tmp_path):
    """The 400 Imagenette images with 20 % of the labels moved to another class (seed 3): (root, labels.csv, truth)."""
    root, csv = imagenette_small
    df = pd.read_csv(csv)
    classes = sorted(df["label"].unique())
    rng = np.random.default_rng(3)
    flip = rng.choice(len(df), size=len(df) // 5, replace=False)
    truth = np.zeros(len(df), dtype=bool)
    truth[flip] = True
    for i in flip:
        df.loc[i, "label"] = classes[(classes.index(df.loc[i, "label"]) + 1 + rng.integers(len(classes) - 1))
                                     % len(classes)]
    df[["path", "label"]].to_csv(tmp_path / "labels.csv", index=False)
    return root, tmp_path / "labels.csv", dict(zip(df["path"], truth, strict=True))


def test_features_audit_equals_the_image_audit_and_finds_the_noise(imagenette_small, mini_clip, mini_clip_dir,
                                                                   feature_cache, tmp_path, capsys):
    root, labels, truth = _noisy_labels(imagenette_small, tmp_path)
    feats = extract_features(load_images(root, labels), mini_clip, cache_dir=feature_cache, progress=False)
    np.save(tmp_path / "feats.npy", np.asarray(feats.vectors))  # the store's own float16 rows, in CSV order
    common = ["--no-progress", "--method", "turn", "--no-finetune", "--no-near-duplicates"]
    assert main(["audit", str(root), str(labels), "--model", str(mini_clip_dir), "--cache-dir", str(feature_cache),
                 "-o", str(tmp_path / "images"), "--no-html", *common]) == 0
    assert main(["audit", "--features", str(tmp_path / "feats.npy"), str(labels), "-o", str(tmp_path / "feats"),
                 *common]) == 0
    a = pd.read_csv(tmp_path / "images" / "audit.csv").set_index("path")
    b = pd.read_csv(tmp_path / "feats" / "audit.csv").set_index("path")
    assert list(a.index) == list(b.index)  # same ranking
    assert (a["is_noisy"] == b["is_noisy"]).all()
    np.testing.assert_allclose(b["p_clean"], a["p_clean"], atol=1e-6)
    # the noise is found: F1 of the flag against the injected flips (measured 0.948 on this set)
    flagged = b["is_noisy"].to_numpy(dtype=bool)
    noisy = np.array([truth[p] for p in b.index])
    tp = int((flagged & noisy).sum())
    f1 = 2 * tp / (int(flagged.sum()) + int(noisy.sum()))
    assert f1 > 0.8, f1
    record = json.loads((tmp_path / "feats" / "audit.json").read_text())
    assert record["features"]["shape"] == [400, feats.vectors.shape[1]] and record["model"] is None
    assert record["method"] == "turn" and (tmp_path / "feats" / "audit.html").is_file()


def test_features_audit_default_method_and_clear_errors(imagenette_small, tmp_path, capsys):
    root, labels, _ = _noisy_labels(imagenette_small, tmp_path)
    rng = np.random.default_rng(0)
    np.save(tmp_path / "short.npy", rng.normal(size=(399, 8)).astype(np.float32))
    assert main(["audit", "--features", str(tmp_path / "short.npy"), str(labels), "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "399 rows of features for the 400 rows" in err and "labels.csv" in err
    (tmp_path / "text.npy").write_text("not an array")
    assert main(["audit", "--features", str(tmp_path / "text.npy"), str(labels), "-o", str(tmp_path / "o")]) == 2
    assert "not a .npy array" in capsys.readouterr().err
    assert main(["audit", "--features", str(tmp_path / "missing.npy"), str(labels), "-o", str(tmp_path / "o")]) == 2
    assert "Features file not found" in capsys.readouterr().err
    # a text-guided detector without the model the features came from
    np.save(tmp_path / "ok.npy", rng.normal(size=(400, 8)).astype(np.float16))
    assert main(["audit", "--features", str(tmp_path / "ok.npy"), str(labels), "--method", "deft",
                 "-o", str(tmp_path / "o")]) == 2
    assert "pass the model the features came from (--model)" in capsys.readouterr().err
    # the default: TURN's probe, no image read (the CSV's paths name nothing on disk here)
    assert main(["audit", "--features", str(tmp_path / "ok.npy"), str(labels), "-o", str(tmp_path / "o"),
                 "--no-progress", "--no-html"]) == 0
    record = json.loads((tmp_path / "o" / "audit.json").read_text())
    assert record["method"] == "turn" and record["parameters"]["finetune"] is False
    assert len(pd.read_csv(tmp_path / "o" / "audit.csv")) == 400
