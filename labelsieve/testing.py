"""Real data for tests, benchmarks and users measuring a detector: subsets of ../shared/data.

``shared_dir()`` finds the shared folder (``$LABELSIEVE_SHARED`` or ``../shared`` beside the project);
``extract_subset`` unpacks only the images a test needs from a dataset's zip, once, into a cache
folder, and writes a ``path,label`` CSV for them.
"""

from __future__ import annotations

import csv
import os
import zipfile
from pathlib import Path

import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parents[1]

DATASETS = {
    # name: (folder, zip, labels csv, extra label columns csv)
    "cifar10": ("cifar10", "images.zip", "train.csv"),
    "cifar10-test": ("cifar10", "images.zip", "test.csv"),
    "eurosat": ("eurosat", "images.zip", "labels.csv"),
    "imagenette": ("imagenette", "images.zip", "train.csv"),
    "imagenette-val": ("imagenette", "images.zip", "val.csv"),
}

EUROSAT_CLASSNAMES = {
    "AnnualCrop": "annual crop land", "Forest": "forest", "HerbaceousVegetation": "brushland or shrubland",
    "Highway": "highway or road", "Industrial": "industrial buildings", "Pasture": "pasture land",
    "PermanentCrop": "permanent crop land", "Residential": "residential buildings", "River": "river",
    "SeaLake": "lake or sea",
}


def shared_dir() -> Path:
    """The shared data/models folder; raises FileNotFoundError if absent."""
    env = os.environ.get("LABELSIEVE_SHARED")
    cands = [Path(env)] if env else []
    cands += [PROJECT_ROOT.parent / "shared", Path.cwd().parent / "shared"]
    for c in cands:
        if (c / "data").is_dir():
            return c.resolve()
    raise FileNotFoundError("shared data folder not found; set LABELSIEVE_SHARED")


def cache_dir() -> Path:
    d = Path(os.environ.get("LABELSIEVE_TEST_CACHE", PROJECT_ROOT / ".cache" / "data"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def read_csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        return list(csv.DictReader(f))


def extract_subset(
    name: str, n: int | None = None, *, seed: int = 0, per_class: int | None = None, first: bool = False,
    skip_first: int = 0,
) -> tuple[Path, Path]:
    """Unpack a subset of a shared dataset; returns (image root, labels CSV).

    ``first`` takes the first ``n`` rows (CIFAR-10N benchmarks use the first rows); otherwise a
    seeded random subset of ``n`` rows, or ``per_class`` rows of each class. ``skip_first`` draws the
    random subset from the rows after the first ``skip_first`` only (a held-out set that shares no image
    with the ``first`` subsets). Extraction is cached.
    """
    folder, zname, cname = DATASETS[name]
    src = shared_dir() / "data" / folder
    rows = read_csv_rows(src / cname)
    if per_class is not None:
        rng = np.random.default_rng(seed)
        by: dict[str, list[int]] = {}
        for i, r in enumerate(rows):
            by.setdefault(r["label"], []).append(i)
        idx = sorted(int(j) for c in sorted(by) for j in rng.choice(by[c], size=min(per_class, len(by[c])),
                                                                     replace=False))
        tag = f"pc{per_class}-s{seed}"
    elif n is None or n >= len(rows):
        idx, tag = list(range(len(rows))), "all"
    elif first:
        idx, tag = list(range(n)), f"first{n}"
    elif skip_first:
        pool = len(rows) - skip_first
        idx = sorted((skip_first + np.random.default_rng(seed).choice(pool, size=n, replace=False)).tolist())
        tag = f"n{n}-s{seed}-after{skip_first}"
    else:
        idx = sorted(np.random.default_rng(seed).choice(len(rows), size=n, replace=False).tolist())
        tag = f"n{n}-s{seed}"
    root = cache_dir() / folder
    out_csv = cache_dir() / f"{name}-{tag}.csv"
    sub = [rows[i] for i in idx]
    todo = [r["path"] for r in sub if not (root / r["path"]).is_file()]
    if todo:
        with zipfile.ZipFile(src / zname) as z:
            for p in todo:
                target = root / p
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_suffix(target.suffix + ".part")
                tmp.write_bytes(z.read(p))
                tmp.replace(target)
    if not out_csv.is_file():
        tmp = out_csv.with_suffix(".part")
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(sub[0].keys()))
            w.writeheader()
            w.writerows(sub)
        tmp.replace(out_csv)
    return root, out_csv


def cifar10n_labels(kind: str = "aggre_label") -> dict[str, tuple[str, str]]:
    """path -> (clean label, noisy label of CIFAR-10N's ``kind`` column)."""
    rows = read_csv_rows(shared_dir() / "data" / "cifar10" / "cifar10n.csv")
    return {r["path"]: (r["clean_label"], r[kind]) for r in rows}


def mini_clip_dir() -> Path:
    return shared_dir() / "models" / "mini-clip"
