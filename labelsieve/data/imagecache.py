"""Decode every image once into a memory-mapped uint8 array, then train for many epochs from it.

Fine-tuning (DEFT's PEFT and FFT phases, TURN's FFT epochs, co-divide, ``labelsieve train``) reads
each image once per epoch. Decoding a JPEG costs more than a small network's forward pass on a
GPU, so :class:`DecodedImageCache` decodes and resizes each image **once** into an ``(n, S, S, 3)``
uint8 array on disk; the epochs then read raw pixels through :class:`CachedImageDataset`, which
applies tensor transforms (random resized crop, flip, RandAugment, normalisation) that run equally
on CPU workers or on a GPU.

Resizing (``mode``)
    ``"crop"`` (default): the shorter side is resized to ``S`` with antialiased bicubic
    interpolation (PIL), then the centre ``S x S`` square is cut out — the same geometry as
    ``torchvision.transforms.Resize(S, BICUBIC)`` + ``CenterCrop(S)``, so evaluation from the cache
    equals timm's usual "resize then centre crop". The borders of non-square images are lost.
    ``"resize"``: the whole image is squeezed to ``S x S`` (aspect ratio not kept, nothing lost).

Large JPEGs are decoded at a reduced DCT scale (PIL ``draft``) that still leaves the shorter side at
least ``2 S`` pixels, which is several times faster and indistinguishable after the bicubic
downscale; images already smaller than ``2 S`` are decoded in full.

Layout under ``<cache_dir>/decoded/<key>/``::

    images.npy    uint8 (n, S, S, 3), a .npy file opened as a memory map
    done.npy      bool (n,): rows already written (flushed to disk before this file is replaced)
    ok.npy        bool (n,): False where the image could not be decoded (its row is zeros)
    errors.json   {row: message} for those rows
    meta.json     size, mode, n, and ``complete`` once every row is done

``key`` hashes the *content* of the files (blake2b digests memoised by path, size, mtime, ctime and
inode in the shared ``hashes.sqlite``, so a rerun does not re-read the files), their order, ``S`` and ``mode``.
Opening the same images at the same size again reuses the array without decoding anything; an
interrupted build resumes from the rows whose chunk was flushed.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from labelsieve.core.defaults import default_cache_dir, default_num_workers
from labelsieve.core.errors import DataError, check_param
from labelsieve.core.io import atomic_save_npy, atomic_write_text
from labelsieve.core.progress import progress_bar, warn
from labelsieve.data.decode import UnreadableImage, read_image_bytes, to_rgb
from labelsieve.data.hashing import ContentHasher, digest_list
from labelsieve.data.images import LabeledImages
from labelsieve.data.members import Members, UnitStream

__all__ = [
    "CachedImageDataset",
    "CachedTwoViewDataset",
    "DecodedImageCache",
    "decode_resized",
]

FORMAT_VERSION = 1
RESIZE_MODES = ("crop", "resize")


# --------------------------------------------------------------------------- decoding


def _resize_geometry(width: int, height: int, size: int) -> tuple[int, int]:
    """Output (width, height) of resizing the shorter side to ``size`` (torchvision's rounding)."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def decode_resized(data_or_path: bytes | str | os.PathLike[str], size: int, *, mode: str = "crop",
                   name: str | None = None) -> np.ndarray:
    """Decode one image and resize it to a ``(size, size, 3)`` uint8 array.

    Parameters
    ----------
    data_or_path : bytes, path or container member
        Encoded image bytes, the path of an image file, or a :class:`~labelsieve.data.members.Member`.
    size : int
        Output side ``S`` in pixels.
    mode : {"crop", "resize"}
        ``"crop"``: shorter side to ``S`` (bicubic, antialiased), then the centre ``S x S`` square;
        ``"resize"``: the whole image to ``S x S``.
    name : str, optional
        How the image is named in error messages (default: the path).

    Returns
    -------
    ndarray of shape (size, size, 3), uint8

    Raises
    ------
    UnreadableImage
        If the file cannot be read or decoded.
    """
    if isinstance(data_or_path, (bytes, bytearray)):
        data, label = bytes(data_or_path), name or "image"
    else:
        label = name or str(data_or_path)
        data = read_image_bytes(data_or_path)
    if not data:
        raise UnreadableImage(f"{label}: file is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format == "JPEG":
                # Decode at a reduced DCT scale; the result keeps both sides >= 2 * size.
                im.draft("RGB", (2 * size, 2 * size))
            im.load()
            rgb = to_rgb(ImageOps.exif_transpose(im))
            if mode == "resize":
                out = rgb.resize((size, size), Image.Resampling.BICUBIC)
            else:
                w, h = rgb.size
                nw, nh = _resize_geometry(w, h, size)
                if (nw, nh) != (w, h):
                    rgb = rgb.resize((nw, nh), Image.Resampling.BICUBIC)
                left = int(round((nw - size) / 2.0))
                top = int(round((nh - size) / 2.0))
                out = rgb.crop((left, top, left + size, top + size))
            arr = np.array(out, dtype=np.uint8)  # writable copy (torch.from_numpy needs one)
    except UnreadableImage:
        raise
    except Exception as exc:  # PIL raises many types for bad data
        raise UnreadableImage(f"{label}: cannot decode image ({type(exc).__name__}: {exc})") from exc
    if arr.shape != (size, size, 3):
        raise UnreadableImage(f"{label}: decoded to an unexpected shape {arr.shape}")
    return arr


class _ResizeMember:
    """:class:`UnitStream` item of the cache build for a container member: ``(uint8 (S, S, 3), row, error)``."""

    def __init__(self, names: Sequence[str], size: int, mode: str) -> None:
        self.names, self.size, self.mode = names, size, mode

    def __call__(self, row: int, data: bytes | None, err: str) -> tuple[torch.Tensor, int, str]:
        blank = torch.zeros(self.size, self.size, 3, dtype=torch.uint8)
        if data is None:
            return blank, row, f"{self.names[row]}: cannot read ({err})"
        try:
            return torch.from_numpy(decode_resized(data, self.size, mode=self.mode, name=self.names[row])), row, ""
        except UnreadableImage as exc:
            return blank, row, str(exc)
        except Exception as exc:  # a strange image must never stop a long build
            return blank, row, f"{self.names[row]}: {type(exc).__name__}: {exc}"


class _ResizeDataset(torch.utils.data.Dataset):
    """Rows to decode for the cache build: ``(uint8 (S, S, 3), row, error text)``; never raises."""

    def __init__(self, files: Sequence[str], rows: np.ndarray, size: int, mode: str) -> None:
        self.files, self.rows, self.size, self.mode = list(files), rows, size, mode

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, int, str]:
        row = int(self.rows[k])
        try:
            arr = decode_resized(self.files[row], self.size, mode=self.mode)
            return torch.from_numpy(arr), row, ""
        except UnreadableImage as exc:
            return torch.zeros(self.size, self.size, 3, dtype=torch.uint8), row, str(exc)
        except Exception as exc:  # a strange image must never stop a long build
            msg = f"{self.files[row]}: {type(exc).__name__}: {exc}"
            return torch.zeros(self.size, self.size, 3, dtype=torch.uint8), row, msg


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (POSIX); a no-op where ``fcntl`` is unavailable."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# --------------------------------------------------------------------------- the cache


class DecodedImageCache:
    """Images decoded and resized once into a memory-mapped ``(n, S, S, 3)`` uint8 array.

    Build or reopen one with :meth:`open` (or :meth:`from_images`); see the module docstring for
    the resizing rule, the key and the on-disk layout. Instances pickle without the array (each
    DataLoader worker maps the file itself).

    Attributes
    ----------
    root : Path
        The cache folder ``<cache_dir>/decoded/<key>``.
    size : int
        Side ``S`` of every stored image.
    mode : str
        ``"crop"`` or ``"resize"``.
    ok : ndarray of shape (n,), bool
        False where the image could not be decoded (its pixels are zeros).
    errors : dict of int to str
        Row -> why it could not be decoded.
    n_decoded : int
        How many images the call that opened this cache had to decode (0 when fully reused).
    seconds : float
        Time the opening call took (hashing, decoding, writing).
    """

    def __init__(self, root: Path, *, size: int, mode: str, n: int, ok: np.ndarray,
                 errors: dict[int, str], n_decoded: int = 0, seconds: float = 0.0) -> None:
        self.root = Path(root)
        self.size = int(size)
        self.mode = mode
        self._n = int(n)
        self.ok = np.asarray(ok, dtype=bool)
        self.errors = dict(errors)
        self.n_decoded = int(n_decoded)
        self.seconds = float(seconds)
        self._array: np.ndarray | None = None

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        files: Sequence[str | os.PathLike[str]],
        *,
        size: int,
        mode: str = "crop",
        cache_dir: str | os.PathLike[str] | None = None,
        num_workers: int | None = None,
        batch_size: int = 32,
        flush_images: int = 1024,
        progress: bool = True,
        on_batch: Callable[[int], None] | None = None,
        members: Members | None = None,
    ) -> DecodedImageCache:
        """Open the cache of ``files`` at ``size``, decoding only the rows not done yet.

        Parameters
        ----------
        files : sequence of path
            Image files, one per row, in the order rows are wanted.
        size : int
            Side ``S`` of the stored square images (>= 8).
        mode : {"crop", "resize"}
            Resizing rule (see the module docstring).
        cache_dir : path, optional
            Cache root (default :func:`labelsieve.features.default_cache_dir`).
        num_workers : int, optional
            DataLoader worker processes decoding in parallel (default ``min(8, cpu_count)``;
            0 decodes in this process).
        batch_size : int
            Images per worker batch.
        flush_images : int
            Rows written between flushes of the array and the done-mask; an interruption loses at
            most this many decoded images.
        progress : bool
            Show a progress bar while decoding.
        on_batch : callable, optional
            Called with the number of images decoded so far after every batch (tests use it to
            simulate an interruption).
        members : Members, optional
            The images are inside containers (:mod:`labelsieve.data.members`), row-aligned with ``files`` (then
            their sample names): their digests are their index's, and they are decoded container by container.

        Returns
        -------
        DecodedImageCache
        """
        owner = "DecodedImageCache"
        check_param(owner, "size", size, isinstance(size, int) and size >= 8, "an int >= 8")
        check_param(owner, "mode", mode, mode in RESIZE_MODES, f"one of {RESIZE_MODES}")
        check_param(owner, "batch_size", batch_size, isinstance(batch_size, int) and batch_size >= 1,
                    "an int >= 1")
        check_param(owner, "flush_images", flush_images,
                    isinstance(flush_images, int) and flush_images >= 1, "an int >= 1")
        check_param(owner, "num_workers", num_workers,
                    num_workers is None or (isinstance(num_workers, int) and num_workers >= 0),
                    "None or an int >= 0")
        if len(files) == 0:
            raise DataError("No images to decode: the image list is empty. Give at least one image.")
        t0 = time.perf_counter()
        base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        if members is not None:
            paths: list[Any] = [str(f) for f in files]
            digests = digest_list(members.digests)
        else:
            paths = [Path(f).expanduser().resolve() for f in files]
            digests = ContentHasher(base / "hashes.sqlite").digests(paths)
        h = hashlib.blake2b(digest_size=12)
        h.update(f"v{FORMAT_VERSION}|{size}|{mode}|{len(paths)}|".encode())
        for d in digests:
            h.update(d)
        root = base / "decoded" / h.hexdigest()
        root.mkdir(parents=True, exist_ok=True)
        build = {"size": size, "mode": mode, "num_workers": num_workers, "batch_size": batch_size,
                 "flush_images": flush_images, "progress": progress, "on_batch": on_batch, "members": members}
        with _file_lock(root / ".lock"):
            try:
                n_decoded = cls._build(root, [str(p) for p in paths], **build)
                ok, errors = cls._check(root, len(paths), size)
            except (ValueError, EOFError, OSError, KeyError, TypeError) as exc:
                if isinstance(exc, OSError) and exc.errno not in (None, 0) and not isinstance(exc, FileNotFoundError):
                    raise  # a disk that is full or read-only is not a damaged cache
                warn(f"decoded-image cache {root} is damaged ({type(exc).__name__}: {exc}); decoding again")
                for f in root.iterdir():
                    if f.name != ".lock":
                        f.unlink()
                n_decoded = cls._build(root, [str(p) for p in paths], **build)
                ok, errors = cls._check(root, len(paths), size)
        return cls(root, size=size, mode=mode, n=len(paths), ok=ok, errors=errors, n_decoded=n_decoded,
                   seconds=time.perf_counter() - t0)

    @classmethod
    def from_images(cls, images: LabeledImages, *, size: int, **kwargs: Any) -> DecodedImageCache:
        """:meth:`open` for every row of ``images`` (row ``i`` of the cache is ``images.paths[i]``), files or
        container members."""
        if images.members is not None:
            return cls.open(images.paths, size=size, members=images.members, **kwargs)
        return cls.open([images.abspath(i) for i in range(len(images))], size=size, **kwargs)

    @staticmethod
    def _check(root: Path, n: int, size: int) -> tuple[np.ndarray, dict[int, str]]:
        """The ``ok`` mask and errors of a built cache, its files checked to be what :meth:`_build` writes
        (plain arrays of the right dtype and shape: never a pickle). ValueError when they are not."""
        arr = np.load(root / "images.npy", mmap_mode="r", allow_pickle=False)
        ok = np.load(root / "ok.npy", allow_pickle=False)
        if arr.dtype != np.uint8 or arr.shape != (n, size, size, 3) or ok.dtype != bool or ok.shape != (n,):
            raise ValueError(f"arrays of {arr.dtype} {arr.shape} and {ok.dtype} {ok.shape}, expected uint8 "
                             f"{(n, size, size, 3)} and bool ({n},)")
        errors = {int(k): str(v) for k, v in json.loads((root / "errors.json").read_text()).items()}
        return ok, errors

    @staticmethod
    def _build(root: Path, files: list[str], *, size: int, mode: str, num_workers: int | None,
               batch_size: int, flush_images: int, progress: bool,
               on_batch: Callable[[int], None] | None, members: Members | None = None) -> int:
        n = len(files)
        meta_path, arr_path = root / "meta.json", root / "images.npy"
        if meta_path.exists():
            meta = json.loads(meta_path.read_text())
            if meta.get("complete") and arr_path.exists():
                return 0
        if arr_path.exists() and (root / "done.npy").exists():
            shape = np.load(arr_path, mmap_mode="r", allow_pickle=False).shape
            if shape != (n, size, size, 3):  # foreign or damaged: start over
                arr_path.unlink()
        if not (arr_path.exists() and (root / "done.npy").exists()):
            fresh = np.lib.format.open_memmap(arr_path, mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
            fresh.flush()
            del fresh
            atomic_save_npy(root / "done.npy", np.zeros(n, dtype=bool))
            atomic_save_npy(root / "ok.npy", np.ones(n, dtype=bool))
            atomic_write_text(root / "errors.json", "{}")
        atomic_write_text(meta_path, json.dumps({"format": FORMAT_VERSION, "size": size, "mode": mode, "n": n,
                                                 "complete": False}, indent=2))
        arr = np.load(arr_path, mmap_mode="r+", allow_pickle=False)
        done = np.load(root / "done.npy", allow_pickle=False)
        ok = np.load(root / "ok.npy", allow_pickle=False)
        errors: dict[str, str] = json.loads((root / "errors.json").read_text())
        todo = np.nonzero(~done)[0]
        if num_workers is None:
            num_workers = default_num_workers()
        num_workers = min(num_workers, max(0, (len(todo) + batch_size - 1) // batch_size))
        if members is not None:  # each container read in storage order by one worker
            units = members.units(todo)
            dataset: Any = UnitStream(members, units, _ResizeMember(files, size, mode))
            num_workers = min(num_workers, len(units))
        else:
            dataset = _ResizeDataset(files, todo, size, mode)
        # its own generator: worker base seeds would otherwise be drawn from the global torch RNG, so
        # whether the cache was warm would change the random draws of whatever trains next
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False,
                                             generator=torch.Generator().manual_seed(0))
        pending: list[np.ndarray] = []
        n_pending = 0
        decoded = 0

        def commit() -> None:
            nonlocal pending, n_pending
            if not pending:
                return
            arr.flush()  # pixels first, then the mask that says they are there
            done[np.concatenate(pending)] = True
            atomic_save_npy(root / "ok.npy", ok)
            atomic_write_text(root / "errors.json", json.dumps(errors))
            atomic_save_npy(root / "done.npy", done)
            pending, n_pending = [], 0

        with progress_bar(len(todo), f"decoding images ({size}px)", enabled=progress and len(todo) > 0) as adv:
            for x, rows, errs in loader:
                r = rows.numpy()
                arr[r] = x.numpy()
                for j, e in enumerate(errs):
                    ok[r[j]] = not e
                    if e:
                        errors[str(int(r[j]))] = e
                    else:
                        errors.pop(str(int(r[j])), None)
                pending.append(r)
                n_pending += len(r)
                decoded += len(r)
                if n_pending >= flush_images:
                    commit()
                adv(len(r))
                if on_batch is not None:
                    on_batch(decoded)
        commit()
        arr.flush()
        atomic_write_text(meta_path, json.dumps({"format": FORMAT_VERSION, "size": size, "mode": mode, "n": n,
                                                 "complete": True, "n_unreadable": int((~ok).sum())},
                                                indent=2))
        return decoded

    # -- access ------------------------------------------------------------------------------------
    @property
    def array(self) -> np.ndarray:
        """The read-only memory-mapped uint8 array of shape (n, S, S, 3)."""
        if self._array is None:
            self._array = np.load(self.root / "images.npy", mmap_mode="r", allow_pickle=False)
        return self._array

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> torch.Tensor:
        """Row ``i`` as a uint8 tensor of shape (3, S, S) (channels first)."""
        return torch.from_numpy(np.array(self.array[int(i)])).permute(2, 0, 1)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_array"] = None  # never pickle the mapped pixels; workers map the file themselves
        return state

    def __repr__(self) -> str:
        return (f"DecodedImageCache(n={self._n}, size={self.size}, mode={self.mode!r}, "
                f"unreadable={int((~self.ok).sum())}, root={str(self.root)!r})")


# --------------------------------------------------------------------------- datasets


class CachedImageDataset(torch.utils.data.Dataset):
    """Training/evaluation samples served from a :class:`DecodedImageCache` (no JPEG decoding).

    Each item is ``(x, label, index, ok)``: ``x`` the transformed float tensor, ``label`` an int,
    ``index`` the cache row (a global sample index, usable by per-sample losses such as ELR), ``ok``
    False for an image that could not be decoded (``x`` is then the transform of a black image; the
    :class:`~labelsieve.core.engine.Trainer` leaves such rows out of losses and statistics).

    Parameters
    ----------
    cache : DecodedImageCache
    index : array-like of int, optional
        Cache rows this dataset serves, in order (default: all rows). Item ``k`` is row
        ``index[k]``; :meth:`Trainer.predict <labelsieve.core.engine.Trainer.predict>` returns
        its outputs in this order.
    labels : array-like of int, optional
        Labels of **all** cache rows (length ``len(cache)``), looked up by row; -1 if omitted.
    transform : callable, optional
        uint8 tensor (3, S, S) -> tensor; default converts to float in [0, 1].
    """

    def __init__(self, cache: DecodedImageCache, index: Sequence[int] | np.ndarray | None = None,
                 labels: Sequence[int] | np.ndarray | None = None,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.cache = cache
        self.index = np.arange(len(cache), dtype=np.int64) if index is None else np.asarray(index, dtype=np.int64)
        if self.index.size and (self.index.min() < 0 or self.index.max() >= len(cache)):
            raise IndexError(f"index has rows outside the cache of {len(cache)} images")
        if labels is None:
            self.labels = np.full(len(cache), -1, dtype=np.int64)
        else:
            self.labels = np.asarray(labels, dtype=np.int64)
            if self.labels.shape != (len(cache),):
                raise ValueError(f"labels must have one entry per cache row ({len(cache)}); got shape "
                                 f"{self.labels.shape}")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.index)

    def _pixels(self, row: int) -> torch.Tensor:
        return self.cache[row]

    def _apply(self, t: Callable[[torch.Tensor], torch.Tensor] | None, x: torch.Tensor) -> torch.Tensor:
        return x.float().div_(255.0) if t is None else t(x)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, int, int, bool]:
        row = int(self.index[k])
        x = self._pixels(row)
        return self._apply(self.transform, x), int(self.labels[row]), row, bool(self.cache.ok[row])


class CachedTwoViewDataset(CachedImageDataset):
    """Two augmented views of each cached image, for FixMatch-style training.

    Each item is ``(weak, strong, label, index, ok)`` where ``weak`` comes from ``transform``
    (e.g. :func:`train_transform`) and ``strong`` from ``strong`` (e.g. :func:`strong_transform`,
    RandAugment); other parameters as in :class:`CachedImageDataset`.
    """

    def __init__(self, cache: DecodedImageCache, index: Sequence[int] | np.ndarray | None = None,
                 labels: Sequence[int] | np.ndarray | None = None,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None, *,
                 strong: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__(cache, index, labels, transform)
        self.strong = strong

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor, int, int, bool]:  # type: ignore[override]
        row = int(self.index[k])
        x = self._pixels(row)
        return (self._apply(self.transform, x), self._apply(self.strong, x), int(self.labels[row]), row,
                bool(self.cache.ok[row]))
