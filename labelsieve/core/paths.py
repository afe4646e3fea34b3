"""Where labelsieve reads and writes: the one rule for image paths, and output checks made before work.

**Reading.** Every command that reads images named by a user's file (``audit`` and ``noise`` through
:func:`labelsieve.data.load_images`, ``train`` through the paths of an edited ``audit.csv``, ``predict``
through a CSV or a folder) checks them with :func:`check_image_paths`. The threat is a *list* of paths (a CSV,
an edited audit) that names files elsewhere, so a path as written must stay inside the image root: absolute
paths are refused, and a path with a ``..`` part must resolve inside the root. Symbolic links *inside* the
folder are followed wherever they point, as ImageFolder, ``tar -h`` and ``rsync -L`` follow them: the folder's
owner placed them there (a Hugging Face hub snapshot, DVC's and git-annex's caches present every image as a
link into a blob store outside the folder). Whatever a path leads to must be a regular file: a FIFO, a device
or a socket is refused and never opened (:func:`open_regular`, which every image read goes through, checks it
again on the opened file).

**Writing.** :func:`check_output_dir` and :func:`check_output_file` are called by every command before it
starts its work, so that an output (``-o``) or cache (``--cache-dir``) location that cannot be written is
reported at once in one message, not as a traceback after minutes of work.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Sequence
from pathlib import Path

from labelsieve.core.errors import DataError, OutputError

__all__ = ["check_image_paths", "check_output_dir", "check_output_file", "inside_root", "listed", "open_regular",
           "read_regular"]

_MAX_LISTED = 5


def listed(items: Sequence[object], limit: int = _MAX_LISTED) -> str:
    """The first ``limit`` items joined by ``; ``, with `` …`` when there are more."""
    return "; ".join(str(i) for i in items[:limit]) + (" …" if len(items) > limit else "")


def inside_root(root: Path, path: str) -> Path | None:
    """``root / path`` with ``..`` and symbolic links resolved, or None when that lies outside ``root``.

    ``root`` must already be resolved (:meth:`Path.resolve`).
    """
    full = (root / path).resolve()
    return full if full == root or full.is_relative_to(root) else None


def escapes_root(path: str) -> bool:
    """True when ``path`` as written is absolute, empty, or has a ``..`` part (it may lead out of the root: such a
    path is judged by where it resolves, :func:`inside_root`)."""
    if not path or os.path.isabs(path) or (os.altsep is not None and path.startswith(os.altsep)):
        return True
    if ".." not in path:
        return False
    parts = path.replace(os.altsep, os.sep).split(os.sep) if os.altsep else path.split(os.sep)
    return ".." in parts


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISDIR(mode):
        return "a folder"
    return "not a regular file"


def open_regular(path: str | os.PathLike[str], *, buffering: int = -1):
    """Open ``path`` for binary reading if it is a regular file (after following symbolic links).

    A FIFO, a device, a socket or a folder raises :class:`OSError` without being opened (checked with ``stat``
    first); the file is opened non-blocking and checked again on the open descriptor, so one swapped in between
    cannot block the read or be read.
    """
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise OSError(errno.EINVAL, f"{_kind(st.st_mode)}, not a regular file: labelsieve does not open it",
                      str(path))
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
                 | getattr(os, "O_BINARY", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, f"{_kind(st.st_mode)}, not a regular file: labelsieve does not open it",
                          str(path))
        return os.fdopen(fd, "rb", buffering=buffering)
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | os.PathLike[str]) -> bytes:
    """The bytes of the regular file ``path`` (:func:`open_regular`; OSError otherwise)."""
    with open_regular(path) as f:
        return f.read()


def check_image_paths(root: Path, paths: Sequence[str], *, lines: Sequence[int] | None = None, where: str,
                      must_exist: bool = True) -> None:
    """Check the files ``paths`` name under ``root``: the rule every command applies to image paths it is given.

    Paths that can name no file (a NUL byte, a symbolic-link loop) are refused first, with their lines (see
    :func:`_check_image_paths` for the rest of the rule).
    """
    numbered = list(lines) if lines is not None else list(range(1, len(paths) + 1))
    unusable = [f"line {line}: {path!r} holds a NUL byte" for path, line in zip(paths, numbered, strict=True)
                if "\0" in path]
    if not unusable:
        try:
            _check_image_paths(root, paths, lines=numbered, where=where, must_exist=must_exist)
            return
        except (RuntimeError, OSError):  # a symbolic-link loop (RuntimeError before Python 3.13, then ELOOP)
            for path, line in zip(paths, numbered, strict=True):  # rare: name the rows, one resolve each
                try:
                    inside_root(root, path)
                except (RuntimeError, OSError) as exc:
                    loop = isinstance(exc, RuntimeError) or exc.errno == errno.ELOOP
                    unusable.append(f"line {line}: {path} ({'a symbolic-link loop' if loop else exc})")
            if not unusable:
                raise
    raise DataError(f"{where}: {len(unusable)} path(s) cannot name a file ({listed(unusable)}). Fix or remove those "
                    "rows (or the looping links).")


def _check_image_paths(root: Path, paths: Sequence[str], *, lines: Sequence[int] | None = None, where: str,
                       must_exist: bool = True) -> None:
    """Check the files ``paths`` name under ``root``: the rule every command applies to image paths it is given.

    Parameters
    ----------
    root : Path
        The image root, resolved.
    paths : sequence of str
        Paths relative to ``root`` as the user wrote them.
    lines : sequence of int, optional
        Line of each path in ``where`` (for messages); default 1, 2, …
    where : str
        The file the paths come from (or "the image folder").
    must_exist : bool, default True
        Also refuse paths that name no regular file.

    Raises
    ------
    DataError
        Naming the lines whose path leaves the root (an absolute path, or a ``..`` that resolves outside), names
        something that is not a regular file (a FIFO, a device, a socket, a folder), or, with ``must_exist``,
        names nothing.

    Notes
    -----
    Symbolic links inside the root are followed wherever they point (module docstring). Fast on millions of
    paths: a few string tests and one ``stat`` per path (none without ``must_exist``); only a path with a ``..``
    part is resolved.
    """
    lines = list(lines) if lines is not None else list(range(1, len(paths) + 1))
    outside, missing, special = [], [], []
    root_s = str(root).rstrip(os.sep) + os.sep
    for path, line in zip(paths, lines, strict=True):
        if escapes_root(path) and inside_root(root, path) is None:
            outside.append(f"line {line}: {path}")
            continue
        if not must_exist:  # nothing is opened here; a later read refuses what is not a regular file
            continue
        try:
            st = os.stat(root_s + path)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise  # a symbolic-link loop: check_image_paths names those rows
            missing.append(f"line {line}: {path}")
            continue
        except ValueError:
            missing.append(f"line {line}: {path}")
            continue
        if stat.S_ISDIR(st.st_mode):
            missing.append(f"line {line}: {path}")
        elif not stat.S_ISREG(st.st_mode):
            special.append(f"line {line}: {path} ({_kind(st.st_mode)})")
    if outside:
        raise DataError(f"{where}: {len(outside)} path(s) point outside the image folder {root} ({listed(outside)}). "
                        "Make paths relative to the image folder, or pass a higher folder as the image root.")
    if special:
        raise DataError(f"{where}: {len(special)} path(s) under {root} name something that is not a regular file "
                        f"({listed(special)}); labelsieve never opens a FIFO, device or socket. Point those rows at "
                        "image files.")
    if missing:
        raise DataError(f"{where}: {len(missing)} image file(s) not found under {root} ({listed(missing)}). "
                        "Fix the paths or remove those rows.")


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _probe_writable(folder: Path) -> str | None:
    """Why no file can be created in the existing ``folder`` (None when one can)."""
    probe = folder / f".labelsieve-write-test-{secrets.token_hex(4)}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    os.close(fd)
    with contextlib.suppress(OSError):
        probe.unlink()
    return None


def check_output_dir(path: str | os.PathLike[str], *, what: str) -> Path:
    """Check, before any work, that the folder ``path`` exists or can be created, and can be written.

    Nothing is created: the nearest existing ancestor must be a writable folder (a file created there
    and removed at once proves it).

    Parameters
    ----------
    path : path
        The folder a command will write into.
    what : str
        What the folder is for, for the message (e.g. "the audit folder (-o)").

    Returns
    -------
    Path

    Raises
    ------
    OutputError
        When ``path`` (or a parent) is a file, or the folder cannot be written.
    """
    p = Path(path).expanduser()
    base = _nearest_existing(p.absolute())
    if not base.is_dir():
        raise OutputError(f"Cannot write {what} at {p}: {base} is a file, not a folder. Give a folder path.")
    why = _probe_writable(base)
    if why is not None:
        raise OutputError(f"Cannot write {what} at {p}: {base} is not writable ({why}). Choose a folder you can "
                          "write to, or fix its permissions.")
    return p


def check_output_file(path: str | os.PathLike[str], *, what: str) -> Path:
    """Check, before any work, that the file ``path`` can be written (created or replaced).

    Raises
    ------
    OutputError
        When ``path`` is a folder, or its folder cannot be created or written.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        raise OutputError(f"Cannot write {what} at {p}: it is a folder. Give a file name.")
    check_output_dir(p.parent, what=what)
    return p
