"""TURN's efficiency claim, measured: TURN against plain full fine-tuning with CE for the same epochs.

Both fine-tune the same image tower (the mini CLIP's EfficientNet-Lite0 tower) at the same image size
on the 2,500 Imagenette train images with 40 % symmetric noise (seed 0):

* ``turn``: the detector with fine-tuning (GCE linear probe, then per epoch an evaluation pass over
  all images, a per-class GMM split, a class-balanced subsample, one epoch of fine-tuning on it);
* ``plain CE``: ``labelsieve train --backbone clip`` on all images with their noisy labels, no
  validation split, same epochs, same image size.

Wall time of each and, for TURN, its detection quality; for both, accuracy on the 1,000 Imagenette
val images. Rows go to ``OUT/turn_efficiency.jsonl`` (a rerun skips finished rows) and
``OUT/turn_efficiency.md``.

    python benchmarks/turn_efficiency.py --out benchmarks/results      # about 25 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from common import append_jsonl, default_threads, host_info, prepare_run, read_jsonl  # noqa: E402

from labelsieve import testing  # noqa: E402
from labelsieve.audit.evaluate import detection_metrics  # noqa: E402
from labelsieve.core.runtime import peak_memory_mb, seed_everything  # noqa: E402
from labelsieve.data import load_images  # noqa: E402
from labelsieve.data.noise import make_noisy_labels  # noqa: E402
from labelsieve.detectors import create_detector  # noqa: E402
from labelsieve.detectors.common.base import DetectionContext  # noqa: E402
from labelsieve.features import extract_features  # noqa: E402
from labelsieve.models.encoders import create_encoder  # noqa: E402
from labelsieve.train import train_on_labels  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--work", default=".cache/bench-turn")
    ap.add_argument("--feature-cache", default=".cache/bench-features/mini-clip/imagenette")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=default_threads())
    args = ap.parse_args(argv)
    out, work, jsonl, done = prepare_run(args.out, args.work, args.threads, "turn_efficiency.jsonl")
    host = host_info(args.threads)
    mini = str(testing.shared_dir() / "models" / "mini-clip")
    root, csv_path = testing.extract_subset("imagenette")
    images = load_images(root, csv_path)
    true = images.labels.copy()
    images.labels = make_noisy_labels(images, kind="symmetric", rate=0.4, seed=0)
    vroot, vcsv = testing.extract_subset("imagenette-val")
    val = load_images(vroot, vcsv, classes=images.classes)

    if "turn" not in done:
        enc = create_encoder(mini)
        feats = extract_features(images, enc, cache_dir=args.feature_cache, progress=False)
        x = np.asarray(feats.vectors, dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        ctx = DetectionContext(labels=images.labels, classnames=images.classnames, images=images, encoder=enc,
                               features_fn=lambda: x, device=enc.device, seed=0, cache_dir=work / "turn",
                               progress=False)
        seed_everything(0)
        t = time.perf_counter()
        det = create_detector("turn", fft_epochs=args.epochs, image_size=args.image_size)
        res = det.detect(ctx)
        secs = time.perf_counter() - t
        m = detection_metrics(images.labels != true, res.p_clean, res.is_noisy)
        hist = res.info.get("history", [])
        rec = {"run": "turn", "seconds": secs, "epochs": args.epochs, "image_size": args.image_size,
               "images_per_epoch": [h.get("n") for h in hist], "f1": m["f1"], "auroc": m["auroc"],
               "train_acc_of_suggestion_on_true": float((res.suggested == true).mean()),
               "info_seconds": {k: v for k, v in res.info.items() if k.endswith("seconds")},
               "peak_rss_mb": peak_memory_mb(), "host": host}
        append_jsonl(jsonl, rec)
        print(f"turn: {secs:.0f} s, F1 {m['f1']:.3f}, AUROC {m['auroc']:.3f}", flush=True)
    if "plain CE" not in done:
        t = time.perf_counter()
        rep = train_on_labels(images, backbone="clip", clip_model=mini, epochs=args.epochs,
                              image_size=args.image_size, val_fraction=0.0, test_images=val, progress=False,
                              cache_dir=work / "ce", seed=0)
        secs = time.perf_counter() - t
        rec = {"run": "plain CE", "seconds": secs, "epochs": args.epochs, "image_size": args.image_size,
               "images_per_epoch": [h.get("n") for h in rep.history], "val_acc": rep.test_acc,
               "images_per_s": rep.images_per_s, "peak_rss_mb": peak_memory_mb(), "host": host}
        append_jsonl(jsonl, rec)
        print(f"plain CE: {secs:.0f} s, val acc {rep.test_acc:.3f}", flush=True)
    rows = {r["run"]: r for r in read_jsonl(jsonl)}
    lines = ["| run | wall s | images trained per epoch | result |", "|---|---|---|---|"]
    if "turn" in rows:
        r = rows["turn"]
        lines.append(f"| TURN ({r['epochs']} fine-tuning epochs, {r['image_size']} px) | {r['seconds']:.0f} | "
                     f"{r['images_per_epoch']} | detection F1 {r['f1']:.3f}, AUROC {r['auroc']:.3f} |")
    if "plain CE" in rows:
        r = rows["plain CE"]
        lines.append(f"| plain CE fine-tuning ({r['epochs']} epochs, {r['image_size']} px) | {r['seconds']:.0f} | "
                     f"{r['images_per_epoch']} | val accuracy {r['val_acc']:.3f} |")
    if rows:
        lines += ["", f"Host: {next(iter(rows.values()))['host']}"]
    (out / "turn_efficiency.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
