"""Image collections stored in containers: what ``labelsieve audit SHARDS`` finds, and how each sample is named.

:func:`find_containers` recognises the argument of a command: a WebDataset shard (``.tar``), a Parquet file, a
Hugging Face ``save_to_disk`` folder (``state.json`` and ``data-*.arrow``), a folder of shards or of Parquet files
(holding no images and no sub-folders), or a pattern with braces or wildcards (``shards/{000000..000099}.tar``,
``data/train-*.parquet``). :func:`container_samples` indexes every container (once: the index is memoised,
:mod:`labelsieve.data.indexmemo`; under torchrun each rank indexes its own share of the containers) and names each
sample the one way every later command uses (audit.csv's ``path``, ``labels.clean.csv``, ``predictions.csv``):

* a WebDataset sample is ``<shard>/<image member>``, e.g. ``shard-000003.tar/KEY.jpg``;
* a Parquet or Arrow row is ``<file>#<row>`` (0-based), e.g. ``train-00001.parquet#1234``;

the shard or file relative to the folder the containers were found in (the audit's image root).

A labels CSV given with containers names samples in its path column by those names, or, for WebDataset, by
``KEY`` alone (the column may be called ``key``); the audit then covers the CSV's rows, in its order, as with a
folder. Without one, the labels come from the containers, in container order and storage order.
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from labelsieve.core import distributed
from labelsieve.core.defaults import default_cache_dir
from labelsieve.core.errors import DataError, OutputError
from labelsieve.core.io import atomic_open, atomic_path
from labelsieve.core.paths import listed
from labelsieve.core.progress import progress_bar, warn
from labelsieve.data.decode import IMAGE_EXTENSIONS
from labelsieve.data.hashing import DIGEST_SIZE, file_stamp
from labelsieve.data.indexmemo import IndexMemo, unpack_strings
from labelsieve.data.members import Members, balance
from labelsieve.data.parquet import index_table, write_table_copy
from labelsieve.data.webdataset import FROM_NONE, index_shard, split_key, write_shard

__all__ = ["CONTAINER_SUFFIXES", "Found", "Samples", "all_samples", "container_samples", "expand_pattern",
           "find_containers", "materialise", "open_samples", "sample_name", "write_cleaned_copy"]

#: File suffixes of containers, and the kind each is.
CONTAINER_SUFFIXES = {".tar": "webdataset", ".parquet": "parquet", ".arrow": "arrow"}
_PATTERN = re.compile(r"[{}*?\[]")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


@dataclass
class Found:
    """Containers found for a command's argument: their kind, the folder sample names are relative to, the files
    (in order) and the argument as given."""

    kind: str
    root: Path
    files: list[Path]
    spec: str

    def rel(self, path: Path) -> str:
        return os.path.relpath(path, self.root).replace(os.sep, "/")


@dataclass
class Samples:
    """What :func:`container_samples` read: one entry per sample, in the audit's order."""

    root: Path
    paths: list[str]
    labels: list[str]
    lines: list[int]
    source: str
    members: Members
    label_from: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int8))
    classes: list[str] | None = None
    seconds: dict[str, float] = field(default_factory=dict)


def _split_braces(pattern: str) -> list[str]:
    """Expand the first ``{…}`` of ``pattern`` (``{a,b}`` lists, ``{000..099}`` zero-padded ranges), recursively."""
    start = pattern.find("{")
    if start < 0:
        return [pattern]
    depth = 0
    for end in range(start, len(pattern)):
        depth += {"{": 1, "}": -1}.get(pattern[end], 0)
        if depth == 0:
            break
    else:
        raise DataError(f"{pattern}: unmatched '{{' in the pattern.")
    body = pattern[start + 1: end]
    m = _RANGE.match(body)
    if m:
        a, b = m.group(1), m.group(2)
        width = max(len(a), len(b)) if (a.lstrip("-").startswith("0") or b.lstrip("-").startswith("0")) else 0
        lo, hi = int(a), int(b)
        step = 1 if hi >= lo else -1
        choices = [str(v).zfill(width) for v in range(lo, hi + step, step)]
    else:
        choices, depth, cur = [], 0, ""
        for ch in body:
            if ch == "," and depth == 0:
                choices.append(cur)
                cur = ""
                continue
            depth += {"{": 1, "}": -1}.get(ch, 0)
            cur += ch
        choices.append(cur)
    head, tail = pattern[:start], pattern[end + 1:]
    return [x for c in choices for x in _split_braces(head + c + tail)]


def expand_pattern(pattern: str) -> list[Path]:
    """The files a brace and wildcard pattern names, in the pattern's order (each wildcard's matches sorted).

    Raises
    ------
    DataError
        Files the braces name that do not exist, or a wildcard that matches nothing.
    """
    out: list[Path] = []
    missing: list[str] = []
    for item in _split_braces(os.path.expanduser(pattern)):
        if any(c in item for c in "*?["):
            hits = sorted(glob.glob(item))
            if not hits:
                missing.append(item)
            out.extend(Path(h) for h in hits)
        elif os.path.isfile(item):
            out.append(Path(item))
        else:
            missing.append(item)
    if missing:
        raise DataError(f"{pattern}: {len(missing)} file(s) the pattern names do not exist ({listed(missing)}). Fix "
                        "the pattern, or give the folder that holds the files.")
    seen: set[str] = set()
    unique = [p for p in out if not (str(p) in seen or seen.add(str(p)))]  # type: ignore[func-returns-value]
    return unique


def _kind_of(files: Sequence[Path], spec: str) -> str:
    kinds = {CONTAINER_SUFFIXES.get(p.suffix.lower()) for p in files}
    if None in kinds:
        odd = [str(p) for p in files if p.suffix.lower() not in CONTAINER_SUFFIXES]
        raise DataError(f"{spec}: {listed(odd)} is not a WebDataset shard (.tar), Parquet (.parquet) or Arrow (.arrow) "
                        "file.")
    if len(kinds) > 1:
        raise DataError(f"{spec}: mixes {', '.join(sorted(k for k in kinds if k))} files. Give one kind at a time.")
    return kinds.pop()  # type: ignore[return-value]


def _hf_saved(folder: Path) -> list[Path] | None:
    """The Arrow files of a ``datasets`` ``save_to_disk`` folder, in its ``state.json`` order (None: not one)."""
    state = folder / "state.json"
    if not state.is_file():
        return None
    try:
        files = [folder / str(d["filename"]) for d in json.loads(state.read_text(encoding="utf-8"))["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{state}: not a readable Hugging Face datasets state file ({exc}).") from None
    lost = [str(p) for p in files if not p.is_file()]
    if lost:
        raise DataError(f"{folder}: {len(lost)} file(s) its state.json lists are missing ({listed(lost)}).")
    return files


def find_containers(spec: str | os.PathLike[str]) -> Found | None:
    """The containers a command's image argument names, or None when it is an image folder (or names nothing: the
    caller reports that).

    Raises
    ------
    DataError
        A ``DatasetDict`` folder (naming its splits), a pattern naming missing files, mixed container kinds.
    """
    given = os.path.expanduser(os.fspath(spec))
    # absolute, so the audit records where the containers are (a pattern that starts with a brace stays as given)
    text = given if given.startswith("{") else os.path.abspath(given)
    p = Path(text)
    if p.is_file() and p.suffix.lower() in CONTAINER_SUFFIXES:
        return Found(_kind_of([p], text), p.parent.absolute(), [p.absolute()], text)
    if p.is_dir():
        dd = p / "dataset_dict.json"
        if dd.is_file():
            try:
                splits = json.loads(dd.read_text(encoding="utf-8")).get("splits", [])
            except (OSError, ValueError):
                splits = []
            raise DataError(f"{p} holds a Hugging Face DatasetDict with splits {', '.join(map(str, splits))}: give one "
                            f"split's folder, e.g. {p / (splits[0] if splits else 'train')}.")
        saved = _hf_saved(p)
        if saved is not None:
            return Found("arrow", p.absolute(), [f.absolute() for f in saved], text)
        containers, other = [], False
        with os.scandir(p) as it:
            for e in it:
                if e.name.startswith("."):
                    continue
                suffix = os.path.splitext(e.name)[1].lower()
                if suffix in CONTAINER_SUFFIXES and e.is_file():
                    containers.append(Path(e.path))
                elif e.is_dir() or suffix in IMAGE_EXTENSIONS:
                    other = True
        if containers and not other:
            files = sorted(containers, key=lambda q: q.name)
            return Found(_kind_of(files, text), p.absolute(), [f.absolute() for f in files], text)
        return None
    if _PATTERN.search(text) and not p.exists():
        files = expand_pattern(text)
        if not files:
            raise DataError(f"{text}: the pattern names no file.")
        kind = _kind_of(files, text)
        root = Path(os.path.commonpath([str(f.absolute().parent) for f in files]))
        return Found(kind, root, [f.absolute() for f in files], text)
    return None


def sample_name(kind: str, container: str, inner: str | int) -> str:
    """A sample's name: ``<shard>/<member>`` for WebDataset, ``<file>#<row>`` for a table."""
    return f"{container}/{inner}" if kind == "webdataset" else f"{container}#{inner}"


def _index_one(found: Found, path: Path, memo: IndexMemo, *, image_column: str,
               label_column: str | None) -> dict[str, np.ndarray]:
    """One container's index, from the memo or read now (and memoised)."""
    variant = "" if found.kind == "webdataset" else f"{image_column}\0{label_column}"
    hit = memo.get(path, variant)
    if hit is not None:
        return hit
    started = time.time()
    try:
        stamp = file_stamp(os.stat(path))
    except OSError as exc:
        raise DataError(f"{found.rel(path)}: cannot read ({exc.strerror or exc}).") from None
    name = found.rel(path)
    if found.kind == "webdataset":
        index = index_shard(path, shard=name)
    else:
        index = index_table(path, name=name, image_column=image_column, label_column=label_column)
    memo.put(path, index, stamp=stamp, started=started, variant=variant)
    return index


def index_containers(found: Found, *, image_column: str = "image", label_column: str | None = "label",
                     cache_dir: str | os.PathLike[str] | None = None,
                     progress: bool = True) -> list[dict[str, np.ndarray]]:
    """Every container's index, in ``found.files`` order. Under torchrun each rank indexes its share of the
    containers (by size) and the ranks exchange them, so none is read twice; indexes are memoised one by one, so
    work done before an error is kept."""
    memo = IndexMemo(cache_dir or default_cache_dir(), warn=warn)
    sizes = []
    for f in found.files:
        try:
            sizes.append(os.stat(f).st_size)
        except OSError as exc:
            raise DataError(f"{found.rel(f)}: cannot read ({exc.strerror or exc}).") from None
    mine = balance(sizes, distributed.world_size())[distributed.rank()]
    out: dict[int, dict[str, np.ndarray]] = {}
    error: DataError | None = None
    with progress_bar(len(mine), f"indexing {found.kind} files", enabled=progress and len(mine) > 1) as advance, \
            ThreadPoolExecutor(max_workers=min(4, max(1, len(mine)))) as pool:
        futures = {k: pool.submit(_index_one, found, found.files[k], memo, image_column=image_column,
                                  label_column=label_column) for k in mine}
        for k, fut in futures.items():
            try:
                out[k] = fut.result()
            except DataError as exc:
                error = error or exc
            advance()
    parts = distributed.all_gather_object((out, str(error) if error else None))
    errors = [e for _, e in parts if e]
    if errors:
        raise DataError(errors[0])
    merged: dict[int, dict[str, np.ndarray]] = {}
    for part, _ in parts:
        merged.update(part)
    return [merged[k] for k in range(len(found.files))]


def _csv_keys(inner: list[str]) -> dict[str, int]:
    """WebDataset: KEY -> row (-1 for a KEY found in several shards), from the image member names."""
    keys: dict[str, int] = {}
    dup: set[str] = set()
    for i, n in enumerate(inner):
        k = split_key(n)[0]
        if k in keys:
            dup.add(k)
        keys[k] = i
    for k in dup:
        keys[k] = -1
    return keys


def container_samples(found: Found, csv_rows: tuple[list[str], list[str], list[int]] | None = None, *,
                      csv_name: str = "", image_column: str = "image", label_column: str | None = "label",
                      labels_needed: bool = True, cache_dir: str | os.PathLike[str] | None = None,
                      progress: bool = True) -> Samples:
    """The samples of ``found``, named and labelled (module docstring).

    Parameters
    ----------
    found : Found
    csv_rows : (paths, labels, lines), optional
        A labels CSV's rows (:func:`labelsieve.data.sources.read_labels_csv`): the audit covers those samples, in
        that order, with those labels. Without it, every sample of the containers, labelled from them.
    csv_name : str
        The CSV's name for messages.
    image_column, label_column : str
        A table's columns (``label_column`` None: no label column is read).
    labels_needed : bool
        Refuse a sample without a label (False for ``predict``).

    Raises
    ------
    DataError
        A shard or file that cannot be read (truncated, damaged, no image column …) naming it and the member or row;
        a sample without a label (naming it); CSV rows that name no sample (naming their lines).
    """
    t0 = time.perf_counter()
    table_labels = label_column if (found.kind != "webdataset" and csv_rows is None) else None
    indexes = index_containers(found, image_column=image_column, label_column=table_labels, cache_dir=cache_dir,
                               progress=progress)
    t_index = time.perf_counter() - t0
    names: list[str] = []
    inner_names: list[str] = []
    labels: list[str] = []
    file_ids, pos, size, digests, label_from, groups = [], [], [], [], [], []
    classes: list[str] | None = None
    for k, (path, ix) in enumerate(zip(found.files, indexes, strict=True)):
        n = int(ix["n"])
        rel = found.rel(path)
        if found.kind == "webdataset":
            inner = unpack_strings(ix["names"], n)
            inner_names.extend(inner)
            names.extend(f"{rel}/{m}" for m in inner)
            pos.append(ix["offset"])
            size.append(ix["size"])
            label_from.append(ix["label_from"])
            groups.append(np.zeros(n, dtype=np.int32))
        else:
            names.extend(f"{rel}#{r}" for r in range(n))
            pos.append(np.arange(n, dtype=np.int64))
            size.append(np.zeros(n, dtype=np.int64))
            label_from.append(np.full(n, FROM_NONE, dtype=np.int8))
            groups.append(ix["group"])
            if int(ix["n_classes"]):
                classes = unpack_strings(ix["classes"], int(ix["n_classes"]))
        labels.extend(unpack_strings(ix["labels"], n))
        file_ids.append(np.full(n, k, dtype=np.int32))
        digests.append(ix["digest"])
    if not names:
        raise DataError(f"{found.spec}: the {found.kind} files hold no images.")
    members = Members(kind=found.kind, files=[str(f) for f in found.files], file=np.concatenate(file_ids),
                      pos=np.concatenate(pos), size=np.concatenate(size),
                      digests=np.concatenate(digests) if digests else np.zeros(0, f"S{DIGEST_SIZE}"),
                      group=np.concatenate(groups),
                      image_column=image_column if found.kind != "webdataset" else None, spec=found.spec,
                      label_column=table_labels)
    lf = np.concatenate(label_from)
    if csv_rows is None:
        if labels_needed:
            unlabelled = [i for i, lab in enumerate(labels) if not lab]
            if unlabelled:
                where = ("no KEY.cls, KEY.json 'label' or KEY.txt member" if found.kind == "webdataset"
                         else f"an empty '{label_column}' cell")
                raise DataError(f"{found.spec}: {len(unlabelled)} sample(s) have no label ({where}): "
                                f"{listed([names[i] for i in unlabelled])}. Add their labels, or give a labels CSV "
                                "keyed by sample (or KEY).")
        return Samples(root=found.root, paths=names, labels=labels, lines=list(range(1, len(names) + 1)),
                       source=found.spec, members=members, label_from=lf, classes=classes,
                       seconds={"index": t_index, "total": time.perf_counter() - t0})
    paths, raw, lines = csv_rows
    row_of = {n: i for i, n in enumerate(names)}
    keys = _csv_keys(inner_names) if found.kind == "webdataset" else None
    rows: list[int] = []
    unknown: list[str] = []
    ambiguous: list[str] = []
    for p, line in zip(paths, lines, strict=True):
        i = row_of.get(p)
        if i is None and keys is not None:
            i = keys.get(p)
            if i == -1:
                ambiguous.append(f"line {line}: {p}")
                continue
        if i is None:
            unknown.append(f"line {line}: {p}")
            continue
        rows.append(i)
    if ambiguous:
        raise DataError(f"{csv_name}: {len(ambiguous)} KEY(s) are in more than one shard ({listed(ambiguous)}); name "
                        "those samples in full, as <shard>/<member>.")
    if unknown:
        how = ("as <shard>/<member> (e.g. shard-000000.tar/KEY.jpg) or by KEY" if found.kind == "webdataset"
               else "as <file>#<row> (e.g. train-00000.parquet#0)")
        raise DataError(f"{csv_name}: {len(unknown)} row(s) name no sample of {found.spec} ({listed(unknown)}). "
                        f"Name samples {how}.")
    idx = np.asarray(rows, dtype=np.int64)
    return Samples(root=found.root, paths=[names[i] for i in rows], labels=list(raw), lines=list(lines),
                   source=csv_name, members=members.subset(idx), label_from=lf[idx], classes=classes,
                   seconds={"index": t_index, "total": time.perf_counter() - t0})



def open_samples(spec: str, names: Sequence[str], *, image_column: str = "image", label_column: str | None = None,
                 cache_dir: str | os.PathLike[str] | None = None, where: str = "",
                 lines: Sequence[int] | None = None) -> Samples:
    """The samples ``names`` (as an audit names them) of the containers ``spec``, in that order: for commands that
    read images an audit listed (``train --clean``, ``export``, ``apply --write-shards``).

    Raises
    ------
    DataError
        ``spec`` names no containers (moved?), or names that are none of their samples (naming the lines).
    """
    found = find_containers(spec)
    if found is None:
        raise DataError(f"{where}: the audit's images were in {spec}, which holds no WebDataset shards or "
                        "Parquet/Arrow files now (moved or unmounted?). Give their new location with --images.")
    lines = list(lines) if lines is not None else list(range(1, len(names) + 1))
    return container_samples(found, (list(names), [""] * len(names), lines), csv_name=where,
                             image_column=image_column, label_column=None, labels_needed=False, cache_dir=cache_dir,
                             progress=False)


def all_samples(spec: str, *, image_column: str = "image", label_column: str | None = None,
                cache_dir: str | os.PathLike[str] | None = None, where: str = "") -> tuple[Found, Samples]:
    """Every sample of the containers ``spec`` with the labels they hold (none required)."""
    found = find_containers(spec)
    if found is None:
        raise DataError(f"{where}: the audit's images were in {spec}, which holds no WebDataset shards or "
                        "Parquet/Arrow files now (moved or unmounted?).")
    return found, container_samples(found, None, image_column=image_column, label_column=label_column,
                                    labels_needed=False, cache_dir=cache_dir, progress=False)


def write_cleaned_copy(spec: str, paths: Sequence[str], labels: Sequence[str], out_dir: str | os.PathLike[str], *,
                       fmt: str, image_column: str = "image", label_column: str | None = None,
                       cache_dir: str | os.PathLike[str] | None = None, where: str = "") -> dict[str, Any]:
    """Write a cleaned copy of the containers ``spec`` into ``out_dir`` in their own format, streaming: the samples
    ``paths`` (as the audit names them) with their final ``labels``, every other sample left out (``apply
    --write-shards`` / ``--write-parquet``).

    Each shard (file) is copied, in its order, to the same name under ``out_dir``: a WebDataset sample keeps all its
    members, with the member that held its label (``KEY.cls``, ``KEY.txt``, ``KEY.json``'s ``label``) rewritten when
    the label changed; a Parquet or Arrow row keeps every column, with its label column rewritten (as a
    ``ClassLabel`` number where it holds those), and the copy is Parquet, a row group per input row group. Labels
    that came from a labels CSV stay in the CSV ``apply`` writes. Each file appears whole or not at all (written to a
    temporary name, then renamed); a file that keeps no sample is not written.

    Returns
    -------
    dict
        ``files`` written, ``samples`` written, ``out`` folder, ``format``.

    Raises
    ------
    DataError
        The audit's containers are not of the format asked for, cannot be found, or lack a sample named.
    OutputError
        ``out_dir`` is the folder the containers are in.
    """
    found, s = all_samples(spec, image_column=image_column, label_column=label_column, cache_dir=cache_dir,
                           where=where)
    want = {"webdataset": ("webdataset",), "parquet": ("parquet", "arrow")}[fmt]
    if found.kind not in want:
        other = "--write-parquet" if found.kind != "webdataset" else "--write-shards"
        raise DataError(f"{where}: the audit read {found.kind} files; a cleaned copy is written in the input's format: "
                        f"use {other}.")
    out = Path(out_dir).expanduser()
    if out.exists() and out.resolve() == found.root.resolve():
        raise OutputError(f"Refusing to write the cleaned copy into {out}, the folder the audit's {found.kind} files "
                          "are in: that would replace them. Give another folder.")
    row_of = {name: i for i, name in enumerate(s.paths)}
    unknown = [p for p in paths if p not in row_of]
    if unknown:
        raise DataError(f"{where}: {len(unknown)} kept row(s) name no sample of {spec} ({listed(unknown)}); the "
                        "containers changed since the audit. Audit them again.")
    rows = np.array([row_of[p] for p in paths], dtype=np.int64)
    new = dict(zip(rows.tolist(), labels, strict=True))
    n_files = n_samples = 0
    for k, path in enumerate(found.files):
        mine = rows[s.members.file[rows] == k]
        if len(mine) == 0:
            continue
        rel = found.rel(path)
        if found.kind == "webdataset":
            in_file = np.flatnonzero(s.members.file == k)
            prefix = len(rel) + 1
            images = [s.paths[i][prefix:] for i in in_file]
            keep = {s.paths[i][prefix:]: (new[i] if new[i] != s.labels[i] else None) for i in mine.tolist()}
            label_from = {split_key(s.paths[i][prefix:])[0]: int(s.label_from[i]) for i in mine.tolist()}
            with atomic_open(out / rel, "wb") as dest:
                n_samples += write_shard(path, dest, shard=rel, images=images, keep=keep, label_from=label_from)
        else:
            target = out / Path(rel).with_suffix(".parquet")
            order = np.sort(s.members.pos[mine])
            by_pos = {int(s.members.pos[i]): new[i] for i in mine.tolist()}
            with atomic_path(target) as tmp:
                n_samples += write_table_copy(path, tmp, keep=order, labels=by_pos, label_column=label_column,
                                              classes=s.classes)
        n_files += 1
    return {"files": n_files, "samples": n_samples, "out": out, "format": fmt}


_FORMATS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}


def materialise(samples: Samples, dest: str | os.PathLike[str]) -> dict[str, Path]:
    """Write the images of ``samples`` as files under ``dest`` for tools that open files (Label Studio, FiftyOne):
    a WebDataset sample at ``dest/<shard>/<member>``, a table row at ``dest/<file>/<row>.<ext>`` (the extension from
    the image's format). Returns sample name -> file; an image that cannot be read is left out."""
    out: dict[str, Path] = {}
    root = Path(dest)
    for i, name in enumerate(samples.paths):
        try:
            data = samples.members.read(i)
        except OSError:
            continue
        if samples.members.kind == "webdataset":
            target = root / name
        else:
            container, _, row = name.rpartition("#")
            try:
                with Image.open(io.BytesIO(data)) as im:
                    ext = _FORMATS.get(str(im.format), ".img")
            except Exception:  # not an image PIL knows: written as it is
                ext = ".img"
            target = root / container / f"{row}{ext}"
        if not (target.is_file() and target.stat().st_size == len(data)):
            with atomic_open(target, "wb") as f:
                f.write(data)
        out[name] = target
    return out
