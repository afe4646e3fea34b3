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


#: Cheap settings per detector (what the test may set; never a parameter in the detector's ``features_only``).
_CHEAP = {"codivide": {"epochs": 1}, "confident_learning": {"folds": 2, "epochs": 2}, "deft": {"epochs": 1},
          "gmm": {"folds": 2, "probe_epochs": 2}, "knn": {}, "label_match": {}, "small_loss": {"folds": 2, "epochs": 2},
          "turn": {"lp_epochs": 2},
          "ensemble": {"members": [["codivide", {"frozen": True, "epochs": 1}], ["turn", {"finetune": False,
                                                                                            "lp_epochs": 2}], "knn"]}}
#: Parameters that make a detector read the images: with features only they are refused before any work.
_NEEDS_IMAGES = {"turn": {"finetune": True}, "deft": {"peft": "vpt_deep"}, "codivide": {"frozen": False},
                 "gmm": {"source": "finetune"}, "ensemble": {"members": ["turn", "knn"]}}


def test_every_detector_runs_on_features_or_is_refused_up_front(imagenette_feats, mini_clip, mini_clip_dir, tmp_path,
                                                               monkeypatch):
    """Every registered detector through every features-only entry (labelsieve.detect with and without the model,
    audit --features with and without --model) runs to a result, with what can run on features (TURN's probe when
    fine-tuning was not asked for; it used to die after the probe, wanting an image tower), or is refused before
    any work with a message; and through run_detector an impossible path is refused before features are
    extracted."""
    import labelsieve.api as api
    from labelsieve.core.errors import LabelsieveError, ModelError, ParameterError
    from labelsieve.detectors import get_detector_class, list_detectors

    images, x = imagenette_feats
    rows = np.arange(0, 400, 10)  # 40 rows, 10 classes
    feats, labels = x[rows], [images.classes[i] for i in images.labels[rows]]
    np.save(tmp_path / "f.npy", feats)
    pd.DataFrame({"path": [images.paths[i] for i in rows], "label": labels}).to_csv(tmp_path / "l.csv", index=False)
    assert sorted(_CHEAP) == sorted(list_detectors())  # a new detector must be added here
    verdicts = {}
    for name in list_detectors():
        cls = get_detector_class(name)
        for entry in ("detect", "detect+model", "audit --features", "audit --features --model"):
            model = entry.endswith("model")
            for params in (_CHEAP[name], {**_CHEAP[name], **_NEEDS_IMAGES.get(name, {})}):
                key = (name, entry, "needs images" if params is not _CHEAP[name] else "cheap")
                if key[2] == "needs images" and name not in _NEEDS_IMAGES:
                    continue
                ran = {"detect": False}
                real = cls.detect

                def watched(self, ctx, _real=real, _ran=ran):
                    _ran["detect"] = True
                    return _real(self, ctx)

                monkeypatch.setattr(cls, "detect", watched)
                try:
                    if entry.startswith("detect"):
                        res = api.detect(feats, labels, method=name, params=dict(params),
                                         encoder=mini_clip if model else None)
                        assert len(res.p_clean) == len(rows)
                    else:
                        a = api.audit_features(tmp_path / "f.npy", tmp_path / "l.csv", method=name, params=dict(params),
                                               model=str(mini_clip_dir) if model else None, quiet=True,
                                               progress=False)
                        assert len(a.table) == len(rows)
                    verdicts[key] = "ran"
                except (ParameterError, ModelError) as exc:
                    assert not ran["detect"], (key, exc)  # refused before the detector did any work
                    verdicts[key] = "refused"
                except LabelsieveError as exc:  # pragma: no cover - any other message is a failure of this test
                    raise AssertionError((key, exc)) from exc
                finally:
                    monkeypatch.setattr(cls, "detect", real)
    for (name, entry, kind), verdict in verdicts.items():
        needs_text = get_detector_class(name)().needs_text if name != "ensemble" else True
        if kind == "needs images":
            assert verdict == "refused", (name, entry)
        elif needs_text and not entry.endswith("model"):
            assert verdict == "refused", (name, entry)  # no text side without the model
        else:
            assert verdict == "ran", (name, entry)
    # TURN with its defaults (finetune=True) on features: the probe runs, with a warning (it died after the probe)
    res = api.detect(feats, labels, method="turn", params={"lp_epochs": 2})
    assert "probe" in res.rule
    # run_detector: a path that cannot run on this tower is refused before any feature is extracted
    monkeypatch.setattr(api, "extract_features", lambda *a, **k: (_ for _ in ()).throw(AssertionError("work")))
    for name, params in (("deft", {"peft": "vpt_deep"}), ("codivide", {"frozen": False})):
        try:
            api.run_detector(images.subset(rows), mini_clip, method=name, params=params, progress=False)
        except ModelError as exc:
            assert "ViT" in str(exc), name
        else:  # pragma: no cover
            raise AssertionError(f"{name} {params} was not refused")
