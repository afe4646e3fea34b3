"""Adaptation phase: does training on the images an audit kept beat training on all noisy labels?

CIFAR-10N "worst" labels (41 % human noise) on the first 10,000 CIFAR-10 train images. Four runs of
``labelsieve train`` with EfficientNet-Lite0 (ImageNet weights from ../shared/models), same settings:

* ``all noisy``: every image with its noisy label;
* ``kept by <method>``: the rows a ``labelsieve audit`` with the mini CLIP kept (flagged rows dropped,
  as ``labelsieve train --clean`` does when nobody reviewed them), for the default method and for
  the best cheap detector of the detection benchmark;
* ``true labels``: every image with its clean label (the ceiling).

Each model is exported, read back by ``labelsieve predict`` and scored on the first 2,000 CIFAR-10
test images. Rows are appended to ``OUT/train_kept.jsonl`` (a rerun skips finished rows) and
rendered to ``OUT/train_kept.md``.

    python benchmarks/train_kept.py --out benchmarks/results          # about 30 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import csv
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd  # noqa: E402
from common import append_jsonl, default_threads, host_info, prepare_run, read_jsonl  # noqa: E402

import labelsieve  # noqa: E402
from labelsieve import testing  # noqa: E402
from labelsieve.data import load_images  # noqa: E402
from labelsieve.train import predict, train_from_audit, train_on_labels  # noqa: E402

RUNS = ["all noisy", "kept by deft", "kept by turn", "true labels"]


def _write_labels(path: Path, paths: list[str], labels: list[str]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows(zip(paths, labels, strict=True))
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--work", default=".cache/bench-train")
    ap.add_argument("--feature-cache", default=".cache/bench-features/mini-clip/cifar10n")
    ap.add_argument("--runs", default=",".join(RUNS))
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--n-test", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=default_threads())
    args = ap.parse_args(argv)
    out, work, jsonl, done = prepare_run(args.out, args.work, args.threads, "train_kept.jsonl")
    shared = testing.shared_dir() / "models"
    lite0 = str(shared / "tf_efficientnet_lite0.safetensors")
    host = host_info(args.threads)

    root, csv_path = testing.extract_subset("cifar10", 10_000, first=True)
    images = load_images(root, csv_path)
    n10 = testing.cifar10n_labels("worse_label")
    true_labels = [n10[p][0] for p in images.paths]
    noisy_labels = [n10[p][1] for p in images.paths]
    noisy_csv = _write_labels(work / "noisy.csv", images.paths, noisy_labels)
    test_root, test_csv = testing.extract_subset("cifar10-test", args.n_test, first=True)
    truth = pd.read_csv(test_csv).set_index("path")["label"]
    common = {"backbone": "tf_efficientnet_lite0", "pretrained": lite0, "epochs": args.epochs,
              "image_size": args.image_size, "crop_scale": (0.35, 1.0), "seed": 0, "progress": False,
              "val_fraction": 0.1}

    for run in args.runs.split(","):
        if run in done:
            continue
        model_dir = work / run.replace(" ", "-")
        t = time.perf_counter()
        extra: dict = {}
        if run.startswith("kept by "):
            method = run.removeprefix("kept by ")
            params = {"finetune": False} if method == "turn" else {}
            a = labelsieve.audit(root, noisy_csv, method=method, params=params, model=str(shared / "mini-clip"),
                                 pretrained=None, out_dir=work / f"audit-{method}",
                                 cache_dir=args.feature_cache, progress=False, quiet=True)
            flagged = a.table["is_noisy"].to_numpy(bool)
            given = a.table["given_label"].to_numpy()
            true_of = dict(zip(images.paths, true_labels, strict=True))
            wrong = given != a.table["path"].map(true_of).to_numpy()
            kept_wrong = wrong[~flagged]
            extra = {"audit_seconds": time.perf_counter() - t, "n_flagged": int(flagged.sum()),
                     "noise_in_kept": float(kept_wrong.mean()), "noise_in_all": float(wrong.mean())}
            rep = train_from_audit(work / f"audit-{method}" / "audit.csv", images_root=root, out_dir=model_dir,
                                   drop_unreviewed_flagged=True, **common)
        else:
            labels = true_labels if run == "true labels" else noisy_labels
            sub = load_images(root, _write_labels(work / f"{run.replace(' ', '-')}.csv", images.paths, labels))
            rep = train_on_labels(sub, out_dir=model_dir, **common)
        pred = pd.read_csv(predict(model_dir, test_root, labels_csv=test_csv, out_dir=model_dir / "test",
                                   progress=False))
        acc = float((pred["predicted_label"].to_numpy() == pred["path"].map(truth).to_numpy()).mean())
        rec = {"run": run, "n_train": rep.n_train, "n_val": rep.n_val, "epochs": rep.epochs,
               "best_val_acc_noisy_val": rep.best_val_acc, "test_acc": acc, "train_seconds": rep.seconds,
               "images_per_s": rep.images_per_s, "total_seconds": time.perf_counter() - t,
               "config": {k: v for k, v in rep.config.items() if isinstance(v, (int, float, str, bool, type(None)))},
               "host": host, **extra}
        append_jsonl(jsonl, rec)
        print(f"{run:14s} n_train {rep.n_train:5d} test acc {acc:.4f} ({rec['total_seconds']:.0f} s)", flush=True)
    render(jsonl, out / "train_kept.md")
    return 0


def render(jsonl: Path, md: Path) -> None:
    rows = {r["run"]: r for r in read_jsonl(jsonl)}
    lines = ["| training labels | images trained on | noise in them | test accuracy | train s | img/s |",
             "|---|---|---|---|---|---|"]
    for run in RUNS:
        if run not in rows:
            continue
        r = rows[run]
        all_noise = next((x["noise_in_all"] for x in rows.values() if "noise_in_all" in x), None)
        noise = {"true labels": 0.0, "all noisy": all_noise}.get(run, r.get("noise_in_kept"))
        noise = "–" if noise is None else f"{noise:.1%}"
        lines.append(f"| {run} | {r['n_train']} | {noise} | {r['test_acc']:.4f} | {r['train_seconds']:.0f} | "
                     f"{r['images_per_s']:.0f} |")
    if rows:
        first = next(iter(rows.values()))
        lines += ["", f"Host: {first['host']}; settings: {first['config']}"]
    md.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
