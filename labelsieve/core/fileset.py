"""A set of files in one folder replaced as one unit: an audit's ``audit.csv``/``.xlsx``/``.html``/``.json``, an
exported model's ``model.safetensors`` + ``model.json``.

Each file is atomic on its own (:func:`labelsieve.core.io.atomic_path`), but a set written file after file can
be left mixed: a Ctrl-C, a full disk or a crash between two files leaves the new ``audit.csv`` beside the old
``audit.json``. :func:`replace_files` makes the set one unit, in three steps:

1. every new file is written completely under a temporary name (``.<name>.<token>.new``) in the folder; a
   failure here removes them, and the old set is untouched;
2. a journal ``.<tag>.replace.json`` naming the new files is written (atomically): **the commit point**;
3. each new file is renamed over its name, the files of the old set that the new one lacks are removed,
   and the journal is removed.

A run that stops inside step 3 leaves the journal. :func:`recover` (called by :func:`replace_files` and by
every reader of the set before it reads) finishes the job: renames are idempotent, so a reader sees the old
set (before the commit) or the new one (after it), never a mix. A journal that cannot be finished (the folder
became read-only) is an :class:`~labelsieve.core.errors.OutputError` with what to do.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from labelsieve.core.errors import NO_SPACE, OutputError, no_space_error
from labelsieve.core.io import atomic_write_text

__all__ = ["journal_path", "recover", "replace_files"]

_STALE_SECONDS = 3600


def journal_path(folder: str | os.PathLike[str], tag: str) -> Path:
    """Where the journal of the set ``tag`` in ``folder`` lives."""
    return Path(folder) / f".{tag}.replace.json"


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a folder be opened or synced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _finish(folder: Path, journal: Path) -> None:
    """Step 3 from a journal: rename what is still staged, remove what the new set lacks, drop the journal."""
    try:
        plan = json.loads(journal.read_text(encoding="utf-8"))
        files = dict(plan["files"])
        remove = list(plan.get("remove", []))
    except (ValueError, KeyError, TypeError):  # never committed in full: nothing to finish
        journal.unlink(missing_ok=True)
        return
    for name, staged in files.items():
        src = folder / str(staged)
        if src.exists():
            os.replace(src, folder / str(name))
    for name in remove:
        (folder / str(name)).unlink(missing_ok=True)
    _fsync_dir(folder)
    journal.unlink(missing_ok=True)
    _fsync_dir(folder)


def recover(folder: str | os.PathLike[str], tag: str) -> bool:
    """Finish a replacement of the set ``tag`` in ``folder`` that was interrupted after its commit point.

    Returns True when there was one to finish.

    Raises
    ------
    OutputError
        The journal is there but the folder cannot be written (the set cannot be made whole).
    """
    folder = Path(folder)
    journal = journal_path(folder, tag)
    if not journal.exists():
        return False
    try:
        _finish(folder, journal)
    except OSError as exc:
        raise OutputError(f"{folder}: a replacement of its {tag} files was interrupted ({journal.name} is there) and "
                          f"cannot be finished ({exc.strerror or exc}). Make the folder writable and run the command "
                          "again, or run the command that wrote it again.") from exc
    return True


def _remove_stale(folder: Path, names: Iterable[str]) -> None:
    """Staged files of replacements that never reached their commit point (a killed run), an hour old."""
    now = time.time()
    for name in names:
        for f in folder.glob(f".{name}.*.new"):
            with contextlib.suppress(OSError):
                if now - f.stat().st_mtime > _STALE_SECONDS:
                    f.unlink()


def replace_files(
    folder: str | os.PathLike[str],
    writers: Mapping[str, Callable[[Path], Any]],
    *,
    tag: str,
    members: Iterable[str] = (),
    record: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Replace the files of a set in ``folder`` as one unit (see the module docstring).

    Parameters
    ----------
    folder : path
        Created if missing.
    writers : mapping of name -> callable
        ``writer(path)`` writes the complete new file ``name`` at ``path`` (a temporary name in ``folder``).
        Called in order; the set is committed only when all of them returned.
    tag : str
        Names the set (its journal is ``.<tag>.replace.json``).
    members : iterable of str
        Every name the set may hold: those of them not in ``writers`` are removed when the new set is
        committed (an old ``audit.html`` must not stay beside a new audit written without one).
    record : mapping, optional
        Written into the journal (e.g. the set's identity), for a person reading it.

    Returns
    -------
    dict
        name -> final path, in the order of ``writers``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    recover(folder, tag)
    _remove_stale(folder, [*writers, *members])
    token = secrets.token_hex(6)
    staged: dict[str, Path] = {}
    try:
        for name, write in writers.items():
            tmp = folder / f".{name}.{token}.new"
            staged[name] = tmp
            try:
                write(tmp)
            except OutputError as exc:  # a full disk: name the file the user knows, not its temporary name
                cause = exc.__cause__
                if isinstance(cause, OSError) and cause.errno in NO_SPACE:
                    raise no_space_error(cause, folder / name) from cause
                raise
        plan = {"format": 1, "tag": tag, "record": dict(record or {}),
                "files": {name: tmp.name for name, tmp in staged.items()},
                "remove": [m for m in members if m not in writers]}
        atomic_write_text(journal_path(folder, tag), json.dumps(plan, indent=1, ensure_ascii=False))
    except BaseException:
        for tmp in staged.values():
            with contextlib.suppress(OSError):
                tmp.unlink()
        raise
    try:
        _finish(folder, journal_path(folder, tag))
    except OSError as exc:  # committed: whoever reads the set next finishes it (recover)
        raise OutputError(f"{folder}: the new {tag} files are written in full, but putting them in place failed "
                          f"({exc.strerror or exc}); the next command that reads them finishes it, or run this "
                          "command again.") from exc
    return {name: folder / name for name in writers}
