"""Errors a user can cause and fix.

Every error raised for a user's input is a :class:`LabelsieveError` whose message names the file or
row at fault and says what to do. The CLI prints the message alone (no traceback) and exits with
status 2.
"""

from __future__ import annotations

import errno
import os

#: errno values of a full disk (no space left, or a quota reached).
NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})


class LabelsieveError(Exception):
    """A problem with the user's input, model choice or options, with a message saying what to do."""


class DataError(LabelsieveError):
    """The image folder or labels CSV cannot be used as given."""


class ModelError(LabelsieveError):
    """A model or its weights cannot be loaded, or do not support the requested option."""


class OutputError(LabelsieveError):
    """An output or cache location cannot be written, or writing there would destroy a reviewer's work."""


class ParameterError(LabelsieveError, ValueError):
    """A detector or training parameter is out of range or of the wrong type."""


def check_param(owner: str, name: str, value: object, ok: bool, expected: str) -> None:
    """Raise :class:`ParameterError` in the project's one format unless ``ok``.

    >>> check_param("KNNDetector", "k", 0, 0 > 0, "an int >= 1")
    Traceback (most recent call last):
    ...
    labelsieve.core.errors.ParameterError: The 'k' parameter of KNNDetector must be an int >= 1. Got 0 instead.
    """
    if not ok:
        raise ParameterError(f"The {name!r} parameter of {owner} must be {expected}. Got {value!r} instead.")


def no_space_error(exc: OSError, path: str | os.PathLike[str] | None = None) -> OutputError:
    """The :class:`OutputError` for a write that failed on a full disk: which file, and what to do."""
    where = os.fspath(path) if path is not None else (exc.filename or "a file")
    return OutputError(f"No space left on the disk while writing {where} ({exc.strerror or 'disk full'}). Nothing "
                       "half-written was kept, and the file it would have replaced is unchanged. Free some space, or "
                       "give another folder (-o for outputs, --cache-dir or $LABELSIEVE_CACHE for the cache), and run "
                       "the same command again.")
