"""On-disk feature store: image embeddings extracted once, reused by every later run.

Layout under ``<cache_dir>/features/<encoder.key>/``::

    meta.json                      what model and preprocessing the vectors come from
    chunk-<id>.npy                 float16 (m, d) embeddings of m images
    chunk-<id>.digests.npy         |S16 (m,) content digests (blake2b-128 of the file bytes) of those images
    chunk-<id>.manifest.json       the commit: format, m, d, the size and SHA-256 of the two files above,
                                   and {digest: error} for images that could not be decoded
    views/<request>.npy            float16 (n, d) memory-mapped array for one request, in its row order
    views/<request>.json           the view's size and SHA-256, and the chunks it was built from

**Commit.** A chunk exists once its manifest lands (written last, by atomic rename); files of a chunk
without a manifest are an interrupted commit, ignored and removed after an hour. Work is committed every
``chunk_images`` images *or* every ``commit_seconds`` (default 20 s), whichever comes first, so a kill
(even ``kill -9``) loses at most about that much extraction; the rerun extracts only what no chunk holds.
Chunks are named by time and a random id and never rewritten, so several processes (one per GPU, say) may
extract into the same store at once: each commits its own chunks, and every reader sees all of them.

**Several ranks** (torchrun, :mod:`labelsieve.core.distributed`). The ranks of one job split the work: each
hashes its block of the files, rank 0 decides from the store which images are missing, and each rank
extracts its contiguous block of those into chunks of its own, so no two ranks write the same entry
(the store must be on a filesystem every rank sees). A rank that dies loses only the chunk it had not
committed; rerunning the command extracts only what no chunk holds. When every rank is done, rank 0
builds the view and the others open it (checked like any view).

**Checked on read.** Every ``get`` verifies each chunk's digests file against its manifest (size and
SHA-256: cheap, 16 bytes per image) and the size of its vectors file; a chunk's vectors are verified in
full (SHA-256 of the file) whenever they are read to build a view, and a view in full whenever it is
opened. A chunk or view that is truncated, overwritten or unreadable is removed with a warning and rebuilt
(its images extracted again); it is never used. Vectors are stored under the digest of the bytes they
were computed from (the decoder hashes what it reads), so a file changed between hashing and decoding
cannot be stored under its old content.

Vectors are keyed by *file content*: renaming or moving images, or auditing a different CSV over the same
images, reuses them; editing an image re-extracts it. Content digests are memoised in ``hashes.sqlite``
(:class:`~labelsieve.data.hashing.ContentHasher`: by path, size, mtime, ctime and inode) so a rerun does
not re-read every file.

**Images inside containers** (WebDataset shards, Parquet/Arrow files: :mod:`labelsieve.data.members`) are keyed
the same way, by the digest of their bytes, which the container's index recorded: the same images as files, as
shards or as Parquet share their vectors, and re-packing shards re-extracts nothing. Their extraction reads each
container sequentially, one DataLoader worker per container, and under torchrun each rank extracts the
containers of its own share (:func:`labelsieve.data.members.balance`), so no container is read by two ranks.

A store written by labelsieve before these checks (chunks committed by a ``chunk-<id>.keys.npy``, no
manifest) is adopted on first use: each complete chunk gets its manifest, unreadable ones are removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from labelsieve.core import distributed
from labelsieve.core.defaults import (
    DEFAULT_COMMIT_SECONDS,
    default_cache_dir,
    default_num_workers,
)
from labelsieve.core.io import atomic_path, atomic_write_text
from labelsieve.core.progress import progress_bar, warn
from labelsieve.data.decode import UnreadableImage, decode_image, read_image_bytes
from labelsieve.data.hashing import DIGEST_SIZE, ContentHasher, digest_bytes, digest_list
from labelsieve.data.images import LabeledImages
from labelsieve.data.indexmemo import IndexMemo
from labelsieve.data.members import Members, UnitStream, balance

FORMAT = 2
#: Files of an uncommitted chunk (no manifest) older than this are removed.
ORPHAN_SECONDS = 3600
_MANIFEST = ".manifest.json"
_KEY_DTYPE = f"S{DIGEST_SIZE}"


@dataclass
class Features:
    """Embeddings of one request, row-aligned with the images asked for.

    Attributes
    ----------
    vectors : ndarray (memory-mapped) of shape (n, d), float16
        Unreadable rows are zeros.
    ok : ndarray of shape (n,), bool
        False where the image could not be decoded.
    errors : dict of int to str
        Row -> why it could not be decoded.
    digests : list of bytes
        Content digest of each row (equal digests = byte-identical files).
    n_extracted : int
        How many images this call had to run through the model (0 on a warm cache).
    seconds : float
    warnings : list of str
        Cache entries found damaged or stale and rebuilt during this call.
    """

    vectors: np.ndarray
    ok: np.ndarray
    errors: dict[int, str]
    digests: list[bytes]
    n_extracted: int
    seconds: float
    warnings: list[str] = field(default_factory=list)


class _DecodeDataset(torch.utils.data.Dataset):
    """``(x, i, error, digest of the bytes read)`` per file."""

    def __init__(self, files: list[Path], transform: Callable, shape: tuple[int, int, int]) -> None:
        self.files, self.transform, self.shape = files, transform, shape

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        try:
            data = read_image_bytes(self.files[i])
        except UnreadableImage as exc:
            return torch.zeros(self.shape), i, str(exc), b""
        key = digest_bytes(data)
        try:
            return self.transform(decode_image(data, name=str(self.files[i]))), i, "", key
        except UnreadableImage as exc:
            return torch.zeros(self.shape), i, str(exc), key
        except Exception as exc:  # a transform failing on a strange image must not stop the run
            return torch.zeros(self.shape), i, f"{self.files[i]}: {type(exc).__name__}: {exc}", key


class _DecodeMember:
    """``(x, position, error, digest of the bytes read)`` of a container member (:class:`UnitStream`'s item)."""

    def __init__(self, names: list[str], transform: Callable, shape: tuple[int, int, int]) -> None:
        self.names, self.transform, self.shape = names, transform, shape

    def __call__(self, i: int, data: bytes | None, err: str):
        if data is None:  # not the bytes the index hashed (the container changed): stored under a marker, never
            # under the content digest, and the container's index is dropped so the next run indexes it again
            marker = digest_bytes(b"\0unreadable\0" + self.names[i].encode())
            return torch.zeros(self.shape), i, f"{self.names[i]}: cannot read ({err})", marker
        key = digest_bytes(data)
        try:
            return self.transform(decode_image(data, name=self.names[i])), i, "", key
        except UnreadableImage as exc:
            return torch.zeros(self.shape), i, str(exc), key
        except Exception as exc:  # a transform failing on a strange image must not stop the run
            return torch.zeros(self.shape), i, f"{self.names[i]}: {type(exc).__name__}: {exc}", key


def _collate(batch):
    xs, idx, errs, keys = zip(*batch, strict=True)
    return torch.stack(xs), list(idx), list(errs), list(keys)


def _file_digest(data: bytes) -> str:
    """The content digest of a cache file: SHA-256 (hardware-accelerated: 10 MB in ~15 ms)."""
    return hashlib.sha256(data).hexdigest()


@dataclass
class _Chunk:
    """A committed chunk: its name, manifest and (verified) digests."""

    name: str
    manifest: dict[str, Any]
    keys: np.ndarray


class _Damaged(Exception):
    """A cache file does not match its manifest."""


class FeatureStore:
    """Content-addressed cache of one encoder's image embeddings (see the module docstring).

    Parameters
    ----------
    cache_dir : path
        The cache root; vectors live in ``cache_dir/features/<encoder_key>``.
    encoder_key : str
    meta : dict, optional
        Written to ``meta.json`` when the store is new.
    """

    def __init__(self, cache_dir: str | os.PathLike[str], encoder_key: str, *, meta: dict | None = None) -> None:
        self.root = Path(cache_dir).expanduser() / "features" / encoder_key
        (self.root / "views").mkdir(parents=True, exist_ok=True)
        if meta is not None and not (self.root / "meta.json").exists():
            atomic_write_text(self.root / "meta.json", json.dumps(meta, indent=2, default=str))
        self.warnings: list[str] = []
        self.hasher = ContentHasher(Path(cache_dir).expanduser() / "hashes.sqlite", warn=self._warn)

    def _warn(self, message: str) -> None:
        self.warnings.append(message)
        warn(message)

    # -- committed chunks ------------------------------------------------------------------------
    def _chunks(self) -> list[str]:
        """Names of the committed chunks, oldest first."""
        return [c.name for c in self._load_chunks()]

    def _drop(self, name: str, why: str) -> None:
        """Remove a damaged chunk (manifest first, so it is uncommitted before its data goes)."""
        self._warn(f"feature cache chunk {self.root / name} is damaged ({why}); removed, its images will be "
                   "extracted again")
        for suffix in (_MANIFEST, ".npy", ".digests.npy", ".keys.npy", ".bad.json"):
            with contextlib.suppress(FileNotFoundError):
                (self.root / f"{name}{suffix}").unlink()

    def _read_verified(self, path: Path, size: int, digest: str) -> bytes:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise _Damaged(f"{path.name}: {exc.strerror or exc}") from exc
        if len(data) != size:
            raise _Damaged(f"{path.name} has {len(data)} bytes, its manifest says {size}")
        if _file_digest(data) != digest:
            raise _Damaged(f"{path.name} does not match its content digest")
        return data

    def _load_chunk(self, name: str) -> _Chunk:
        try:
            m = json.loads((self.root / f"{name}{_MANIFEST}").read_text(encoding="utf-8"))
            n, dim = int(m["n"]), int(m["dim"])
            vname, vsize = str(m["files"]["vectors"]["name"]), int(m["files"]["vectors"]["size"])
            dig = m["files"]["digests"]
            dname, dsize, dsum = str(dig["name"]), int(dig["size"]), str(dig["sha256"])
            if m.get("format") != FORMAT or not isinstance(m.get("bad", {}), dict) or dim < 1:
                raise ValueError("unknown manifest format")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise _Damaged(f"manifest unreadable: {exc}") from exc
        try:
            actual = (self.root / vname).stat().st_size
        except OSError as exc:
            raise _Damaged(f"{vname}: {exc.strerror or exc}") from exc
        if actual != vsize:
            raise _Damaged(f"{vname} has {actual} bytes, its manifest says {vsize}")
        try:
            keys = np.load(io.BytesIO(self._read_verified(self.root / dname, dsize, dsum)), allow_pickle=False)
        except (ValueError, EOFError) as exc:
            raise _Damaged(f"{dname}: {exc}") from exc
        if keys.shape != (n,) or keys.dtype != np.dtype(_KEY_DTYPE):
            raise _Damaged(f"digests of shape {keys.shape}, manifest says ({n},)")
        return _Chunk(name=name, manifest=m, keys=keys)

    def _adopt_legacy(self, name: str) -> None:
        """Give a chunk written before manifests (committed by its ``.keys.npy``) a manifest, or remove it."""
        try:
            kpath, vpath = self.root / f"{name}.keys.npy", self.root / f"{name}.npy"
            kdata, vdata = kpath.read_bytes(), vpath.read_bytes()
            keys = np.load(io.BytesIO(kdata), allow_pickle=False)
            vecs = np.load(io.BytesIO(vdata), allow_pickle=False)
            bf = self.root / f"{name}.bad.json"
            bad = json.loads(bf.read_text(encoding="utf-8")) if bf.exists() else {}
            if keys.dtype != np.dtype(_KEY_DTYPE) or keys.ndim != 1 or vecs.ndim != 2 or len(vecs) != len(keys):
                raise ValueError(f"digests {keys.shape} and vectors {vecs.shape} do not match")
        except (OSError, ValueError, EOFError) as exc:
            self._drop(name, f"written by an older labelsieve and unreadable: {exc}")
            return
        self._write_manifest(name, vpath, vdata, kpath, kdata, n=len(keys), dim=vecs.shape[1], bad=bad)

    def _write_manifest(self, name: str, vpath: Path, vdata: bytes, kpath: Path, kdata: bytes, *, n: int, dim: int,
                        bad: dict[str, str]) -> None:
        manifest = {"format": FORMAT, "n": n, "dim": dim,
                    "files": {"vectors": {"name": vpath.name, "size": len(vdata), "sha256": _file_digest(vdata)},
                              "digests": {"name": kpath.name, "size": len(kdata), "sha256": _file_digest(kdata)}},
                    "bad": bad}
        atomic_write_text(self.root / f"{name}{_MANIFEST}", json.dumps(manifest))

    def _load_chunks(self) -> list[_Chunk]:
        """Every committed chunk with its digests verified; damaged ones are removed (with a warning)."""
        names = {p.name[: -len(_MANIFEST)] for p in self.root.glob(f"chunk-*{_MANIFEST}")}
        for p in self.root.glob("chunk-*.keys.npy"):
            legacy = p.name[: -len(".keys.npy")]
            if legacy not in names:
                self._adopt_legacy(legacy)
                if (self.root / f"{legacy}{_MANIFEST}").exists():
                    names.add(legacy)
        chunks = []
        for name in sorted(names):
            try:
                chunks.append(self._load_chunk(name))
            except _Damaged as exc:
                self._drop(name, str(exc))
        return chunks

    def _index(self) -> tuple[list[_Chunk], np.ndarray, np.ndarray, np.ndarray, dict[bytes, str]]:
        """Chunks, sorted digests with their chunk number and row, and all decode errors."""
        chunks = self._load_chunks()
        bad: dict[bytes, str] = {}
        for c in chunks:
            bad.update({bytes.fromhex(h): e for h, e in c.manifest.get("bad", {}).items()})
        if not chunks:
            return chunks, np.zeros(0, dtype=_KEY_DTYPE), np.zeros(0, np.int32), np.zeros(0, np.int64), bad
        allk = np.concatenate([c.keys for c in chunks])
        cid = np.concatenate([np.full(len(c.keys), i, dtype=np.int32) for i, c in enumerate(chunks)])
        rows = np.concatenate([np.arange(len(c.keys), dtype=np.int64) for c in chunks])
        order = np.argsort(allk, kind="stable")
        return chunks, allk[order], cid[order], rows[order], bad

    def _commit_chunk(self, vecs: np.ndarray, digests: list[bytes], bad: dict[bytes, str]) -> None:
        name = f"chunk-{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:8]}"
        vbuf, kbuf = io.BytesIO(), io.BytesIO()
        np.save(vbuf, vecs.astype(np.float16))
        np.save(kbuf, np.array(digests, dtype=_KEY_DTYPE))
        vpath, kpath = self.root / f"{name}.npy", self.root / f"{name}.digests.npy"
        for path, buf in ((vpath, vbuf), (kpath, kbuf)):
            with atomic_path(path) as tmp:
                tmp.write_bytes(buf.getvalue())
        self._write_manifest(name, vpath, vbuf.getvalue(), kpath, kbuf.getvalue(), n=len(digests),
                             dim=int(vecs.shape[1]), bad={k.hex(): v for k, v in bad.items()})

    def _remove_orphans(self) -> None:
        """Files of commits interrupted more than :data:`ORPHAN_SECONDS` ago (never a live writer's)."""
        committed = {p.name[: -len(_MANIFEST)] for p in self.root.glob(f"chunk-*{_MANIFEST}")}
        committed |= {p.name[: -len(".keys.npy")] for p in self.root.glob("chunk-*.keys.npy")}
        old = time.time() - ORPHAN_SECONDS
        for folder in (self.root, self.root / "views"):
            for p in folder.iterdir():
                stem = p.name.split(".", 1)[0]
                orphan = (p.name.endswith(".tmp") or (p.name.startswith("chunk-") and stem not in committed))
                with contextlib.suppress(OSError):
                    if orphan and p.stat().st_mtime < old:
                        p.unlink()

    # -- extraction ------------------------------------------------------------------------------
    def get(
        self,
        files: Sequence[Path],
        encode: Callable[[torch.Tensor], torch.Tensor],
        transform: Callable,
        *,
        image_shape: tuple[int, int, int],
        batch_size: int = 64,
        num_workers: int | None = None,
        chunk_images: int = 2048,
        commit_seconds: float = DEFAULT_COMMIT_SECONDS,
        progress: bool = True,
        on_batch: Callable[[int], None] | None = None,
        members: Members | None = None,
    ) -> Features:
        """Embeddings of ``files`` (absolute paths), extracting only what the cache lacks.

        ``encode`` maps a preprocessed batch to (B, d) embeddings; ``transform`` is the preprocessing
        (PIL -> tensor) and ``image_shape`` its output shape. Vectors are committed every
        ``chunk_images`` images or ``commit_seconds`` seconds, whichever comes first, so an interruption
        loses at most that much work. ``on_batch`` is called with the number of images done after every
        batch (tests use it to interrupt). With ``members`` the images are inside containers, row-aligned with
        ``files`` (then their sample names, for messages): their digests are the ones the containers' index
        recorded, and they are read container by container.
        """
        t0 = time.perf_counter()
        files = list(files)
        if members is not None:
            digests = digest_list(members.digests)
        else:  # each rank hashes its block of the files (one rank: all of them)
            digests = [d for part in distributed.all_gather_object(self.hasher.digests(distributed.share(files)))
                       for d in part]
        n_extracted = 0
        for _attempt in range(5):
            chunks, keys, cid, rows, bad = self._index()
            uniq: dict[bytes, int] = {}
            for i, d in enumerate(digests):
                uniq.setdefault(d, i)
            ulist = list(uniq)
            have = np.zeros(len(ulist), dtype=bool)
            if len(keys):
                q = np.array(ulist, dtype=_KEY_DTYPE)
                pos = np.clip(np.searchsorted(keys, q), 0, len(keys) - 1)
                have = keys[pos] == q
            # rank 0's reading of the store decides, so every rank splits the same list
            missing = distributed.broadcast_object([uniq[d] for d, h in zip(ulist, have, strict=True) if not h])
            if missing:
                opts = {"image_shape": image_shape, "batch_size": batch_size, "num_workers": num_workers,
                        "chunk_images": chunk_images, "commit_seconds": commit_seconds, "progress": progress,
                        "on_batch": on_batch}
                if members is not None:
                    units = members.units(np.asarray(missing, dtype=np.int64))
                    # each rank reads whole containers of its own share: no container is read by two ranks
                    share = [units[u] for u in balance([len(r) for _, r, _ in units], distributed.world_size())[
                        distributed.rank()]]
                    changed = self._extract_members(members, share, [str(f) for f in files], digests, encode,
                                                    transform, **opts) if share else {}
                    memo = IndexMemo(self.hasher.db_path.parent, warn=self._warn)
                    for f in sorted({int(members.file[i]) for i in changed}):
                        memo.forget(Path(members.files[f]))  # its index is stale: index the container again
                else:
                    mine = distributed.share(missing)
                    local = self._extract([files[i] for i in mine], [digests[i] for i in mine], encode,
                                          transform, **opts) if mine else {}
                    if local:
                        self.hasher.forget([files[mine[j]] for j in local])
                    changed = {mine[j]: d for j, d in local.items()}
                n_extracted += len(missing)
                # every rank waits here for the others, and learns which of their files changed
                for part in distributed.all_gather_object(changed):
                    for i, actual in part.items():
                        digests[i] = actual
                continue  # index again: the new chunks, and rows that shared a digest that changed
            view = self._view(digests, chunks, keys, cid, rows) if distributed.is_main() else None
            if not distributed.broadcast_object(view is not None):
                continue  # a chunk was damaged and removed: extract its images again
            if view is None:  # another rank: open the view rank 0 built (checked like any view)
                view = self._view(digests, chunks, keys, cid, rows)
                if view is None:
                    raise RuntimeError(f"feature store {self.root}: a chunk rank 0 had just read failed its checks "
                                       "on this rank (is the store on a filesystem every rank sees?)")
            ok = np.array([d not in bad for d in digests], dtype=bool)
            errors = {i: bad[d] for i, d in enumerate(digests) if d in bad}
            return Features(vectors=view, ok=ok, errors=errors, digests=digests, n_extracted=n_extracted,
                            seconds=time.perf_counter() - t0, warnings=list(self.warnings))
        raise RuntimeError(f"feature store {self.root}: vectors keep disappearing or failing their checks while "
                           "being read (is another program deleting or writing these files?)")

    def _extract(self, files: list[Path], digests: list[bytes], encode, transform, *, image_shape,
                 batch_size: int, num_workers: int | None, chunk_images: int, commit_seconds: float,
                 progress: bool, on_batch: Callable[[int], None] | None) -> dict[int, bytes]:
        """Extract and commit ``files``; returns {position: digest} for files whose bytes no longer match
        the digest they were asked for (they are stored under the digest of what was read)."""
        if num_workers is None:
            num_workers = default_num_workers()
        ds = _DecodeDataset(files, transform, image_shape)
        loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=num_workers,
                                             pin_memory=torch.cuda.is_available(), collate_fn=_collate,
                                             persistent_workers=False)
        return self._run(loader, len(files), digests, encode, chunk_images=chunk_images,
                         commit_seconds=commit_seconds, progress=progress, on_batch=on_batch)

    def _extract_members(self, members: Members, units: list[tuple[int, np.ndarray, np.ndarray]], names: list[str],
                         digests: list[bytes], encode, transform, *, image_shape, batch_size: int,
                         num_workers: int | None, chunk_images: int, commit_seconds: float, progress: bool,
                         on_batch: Callable[[int], None] | None) -> dict[int, bytes]:
        """Extract and commit the rows of ``units`` (containers, each read in storage order by one worker);
        returns {row: digest} for rows whose bytes no longer match their index's digest."""
        if num_workers is None:
            num_workers = default_num_workers()
        ds = UnitStream(members, units, _DecodeMember(names, transform, image_shape))
        loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=min(num_workers, len(units)),
                                             pin_memory=torch.cuda.is_available(), collate_fn=_collate,
                                             persistent_workers=False)
        return self._run(loader, len(ds), digests, encode, chunk_images=chunk_images, commit_seconds=commit_seconds,
                         progress=progress, on_batch=on_batch)

    def _run(self, loader: Any, total: int, digests: list[bytes], encode, *, chunk_images: int, commit_seconds: float,
             progress: bool, on_batch: Callable[[int], None] | None) -> dict[int, bytes]:
        """Encode the loader's batches ``(x, index, error, digest read)`` and commit them in chunks."""
        self._remove_orphans()
        buf_v: list[np.ndarray] = []
        buf_d: list[bytes] = []
        buf_bad: dict[bytes, str] = {}
        changed: dict[int, bytes] = {}
        done = 0
        last_commit = time.monotonic()
        with progress_bar(total, "extracting features", enabled=progress) as advance:
            for x, idx, err, read in loader:
                v = encode(x).float().cpu().numpy()
                batch_keys = []
                for j, i in enumerate(idx):
                    key = read[j] or digests[i]
                    if key != digests[i]:
                        changed[i] = key
                    if err[j]:
                        v[j] = 0.0
                        buf_bad[key] = err[j]
                    batch_keys.append(key)
                buf_v.append(v)
                buf_d.extend(batch_keys)
                done += len(idx)
                if len(buf_d) >= chunk_images or time.monotonic() - last_commit >= commit_seconds:
                    self._commit_chunk(np.concatenate(buf_v), buf_d, buf_bad)
                    buf_v, buf_d, buf_bad = [], [], {}
                    last_commit = time.monotonic()
                advance(len(idx))
                if on_batch is not None:
                    on_batch(done)
        if buf_v:
            self._commit_chunk(np.concatenate(buf_v), buf_d, buf_bad)
        return changed

    # -- views -----------------------------------------------------------------------------------
    def _view(self, digests: list[bytes], chunks: list[_Chunk], keys: np.ndarray, chunk_ids: np.ndarray,
              rows: np.ndarray) -> np.ndarray | None:
        """The request's vectors as a verified memory-mapped view; None when a chunk it needs was damaged."""
        q = np.array(digests, dtype=_KEY_DTYPE)
        pos = np.searchsorted(keys, q)
        if len(keys) == 0 or np.any(pos >= len(keys)) or np.any(keys[np.minimum(pos, len(keys) - 1)] != q):
            return None
        cid, crow = chunk_ids[pos], rows[pos]
        used = np.unique(cid)
        names = [chunks[ci].name for ci in used]
        req = hashlib.blake2b(f"v{FORMAT}|".encode() + b"".join(digests) + "|".join(names).encode(),
                              digest_size=12).hexdigest()
        path, mpath = self.root / "views" / f"{req}.npy", self.root / "views" / f"{req}.json"
        if path.exists():
            try:
                m = json.loads(mpath.read_text(encoding="utf-8"))
                self._read_verified(path, int(m["size"]), m["sha256"])
                return np.load(path, mmap_mode="r", allow_pickle=False)
            except FileNotFoundError:
                pass  # a view whose record was never written (interrupted): build it again
            except (_Damaged, OSError, ValueError, KeyError, TypeError) as exc:
                self._warn(f"feature cache view {path} is damaged ({exc}); rebuilt from its chunks")
        dim = int(chunks[used[0]].manifest["dim"])
        try:
            with atomic_path(path) as tmp:
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(len(digests), dim))
                for ci in used:
                    c = chunks[ci]
                    vec = c.manifest["files"]["vectors"]
                    try:
                        arr = np.load(io.BytesIO(self._read_verified(self.root / vec["name"], vec["size"],
                                                                     vec["sha256"])), allow_pickle=False)
                    except (ValueError, EOFError) as exc:
                        raise _Damaged(f"{vec['name']}: {exc}") from exc
                    if arr.shape != (len(c.keys), dim):
                        raise _Damaged(f"vectors of shape {arr.shape}, manifest says ({len(c.keys)}, {dim})")
                    sel = np.nonzero(cid == ci)[0]
                    out[sel] = arr[crow[sel]]
                out.flush()
                del out
                data = tmp.read_bytes()
        except _Damaged as exc:
            self._drop(c.name, str(exc))
            return None
        atomic_write_text(mpath, json.dumps({"size": len(data), "sha256": _file_digest(data), "chunks": names}))
        return np.load(path, mmap_mode="r", allow_pickle=False)


def extract_features(images: LabeledImages, encoder: Any, *, cache_dir: str | os.PathLike[str] | None = None,
                     **options: Any) -> Features:
    """Image embeddings of ``images`` with ``encoder`` (an :class:`~labelsieve.models.encoders.Encoder`),
    through the feature store in ``cache_dir`` (default :func:`default_cache_dir`); ``options`` are those of
    :meth:`FeatureStore.get` (``batch_size``, ``num_workers``, ``chunk_images``, ``commit_seconds``,
    ``progress``, ``on_batch``)."""
    store = FeatureStore(cache_dir or default_cache_dir(), encoder.key, meta=encoder.identity)
    size = encoder.image_size
    files: list[Any] = [images.locate(i) for i in range(len(images))] if images.members is None else images.paths
    return store.get(files, encoder.encode_images, encoder.preprocess, image_shape=(3, size, size),
                     members=images.members, **options)
