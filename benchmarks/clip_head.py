"""Phase 2 with a CLIP backbone: the DEFT authors' head against labelsieve's zero-shot head.

``labelsieve train --backbone clip`` fine-tunes the audit model's image tower with a linear head:

* ``linear`` (default, the authors' ``main_phase2.py``): a fresh head on the pre-projection features,
  only the tower's blocks and the head trained;
* ``zero_shot`` (option): a head on the projected embedding initialised from the class names' text
  embeddings, the whole tower trained.

Both train with the same settings (the CLIP row of DEFT's phase-2 defaults: SGD lr 5e-4, momentum 0.9,
wd 5e-4, batch 64, cosine) on clean labels of an Imagenette or CIFAR-10 subset, with the mini CLIP, at
``--image-size`` (its tower is a CNN: any size works), and are scored on held-out images (Imagenette
val, CIFAR-10 test). Rows go to ``OUT/clip_head.jsonl`` (a rerun skips finished runs) and
``OUT/clip_head.md``.

    python benchmarks/clip_head.py --out benchmarks/results      # about 40 minutes on 2 idle CPU cores
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import append_jsonl, default_threads, host_info, prepare_run, read_jsonl  # noqa: E402

from labelsieve import testing  # noqa: E402
from labelsieve.data import load_images  # noqa: E402
from labelsieve.train import train_on_labels  # noqa: E402

DATASETS = {"imagenette": ("imagenette", "imagenette-val"), "cifar10": ("cifar10", "cifar10-test")}
HEADS = ("linear", "zero_shot")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--work", default=".cache/bench-clip-head")
    ap.add_argument("--datasets", default=",".join(DATASETS))
    ap.add_argument("--heads", default=",".join(HEADS))
    ap.add_argument("--per-class", type=int, default=100, help="training images per class")
    ap.add_argument("--test-per-class", type=int, default=50)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=default_threads())
    args = ap.parse_args(argv)
    out, work, jsonl, done = prepare_run(args.out, args.work, args.threads, "clip_head.jsonl")
    model = str(testing.shared_dir() / "models" / "mini-clip")
    for dname in args.datasets.split(","):
        train_name, test_name = DATASETS[dname]
        images = load_images(*testing.extract_subset(train_name, per_class=args.per_class, seed=0))
        test = load_images(*testing.extract_subset(test_name, per_class=args.test_per_class, seed=0),
                           classes=images.classes)
        for head in args.heads.split(","):
            run = f"{dname} {head} {args.per_class}/class {args.epochs} ep {args.image_size}px"
            if run in done:
                continue
            t = time.perf_counter()
            rep = train_on_labels(images, backbone=model, out_dir=None, epochs=args.epochs, image_size=args.image_size,
                                  val_fraction=0.0, test_images=test, clip_head=head, seed=0, cache_dir=work,
                                  progress=False, num_workers=0)
            rec = {"run": run, "dataset": dname, "head": head, "n_train": rep.n_train, "n_test": len(test),
                   "epochs": args.epochs, "image_size": args.image_size, "test_acc": rep.test_acc,
                   "trainable": rep.config.get("trainable"), "seconds": time.perf_counter() - t,
                   "images_per_s": rep.images_per_s, "host": host_info(args.threads)}
            append_jsonl(jsonl, rec)
            print(f"{run}: test acc {rep.test_acc:.4f} ({rec['seconds']:.0f} s)", flush=True)
    rows = read_jsonl(jsonl)
    lines = ["| dataset | head | trained | images | epochs | px | test images | test accuracy | seconds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dataset']} | {r['head']} | {r['trainable']} | {r['n_train']} | {r['epochs']} | "
                     f"{r['image_size']} | {r['n_test']} | {r['test_acc']:.4f} | {r['seconds']:.0f} |")
    hosts = {str(r["host"]) for r in rows}
    (out / "clip_head.md").write_text("\n".join(lines) + "\n\nHost: " + "; ".join(sorted(hosts)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
