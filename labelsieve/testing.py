"""Real data for tests, benchmarks and users measuring a detector: subsets of ../shared/data.

``shared_dir()`` finds the shared folder (``$LABELSIEVE_SHARED`` or ``../shared`` beside the project);
``extract_subset`` unpacks only the images a test needs from a dataset's zip, once, into a cache
folder, and writes a ``path,label`` CSV for them.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

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


def write_shards(root: Path, labels_csv: Path, out: Path, *, shards: int, label: str = "cls",
                 name: str = "shard-{:06d}.tar", order: list[int] | None = None) -> list[Path]:
    """Pack the images of ``labels_csv`` (``path,label`` under ``root``) into ``shards`` WebDataset shards in
    ``out``, in the CSV's order (or ``order``), split into contiguous runs; each sample is ``KEY.<image ext>`` and
    its label in ``KEY.<label>`` (``cls``, ``txt`` or ``json``; ``none`` writes no label member). KEY is the image's
    path with ``/`` and ``.`` replaced by ``_``. Returns the shard paths."""
    rows = read_csv_rows(labels_csv)
    if order is not None:
        rows = [rows[i] for i in order]
    out.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, len(rows), shards + 1).astype(int)
    written = []
    for k in range(shards):
        path = out / name.format(k)
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
            for r in rows[bounds[k]: bounds[k + 1]]:
                stem, ext = os.path.splitext(r["path"])
                key = stem.replace("/", "_").replace(".", "_")
                members = [(f"{key}{ext.lower()}", (root / r["path"]).read_bytes())]
                if label == "json":
                    members.append((f"{key}.json", json.dumps({"label": r["label"], "source": r["path"]}).encode()))
                elif label != "none":
                    members.append((f"{key}.{label}", r["label"].encode()))
                for member, data in members:
                    info = tarfile.TarInfo(member)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        written.append(path)
    return written


def write_parquet(root: Path, labels_csv: Path, out: Path, *, files: int, class_label: bool = True,
                  row_group_size: int = 100, name: str = "train-{:05d}-of-{:05d}.parquet") -> list[Path]:
    """Write the images of ``labels_csv`` as ``files`` Parquet files in ``out`` the way the Hugging Face hub does:
    an ``image`` struct column ``{bytes, path}`` and a ``label`` column, ``ClassLabel`` numbers with the class names
    in the ``huggingface`` schema metadata (``class_label=False``: the labels as text). Rows in the CSV's order,
    split into contiguous runs; ``row_group_size`` rows per row group. Returns the file paths."""
    rows = read_csv_rows(labels_csv)
    classes = sorted({r["label"] for r in rows})
    index = {c: i for i, c in enumerate(classes)}
    features = {"image": {"_type": "Image"},
                "label": ({"names": classes, "_type": "ClassLabel"} if class_label
                          else {"dtype": "string", "_type": "Value"})}
    meta = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([("image", image_type), ("label", pa.int64() if class_label else pa.string())], metadata=meta)
    out.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, len(rows), files + 1).astype(int)
    written = []
    for k in range(files):
        part = rows[bounds[k]: bounds[k + 1]]
        images = [{"bytes": (root / r["path"]).read_bytes(), "path": r["path"]} for r in part]
        labels = [index[r["label"]] if class_label else r["label"] for r in part]
        table = pa.table({"image": pa.array(images, type=image_type), "label": labels}, schema=schema)
        path = out / name.format(k, files)
        pq.write_table(table, path, row_group_size=row_group_size)
        written.append(path)
    return written


def write_hf_saved(root: Path, labels_csv: Path, out: Path, *, files: int = 1) -> Path:
    """A folder as ``datasets.Dataset.save_to_disk`` writes it (Arrow IPC stream files ``data-*.arrow``,
    ``state.json``, ``dataset_info.json`` with a ``ClassLabel``), made with pyarrow alone. Returns ``out``."""
    rows = read_csv_rows(labels_csv)
    classes = sorted({r["label"] for r in rows})
    index = {c: i for i, c in enumerate(classes)}
    features = {"image": {"_type": "Image"}, "label": {"names": classes, "_type": "ClassLabel"}}
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([("image", image_type), ("label", pa.int64())],
                       metadata={b"huggingface": json.dumps({"info": {"features": features}}).encode()})
    out.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, len(rows), files + 1).astype(int)
    names = []
    for k in range(files):
        part = rows[bounds[k]: bounds[k + 1]]
        name = f"data-{k:05d}-of-{files:05d}.arrow"
        batch = pa.record_batch([pa.array([{"bytes": (root / r["path"]).read_bytes(), "path": None} for r in part],
                                          type=image_type), pa.array([index[r["label"]] for r in part], pa.int64())],
                                schema=schema)
        with pa.OSFile(str(out / name), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            for i in range(0, batch.num_rows, 100):
                writer.write_batch(batch.slice(i, 100))
        names.append(name)
    (out / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names],
                                                "_fingerprint": "0", "_split": "train"}))
    (out / "dataset_info.json").write_text(json.dumps({"features": features}))
    return out
