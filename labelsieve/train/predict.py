"""Label new images with an exported classifier (``labelsieve predict``).

:func:`predict` loads the model (:func:`labelsieve.train.export.load_classifier`) and runs it over a
folder (every image file, recursively) or a CSV of paths, with exactly the preprocessing used for
validation during training (shorter side to ``resize_size``, bicubic, centre crop ``image_size``,
normalise), and writes ``predictions.csv``. Paths follow the one rule of
:func:`labelsieve.core.paths.check_image_paths` (nothing outside the image folder is read, whether named by
``..``, an absolute path or a symbolic link); files in a folder that are not images are reported.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from labelsieve.core.defaults import default_num_workers
from labelsieve.core.engine import Trainer, make_loader
from labelsieve.core.errors import DataError, check_param
from labelsieve.core.io import (
    atomic_open,
    is_spreadsheet_error,
    line_end,
    neutralise_frame,
    restore_cell,
    sniff_delimiter,
)
from labelsieve.core.paths import check_image_paths, check_output_dir, listed
from labelsieve.core.progress import console, escape, warn
from labelsieve.data import IMAGE_EXTENSIONS, UnreadableImage
from labelsieve.data.containers import container_samples, find_containers
from labelsieve.data.imagecache import decode_resized
from labelsieve.data.transforms import eval_transform
from labelsieve.train.export import load_classifier

__all__ = ["predict"]



class _PredictDataset(torch.utils.data.Dataset):
    """``(x, label, index, ok)`` of image files, decoded like the validation images in training."""

    def __init__(self, files: Sequence[Path], labels: np.ndarray, *, resize_size: int, transform: Any) -> None:
        self.files, self.labels = list(files), labels
        self.resize_size, self.transform = resize_size, transform
        self.index = np.arange(len(self.files), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int, bool]:
        try:
            arr = decode_resized(self.files[i], self.resize_size, mode="crop")
            ok = True
        except UnreadableImage:
            arr, ok = np.zeros((self.resize_size, self.resize_size, 3), dtype=np.uint8), False
        x = self.transform(torch.from_numpy(arr).permute(2, 0, 1))
        return x, int(self.labels[i]), i, ok


def _list_folder(root: Path) -> tuple[list[str], list[str]]:
    """Image files under ``root`` (recursively, hidden ones left out), and the other files found there."""
    out, other = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if f.startswith("."):
                continue
            rel = os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/")
            (out if f.lower().endswith(IMAGE_EXTENSIONS) else other).append(rel)
    return out, other


def _read_paths_csv(csv_path: Path, path_column: str, label_column: str) -> tuple[list[str], list[str] | None,
                                                                                  list[int]]:
    if not csv_path.is_file():
        raise DataError(f"Image list not found: {csv_path}. Give a CSV with a '{path_column}' column.")
    text = csv_path.read_text(encoding="utf-8-sig")
    if not text.strip():
        raise DataError(f"{csv_path}: the CSV is empty. It needs a header row with a '{path_column}' column.")
    reader = csv.reader(io.StringIO(text), delimiter=sniff_delimiter(text[:8192]))
    header = [h.strip() for h in next(reader)]
    if path_column not in header:
        raise DataError(f"{csv_path}: no column {path_column!r} in the header {header}. Name the path column with "
                        "--path-column.")
    ip = header.index(path_column)
    il = header.index(label_column) if label_column in header else None
    paths: list[str] = []
    labels: list[str] = []
    lines: list[int] = []
    errors: list[str] = []
    for line_no, row in enumerate(reader, start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) <= ip or not row[ip].strip():
            raise DataError(f"{csv_path}, line {line_no}: the '{path_column}' field is empty. Give the image path "
                            "or delete the row.")
        paths.append(restore_cell(row[ip]))  # paths and labels are data: byte for byte, nothing trimmed
        labels.append(restore_cell(row[il]) if il is not None and len(row) > il and row[il].strip() else "")
        lines.append(line_no)
        errors.extend(f"line {line_no}: {v!r}" for v in (paths[-1], labels[-1]) if is_spreadsheet_error(v))
    if errors:
        raise DataError(f"{csv_path}: {len(errors)} cell(s) hold a spreadsheet error instead of a path or label "
                        f"({listed(errors)}). Restore the original values.")
    if not paths:
        raise DataError(f"{csv_path}: the CSV has a header but no rows. Add one row per image.")
    return paths, (labels if il is not None else None), lines


def predict(
    model_dir: str | os.PathLike[str],
    images_root: str | os.PathLike[str],
    *,
    labels_csv: str | os.PathLike[str] | None = None,
    out_dir: str | os.PathLike[str],
    batch_size: int = 64,
    device: str | torch.device | None = None,
    progress: bool = True,
    num_workers: int | None = None,
    path_column: str = "path",
    label_column: str = "label",
    image_column: str = "image",
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Predict the class of every image and write ``out_dir/predictions.csv``.

    Parameters
    ----------
    model_dir : path
        Exported classifier (see :func:`load_classifier`).
    images_root : path
        A folder: without ``labels_csv`` every image file under it (recursively) is predicted; with
        it, the CSV's paths are relative to this folder. A CSV file here is read as ``labels_csv``
        with paths relative to the CSV's folder. Or containers (WebDataset shards, Parquet files, a Hugging Face
        ``save_to_disk`` folder: :func:`labelsieve.data.containers.find_containers`): every sample, or those the
        CSV names (``shard.tar/KEY.jpg``, ``file.parquet#row``, or a WebDataset KEY); their labels, when every
        sample has one, are scored like a CSV's.
    labels_csv : path, optional
        CSV with a ``path_column`` (and optionally a ``label_column``, copied to the output as
        ``label`` with a ``correct`` column).
    out_dir : path
        Created if needed; ``predictions.csv`` is replaced atomically.
    batch_size : int
    device : str or torch.device, optional
        ``None``: CUDA if available.
    progress : bool
    num_workers : int, optional
        Decoding workers (default ``min(8, cpu_count - 1)``).
    path_column, label_column : str
        Column names in ``labels_csv`` (``label_column`` is also a Parquet file's label column).
    image_column : str
        A Parquet file's image column.
    cache_dir : path, optional
        Where container indexes are memoised.

    Returns
    -------
    Path
        ``out_dir/predictions.csv`` with columns ``path``, ``predicted_label``, ``probability``
        (softmax of the predicted class), ``error`` (why an image could not be read; its prediction
        and probability are empty), plus ``label`` and ``correct`` when the CSV has labels. Rows
        are in input order.

    Raises
    ------
    DataError
        Missing folder/CSV, missing image files, paths that lead outside the image folder, or no images
        found.
    ModelError
        If the model cannot be loaded.
    OutputError
        Before any work, when ``out_dir`` cannot be written.
    """
    check_param("predict", "batch_size", batch_size, isinstance(batch_size, int) and batch_size >= 1, "an int >= 1")
    check_output_dir(out_dir, what="the predictions folder (-o)")
    root = Path(images_root).expanduser()
    csv_path = Path(labels_csv).expanduser() if labels_csv is not None else None
    if csv_path is None and root.is_file() and root.suffix.lower() in (".csv", ".tsv", ".txt"):
        csv_path, root = root, root.parent
    found = find_containers(images_root)
    given: list[str] | None = None
    skipped: list[str] = []
    files: list[Any] = []
    if found is not None:  # WebDataset shards, Parquet/Arrow files: samples named as an audit names them
        listed_rows = _read_paths_csv(csv_path, path_column, label_column) if csv_path is not None else None
        rows = None
        if listed_rows is not None:
            rows = (listed_rows[0], listed_rows[1] or [""] * len(listed_rows[0]), listed_rows[2])
        s = container_samples(found, rows, csv_name=str(csv_path or ""), image_column=image_column,
                              label_column=label_column if rows is None and found.kind != "webdataset" else None,
                              labels_needed=False, cache_dir=cache_dir, progress=progress)
        paths = s.paths
        files = [s.members.locate(i, p) for i, p in enumerate(paths)]
        given = (listed_rows[1] if listed_rows is not None else s.labels if all(s.labels) else None)
    elif not root.is_dir():
        raise DataError(f"Image folder not found: {root}. Give the folder of the images to predict.")
    elif csv_path is None:
        root = root.resolve()
        paths, skipped = _list_folder(root)
        if not paths:
            raise DataError(f"{root}: no image files found ({', '.join(IMAGE_EXTENSIONS)}). Give the folder of "
                            "the images to predict.")
        check_image_paths(root, paths, where=f"the image folder {root}")
        if skipped:
            warn(f"{root}: skipping {len(skipped)} file(s) that are not images ({listed(skipped)}); images end in "
                 f"{', '.join(IMAGE_EXTENSIONS)}")
    else:
        root = root.resolve()
        paths, given, lines = _read_paths_csv(csv_path, path_column, label_column)
        check_image_paths(root, paths, lines=lines, where=str(csv_path))
    model, meta = load_classifier(model_dir, device=device)
    pre = meta["preprocessing"]
    classes = list(meta["classes"])
    size = int(pre["image_size"])
    resize = int(pre.get("resize_size", size))
    tf = eval_transform(size, mean=pre["mean"], std=pre["std"], interpolation=pre.get("interpolation", "bicubic"))
    if found is None:
        files = [root / p for p in paths]
    ds = _PredictDataset(files, np.full(len(files), -1, dtype=np.int64), resize_size=resize, transform=tf)
    workers = num_workers if num_workers is not None else default_num_workers(reserve=1)
    loader = make_loader(ds, batch_size=batch_size, num_workers=workers)
    trainer = Trainer(model, device=device, progress=progress, desc="classifier")
    logits, ok = trainer.predict(loader)
    probs = torch.softmax(torch.from_numpy(logits), dim=1).numpy() if len(logits) else logits
    pred = probs.argmax(1) if len(probs) else np.zeros(0, dtype=np.int64)
    errors = [""] * len(files)
    for i in np.nonzero(~ok)[0]:
        try:
            decode_resized(files[i], resize, mode="crop")
            errors[i] = "could not be decoded"
        except UnreadableImage as exc:
            errors[i] = str(exc)
    table = pd.DataFrame({
        "path": paths,
        "predicted_label": [classes[int(p)] if k else "" for p, k in zip(pred, ok, strict=True)],
        "probability": [round(float(probs[i, pred[i]]), 6) if ok[i] else None for i in range(len(paths))],
        "error": errors,
    })
    if given is not None:
        table["label"] = given
        table["correct"] = [("" if not k else str(g == p)) for g, p, k in
                            zip(given, table["predicted_label"], ok, strict=True)]
    target = Path(out_dir).expanduser() / "predictions.csv"
    with atomic_open(target) as f:
        neutralise_frame(table).to_csv(f, index=False, lineterminator=line_end(table))
    if progress:
        n_bad = int((~ok).sum())
        console.print(escape(f"wrote {target} ({len(paths)} images" + (f", {n_bad} unreadable" if n_bad else "")
                             + (f", {len(skipped)} non-image file(s) skipped" if skipped else "") + ")"))
    return target
