"""What a spreadsheet does to the text cells of a CSV, and how labelsieve prevents, detects and undoes it.

A spreadsheet that opens a CSV converts cells that look like numbers, dates, times or booleans, and saves
them back in its own spelling: LibreOffice (headless ``soffice --convert-to``, en-US) turns ``0012`` into
``12``, ``1e5`` into ``100000`` (or ``1.00E+05`` with "detect special numbers"), ``3/4`` into ``03/04/26``
and ``Mar-4`` into a date; Excel does the same and more. A class or file name of that shape would come back
changed.

**Prevented.** :func:`is_convertible` says whether a spreadsheet may convert a text; the CSV writers give
such cells a leading ``'`` (:func:`labelsieve.core.io.neutralise_cell`, like formula prefixes), which
spreadsheets keep as text, and every reader removes exactly that ``'``. The same patterns
(:data:`CONVERTIBLE_PATTERN`) are inlined into ``audit.html``, so the page's reviews CSV follows the same rule.

**Detected.** A label read back that is not one of the audit's classes is compared with each class by
:func:`mangling`: the typical changes (leading zeros or an exponent lost to a number, a date, a time,
a percentage, trimmed or added spaces, another case, another Unicode form) are recognised, so a reader can
repair the value when exactly one class explains it (:func:`unmangle`) and name it otherwise.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Iterable

__all__ = ["CONVERTIBLE_PATTERN", "MAX_LENGTH", "NUMBER_FIRST", "WORD_FIRST", "WORD_MAX_LENGTH", "is_convertible",
           "mangling", "page_rules", "unmangle"]

_MONTHS = "jan|feb|mar|apr|may|jun|jul|aug|sep|sept|oct|nov|dec"
_MONTH_INDEX = {m: i for i, m in enumerate(["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct",
                                             "nov", "dec"], start=1)}
_NUMBER = r"[+-]?(?:\d+(?:[.,]\d*)?|[.,]\d+)(?:[eE][+-]?\d+)?"
_PARTS = [
    rf"[$€£¥]?\s?{_NUMBER}\s?[%$€£¥]?",                       # 12, 0012, 1e5, 1.50, 50%, $5
    r"[+-]?\d{1,3}(?:[, ]\d{3})+(?:\.\d*)?",                   # 1,000 / 1 000 000
    r"\d+ \d+/\d+",                                            # 1 1/2
    r"\d{1,4}[/.\-]\d{1,2}(?:[/.\-]\d{1,4})?(?:[ T]\d{1,2}:\d{2}(?::\d{2})?)?",  # 3/4, 2024-01-05, 4.3.26
    rf"\d{{1,2}}[\- ](?:{_MONTHS})[a-z]*\.?(?:[\- ]\d{{2,4}})?",  # 4-Mar, 4 March 2026
    rf"(?:{_MONTHS})[a-z]*\.?[\- ]\d{{1,4}}(?:,?[\- ]\d{{2,4}})?",  # Mar-4, March 4, 2026
    r"\d{1,2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:\s?[ap]\.?m\.?)?",     # 12:30, 12:30:00 PM
    r"true|false",                                             # TRUE
]
#: A text a spreadsheet may turn into a number, date, time or boolean (case-insensitive; also in audit.html).
CONVERTIBLE_PATTERN = r"^\s*(?:" + "|".join(_PARTS) + r")\s*$"
_CONVERTIBLE = re.compile(CONVERTIBLE_PATTERN, re.IGNORECASE)
_DATE = re.compile(r"^\s*(\d{1,4})[/.\-](\d{1,2})(?:[/.\-](\d{1,4}))?(?:[ T].*)?\s*$")
_DAY_MONTH = re.compile(rf"^\s*(\d{{1,2}})[\- ]({_MONTHS})[a-z]*\.?(?:[\- ](\d{{2,4}}))?\s*$", re.IGNORECASE)
_MONTH_DAY = re.compile(rf"^\s*({_MONTHS})[a-z]*\.?[\- ](\d{{1,4}})(?:,?[\- ](\d{{2,4}}))?\s*$", re.IGNORECASE)
_TIME = re.compile(r"^\s*(\d{1,2}):(\d{2})(?::(\d{2})(?:\.\d+)?)?\s*(?:([ap])\.?m\.?)?\s*$", re.IGNORECASE)


#: The quick test before the pattern (also in audit.html): the first character of a convertible text (after
#: spaces), and the longest convertible texts (a word first: a month or a boolean).
NUMBER_FIRST = "0123456789+-.,$€£¥"
WORD_FIRST = "jfmasondtJFMASONDT"
MAX_LENGTH, WORD_MAX_LENGTH = 40, 24


def is_convertible(text: str) -> bool:
    """True if a spreadsheet opening a CSV may read ``text`` as a number, date, time or boolean."""
    t = text.lstrip()
    if not t or len(t) > MAX_LENGTH:
        return False
    first = t[0]
    if first not in NUMBER_FIRST and (first not in WORD_FIRST or len(t) > WORD_MAX_LENGTH):
        return False  # most names: one string lookup, no regex
    return _CONVERTIBLE.match(text) is not None


def page_rules(formula_prefixes: Iterable[str]) -> dict[str, object]:
    """The rules of :func:`is_convertible` and the formula prefixes, for audit.html's reviews CSV (its script
    applies them to the letter: the same cells get the same ``'``)."""
    return {"formula": "".join(formula_prefixes), "pattern": CONVERTIBLE_PATTERN, "num_first": NUMBER_FIRST,
            "word_first": WORD_FIRST, "max_len": MAX_LENGTH, "word_len": WORD_MAX_LENGTH}


def _number(text: str) -> float | None:
    """``text`` as a spreadsheet reads a number (``0012``, ``1e5``, ``1.00E+05``, ``1,000``, ``50%``, ``$5``)."""
    t = text.strip().replace("\u00a0", "").replace(" ", "")
    scale = 1.0
    if t.endswith("%"):
        t, scale = t[:-1], 0.01
    t = t.strip("$€£¥")
    if re.fullmatch(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d*)?", t):
        t = t.replace(",", "")
    elif re.fullmatch(r"[+-]?\d*,\d+", t):
        t = t.replace(",", ".")
    if not re.fullmatch(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?", t):
        return None
    value = float(t) * scale
    return value if math.isfinite(value) else None


def _month_days(text: str) -> tuple[set[tuple[int, int]], int | None] | None:
    """The (month, day) readings of a date-like text and its year (None when there is none), or None."""
    m = _DATE.match(text)
    if m:
        a, b, c = m.group(1), m.group(2), m.group(3)
        if len(a) == 4:  # 2024-01-05
            pairs = {(int(b), int(c))} if c else set()
            year = int(a)
        else:
            x, y = int(a), int(b)
            pairs = {(x, y), (y, x)}
            year = int(c) if c else None
        pairs = {(mo, d) for mo, d in pairs if 1 <= mo <= 12 and 1 <= d <= 31}
        return (pairs, year) if pairs else None
    m = _DAY_MONTH.match(text)
    if m:
        return {(_MONTH_INDEX[m.group(2).lower()[:3]], int(m.group(1)))}, int(m.group(3)) if m.group(3) else None
    m = _MONTH_DAY.match(text)
    if m:
        mo, n = _MONTH_INDEX[m.group(1).lower()[:3]], int(m.group(2))
        if m.group(3):
            return {(mo, n)}, int(m.group(3))
        return ({(mo, n)}, None) if n <= 31 else ({(mo, 1)}, n)  # "June 2020" is a month of a year
    return None


def _time(text: str) -> tuple[int, int] | None:
    m = _TIME.match(text)
    if not m:
        return None
    h, mi = int(m.group(1)), int(m.group(2))
    if m.group(4):
        h = h % 12 + (12 if m.group(4).lower() == "p" else 0)
    return (h, mi) if h < 24 and mi < 60 else None


def _same_year(a: int | None, b: int | None) -> bool:
    if a is None or b is None:
        return True  # a spreadsheet adds the current year to a date that has none
    return a == b or a % 100 == b % 100


def mangling(original: str, seen: str) -> str | None:
    """How a spreadsheet may have turned ``original`` into ``seen`` (a short reason), or None.

    Recognised: surrounding spaces trimmed or added, another Unicode form (NFC/NFD), another case, a number
    (leading zeros, exponent, grouping or precision lost: ``0012`` → ``12``, ``1e5`` → ``1.00E+05``), a
    percentage, a date (``3/4`` → ``03/04/26``, ``Mar-4`` → ``2026-03-04``) and a time.
    """
    if original == seen:
        return None
    a, b = unicodedata.normalize("NFC", original), unicodedata.normalize("NFC", seen)
    if a == b:
        return "another Unicode form (NFC/NFD)"
    if a.strip() == b.strip():
        return "surrounding spaces trimmed or added"
    if a.strip().casefold() == b.strip().casefold():
        return "another case"
    if not is_convertible(original):
        return None
    x, y = _number(original), _number(seen)
    if x is not None and y is not None and math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-12):
        return f"read as the number {seen.strip()}"
    d, e = _month_days(original), _month_days(seen)
    if d is not None and e is not None and d[0] & e[0] and _same_year(d[1], e[1]):
        return f"read as the date {seen.strip()}"
    t, u = _time(original), _time(seen)
    if t is not None and t == u:
        return f"read as the time {seen.strip()}"
    return None


def unmangle(seen: str, candidates: Iterable[str]) -> list[tuple[str, str]]:
    """The candidates a spreadsheet may have turned into ``seen``, each with the reason (:func:`mangling`)."""
    out = []
    for c in candidates:
        why = mangling(c, seen)
        if why is not None:
            out.append((c, why))
    return out
