"""`labelsieve train --clean audit/audit.csv --backbone …` as the README writes it: the image root comes from the
audit.json beside the audit, --images overrides it, a moved folder gets a clear message, -o defaults to ``model``."""

from __future__ import annotations

import json

import pandas as pd

from labelsieve.cli import main


def _audit(nette, folder, root, *, per_class: int = 3) -> None:
    """A tiny audit (``per_class`` clean rows per class) and the audit.json recording ``root`` as the image folder."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for c in range(nette.n_classes):
        for i in [j for j in range(len(nette)) if nette.labels[j] == c][:per_class]:
            label = nette.classes[c]
            rows.append({"path": nette.paths[i], "given_label": label, "p_clean": 0.9, "is_noisy": False,
                         "suggested_label": label, "suggested_prob": 0.9, "issue": "", "rank": len(rows) + 1,
                         "review": ""})
    pd.DataFrame(rows).to_csv(folder / "audit.csv", index=False)
    (folder / "audit.json").write_text(json.dumps({"input": {"root": str(root)}}))


TINY = ["--epochs", "1", "--image-size", "32", "--val-fraction", "0", "--workers", "0"]


def test_train_reads_image_root_from_audit_json_and_writes_model_by_default(nette, lite0_file, tmp_path,
                                                                            monkeypatch):
    _audit(nette, tmp_path / "audit", nette.root)
    monkeypatch.chdir(tmp_path)
    # the mission's command line, with a backbone whose weights are here offline
    rc = main(["train", "--clean", "audit/audit.csv", "--backbone", "lite0", "--pretrained", str(lite0_file), *TINY])
    assert rc == 0
    meta = json.loads((tmp_path / "model" / "model.json").read_text())  # -o defaults to ./model
    assert meta["training"]["n_train"] == 30


def test_train_moved_image_folder_message_and_images_override(nette, lite0_file, tmp_path, capsys):
    moved = tmp_path / "was-here"  # the audit was made on images that are no longer there
    _audit(nette, tmp_path / "audit", moved, per_class=2)
    base = ["train", "--clean", str(tmp_path / "audit" / "audit.csv"), "--backbone", "lite0", "--pretrained",
            str(lite0_file), *TINY, "-o", str(tmp_path / "m")]
    assert main(base) == 2
    err = capsys.readouterr().err
    assert "no longer exists" in err and str(moved) in err and "--images" in err
    assert not (tmp_path / "m").exists()
    assert main([*base, "--images", str(nette.root)]) == 0  # --images overrides the recorded root
    assert json.loads((tmp_path / "m" / "model.json").read_text())["training"]["n_train"] == 20
    (tmp_path / "audit" / "audit.json").unlink()
    assert main([*base, "-o", str(tmp_path / "m2")]) == 2
    assert "no audit.json beside it" in capsys.readouterr().err


def test_mission_command_offline_fails_only_for_the_weights(nette, tmp_path, monkeypatch, capsys):
    """`labelsieve train --clean audit/audit.csv --backbone convnext_t` exactly: no usage error; offline, the one
    error is that ConvNeXt-T's weights cannot be downloaded, with what to do."""
    _audit(nette, tmp_path / "audit", nette.root, per_class=2)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc = main(["train", "--clean", "audit/audit.csv", "--backbone", "convnext_t"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Missing option" not in err and "Usage" not in err
    assert "convnext_tiny" in err and "Download the weights" in err and "--pretrained" in err
