"""Rebuild the demo dataset bundled in labelsieve/demo/data from ../shared/data/eurosat (MIT licence).

30 images per class (300), seed 0; 15 % of the labels are flipped to another class uniformly
(symmetric noise). `labels.csv` is what the demo audits; `truth.csv` adds the original label.
"""

from __future__ import annotations

import csv
import shutil
import zipfile
from pathlib import Path

import numpy as np

from labelsieve.testing import read_csv_rows, shared_dir

PER_CLASS, RATE, SEED = 30, 0.15, 0
OUT = Path(__file__).resolve().parents[1] / "labelsieve" / "demo"


def main() -> None:
    src = shared_dir() / "data" / "eurosat"
    rows = read_csv_rows(src / "labels.csv")
    rng = np.random.default_rng(SEED)
    classes = sorted({r["label"] for r in rows})
    chosen = []
    for c in classes:
        idx = [i for i, r in enumerate(rows) if r["label"] == c]
        chosen += sorted(rng.choice(idx, size=PER_CLASS, replace=False).tolist())
    chosen.sort()
    n_flip = round(RATE * len(chosen))
    flip = set(rng.choice(len(chosen), size=n_flip, replace=False).tolist())
    img_dir = OUT / "data" / "images"
    shutil.rmtree(img_dir, ignore_errors=True)
    img_dir.mkdir(parents=True)
    out_rows = []
    with zipfile.ZipFile(src / "images.zip") as z:
        for k, i in enumerate(chosen):
            r = rows[i]
            (img_dir / r["path"]).write_bytes(z.read(r["path"]))
            given = r["label"]
            if k in flip:
                given = rng.choice([c for c in classes if c != r["label"]])
            out_rows.append({"path": f"images/{r['path']}", "label": given, "true_label": r["label"]})
    with open(OUT / "data" / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows([[r["path"], r["label"]] for r in out_rows])
    with open(OUT / "data" / "truth.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "label", "true_label"])
        w.writeheader()
        w.writerows(out_rows)
    with open(OUT / "data" / "classnames.csv", "w", newline="") as f:
        from labelsieve.testing import EUROSAT_CLASSNAMES

        w = csv.writer(f)
        w.writerows(sorted(EUROSAT_CLASSNAMES.items()))
    print(f"{len(out_rows)} images, {n_flip} wrong labels -> {OUT / 'data'}")


if __name__ == "__main__":
    main()
