"""Reading a labelled image collection: an ImageFolder tree or a root plus a labels CSV, or images stored in
WebDataset shards, Parquet files or a Hugging Face datasets folder (:mod:`labelsieve.data.containers`).

Everything a user can get wrong is checked up front by :func:`load_images`, which raises one
:class:`~labelsieve.core.errors.DataError` naming the file or row and saying what to do. Images that
exist but cannot be decoded are *not* errors: they are found while features are extracted and
reported in the audit as ``issue=unreadable``.
"""

from __future__ import annotations

import csv
import io
import os
import unicodedata
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from labelsieve.core.errors import DataError
from labelsieve.core.io import is_spreadsheet_error, restore_cell, sniff_delimiter
from labelsieve.core.paths import check_image_paths, listed
from labelsieve.core.progress import warn
from labelsieve.data.containers import container_samples, find_containers
from labelsieve.data.decode import IMAGE_EXTENSIONS
from labelsieve.data.images import LabeledImages
from labelsieve.data.members import Members

_MAX_LISTED = 5


#: First characters of a cell that :func:`restore_cell` or :func:`is_spreadsheet_error` may act on.
_SPECIAL_FIRST = frozenset("'#Ee")


def read_labels_csv(
    csv_path: str | os.PathLike[str], *, path_column: str = "path", label_column: str = "label"
) -> tuple[list[str], list[str], list[int]]:
    """Read ``path,label`` rows from a CSV (``,``/``;``/tab, UTF-8 with or without BOM).

    Paths and labels are data, read byte for byte: nothing is trimmed (a file named `` lead.jpg``, a class
    folder `` Forest`` read back from ``labels.clean.csv``). A leading ``'`` that labelsieve added against
    formula injection or spreadsheet conversion is removed (:func:`labelsieve.core.io.restore_cell`), so a
    ``labels.clean.csv`` reads back as it was meant. A spreadsheet error value (``#NAME?``, ``#REF!`` …) in a path
    or label is refused; a cell of spaces only is empty.

    Returns paths, raw labels and the 1-based line number of each row.
    """
    p = Path(csv_path)
    if not p.is_file():
        raise DataError(f"Labels file not found: {p}. Give the path to a CSV with columns "
                        f"'{path_column}' and '{label_column}'.")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{p}: not UTF-8 text ({exc}). Save the CSV as UTF-8 and try again.") from exc
    if not text.strip():
        raise DataError(f"{p}: the CSV is empty. It needs a header row '{path_column},{label_column}' "
                        "and one row per image.")
    delimiter = sniff_delimiter(text[:8192])
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
    header = [h.strip() for h in next(reader)]
    missing = [c for c in (path_column, label_column) if c not in header]
    if missing:
        raise DataError(
            f"{p}: no column {', '.join(repr(m) for m in missing)} in the header {header}. "
            "Name the columns with --path-column/--label-column."
        )
    ip, il = header.index(path_column), header.index(label_column)
    paths: list[str] = []
    labels: list[str] = []
    lines: list[int] = []
    blanks: list[int] = []
    errors: list[str] = []
    rows = enumerate(reader, start=2)
    while True:
        try:
            line_no, row = next(rows)
        except StopIteration:
            break
        except csv.Error as exc:
            raise DataError(f"{p}, line {reader.line_num}: cannot parse the CSV ({exc}). Check the quoting of that "
                            "row.") from exc
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) <= max(ip, il):
            raise DataError(f"{p}, line {line_no}: expected {len(header)} fields, got {len(row)} "
                            f"({row!r}). Check the delimiter and quoting of that row.")
        path, label = row[ip], row[il]
        if path[:1] in _SPECIAL_FIRST or label[:1] in _SPECIAL_FIRST:  # rare: a neutralised cell, an error value
            path, label = restore_cell(path), restore_cell(label)
            errors.extend(f"line {line_no}: {v!r}" for v in (path, label) if is_spreadsheet_error(v))
        if not path.strip():
            path = ""
        if not label.strip():
            label = ""
        if not path:
            raise DataError(f"{p}, line {line_no}: the '{path_column}' field is empty. "
                            "Give the image path or delete the row.")
        if not label:
            blanks.append(line_no)
            continue
        paths.append(path)
        labels.append(label)
        lines.append(line_no)
    if errors:
        raise DataError(f"{p}: {len(errors)} cell(s) hold a spreadsheet error instead of a path or label "
                        f"({listed(errors)}). A formula failed in the spreadsheet that saved this file: restore the "
                        "original values.")
    if blanks:
        shown = ", ".join(map(str, blanks[:_MAX_LISTED])) + (" …" if len(blanks) > _MAX_LISTED else "")
        raise DataError(f"{p}: {len(blanks)} row(s) have an empty '{label_column}' (line {shown}). "
                        "Fill in the label or delete those rows.")
    if not paths:
        raise DataError(f"{p}: the CSV has a header but no rows. Add one row per image.")
    return paths, labels, lines


def read_image_folder(root: Path) -> tuple[list[str], list[str], list[str]]:
    """Read an ImageFolder tree ``root/<class>/<image>``; returns paths, labels and all class folders."""
    class_dirs = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{root}: no class folders. Either give a labels CSV after the image folder, "
                        "or arrange images as ROOT/<class>/<image>.")
    paths: list[str] = []
    labels: list[str] = []
    for c in class_dirs:
        for dirpath, dirnames, filenames in os.walk(root / c):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for f in sorted(filenames):
                if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."):
                    paths.append(os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/"))
                    labels.append(c)
    return paths, labels, class_dirs


def read_classnames(path: str | os.PathLike[str]) -> dict[str, str]:
    """Read a ``label,text`` CSV (or ``label<TAB>text``) mapping raw labels to the text a model reads."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"Class-names file not found: {p}. Give a CSV with rows 'label,text'.")
    text = p.read_text(encoding="utf-8-sig")
    reader = csv.reader(io.StringIO(text), delimiter=sniff_delimiter(text[:4096]))
    out: dict[str, str] = {}
    for line_no, row in enumerate(reader, start=1):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) < 2 or not row[1].strip():
            raise DataError(f"{p}, line {line_no}: expected 'label,text', got {row!r}.")
        key, val = row[0].strip(), row[1].strip()
        if line_no == 1 and key.lower() in ("label", "class", "raw") and val.lower() in ("text", "name", "classname"):
            continue  # header
        out[key] = val
    if not out:
        raise DataError(f"{p}: no 'label,text' rows found.")
    return out


def _loose(label: str) -> str:
    """A label with its Unicode form, case and surrounding spaces ignored."""
    return unicodedata.normalize("NFC", label).strip().casefold()


def _spelling(label: str) -> str:
    """How a label is spelled, for messages: its repr, and its Unicode form when it is not NFC."""
    return repr(label) + (" (NFD)" if unicodedata.normalize("NFC", label) != label else "")


def label_variants(raw: Sequence[str]) -> dict[str, str]:
    """Labels that differ only by Unicode form (NFC/NFD), case or surrounding spaces: each spelling that is not
    the most frequent of its group, mapped to the most frequent one (ties: the first in sorted order). Empty
    when every label is spelled one way."""
    counts: dict[str, int] = {}
    for r in raw:
        counts[r] = counts.get(r, 0) + 1
    groups: dict[str, list[str]] = {}
    for label in counts:
        groups.setdefault(_loose(label), []).append(label)
    merge: dict[str, str] = {}
    for spellings in groups.values():
        if len(spellings) > 1:
            keep = sorted(spellings, key=lambda x: (-counts[x], x))[0]
            merge.update({x: keep for x in spellings if x != keep})
    return merge


def _warn_variants(raw: Sequence[str], merge: dict[str, str], *, where: str, normalized: bool) -> None:
    counts: dict[str, int] = {}
    for r in raw:
        counts[r] = counts.get(r, 0) + 1
    groups: dict[str, list[str]] = {}
    for x, keep in merge.items():
        groups.setdefault(keep, [keep]).append(x)
    shown = listed([" / ".join(f"{_spelling(x)} ({counts.get(x, 0)} rows)" for x in g) for g in groups.values()])
    if normalized:
        warn(f"{where}: {len(merge)} label spelling(s) were merged into the most frequent spelling of their class "
             f"(--normalize-labels): {shown}.")
    else:
        warn(f"{where}: {len(groups)} class(es) are spelled several ways that differ only by Unicode form, case or "
             f"surrounding spaces, and are audited as different classes: {shown}. Pass --normalize-labels "
             "(normalize_labels=True) to merge each into its most frequent spelling, or fix the labels.")


def default_classname(raw: str) -> str:
    """Readable text for a raw label: underscores and dashes become spaces."""
    return raw.replace("_", " ").replace("-", " ").strip()


def check_unique_paths(root: Path, paths: Sequence[str], labels: Sequence[str], lines: Sequence[int], *,
                       where: str) -> None:
    """Refuse an input that lists one file twice (``a.jpg`` and ``./a.jpg`` are the same file), naming the
    lines and saying whether the labels differ: an audit has one row, and one label, per image."""
    seen: dict[str, int] = {}
    dups: list[str] = []
    conflicting = 0
    always = os.altsep is not None  # two separators (Windows): normalise every path
    for i, path in enumerate(paths):
        # only a path with "." or ".." parts, a doubled or trailing separator, needs normalising to compare
        odd = always or "//" in path or path.endswith("/") or "./" in path or path.endswith(".")
        key = os.path.normpath(path) if odd else path
        j = seen.setdefault(key, i)
        if j != i:
            differ = labels[j] != labels[i]
            conflicting += differ
            dups.append(f"line {lines[i]} repeats line {lines[j]}: {path}"
                        + (f" labelled {labels[j]!r} and {labels[i]!r}" if differ else ""))
    if dups:
        kind = f", {conflicting} with different labels" if conflicting else ""
        raise DataError(f"{where}: {len(dups)} row(s) list an image that an earlier row already lists{kind} "
                        f"({listed(dups)}). Keep one row per image, with the right label.")


def load_images(
    root: str | os.PathLike[str],
    labels_csv: str | os.PathLike[str] | None = None,
    *,
    path_column: str = "path",
    label_column: str = "label",
    classnames: str | os.PathLike[str] | dict[str, str] | None = None,
    classes: Sequence[str] | None = None,
    allow_single_class: bool = False,
    must_exist: bool = True,
    normalize_labels: bool = False,
    image_column: str = "image",
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
) -> LabeledImages:
    """Read and validate a labelled image collection.

    Parameters
    ----------
    root : path
        Image root. Without ``labels_csv`` it must be an ImageFolder tree (``root/<class>/*``). Or containers
        (:func:`labelsieve.data.containers.find_containers`): a WebDataset shard, a folder of shards or a brace or
        wildcard pattern (``shards/{000000..000099}.tar``), a Parquet file or folder of them, a Hugging Face
        ``save_to_disk`` folder; their samples are named ``shard.tar/KEY.jpg`` or ``file.parquet#row``.
    labels_csv : path, optional
        CSV with a path column (relative to ``root``; for containers a sample name, or a WebDataset KEY) and a
        label column.
    path_column, label_column : str
        Column names in the CSV; ``label_column`` is also a Parquet/Arrow file's label column.
    classnames : path or dict, optional
        Maps raw labels to the text the model reads; labels it does not name read as themselves
        (underscores as spaces). Every class it names must have images.
    classes : sequence of str, optional
        The full class list (e.g. from a trained model); labels outside it are an error.
    allow_single_class : bool
        Detectors need at least two classes; ``predict`` does not.
    must_exist : bool, default True
        Refuse paths that name no file (False for an audit of features computed elsewhere, where a path
        only names the row; it must still stay inside ``root``).
    normalize_labels : bool, default False
        Labels that differ only by Unicode form (NFC/NFD), case or surrounding spaces (``ñandú`` typed two
        ways, ``cat`` and ``Cat ``) are separate classes, with a warning naming them; True merges each group
        into its most frequent spelling (recorded in ``label_merges``). Paths are never changed.
    image_column : str
        A Parquet/Arrow file's image column.
    cache_dir : path, optional
        Where container indexes are memoised (default :func:`labelsieve.core.defaults.default_cache_dir`).
    progress : bool
        A progress bar while containers are indexed.
    """
    found = find_containers(root)
    if found is not None:
        csv_rows = None
        if labels_csv is not None:
            csv_rows = read_labels_csv(labels_csv, path_column=_key_column(labels_csv, path_column),
                                       label_column=label_column)
        s = container_samples(found, csv_rows, csv_name=str(Path(labels_csv).resolve()) if labels_csv else "",
                              image_column=image_column, label_column=label_column, cache_dir=cache_dir,
                              progress=progress)
        if len(set(s.paths)) != len(s.paths):  # sample names are canonical: a set finds a repeat, the check names it
            check_unique_paths(s.root, s.paths, s.labels, s.lines, where=s.source)
        return _labelled(s.root, s.paths, s.labels, s.lines, source=s.source, where=s.source, classnames=classnames,
                         classes=classes, allow_single_class=allow_single_class, normalize_labels=normalize_labels,
                         members=s.members)
    root_p = Path(root).expanduser()
    if not root_p.is_dir():
        raise DataError(f"Image folder not found: {root_p}. Give the folder the image paths are relative to.")
    root_p = root_p.resolve()
    empty_dirs: list[str] = []
    if labels_csv is None:
        paths, raw, class_dirs = read_image_folder(root_p)
        present = set(raw)
        empty_dirs = [c for c in class_dirs if c not in present]
        source = str(root_p)
        lines = list(range(1, len(paths) + 1))
    else:
        paths, raw, lines = read_labels_csv(labels_csv, path_column=path_column, label_column=label_column)
        source = str(Path(labels_csv).resolve())

    where = source if labels_csv is not None else "the image folder"
    # Paths: inside the root (the one rule of labelsieve.core.paths), existing, and each listed once.
    check_image_paths(root_p, paths, lines=lines, where=where, must_exist=must_exist)
    check_unique_paths(root_p, paths, raw, lines, where=where)
    if empty_dirs:
        raise DataError(f"{root_p}: class folder(s) with no images: {', '.join(empty_dirs[:_MAX_LISTED])}. "
                        "Add images or remove the empty folder(s).")

    return _labelled(root_p, paths, raw, lines, source=source, where=where, classnames=classnames, classes=classes,
                     allow_single_class=allow_single_class, normalize_labels=normalize_labels)


def _key_column(labels_csv: str | os.PathLike[str], path_column: str) -> str:
    """A labels CSV for WebDataset shards may name its KEY column ``key``: used when ``path`` is the default and the
    header has ``key`` but no ``path``."""
    if path_column != "path":
        return path_column
    try:
        with open(labels_csv, encoding="utf-8-sig") as f:
            head = f.readline()
    except OSError:
        return path_column
    cells = [c.strip() for c in next(csv.reader([head], delimiter=sniff_delimiter(head)), [])]
    return "key" if "path" not in cells and "key" in cells else path_column


def _labelled(root_p: Path, paths: list[str], raw: list[str], lines: Sequence[int], *, source: str, where: str,
              classnames: str | os.PathLike[str] | dict[str, str] | None, classes: Sequence[str] | None,
              allow_single_class: bool, normalize_labels: bool = False,
              members: Members | None = None) -> LabeledImages:
    """Class list, class names and label numbers of validated rows (the end of :func:`load_images`)."""
    merges = label_variants(raw) if classes is None else {}
    if merges:
        _warn_variants(raw, merges, where=where, normalized=normalize_labels)
        if normalize_labels:
            raw = [merges.get(r, r) for r in raw]
        else:
            merges = {}

    names_map: dict[str, str] = {}
    if classnames is not None:
        names_map = dict(classnames) if isinstance(classnames, dict) else read_classnames(classnames)

    if classes is not None:
        class_list = list(classes)
        unknown = sorted(set(raw) - set(class_list))
        if unknown:
            raise DataError(f"{where}: label(s) {unknown[:_MAX_LISTED]} are not among the model's classes "
                            f"{class_list[:10]}{' …' if len(class_list) > 10 else ''}.")
    else:
        class_list = sorted(set(raw))
        no_images = sorted(set(names_map) - set(class_list))
        if no_images:
            raise DataError(
                f"Class(es) {no_images[:_MAX_LISTED]} are named in the class-names file but have no images in "
                f"{where}. Remove them from the class-names file, or add labelled images for them."
            )
    if len(class_list) < 2 and not allow_single_class:
        raise DataError(f"{where}: every image has the label {class_list[0]!r}. Finding wrong labels needs at "
                        "least two classes; check the label column.")
    index = {c: i for i, c in enumerate(class_list)}
    labels = np.array([index[r] for r in raw], dtype=np.int64)
    text = [names_map.get(c, default_classname(c)) for c in class_list]
    return LabeledImages(root=root_p, paths=paths, labels=labels, classes=class_list, classnames=text,
                         source=source, rows=np.asarray(lines, dtype=np.int64), label_merges=merges,
                         members=members)
