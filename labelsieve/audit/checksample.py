"""The check sample: a random, stratified sample of an audit's rows whose review measures the audit.

A reviewer who decides a *random* sample of rows learns the share of wrong labels in the whole dataset, and
how precise the flags are, without trusting the model (:mod:`labelsieve.audit.estimate`): the estimate is
design-based, its interval holds whatever the detector's scores are. Each audit draws one
(:func:`draw_check_sample`, ``labelsieve audit --check-size N``, default :data:`DEFAULT_CHECK_SIZE`); its rows get
their review order, 1 … K, in audit.csv's ``check`` column (empty elsewhere), and the design goes into
audit.json (``check_sample``).

The design
----------
The *population* is every readable row that no reviewer has decided yet (a re-audit with ``--reviewed`` knows
the reviewed rows exactly). It is split by the flag (flagged rows, the others) and, within each part, into bands
of consecutive ranks: a stratum is ``(flagged, first rank, last rank)``, so any reader finds a row's stratum from
the ``is_noisy`` and ``rank`` columns of audit.csv alone. Band edges follow the cumulative
``sqrt(q(1 − q) + δ)`` of the model's expected error ``q = 1 − p_clean`` (the classic cum-√f rule: bands of equal
expected spread). Each band gets a share of the K rows that mixes Neyman's allocation (``N_h·S_h``, with
``S_h`` the model's expected spread in the band) and a proportional one (``N_h``), half each, and at least
:data:`MIN_PER_STRATUM` rows: the model only *directs* the effort; a model that is wrong costs width, never
validity, because every band is sampled at random. The review order is a random permutation of the K rows, so
a reviewer who stops early has reviewed a random sub-sample, which is still a valid sample of every band.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from labelsieve.core.defaults import DEFAULT_CHECK_SIZE

__all__ = ["CHECK_COLUMN", "DEFAULT_CHECK_SIZE", "DESIGN_COLUMNS", "MIN_PER_STRATUM", "REVIEWED_ISSUE", "CheckDesign",
           "Stratum", "design_columns", "design_from_columns", "draw_check_sample", "population_mask"]

#: audit.csv's column holding a check row's review order (1 … K), empty elsewhere.
CHECK_COLUMN = "check"
#: Fewest rows drawn from a band (where it has that many): a band's error rate needs at least two.
MIN_PER_STRATUM = 2
#: Added to each row's expected variance ``q(1 − q)`` when the bands are cut and allocated: rows the model is
#: sure of still get some share, since the model may be wrong about them.
SPREAD_FLOOR = 0.01
#: Bands per this many sampled rows (at most :data:`MAX_STRATA`): 6 bands at K = 100. More bands lower the
#: estimate's spread a little but widen the interval (each band's share is uncertain on its own); measured on the
#: benchmark sets (docs/benchmarks.md §14).
ROWS_PER_STRATUM = 16
MAX_STRATA = 12
#: The ``issue`` of a row a reviewer decided on, in an audit made with ``--reviewed`` (labelsieve.audit.reviewed).
REVIEWED_ISSUE = "reviewed"
#: Issues whose rows are not in the population (no label to check, or a reviewer already decided it).
EXCLUDED_ISSUES = ("unreadable", REVIEWED_ISSUE)


@dataclass
class Stratum:
    """One band of the design: the rows with ``is_noisy == flagged`` and ``first <= rank <= last``."""

    flagged: bool
    first: int
    last: int
    rows: int
    sampled: int
    expected_noise: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CheckDesign:
    """How a check sample was drawn (audit.json's ``check_sample``)."""

    size: int
    seed: int
    population: int
    strata: list[Stratum] = field(default_factory=list)
    excluded_issues: tuple[str, ...] = EXCLUDED_ISSUES

    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size, "seed": self.seed, "population": self.population,
                "excluded_issues": list(self.excluded_issues),
                "design": "stratified random sample: flagged / not flagged x bands of consecutive ranks (cum-sqrt rule "
                          "on the model's expected error), half Neyman, half proportional allocation, at least "
                          f"{MIN_PER_STRATUM} per band; review order a random permutation",
                "strata": [s.to_dict() for s in self.strata]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CheckDesign:
        strata = [Stratum(flagged=bool(s["flagged"]), first=int(s["first"]), last=int(s["last"]), rows=int(s["rows"]),
                          sampled=int(s["sampled"]), expected_noise=float(s.get("expected_noise", float("nan"))))
                  for s in d.get("strata") or []]
        return cls(size=int(d.get("size", 0)), seed=int(d.get("seed", 0)), population=int(d.get("population", 0)),
                   strata=strata, excluded_issues=tuple(d.get("excluded_issues") or EXCLUDED_ISSUES))

    def stratum_of(self, rank: np.ndarray, flagged: np.ndarray, member: np.ndarray) -> np.ndarray:
        """The stratum (index into :attr:`strata`) of rows with these ranks and flags; -1 outside the population
        (``member`` False) or outside every band."""
        rank = np.asarray(rank, dtype=np.int64)
        flagged = np.asarray(flagged, dtype=bool)
        out = np.full(len(rank), -1, dtype=np.int64)
        for h, s in enumerate(self.strata):
            out[np.asarray(member, dtype=bool) & (flagged == s.flagged) & (rank >= s.first) & (rank <= s.last)] = h
        return out


def population_mask(table: pd.DataFrame, excluded: tuple[str, ...] = EXCLUDED_ISSUES) -> np.ndarray:
    """Rows a check sample is drawn from: readable, not yet decided, with a score."""
    issue = table["issue"].astype(str).to_numpy() if "issue" in table.columns else np.full(len(table), "")
    p = pd.to_numeric(table["p_clean"], errors="coerce").to_numpy(dtype=np.float64)
    return ~np.isin(issue, list(excluded)) & np.isfinite(p)


def _cut(spread: np.ndarray, bands: int) -> list[tuple[int, int]]:
    """``bands`` runs of consecutive positions with about equal sums of ``spread`` (cum-sqrt rule); each run holds at
    least :data:`MIN_PER_STRATUM` positions where it can."""
    n = len(spread)
    bands = max(1, min(bands, n // MIN_PER_STRATUM if n >= MIN_PER_STRATUM else 1))
    cum = np.cumsum(spread)
    total = float(cum[-1])
    edges = [0]
    for b in range(1, bands):
        at = int(np.searchsorted(cum, total * b / bands, side="right"))
        at = max(at, edges[-1] + MIN_PER_STRATUM)
        if at > n - MIN_PER_STRATUM:
            break
        edges.append(at)
    edges.append(n)
    return [(a, b) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]


def _allocate(sizes: np.ndarray, spreads: np.ndarray, k: int) -> np.ndarray:
    """Integer sample sizes summing to ``k``: half Neyman (``N_h·S_h``), half proportional, at least
    :data:`MIN_PER_STRATUM` (or the whole band when it is smaller), never more than the band."""
    sizes = np.asarray(sizes, dtype=np.int64)
    floor = np.minimum(sizes, MIN_PER_STRATUM)
    if floor.sum() >= k:  # too few rows to give every band its minimum: proportional, largest remainders
        share = k * sizes / sizes.sum()
    else:
        ney = sizes * spreads
        share = 0.5 * ney / ney.sum() + 0.5 * sizes / sizes.sum()
        share = floor + (k - floor.sum()) * share
    n = np.minimum(np.floor(share).astype(np.int64), sizes)
    while n.sum() < k:  # largest remainder among bands with room
        room = n < sizes
        if not room.any():
            break
        rem = np.where(room, share - n, -np.inf)
        n[int(np.argmax(rem))] += 1
    while n.sum() > k:
        n[int(np.argmax(n - floor))] -= 1
    return n


def draw_check_sample(table: pd.DataFrame, *, size: int = DEFAULT_CHECK_SIZE,
                      seed: int = 0) -> tuple[pd.Series, CheckDesign | None]:
    """Draw the check sample of an audit table (see the module docstring).

    Parameters
    ----------
    table : DataFrame
        The audit table: ``p_clean``, ``is_noisy``, ``rank`` and ``issue`` per row.
    size : int
        Rows to draw (0: none); fewer when the population is smaller.
    seed : int
        Seeds the draw (the audit's seed): the same audit draws the same rows.

    Returns
    -------
    check : Series of nullable Int64, aligned with ``table``
        Review order 1 … K of the sampled rows, ``<NA>`` elsewhere.
    design : CheckDesign or None
        None when nothing was drawn.
    """
    check = pd.Series(pd.array([pd.NA] * len(table), dtype="Int64"), index=table.index)
    member = population_mask(table)
    n_pop = int(member.sum())
    if size <= 0 or n_pop == 0:
        return check, None
    k = min(int(size), n_pop)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x636865636B]))  # "check"
    rank = pd.to_numeric(table["rank"], errors="coerce").to_numpy(dtype=np.float64)
    flagged = _bools(table["is_noisy"])
    q = 1.0 - pd.to_numeric(table["p_clean"], errors="coerce").to_numpy(dtype=np.float64)
    spread_all = np.sqrt(np.clip(q * (1.0 - q), 0.0, 0.25) + SPREAD_FLOOR)
    groups = []
    for f in (True, False):
        pos = np.nonzero(member & (flagged == f))[0]
        if len(pos):
            pos = pos[np.argsort(rank[pos], kind="stable")]
            groups.append((f, pos))
    n_bands = max(1, min(MAX_STRATA, k // ROWS_PER_STRATUM))
    weight = np.array([spread_all[pos].sum() for _, pos in groups])
    bands_per = np.maximum(1, np.round(n_bands * weight / weight.sum()).astype(int))
    runs: list[tuple[bool, np.ndarray]] = []
    for (f, pos), nb in zip(groups, bands_per, strict=True):
        runs += [(f, pos[a:b]) for a, b in _cut(spread_all[pos], int(nb))]
    sizes = np.array([len(r) for _, r in runs])
    spreads = np.array([np.sqrt(np.mean(np.clip(q[r] * (1 - q[r]), 0, 0.25)) + SPREAD_FLOOR) for _, r in runs])
    alloc = _allocate(sizes, spreads, k)
    picked: list[int] = []
    strata = []
    for (f, rows), n_h in zip(runs, alloc, strict=True):
        picked += rng.choice(rows, size=int(n_h), replace=False).tolist()
        strata.append(Stratum(flagged=bool(f), first=int(rank[rows[0]]), last=int(rank[rows[-1]]), rows=len(rows),
                              sampled=int(n_h), expected_noise=float(np.mean(q[rows]))))
    order = rng.permutation(len(picked))
    values = np.full(len(table), 0, dtype=np.int64)
    values[np.asarray(picked, dtype=np.int64)[order]] = np.arange(1, len(picked) + 1)
    check = pd.Series(pd.array(np.where(values > 0, values, 0), dtype="Int64"), index=table.index)
    check[values == 0] = pd.NA
    return check, CheckDesign(size=len(picked), seed=int(seed), population=n_pop, strata=strata)


#: Columns that carry the design with each row, so that a reviews CSV (from audit.html) holds everything an estimate
#: needs without the audit it came from: the row's review order in the check sample (``check``), its band
#: (``stratum``, 0-based; empty outside the population), its position in the band by rank (``stratum_pos``, 1-based),
#: and the band's size and sample size (``stratum_rows``, ``stratum_sampled``).
DESIGN_COLUMNS = ("check", "stratum", "stratum_pos", "stratum_rows", "stratum_sampled")


def design_columns(table: pd.DataFrame, design: CheckDesign) -> pd.DataFrame:
    """:data:`DESIGN_COLUMNS` (but ``check``) for every row of ``table`` (an audit with ``rank``, ``is_noisy``,
    ``issue``, ``p_clean``), as nullable integers aligned with it."""
    member = population_mask(table, design.excluded_issues)
    rank = pd.to_numeric(table["rank"], errors="coerce").fillna(-1).to_numpy(dtype=np.int64)
    flagged = _bools(table["is_noisy"])
    stratum = design.stratum_of(rank, flagged, member)
    pos = np.zeros(len(table), dtype=np.int64)
    for h in range(len(design.strata)):
        at = np.nonzero(stratum == h)[0]
        pos[at[np.argsort(rank[at], kind="stable")]] = np.arange(1, len(at) + 1)
    rows = np.array([s.rows for s in design.strata] + [0], dtype=np.int64)[stratum]
    sampled = np.array([s.sampled for s in design.strata] + [0], dtype=np.int64)[stratum]
    inside = stratum >= 0

    def col(v: np.ndarray) -> pd.Series:
        return pd.Series(pd.array(np.where(inside, v, 0), dtype="Int64"), index=table.index).mask(~inside)

    return pd.DataFrame({"stratum": col(stratum), "stratum_pos": col(pos), "stratum_rows": col(rows),
                         "stratum_sampled": col(sampled)}, index=table.index)


def design_from_columns(frame: pd.DataFrame) -> CheckDesign | None:
    """The design a reviews CSV carries in its :data:`DESIGN_COLUMNS` (None when it carries none): one band per
    ``stratum`` id, with its size, sample size and flag (``is_noisy`` of its rows)."""
    if not {"stratum", "stratum_rows", "stratum_sampled"} <= set(frame.columns):
        return None
    h = pd.to_numeric(frame["stratum"], errors="coerce")
    inside = h.notna()
    if not inside.any():
        return None
    f = frame[inside]
    flagged = _bools(f["is_noisy"]) if "is_noisy" in f.columns else np.zeros(len(f), dtype=bool)
    strata: list[Stratum] = []
    by = pd.DataFrame({"h": h[inside].astype(int).to_numpy(), "rows": pd.to_numeric(f["stratum_rows"]).to_numpy(),
                       "sampled": pd.to_numeric(f["stratum_sampled"]).to_numpy(), "flagged": flagged})
    n_strata = int(by["h"].max()) + 1
    for k in range(n_strata):
        g = by[by["h"] == k]
        if g.empty:  # a band with no row in the file: its size is unknown, so no estimate can cover it
            return None
        strata.append(Stratum(flagged=bool(g["flagged"].iloc[0]), first=0, last=0, rows=int(g["rows"].iloc[0]),
                              sampled=int(g["sampled"].iloc[0]), expected_noise=float("nan")))
    return CheckDesign(size=int(sum(s.sampled for s in strata)), seed=-1, population=int(sum(s.rows for s in strata)),
                       strata=strata)


def _bools(values: pd.Series) -> np.ndarray:
    """A column of flags as written by labelsieve or saved back by a spreadsheet (True/TRUE/1 …) as bools."""
    if values.dtype == bool:
        return values.to_numpy()
    return values.astype(str).str.strip().str.lower().isin(("true", "1", "1.0", "yes", "t", "y")).to_numpy()
