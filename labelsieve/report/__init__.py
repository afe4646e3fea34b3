"""Writers for audit results (HTML report) and the shared atomic-write helper they use.

Every file labelsieve writes for a user is written atomically with :func:`atomic_open`: the content
goes to a temporary file in the destination folder, which replaces the destination only once it is
complete, so an interrupted or failing write never leaves a partial file behind.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

__all__ = ["atomic_open"]


@contextlib.contextmanager
def atomic_open(
    path: str | os.PathLike[str], *, encoding: str = "utf-8", newline: str | None = ""
) -> Iterator[TextIO]:
    """Open a text file for writing that appears at ``path`` only if the block completes.

    Parameters
    ----------
    path : path
        Destination file. Its folder is created if missing; an existing file is replaced.
    encoding : str, default "utf-8"
        Text encoding.
    newline : str or None, default ""
        Passed to :func:`open` (``""`` writes line endings untranslated, as the :mod:`csv` module wants).

    Yields
    ------
    TextIO
        A handle on a temporary file in the same folder as ``path``.

    Notes
    -----
    The temporary file is named ``.<name>.<random>.tmp``. If the block raises, the temporary file
    is removed and ``path`` is left as it was.
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.{secrets.token_hex(6)}.tmp"
    # os.open with mode 0o666 honours the umask (tempfile.mkstemp would make the result owner-only).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding=encoding, newline=newline) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
