"""Label Studio hand-off: a tasks file and a labeling config from an audit, and decisions back from an export.

``labelsieve export audit.csv --to labelstudio -o DIR`` writes (``-o FILE.json`` writes the tasks to that file
and the config beside it)

* ``DIR/labeling_config.xml``: the image, a header with the given and suggested labels, ``p_clean``
  and the issue, a single-choice ``label`` control over the audit's classes and a ``decision``
  control (keep / drop);
* ``DIR/tasks.json``: one task per row of the audit's check sample, first and in its review order (flagged or
  not; ``data.check`` is its number, and the header says CHECK SAMPLE: reviewing them measures the audit), then
  one per flagged row (every readable row with ``--all-rows``), whose ``data`` holds the image URL and the
  audit's fields, and whose prediction (a pre-annotation) is the suggested label with its probability as
  score.

Image URLs: by default Label Studio's local-files URLs relative to the image root
(``/data/local-files/?d=<path>``; start Label Studio with ``LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true``
and ``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=<image root>`` and add a Local Storage on that folder);
``--document-root`` for another local-files root, or ``--url-prefix`` when the images are served
over HTTP(S) or from a bucket.

After review, export the project as JSON (Label Studio's "JSON" format, all tasks) and run
``labelsieve apply audit.csv --from-labelstudio export.json -o labels.clean.csv``. The latest
non-cancelled annotation of each task maps to a review value: ``decision = drop`` → ``drop``; a chosen
``label`` other than the given one → ``relabel:<label>``; ``decision = keep`` or the given label
chosen → ``keep``; no annotation → no decision.

When ``label-studio-sdk`` is installed (``pip install 'labelsieve[labelstudio]'``), the config and every
pre-annotation are checked with its ``LabelInterface`` (the validator the Label Studio server runs on
import) before anything is written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import quote
from xml.sax.saxutils import quoteattr

import pandas as pd

from labelsieve.audit.decisions import reviews_frame
from labelsieve.audit.handoff.common import export_rows, missing_extra, row_values
from labelsieve.core.errors import DataError, OutputError
from labelsieve.core.io import atomic_open
from labelsieve.core.paths import check_output_dir, check_output_file

__all__ = ["DECISION", "FROM_NAME", "TO_NAME", "build_tasks", "export_paths", "label_config", "read_export",
           "validate_tasks", "write_labelstudio"]

FROM_NAME, TO_NAME, DECISION = "label", "image", "decision"
MODEL_VERSION = "labelsieve"


def label_config(classes: list[str]) -> str:
    """The labeling config: the image, the audit's fields, a ``label`` choice over ``classes`` and a
    keep/drop ``decision``."""
    if not classes:
        raise DataError("Cannot write a Label Studio config: the audit names no classes.")
    choices = "\n".join(f"    <Choice value={quoteattr(c)}/>" for c in classes)
    return (
        "<View>\n"
        f'  <Image name="{TO_NAME}" value="$image"/>\n'
        '  <Header value="$check_sample given: $given_label | suggested: $suggested_label | p_clean: $p_clean | '
        'issue: $issue"/>\n'
        f'  <Choices name="{FROM_NAME}" toName="{TO_NAME}" choice="single" showInLine="true">\n'
        f"{choices}\n  </Choices>\n"
        f'  <Choices name="{DECISION}" toName="{TO_NAME}" choice="single" showInLine="true">\n'
        '    <Choice value="keep"/>\n    <Choice value="drop"/>\n  </Choices>\n'
        "</View>\n"
    )


def _image_url(path: str, image_root: Path, document_root: Path | None, url_prefix: str | None) -> str:
    if url_prefix is not None:
        return url_prefix + quote(path)
    full = Path(path) if Path(path).is_absolute() else image_root / path
    droot = document_root if document_root is not None else image_root
    try:
        rel = full.resolve().relative_to(droot.resolve())
    except ValueError as exc:
        raise DataError(f"{full} is not under the Label Studio document root {droot}. Give --document-root a "
                        "folder that holds the images, or --url-prefix.") from exc
    return "/data/local-files/?d=" + quote(rel.as_posix())


def build_tasks(rows: pd.DataFrame, *, image_root: str | os.PathLike[str],
                document_root: str | os.PathLike[str] | None = None, url_prefix: str | None = None,
                files: Mapping[str, Path] | None = None) -> list[dict]:
    """Label Studio import tasks for the audit ``rows`` (see the module docstring); ``files`` maps a row's path to
    the file that shows its image where that is not ``image_root / path`` (images copied out of containers)."""
    root = Path(image_root)
    droot = Path(document_root) if document_root is not None else None
    v = row_values(rows)
    tasks: list[dict] = []
    for k in range(len(rows)):
        path, sugg = v["path"][k], v["sugg"][k]
        shown = files[path].relative_to(root).as_posix() if files is not None and path in files else path
        data: dict[str, Any] = {"image": _image_url(shown, root, droot, url_prefix), "path": path,
                                "given_label": v["given"][k], "suggested_label": sugg, "p_clean": v["p_clean"][k],
                                "issue": v["issue"][k], "rank": v["rank"][k], "check": v["check"][k],
                                "check_sample": (f"CHECK SAMPLE {v['check'][k]} |" if v["check"][k] else "")}
        if v["review"][k]:
            data["review"] = v["review"][k]
        for key in ("digest", "audit_id"):  # the decision comes back checked against the audit and the picture
            if v[key][k]:
                data[key] = v[key][k]
        task: dict[str, Any] = {"data": data}
        if sugg:
            score = v["s_prob"][k]
            pred: dict[str, Any] = {"model_version": MODEL_VERSION, "result": [{
                "from_name": FROM_NAME, "to_name": TO_NAME, "type": "choices", "value": {"choices": [sugg]}}]}
            if score is not None:
                pred["score"] = min(max(score, 0.0), 1.0)
            task["predictions"] = [pred]
        tasks.append(task)
    return tasks


def _sdk_version() -> str | None:
    """The installed label-studio-sdk version, or None (read from its metadata: importing it takes a second)."""
    try:
        return metadata.version("label-studio-sdk")
    except metadata.PackageNotFoundError:
        return None


def _label_interface() -> Any:
    """``label_studio_sdk``'s LabelInterface class, imported here: it is an optional extra."""
    from label_studio_sdk.label_interface import LabelInterface

    return LabelInterface


def validate_tasks(tasks: list[dict], config: str) -> list[str]:
    """Errors in ``config`` and the tasks' pre-annotations by Label Studio's own validator (empty: valid).

    Raises
    ------
    LabelsieveError
        If ``label-studio-sdk`` is not installed.
    """
    try:
        interface = _label_interface()
    except ImportError as exc:
        raise missing_extra("label-studio-sdk", "labelstudio", exc) from exc
    li = interface(config)
    li.validate()
    needed = [o.value_name for o in li.objects if o.value_is_variable]
    errors: list[str] = []
    for i, t in enumerate(tasks):
        errors += [f"task {i + 1}: data.{k} missing" for k in needed if t.get("data", {}).get(k) in (None, "")]
        for j, p in enumerate(t.get("predictions", [])):
            errors += [f"task {i + 1} prediction {j + 1}: {e}" for e in li.validate_prediction(p, return_errors=True)]
    return errors


def write_labelstudio(table: pd.DataFrame, out_dir: str | os.PathLike[str], *, image_root: str | os.PathLike[str],
                      classes: list[str], all_rows: bool = False, document_root: str | os.PathLike[str] | None = None,
                      files: Mapping[str, Path] | None = None,
                      url_prefix: str | None = None, where: str = "audit") -> dict[str, Any]:
    """Write ``labeling_config.xml`` and ``tasks.json`` into the folder ``out_dir`` (atomically); when ``out_dir``
    names a ``.json`` file, the tasks are written to that file and the config beside it.

    Returns
    -------
    dict
        ``config`` and ``tasks`` (the files), ``n_tasks``, ``n_predictions``, ``validated`` (the
        label-studio-sdk version that checked them, or None when it is not installed) and
        ``document_root`` (the folder Label Studio must serve as local files; None with ``url_prefix``).

    Raises
    ------
    DataError
        Nothing to export, an image outside the document root, or tasks Label Studio would reject.
    OutputError
        ``out_dir`` is an existing file that is not a ``.json`` file, or cannot be written.
    """
    tasks_path, config_path = export_paths(out_dir)
    rows = export_rows(table, all_rows=all_rows, where=where)
    config = label_config(classes)
    tasks = build_tasks(rows, image_root=image_root, document_root=document_root, url_prefix=url_prefix, files=files)
    validated = _sdk_version()
    if validated is not None:
        errors = validate_tasks(tasks, config)
        if errors:
            raise DataError(f"Label Studio would reject {len(errors)} pre-annotation(s): " + "; ".join(errors[:5])
                            + (" …" if len(errors) > 5 else ""))
    with atomic_open(config_path) as f:
        f.write(config)
    with atomic_open(tasks_path) as f:
        json.dump(tasks, f, indent=1, ensure_ascii=False, allow_nan=False)
    served = None if url_prefix is not None else Path(document_root if document_root is not None else image_root)
    return {"config": config_path, "tasks": tasks_path, "n_tasks": len(tasks),
            "n_predictions": sum(1 for t in tasks if t.get("predictions")), "validated": validated,
            "document_root": served}


def export_paths(out: str | os.PathLike[str]) -> tuple[Path, Path]:
    """(tasks file, labeling config file) for ``-o OUT``: a folder gets ``tasks.json`` and ``labeling_config.xml``;
    a path ending in ``.json`` is the tasks file, with ``labeling_config.xml`` beside it. Checked before any work.

    Raises
    ------
    OutputError
        ``out`` is an existing file that is not ``.json``, or the location cannot be written.
    """
    p = Path(out).expanduser()
    if p.suffix.lower() == ".json" and not p.is_dir():
        check_output_file(p, what="the Label Studio tasks file (-o)")
        return p, p.with_name("labeling_config.xml")
    if p.exists() and not p.is_dir():
        raise OutputError(f"Cannot write the Label Studio export at {p}: it is a file. Give a folder (tasks.json and "
                          "labeling_config.xml go into it) or a file name ending in .json for the tasks.")
    check_output_dir(p, what="the Label Studio export folder (-o)")
    return p / "tasks.json", p / "labeling_config.xml"


def read_export(export: str | os.PathLike[str] | list) -> pd.DataFrame:
    """Decisions from a Label Studio JSON export (a list of tasks) as a reviews table.

    Raises
    ------
    DataError
        The file is not a Label Studio JSON export of tasks made by ``labelsieve export``.
    """
    source = "Label Studio export" if isinstance(export, list) else str(export)
    if isinstance(export, list):
        tasks = export
    else:
        p = Path(export)
        if not p.is_file():
            raise DataError(f"Label Studio export not found: {p}. Export the project as JSON in Label Studio.")
        try:
            tasks = json.loads(p.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise DataError(f"{p}: not a JSON file ({exc}). Export the project in Label Studio's JSON format.") from exc
    if not isinstance(tasks, list) or not all(isinstance(t, dict) and isinstance(t.get("data"), dict)
                                              and "path" in t["data"] for t in tasks):
        raise DataError(f"{source}: not a Label Studio JSON export of tasks from 'labelsieve export' (a list of tasks "
                        "whose data has a 'path'). Export the project as JSON (not JSON-MIN or CSV).")
    paths, given, sugg, reviews, digests, audit_ids = [], [], [], [], [], []
    for t in tasks:
        data = t["data"]
        anns = [a for a in t.get("annotations") or [] if isinstance(a, dict) and not a.get("was_cancelled")]
        review = ""
        if anns:
            ann = max(anns, key=lambda a: str(a.get("updated_at") or a.get("created_at") or ""))
            picked = {r.get("from_name"): (r.get("value") or {}).get("choices") or []
                      for r in ann.get("result") or [] if r.get("type") == "choices"}
            decision = (picked.get(DECISION) or [""])[0]
            label = (picked.get(FROM_NAME) or [""])[0]
            if decision == "drop":
                review = "drop"
            elif label and label != data.get("given_label"):
                review = f"relabel:{label}"
            elif decision == "keep" or (label and label == data.get("given_label")):
                review = "keep"
        paths.append(str(data["path"]))
        given.append(str(data.get("given_label", "")))
        sugg.append(str(data.get("suggested_label", "")))
        digests.append(str(data.get("digest", "")))
        audit_ids.append(str(data.get("audit_id", "")))
        reviews.append(review)
    return reviews_frame(paths, reviews, source=source, given=given, suggested=sugg, digests=digests,
                         audit_ids=audit_ids)
