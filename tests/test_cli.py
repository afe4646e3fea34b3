"""`labelsieve audit` end to end through the CLI: files, columns, JSON fields, unreadable rows, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from labelsieve.audit.schema import COLUMNS
from labelsieve.cli import main
from labelsieve.core.defaults import DEFAULT_ENSEMBLE_SUMMARY
from labelsieve.detectors.ensemble import DEFAULT_MEMBERS


@pytest.fixture()
def noisy_copy(tmp_path, imagenette_small):
    """80 Imagenette images (8 per class) in a fresh folder, 10 labels flipped, 1 zero-byte file, 1 duplicate."""
    src_root, src_csv = imagenette_small
    df = pd.read_csv(src_csv).groupby("label").head(8).reset_index(drop=True)
    root = tmp_path / "imgs"
    for p in df["path"]:
        (root / p).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src_root / p, root / p)
    classes = sorted(df["label"].unique())
    rng = np.random.default_rng(0)
    flip = rng.choice(len(df), size=10, replace=False)
    df["true_label"] = df["label"]
    for i in flip:
        df.loc[i, "label"] = classes[(classes.index(df.loc[i, "label"]) + 3) % len(classes)]
    broken = df.loc[[j for j in range(len(df)) if j not in flip][0], "path"]
    (root / broken).write_bytes(b"")
    dup_src = df.loc[1, "path"]
    shutil.copy(root / dup_src, root / "train/dup.jpg")
    df = pd.concat([df, pd.DataFrame([{"path": "train/dup.jpg", "label": df.loc[1, "label"],
                                       "true_label": df.loc[1, "true_label"]}])], ignore_index=True)
    df[["path", "label"]].to_csv(tmp_path / "labels.csv", index=False)
    df.to_csv(tmp_path / "truth.csv", index=False)
    return root, tmp_path / "labels.csv", tmp_path / "truth.csv", broken


def test_audit_cli_end_to_end(noisy_copy, tmp_path, mini_clip_dir, feature_cache, capsys):
    root, labels, truth, broken = noisy_copy
    out = tmp_path / "out"
    rc = main(["audit", str(root), str(labels), "--method", "label_match", "--model", str(mini_clip_dir),
               "-o", str(out), "--cache-dir", str(feature_cache), "--no-progress"])
    assert rc == 0
    table = pd.read_csv(out / "audit.csv", keep_default_na=False)
    assert list(table.columns[: len(COLUMNS)]) == COLUMNS
    assert len(table) == 81 and table["rank"].tolist() == list(range(1, 82))
    assert table.loc[0, "path"] == broken and table.loc[0, "issue"] == "unreadable"
    dup = table[table["path"] == "train/dup.jpg"].iloc[0]
    assert dup["duplicate_of"] and dup["issue"] in ("duplicate", "label", "outlier")
    flagged = table[table["is_noisy"].astype(str) == "True"]
    readable = table[table["issue"] != "unreadable"]
    p = pd.to_numeric(readable["p_clean"])
    assert p.between(0, 1).all()
    # worst first among readable rows: flagged rows come before the rest, each sorted by p_clean
    assert list(readable["is_noisy"].astype(str)) == sorted(readable["is_noisy"].astype(str), reverse=True)
    summary = json.loads((out / "audit.json").read_text())
    for key in ("method", "model", "parameters", "seed", "timings", "noise_rate", "noise_rate_per_class",
                "threshold", "n_flagged", "version", "input", "decision_rule", "versions"):
        assert key in summary, key
    assert summary["n_unreadable"] == 1 and summary["n_flagged"] == len(flagged) - 1
    assert summary["input"]["input_hash"] and summary["model"]["kind"] == "open_clip"
    assert summary["warnings"] == []  # the mini CLIP knows Imagenette's classes: no text-side warning
    assert (out / "audit.html").stat().st_size > 10_000
    capsys.readouterr()
    assert main(["evaluate", str(out / "audit.csv"), "--truth", str(truth), "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["recall"] >= 0.8 and m["auroc"] >= 0.9  # Imagenette is easy for the mini CLIP


def test_cli_errors_are_one_clear_line(tmp_path, capsys, mini_clip_dir):
    (tmp_path / "a").mkdir()
    rc = main(["audit", str(tmp_path / "a"), str(tmp_path / "missing.csv"), "--model", str(mini_clip_dir)])
    err = capsys.readouterr().err
    assert rc == 2 and "Labels file not found" in err and "Traceback" not in err
    rc = main(["audit", str(tmp_path / "a"), "--method", "nope", "--model", str(mini_clip_dir)])
    assert rc == 2


def test_audit_records_and_prints_which_path_ran(noisy_copy, tmp_path, mini_clip_dir, feature_cache, capsys):
    """`--method deft` on the mini CLIP (a CNN tower): the paper's VPT cannot run, the frozen path does; the
    printed summary and audit.json say so, and audit.json holds the resolved recipe."""
    root, labels, _, _ = noisy_copy
    out = tmp_path / "deft"
    # text_budget=1 forces k = 2 (81 rows, 2 steps of 64): at the model's scale it warns, in audit.json and printed
    rc = main(["audit", str(root), str(labels), "--method", "deft", "--epochs", "1", "-p", "text_budget=1",
               "--model", str(mini_clip_dir), "-o", str(out), "--cache-dir", str(feature_cache), "--no-progress",
               "--no-html"])
    assert rc == 0
    printed = " ".join(capsys.readouterr().err.split())  # the summary goes to stderr (rich console)
    assert "path" in printed and "not a ViT" in printed
    summary = json.loads((out / "audit.json").read_text())
    info = summary["detector_info"]
    assert info["path"] == "none" and "TimmModel" in info["path_reason"]
    rows = {r["name"]: r for r in info["recipe"]}
    assert rows["epochs"]["value"] == 1 and rows["epochs"]["origin"] == "user"
    assert rows["lr"]["origin"] == "paper" and rows["peft"]["resolved"] == "none"
    assert info["text_scale"] == 2 and len(summary["warnings"]) == 1
    assert "text_budget" in summary["warnings"][0] and "logit_scale=calibrated" in summary["warnings"][0]
    assert "text_budget trains DEFT in 2-fold fewer steps" in printed
    # with the calibrated scale the same budget is what the grid measured as safe: no warning
    out2 = tmp_path / "deft-calibrated"
    assert main(["audit", str(root), str(labels), "--method", "deft(logit_scale=calibrated, text_budget=1)",
                 "--epochs", "1", "--model", str(mini_clip_dir), "-o", str(out2), "--cache-dir", str(feature_cache),
                 "--no-progress", "--no-html"]) == 0
    summary = json.loads((out2 / "audit.json").read_text())
    assert summary["detector_info"]["text_scale"] == 2 and summary["warnings"] == []


def test_detectors_command_lists_registry(capsys):
    assert main(["detectors"]) == 0
    out = capsys.readouterr().out
    for name in ("deft", "knn", "label_match", "confident_learning"):
        assert name in out


def test_audit_reviewed_keeps_decisions_and_trusts_them(noisy_copy, tmp_path, mini_clip_dir, feature_cache, capsys,
                                                        monkeypatch):
    """`audit --reviewed`: the detector fits on the corrected labels (dropped rows left out, reviewed rows marked
    trusted), and the new audit keeps every decision, reports it and ranks it after the rows still to review."""
    from labelsieve.detectors import registry
    from labelsieve.detectors.knn import KNNDetector

    root, labels, truth, broken = noisy_copy
    common = ["--model", str(mini_clip_dir), "--cache-dir", str(feature_cache), "--no-progress", "--no-html"]
    assert main(["audit", str(root), str(labels), "--method", "knn", "-o", str(tmp_path / "one"), *common]) == 0
    first = pd.read_csv(tmp_path / "one" / "audit.csv", keep_default_na=False)
    true = pd.read_csv(truth).set_index("path")["true_label"]
    top = first[first["issue"] != "unreadable"].head(3)
    a, b, c = top["path"].tolist()
    other = next(x for x in sorted(true.unique()) if x not in (true[b], first.set_index("path").loc[b, "given_label"]))
    first.loc[first["path"] == a, "review"] = "keep"
    first.loc[first["path"] == b, "review"] = f"relabel:{other}"
    first.loc[first["path"] == c, "review"] = "drop"
    first.to_csv(tmp_path / "one" / "audit.csv", index=False)

    seen = {}

    class Recording(KNNDetector):
        def detect(self, ctx):
            seen.update(labels=ctx.labels.copy(), trusted=ctx.trusted_mask().copy(), paths=list(ctx.images.paths))
            return super().detect(ctx)

    monkeypatch.setitem(registry._REGISTRY, "knn", Recording)
    out = tmp_path / "two"
    assert main(["audit", str(root), str(labels), "--method", "knn", "-o", str(out), "--reviewed",
                 str(tmp_path / "one" / "audit.csv"), *common]) == 0
    # what the detector saw: c left out, b with its new label, a and b trusted
    pos = {p: i for i, p in enumerate(seen["paths"])}
    classes = sorted(true.unique())
    assert c not in pos and broken not in pos
    assert seen["labels"][pos[b]] == classes.index(other)
    assert seen["trusted"].sum() == 2 and seen["trusted"][pos[a]] and seen["trusted"][pos[b]]
    # what the new audit says
    second = pd.read_csv(out / "audit.csv", keep_default_na=False).set_index("path")
    assert second.loc[[a, b, c], "review"].tolist() == ["keep", f"relabel:{other}", "drop"]
    assert (second.loc[[a, b, c], "issue"] == "reviewed").all()
    assert second.loc[broken, "rank"] == 1 and sorted(second.loc[[a, b, c], "rank"]) == [79, 80, 81]
    assert pd.to_numeric(second.loc[[a, b, c], "p_clean"]).tolist() == [1.0, 0.0, 0.0]
    summary = json.loads((out / "audit.json").read_text())
    assert summary["reviewed"]["n_decided"] == 3 and summary["reviewed"]["n_relabelled"] == 1
    # and apply reads the carried decisions as the first audit's
    capsys.readouterr()
    assert main(["apply", str(out / "audit.csv"), "-o", str(tmp_path / "clean.csv")]) == 0
    clean = pd.read_csv(tmp_path / "clean.csv").set_index("path")["label"]
    assert clean[a] == second.loc[a, "given_label"] and clean[b] == other and c not in clean.index


def test_detectors_show_prints_the_recipe(capsys):
    """``detectors --show deft``: every parameter with its value, paper or labelsieve, and its source."""
    assert main(["detectors", "--show", "deft"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line and not line.startswith(" ")}
    assert "0.03" in lines["lr"] and " paper " in lines["lr"] and "HotanLee/DeFT" in lines["lr"]
    assert "'eval_pass'" in lines["selection"] and " labelsieve " in lines["selection"] and "'batch'" in lines[
        "selection"]
    assert "'model'" in lines["logit_scale"] and " paper " in lines["logit_scale"]
    assert "dual_loss_gradient" in out and "negative context only" in out
    assert main(["detectors", "--show", "codivide"]) == 0
    out = capsys.readouterr().out
    assert "J. Visual Communication" in out and "issue 10's reading" in out
    assert main(["detectors", "--show", "knn"]) == 0
    assert "k = 10" in capsys.readouterr().out
    assert main(["detectors", "--show", "nope"]) == 2


def _recipe_lines(out: str) -> dict[str, str]:
    return {line.split()[0]: line for line in out.splitlines() if line and not line.startswith(" ")}


def test_detectors_show_prints_the_paper_values_of_turn_and_codivide(capsys):
    """Issue 21: TURN's Table 8 probe and its 20 + 4 epochs, co-divide's DivideMix lambda_u and its fine-tuned
    encoders, each with `paper` beside it."""
    assert main(["detectors", "--show", "turn"]) == 0
    lines = _recipe_lines(capsys.readouterr().out)
    for name, value in {"lp_lr": "0.001", "lp_weight_decay": "1e-06", "lp_batch_size": "128", "lp_epochs": "20",
                        "fft_epochs": "4", "optimizer": "'adamw'", "lr": "1e-05", "weight_decay": "1e-05",
                        "batch_size": "128", "augment": "'auto'"}.items():
        assert lines[name].split()[1:3] == [value, "paper"], lines[name]
    assert main(["detectors", "--show", "codivide"]) == 0
    lines = _recipe_lines(capsys.readouterr().out)
    for name, value in {"lambda_u": "25.0", "lambda_u_rampup": "16", "finetune_encoders": "True", "lr": "0.02",
                        "epochs": "60", "batch_size": "64"}.items():
        assert lines[name].split()[1:3] == [value, "paper"], lines[name]
    assert lines["batch_mode"].split()[1:3] == ["'dividemix'", "labelsieve"]


def test_ensemble_members_and_their_parameters_on_the_command_line(capsys, tmp_path, mini_clip_dir):
    """`detectors --show ensemble` prints the members and their non-paper settings; the help of --method names the
    default's members; `--method turn,knn --no-finetune` is refused with the method string that means it."""
    assert main(["detectors", "--show", "ensemble"]) == 0
    out = capsys.readouterr().out
    assert 'members: --method "codivide(' in out and "finetune = false  (user; paper: true)" in out
    assert main(["detectors", "--show", "turn(finetune=false),knn"]) == 0
    assert 'members: --method "turn(finetune=false),knn"' in capsys.readouterr().out
    assert main(["audit", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split()).replace("- ", "-")  # click breaks lines at hyphens
    assert DEFAULT_ENSEMBLE_SUMMARY in help_text
    # the summary names the default members, in order
    names = [m if isinstance(m, str) else m[0] for m in DEFAULT_MEMBERS]
    assert [w for w in DEFAULT_ENSEMBLE_SUMMARY.replace(",", " ").split() if w in names] == names
    assert "NAME(KEY=VALUE, ...)" in help_text
    demo = Path(__file__).resolve().parents[1] / "labelsieve" / "demo" / "data"
    rc = main(["audit", str(demo), str(demo / "labels.csv"), "--method", "turn,knn", "--no-finetune", "--model",
               str(mini_clip_dir), "-o", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "has no parameter 'finetune'" in err and '--method "turn(finetune=false),knn"' in err
