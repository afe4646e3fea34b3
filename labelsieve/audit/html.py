"""``audit.html``: one self-contained page to read an audit and review it.

The page has a header (method, model, counts, threshold, noise estimate), the review tool, per-class
noise bars, the given → suggested confusion matrix of the flagged rows (a click on a cell filters the
review to it), the most frequent confusions, the list of unreadable files and the whole summary.

The review tool (``assets/review.js`` and ``review.css``, inlined) shows the audit's rows as cards,
worst first, with filters (class, suggestion, issue, member disagreement for an ensemble, decided or
not, path), sorting and pagination, and takes decisions from the keyboard (``k`` keep, ``d`` drop, ``r``
relabel to the suggestion, ``c`` or a digit relabel to any class, ``u`` clear, arrows to move). Decisions
are kept in the browser's local storage under the audit's identity (input hash + creation time), so
they survive a reload and a second audit never overwrites them (its page offers to import them); the
download button saves them as a reviews CSV (``path, given_label, suggested_label, review, digest, audit_id``:
each decision with the image digest and the audit it was made on) that ``labelsieve apply --reviews`` and
``train --clean --reviews`` read by the spreadsheet's rule. That CSV, and the page's import, use labelsieve's one
dialect (quoted fields, formula and spreadsheet-conversion cells given a leading ``'`` by the same rules as
audit.csv, which the page receives from :mod:`labelsieve.core.spreadsheet`). The page needs no network and no file
beside it.

Its size is bounded for any audit: the rows are embedded as compact JSON for the first ``max_rows``
rows by rank (all flagged rows come first), and thumbnails only for the ``max_gallery`` most
suspicious flagged rows (docs/architecture.md gives the measured sizes). The writer touches the whole
table only with vectorised column operations and decodes only the thumbnails' images (JPEG files at
reduced scale). Rows whose ``issue`` is ``unreadable`` are listed apart (by path) and shown without a
thumbnail; an image that cannot be decoded (changed or removed since the audit) gets a placeholder.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import re
from collections.abc import Callable, Mapping
from html import escape
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, ImageOps

from labelsieve.audit.checksample import REVIEWED_ISSUE, CheckDesign, design_columns
from labelsieve.audit.estimate import TARGET_WIDTH, is_wrong
from labelsieve.audit.schema import flagged_mask
from labelsieve.core.errors import DataError, check_param
from labelsieve.core.io import FORMULA_PREFIXES, atomic_open
from labelsieve.core.spreadsheet import page_rules
from labelsieve.data.decode import UnreadableImage, read_image_bytes, to_rgb

__all__ = ["write_html"]

_OTHER = "(other)"
_NONE = "(none)"
_TOP_CONFUSIONS = 25
_MAX_UNREADABLE_LISTED = 100
_ASSETS = Path(__file__).parent / "assets"
#: Rows embedded in the page by default (the first by rank), and thumbnails (most suspicious flagged rows).
DEFAULT_MAX_ROWS = 50_000
DEFAULT_MAX_THUMBNAILS = 1_000

_CSS = """
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2330;
 background:#f6f7f9}
header{background:#1d2330;color:#fff;padding:18px 28px}
header h1{margin:0 0 4px;font-size:22px}
header .sub{color:#b9c0cc;font-size:13px}
main{padding:8px 28px 40px;max-width:1400px}
section{background:#fff;border:1px solid #e1e4ea;border-radius:8px;padding:14px 18px;margin:16px 0}
h2{font-size:17px;margin:0 0 10px}
.stats{display:flex;flex-wrap:wrap;gap:10px}
.stat{border:1px solid #e1e4ea;border-radius:6px;padding:8px 12px;min-width:130px}
.stat .k{font-size:12px;color:#5b6475}
.stat .v{font-size:18px;font-weight:600}
.note{color:#5b6475;font-size:12px}
.bars{display:grid;grid-template-columns:minmax(120px,max-content) minmax(200px,1fr) 7em;gap:4px 10px;
 align-items:center}
.bars .name{text-align:right;overflow-wrap:anywhere}
.bar{background:#eef0f4;border-radius:3px;height:14px;position:relative;overflow:hidden}
.bar span{display:block;height:100%;background:#d9534f}
.bars .pct{font-variant-numeric:tabular-nums}
.scroll{overflow:auto;max-height:80vh}
table.cm{border-collapse:collapse;font-size:12px}
table.cm th,table.cm td{border:1px solid #e1e4ea;padding:3px 6px;text-align:center;min-width:2.6em}
table.cm th{background:#f6f7f9;font-weight:600;position:sticky;top:0}
table.cm th.row{position:sticky;left:0;text-align:right}
table.cm td.diag{outline:1px dashed #9aa3b2;outline-offset:-3px}
table.cm td.zero{color:#c4c9d2}
table.top{border-collapse:collapse;font-size:13px}
table.top td,table.top th{padding:2px 10px;border-bottom:1px solid #eef0f4;text-align:left}
table.top td.n{text-align:right;font-variant-numeric:tabular-nums}
.tag{display:inline-block;border-radius:3px;padding:0 5px;background:#eef0f4;color:#1d2330;font-size:11px}
details pre{white-space:pre-wrap;font-size:12px;background:#f6f7f9;padding:8px;border-radius:6px}
"""


def _fmt_pct(x: Any) -> str:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return "–"
    return "–" if not math.isfinite(v) else f"{100.0 * v:.1f}%"


def _fmt_num(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, (int, np.integer)):
        return f"{int(x):,}"
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    return "–" if not math.isfinite(v) else f"{v:.{digits}g}"


def _text_col(frame: pd.DataFrame, column: str, empty: str = "") -> pd.Series:
    if column not in frame.columns:
        return pd.Series([empty] * len(frame), index=frame.index, dtype=object)
    s = frame[column].astype(object).where(frame[column].notna(), "").astype(str)
    return s.where(s != "", empty) if empty else s


def _thumbnail(path: Any, size: int) -> str | None:
    """A base64 JPEG data URI of the image at ``path`` (a file, or a container member) fitted in ``size`` pixels,
    or None if unreadable.

    JPEG files are decoded at a reduced scale (``draft``) where that still leaves at least ``size``
    pixels, which makes a thumbnail of a large photo several times faster than a full decode.
    """
    try:
        with Image.open(io.BytesIO(read_image_bytes(path))) as src:
            src.draft("RGB", (size, size))
            src.load()
            im = to_rgb(ImageOps.exif_transpose(src))
        im.thumbnail((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=80, optimize=False)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, UnreadableImage):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _stat(key: str, value: str) -> str:
    return f'<div class="stat"><div class="k">{escape(key)}</div><div class="v">{escape(value)}</div></div>'


def _model_name(model: Any) -> str:
    """Readable model text: audit.json stores a dict (``name``, ``pretrained`` …) or a string."""
    if isinstance(model, Mapping):
        name = str(model.get("name", "–"))
        pre = model.get("pretrained")
        return f"{name} ({pre})" if pre and str(pre) not in name else name
    return "–" if model is None else str(model)


def _header_html(summary: Mapping[str, Any], *, n_rows: int, n_flagged: int, n_unreadable: int) -> str:
    method = str(summary.get("method", "–"))
    model = _model_name(summary.get("model"))
    n_images = summary.get("n_images", n_rows)
    flagged = summary.get("n_flagged", n_flagged)
    try:
        frac = f" ({100.0 * float(flagged) / float(n_images):.1f}%)" if float(n_images) > 0 else ""
    except (TypeError, ValueError):
        frac = ""
    reviewed = summary.get("noise_rate_basis") == "reviewed sample"
    stats = [
        _stat("images", _fmt_num(n_images)),
        _stat("flagged", _fmt_num(flagged) + frac),
        _stat("unreadable", _fmt_num(summary.get("n_unreadable", n_unreadable))),
        (_stat("threshold (p_clean <)", _fmt_num(summary.get("threshold"))) if summary.get("threshold") is not None
         or not summary.get("decision") else _stat("decision", "the detector's own (not a threshold)")),
        _stat("wrong labels, from the reviewed check sample" if reviewed else
              "estimated noise, model alone (mean 1 − p_clean)",
              _fmt_pct(summary.get("noise_rate")) + _fmt_interval(summary.get("noise_rate_interval"))),
    ]
    if "n_duplicates" in summary:
        stats.append(_stat("byte-identical duplicates", _fmt_num(summary.get("n_duplicates"))))
    near = summary.get("near_duplicates")
    if isinstance(near, Mapping) and near.get("threshold") is not None:
        stats.append(_stat("near-duplicate groups (conflicting labels)",
                           f"{_fmt_num(near.get('n_groups', 0))} ({_fmt_num(near.get('n_conflicting_groups', 0))})"))
    stats.append(_stat("classes", _fmt_num(len(summary.get("classes") or []) or None)))
    notes = [f"Warning: {w}" for w in summary.get("warnings") or []]
    if summary.get("decision_rule"):
        notes.append(f"Decision rule: {summary['decision_rule']}")
    timings = summary.get("timings") or {}
    if isinstance(timings, Mapping) and timings:
        notes.append("Timings: " + ", ".join(f"{k} {_fmt_num(v)} s" for k, v in timings.items()))
    note_html = "".join(f'<p class="note">{escape(str(n))}</p>' for n in notes)
    version = summary.get("version")
    sub = f"method {method} · model {model}" + (f" · labelsieve {version}" if version else "")
    head = f'<header><h1>labelsieve audit</h1><div class="sub">{escape(sub)}</div></header>'
    body = (f'<section><h2>Summary</h2>{_competence_html(summary)}<div class="stats">{"".join(stats)}</div>'
            f'{_basis_html(summary)}{note_html}'
            '<p class="note">Review below (decisions stay in this browser; <b>Download reviews CSV</b> saves them, '
            'then run <code>labelsieve apply audit.csv --reviews reviews.csv -o labels.clean.csv</code>), or in '
            'audit.csv: write keep, relabel, relabel:&lt;class&gt; or drop in the <code>review</code> column and run '
            '<code>labelsieve apply audit.csv -o labels.clean.csv</code>.</p></section>')
    return head + "<main>" + body


def _competence_html(summary: Mapping[str, Any]) -> str:
    """How well the model reads this data (audit.json's ``competence``), above the numbers; a warning banner when
    the verdict is weak."""
    comp = summary.get("competence")
    if not isinstance(comp, Mapping):
        return ""
    parts = []
    for key, label in (("reader_agreement", "image features and class names agree on"),
                       ("probe_agreement", "a linear probe agrees with the given labels on"),
                       ("zero_shot_agreement", "zero-shot agrees with the given labels on")):
        if comp.get(key) is not None:
            parts.append(f"{label} {_fmt_pct(comp[key])}")
    if comp.get("separation") is not None:
        parts.append(f"scores of right and wrong labels {_fmt_num(comp['separation'], 2)} standard deviations apart")
    prec = comp.get("expected_precision")
    implied = (f" As the model sees it, {_fmt_pct(prec)} of the flagged rows are wrong labels (expected precision)."
               if prec is not None else "")
    readers = "the image features" + (" and by the class names" if comp.get("zero_shot_agreement") is not None else "")
    if comp.get("confirmed_precision") is not None:
        implied += (f" The pictures confirm {_fmt_pct(comp['confirmed_precision'])} of the flags (read as another "
                    f"class by {readers})" + (", a check as weak as the readings." if comp.get("verdict") == "weak"
                                              else "."))
    measured = "; ".join(parts)
    if comp.get("verdict") == "weak":
        reasons = "; ".join(str(r) for r in comp.get("reasons") or [])
        return ('<div class="banner err" id="ls-competence"><b>The model reads this data weakly</b> '
                f"({escape(reasons)}). Its flags and its estimate of the error rate are unreliable here."
                f"{escape(implied)} Review the check sample below to measure them; a stronger model, better class "
                "names or an image-feature detector may do better. "
                f"<span class=\"sub\">Measured: {escape(measured)}.</span></div>")
    if comp.get("flags_caution"):
        model_view = (f" As the model sees it, {_fmt_pct(prec)} of them are wrong labels." if prec is not None
                      else "")
        return ('<div class="banner err" id="ls-competence"><b>Many flags may be right labels.</b> The pictures '
                f"confirm only {escape(_fmt_pct(comp['confirmed_precision']))} of the flags (read as another class "
                f"by {escape(readers)}), though the model reads this data well."
                f"{escape(model_view)} Its flags and its estimate of the error rate need the check sample below. "
                f"<span class=\"sub\">Measured: {escape(measured)}.</span></div>")
    return (f'<p class="note" id="ls-competence">The model reads this data well: {escape(measured)}.'
            f"{escape(implied)} (model-based; the check sample measures it).</p>")


def _basis_html(summary: Mapping[str, Any]) -> str:
    """What the noise estimate's interval covers, in words (its basis: the model, or the reviewed check sample)."""
    covers = summary.get("noise_rate_interval_covers")
    if summary.get("noise_rate_basis") == "reviewed sample":
        est = summary.get("reviewed_estimate") or {}
        model = summary.get("model_noise_rate")
        flags = ""
        if est.get("precision") is not None:
            flags = (f" Flags of the reviewed audit: precision {_fmt_num(est['precision'], 3)}"
                     f"{_fmt_interval(est.get('precision_interval'), digits=3)}, recall "
                     f"{_fmt_num(est.get('recall'), 3)}{_fmt_interval(est.get('recall_interval'), digits=3)}.")
        return (f'<p class="note">Wrong labels from {_fmt_num(est.get("check_reviewed"))} reviewed check-sample rows '
                f'and {_fmt_num(est.get("exact_rows"))} rows counted exactly: the interval covers '
                f'{escape(str(covers))}. The model alone said {_fmt_pct(model)}.{escape(flags)}</p>')
    if covers:
        return f'<p class="note">The model-based interval covers {escape(str(covers))}.</p>'
    return ""


def _as_rates(values: Any) -> dict[str, float]:
    """A ``class -> rate`` mapping with finite values clipped to [0, 1] (others skipped)."""
    out: dict[str, float] = {}
    if not isinstance(values, Mapping):
        return out
    for name, r in values.items():
        try:
            v = float(r)
        except (TypeError, ValueError):
            continue
        if math.isfinite(v):
            out[str(name)] = min(max(v, 0.0), 1.0)
    return out


def _fmt_interval(iv: Any, *, digits: int | None = None) -> str:
    """`` (11.0–13.6%)`` for a two-number interval (`` (0.912–0.981)`` with ``digits``), else ''."""
    if isinstance(iv, (list, tuple)) and len(iv) == 2 and iv[0] != iv[1]:
        if digits is not None:
            return f" ({_fmt_num(iv[0], digits)}–{_fmt_num(iv[1], digits)})"
        return f" ({_fmt_pct(iv[0])}–{_fmt_pct(iv[1])})"
    return ""


def _intervals(value: Any) -> dict[str, Any]:
    """``{class: [low, high]}`` from the summary, or {}."""
    return {str(k): v for k, v in value.items()} if isinstance(value, Mapping) else {}


def _bars_html(rates: Mapping[str, float], flagged_per_class: Mapping[str, int], *,
               expected: Mapping[str, Any], class_counts: Mapping[str, Any]) -> str:
    title = "<h2>Estimated noise per class</h2>"
    if not rates:
        return f'<section>{title}<p class="note">No per-class estimate.</p></section>'
    items = sorted(rates.items(), key=lambda t: (-t[1], t[0]))
    rows = []
    for name, v in items:
        detail = [f"{100 * v:.1f}% estimated noise", f"{flagged_per_class.get(name, 0):,} flagged"]
        if name in class_counts:
            detail.append(f"{_fmt_num(class_counts[name])} images")
        iv = expected.get(name)
        if isinstance(iv, (list, tuple)) and len(iv) == 2:
            detail.append(f"interval {_fmt_pct(iv[0])}–{_fmt_pct(iv[1])}")
        tip = f"{name}: {', '.join(detail)}"
        rows.append(
            f'<div class="name">{escape(name)}</div>'
            f'<div class="bar" title="{escape(tip)}"><span style="width:{100 * v:.2f}%"></span></div>'
            f'<div class="pct">{100 * v:.1f}%</div>'
        )
    return (f'<section>{title}<p class="note">Estimated share of wrong labels in each class (the mean of '
            '1 − p_clean over its readable images), worst first; hover a bar for counts and the interval.</p>'
            f'<div class="bars">{"".join(rows)}</div></section>')


def _unreadable_html(paths: list[str], total: int) -> str:
    if total == 0:
        return ""
    items = "".join(f"<li>{escape(p)}</li>" for p in paths)
    more = f'<p class="note">… and {total - len(paths):,} more (see audit.csv).</p>' if total > len(paths) else ""
    return (f'<section><h2>Unreadable files ({total:,})</h2><p class="note">These files could not be decoded; '
            f'<code>labelsieve apply</code> drops them.</p><ul>{items}</ul>{more}</section>')


def _confusion(given: pd.Series, suggested: pd.Series) -> pd.Series:
    """Counts of (given, suggested) pairs among the flagged rows, one ``groupby``."""
    if len(given) == 0:
        empty = pd.MultiIndex.from_arrays([[], []], names=["given", "sugg"])
        return pd.Series([], dtype=np.int64, index=empty)
    frame = pd.DataFrame({"given": given.to_numpy(), "sugg": suggested.to_numpy()})
    return frame.groupby(["given", "sugg"], sort=False).size()


def _matrix_html(counts: pd.Series, *, max_classes: int) -> str:
    title = "<h2>Given → suggested label (flagged rows)</h2>"
    if counts.empty:
        return f'<section>{title}<p class="note">No flagged rows.</p></section>'
    by_given = counts.groupby(level=0, sort=False).sum()
    by_sugg = counts.groupby(level=1, sort=False).sum()
    involvement = by_given.add(by_sugg, fill_value=0).sort_values(ascending=False, kind="stable")
    note = ""
    if len(involvement) > max_classes:
        keep = set(involvement.index[:max_classes])
        note = (f'<p class="note">Showing the {max_classes} classes most involved in flagged rows; the other '
                f'{len(involvement) - max_classes} are folded into {escape(_OTHER)}.</p>')
        g = [x if x in keep else _OTHER for x in counts.index.get_level_values(0)]
        s = [x if x in keep else _OTHER for x in counts.index.get_level_values(1)]
        folded = pd.Series(counts.to_numpy(), index=pd.MultiIndex.from_arrays([g, s]))
        counts = folded.groupby(level=[0, 1]).sum()
    mat = counts.unstack(fill_value=0)
    row_order = sorted(mat.index, key=lambda x: (x in (_OTHER, _NONE), x))
    col_order = sorted(mat.columns, key=lambda x: (x in (_OTHER, _NONE), x))
    mat = mat.reindex(index=row_order, columns=col_order, fill_value=0)
    vmax = max(int(mat.to_numpy().max()), 1)
    head = "".join(f"<th>{escape(str(c))}</th>" for c in col_order)
    lines = [f'<tr><th class="row">given ↓ / suggested →</th>{head}</tr>']
    values = mat.to_numpy()
    for i, g in enumerate(row_order):
        cells = []
        for j, s in enumerate(col_order):
            n = int(values[i, j])
            diag = g == s and g not in (_OTHER, _NONE)
            cls = ["diag"] if diag else []
            style = ""
            if n == 0:
                cls.append("zero")
            else:
                a = 0.12 + 0.78 * n / vmax
                rgb = "120,130,150" if diag else "217,83,79"
                style = f' style="background:rgba({rgb},{a:.2f});{"color:#fff" if a > 0.55 else ""}"'
            attrs = (f' class="{" ".join(cls)}"' if cls else "") + style
            cells.append(f'<td data-given="{escape(g)}" data-suggested="{escape(s)}" '
                         f'title="{escape(f"{g} → {s}: {n:,}")}"{attrs}>{n}</td>')
        lines.append(f'<tr><th class="row">{escape(str(g))}</th>{"".join(cells)}</tr>')
    return (f'<section>{title}{note}<p class="note">Rows: given label; columns: suggested label. '
            'Dashed cells are flagged rows whose best label is their own '
            '(low confidence, outliers, duplicates).</p>'
            f'<div class="scroll"><table class="cm">{"".join(lines)}</table></div></section>')


def _top_confusions_html(counts: pd.Series) -> str:
    if counts.empty:
        return ""
    g = counts.index.get_level_values(0)
    s = counts.index.get_level_values(1)
    off = counts[(g != s) & (s != _NONE)]
    if off.empty:
        return ""
    top = off.sort_values(ascending=False, kind="stable").head(_TOP_CONFUSIONS)
    rows = "".join(f"<tr><td>{escape(str(a))}</td><td>→</td><td>{escape(str(b))}</td>"
                   f'<td class="n">{int(n):,}</td></tr>' for (a, b), n in top.items())
    return ('<section><h2>Most frequent confusions</h2><table class="top">'
            f'<tr><th>given</th><th></th><th>suggested</th><th>flagged</th></tr>{rows}</table></section>')


def _round(values: pd.Series, digits: int) -> list[float | None]:
    """Numbers rounded for the page (None for missing or non-numeric)."""
    v = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64).round(digits)
    return [None if not math.isfinite(x) else float(x) for x in v]


def _exact(values: pd.Series) -> list[float | None]:
    """Numbers at full precision (JSON writes the shortest text that reads back as the same float64), None for
    missing or non-numeric: the page's p_clean sorts rows exactly as audit.csv does."""
    v = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
    return [None if not math.isfinite(x) else float(x) for x in v.tolist()]


def _member_bits(rows: pd.DataFrame, members: list[str]) -> list[int | None]:
    """Per row, a bit mask of the ensemble members that flag it (None where no member scored it)."""
    if not members:
        return []
    bits = np.zeros(len(rows), dtype=np.int64)
    known = np.zeros(len(rows), dtype=bool)
    for b, m in enumerate(members):
        col = rows[f"is_noisy_{m}"]
        if pd.api.types.is_bool_dtype(col.dtype):
            on, ok = col.fillna(False).to_numpy(dtype=bool), col.notna().to_numpy()
        else:
            num = pd.to_numeric(col, errors="coerce")
            txt = col.astype(str).str.strip().str.lower()
            on = ((num > 0) | txt.isin(["true", "t", "yes"])).to_numpy(dtype=bool)
            ok = (num.notna() | txt.isin(["true", "t", "yes", "false", "f", "no"])).to_numpy(dtype=bool)
        bits |= np.where(on & ok, 1 << b, 0)
        known |= ok
    return [int(x) if k else None for x, k in zip(bits.tolist(), known.tolist(), strict=True)]


def _identity(table: pd.DataFrame, summary: Mapping[str, Any]) -> dict[str, str]:
    """What the page's local storage is keyed by: the input hash and creation time of the audit (a hash
    of the paths and given labels when the summary has none)."""
    inp = summary.get("input") if isinstance(summary.get("input"), Mapping) else {}
    input_hash = str(inp.get("input_hash") or "")
    created = str(summary.get("created") or "")
    if not input_hash:
        h = hashlib.blake2b(digest_size=12)
        for col in ("path", "given_label"):
            h.update("\x1f".join(_text_col(table, col).tolist()).encode("utf-8"))
        input_hash = "t" + h.hexdigest()
    title = f"{summary.get('method', 'labelsieve')} audit of {len(table):,} images"
    return {"input_hash": input_hash, "created": created, "key": f"{input_hash}:{created}", "title": title,
            "audit_id": str(summary.get("audit_id") or "")}


def _review_data(table: pd.DataFrame, summary: Mapping[str, Any], *, flagged: np.ndarray, to_review: np.ndarray,
                 image_root: Path, max_rows: int, max_thumbs: int, thumb_size: int,
                 locate: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """The rows embedded in the page (compact columns) and the thumbnails of the most suspicious flagged ones."""
    order = _rank_order(table)
    emb = order[:max_rows]
    check = (pd.to_numeric(table["check"], errors="coerce").fillna(0).to_numpy(dtype=np.int64)
             if "check" in table.columns else np.zeros(len(table), dtype=np.int64))
    if len(order) > max_rows:  # every check row is on the page, however far down the ranking it lies
        extra = np.setdiff1d(np.flatnonzero(check > 0), emb)
        emb = np.concatenate([emb, extra[np.argsort(np.argsort(order)[extra], kind="stable")]])
    rows = table.iloc[emb]
    given = _text_col(rows, "given_label")
    sugg = _text_col(rows, "suggested_label")
    known = [str(c) for c in summary.get("classes") or []]
    classes = sorted(set(known) | set(given.unique()) | (set(sugg.unique()) - {""}))
    code = {c: i for i, c in enumerate(classes)}
    issue = _text_col(rows, "issue")
    issues = sorted(set(issue.unique()) | {""})
    members = [c[len("is_noisy_"):] for c in table.columns if c.startswith("is_noisy_")]
    n = len(rows)
    data: dict[str, Any] = {
        "path": _text_col(rows, "path").tolist(),
        "given": given.map(code).astype(int).tolist(),
        "sugg": sugg.map(lambda x: code.get(x, -1)).astype(int).tolist(),
        "p": _exact(rows["p_clean"]) if "p_clean" in rows.columns else [None] * n,  # sorts as the detector ranks
        "sp": _round(rows["suggested_prob"], 3) if "suggested_prob" in rows.columns else [None] * n,
        "issue": issue.map({s: i for i, s in enumerate(issues)}).astype(int).tolist(),
        "rank": (pd.to_numeric(rows["rank"], errors="coerce").fillna(0).astype(np.int64).tolist()
                 if "rank" in rows.columns else list(range(1, n + 1))),
        "flag": flagged[emb].astype(np.int8).tolist(),
        "agree": _round(rows["agreement"], 3) if "agreement" in rows.columns else [None] * n,
        "mflag": _member_bits(rows, members),
        "review": _text_col(rows, "review").tolist(),
        "check": check[emb].tolist(),
    }
    if "digest" in rows.columns:  # each image's content digest goes into the reviews CSV with its decision
        data["digest"] = _text_col(rows, "digest").tolist()
    design = _design_data(table, summary)
    if design is not None:
        data["stratum"] = design.pop("stratum")[emb].tolist()
        data["spos"] = design.pop("spos")[emb].tolist()
    at = {int(t): j for j, t in enumerate(emb)}
    thumbs: dict[str, str | None] = {}
    paths = data["path"]
    readable_check = (check > 0) & ~(_text_col(table, "issue") == "unreadable").to_numpy()
    gallery = _pick_gallery(table, to_review, max_thumbs)
    if max_thumbs > 0:  # the check sample's rows are reviewed first: each gets its thumbnail, flagged or not
        gallery = np.concatenate([np.flatnonzero(readable_check), np.setdiff1d(gallery, np.flatnonzero(check > 0))])
    for t in gallery:
        j = at.get(int(t))
        if j is not None:
            where = locate(paths[j]) if locate is not None else image_root / paths[j]
            thumbs[str(j)] = _thumbnail(where, thumb_size) if paths[j] and where is not None else None
    return {"version": 1, "id": _identity(table, summary), "n_rows": len(table), "n_embedded": n, "classes": classes,
            "issues": issues, "members": members, "rows": data, "thumbs": thumbs, "download_name": "reviews.csv",
            "design": design, "csv": page_rules(FORMULA_PREFIXES)}


def _design_data(table: pd.DataFrame, summary: Mapping[str, Any]) -> dict[str, Any] | None:
    """What the page's live estimate needs (labelsieve.audit.estimate, ported to review.js): the check sample's
    bands, each row's band and position in it (``stratum``, ``spos``: popped by the caller for the embedded rows),
    the rows decided before this audit (counted exactly) and the model's own estimate to compare with."""
    raw = summary.get("check_sample")
    if not isinstance(raw, Mapping) or not raw.get("strata") or not {"rank", "p_clean"} <= set(table.columns):
        return None
    design = CheckDesign.from_dict(dict(raw))
    cols = design_columns(table.assign(p_clean=pd.to_numeric(table["p_clean"], errors="coerce"),
                                       issue=_text_col(table, "issue")), design)
    known = (_text_col(table, "issue") == REVIEWED_ISSUE).to_numpy()
    wrong = np.array([is_wrong(r, g) for r, g in zip(_text_col(table, "review")[known],
                                                       _text_col(table, "given_label")[known], strict=True)])
    return {"strata": [{"flagged": st.flagged, "rows": st.rows, "sampled": st.sampled} for st in design.strata],
            "size": design.size, "known_rows": int(np.isfinite(wrong).sum()), "known_wrong": int(np.nansum(wrong)),
            "reviewed": ({k: summary["reviewed_estimate"].get(k) for k in ("rate", "interval", "check_reviewed")}
                         if summary.get("noise_rate_basis") == "reviewed sample" else None),
            "model_rate": summary.get("model_noise_rate", summary.get("noise_rate")),
            "model_interval": summary.get("model_noise_rate_interval", summary.get("noise_rate_interval")),
            "target_width": TARGET_WIDTH,
            "stratum": cols["stratum"].fillna(-1).to_numpy(dtype=np.int64),
            "spos": cols["stratum_pos"].fillna(0).to_numpy(dtype=np.int64)}


def _asset(name: str) -> str:
    return (_ASSETS / name).read_text(encoding="utf-8")


def _review_html(data: dict[str, Any], *, n_flagged: int, thumb_size: int) -> str:
    """The review section: controls, grid, overlays, the embedded rows and the inlined script."""
    n_rows, n_emb, n_thumbs = data["n_rows"], data["n_embedded"], len(data["thumbs"])
    scope = (f"All {n_rows:,} rows are on this page" if n_emb == n_rows else
             f"This page holds the {n_emb:,} most suspicious of {n_rows:,} rows (review the rest in audit.csv)")
    scope += (f"; thumbnails for the {n_thumbs:,} most suspicious of {n_flagged:,} flagged images"
              if n_thumbs < n_flagged else f"; thumbnails for all {n_flagged:,} flagged images") + "."
    opts = lambda pairs, sel: "".join(f'<option value="{v}"{" selected" if v == sel else ""}>{t}</option>'  # noqa: E731
                                      for v, t in pairs)
    show = opts([("todo", "flagged, not yet decided"), ("flagged", "flagged"), ("check", "check sample"),
                 ("decided", "decided"), ("undecided", "not decided"), ("all", "all rows")],
                "flagged" if n_flagged else "all")
    design = data.get("design")
    check_panel = ""
    if design:
        k = int(design["size"])
        check_panel = (
            '<div class="check" id="ls-check"><h3>Check this audit: review these ' + f"{k:,}" + ' rows</h3>'
            '<div class="sub">A random sample of the whole audit (flagged or not), drawn so that its review measures '
            'the share of wrong labels and the precision of the flags whatever the model: decide each row as any '
            'other (keep: label right; relabel: label wrong; drop: label wrong or image unusable).</div>'
            '<div class="est" id="ls-check-est"></div><div class="sub" id="ls-check-sub"></div>'
            '<button class="primary" id="ls-check-go">Review the check sample</button></div>')
    sort = opts([("rank", "rank (worst first)"), ("p_asc", "p_clean, lowest first"),
                 ("p_desc", "p_clean, highest first"), ("sp_desc", "suggestion probability"),
                 ("agree_desc", "member agreement"), ("given", "given label"), ("check", "check-sample order")],
                "rank")
    size = opts([("24", "24 per page"), ("48", "48 per page"), ("96", "96 per page"), ("192", "192 per page")], "48")
    payload = json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False).replace("<", "\\u003c")
    keys = [("k", "keep the given label"), ("d", "drop the image"), ("r", "relabel to the suggestion"),
            ("c", "relabel to a class you choose (type to filter, Enter)"),
            ("1 … 9, 0", "relabel to that class (10 classes or fewer; see the legend)"),
            ("u / Backspace", "clear the decision"), ("→ ←", "next / previous row"), ("↓ ↑", "row below / above"),
            ("n / p", "next / previous page"), ("?", "this help"), ("Esc", "close")]
    key_rows = "".join(f"<tr><td><kbd>{escape(k)}</kbd></td><td>{escape(v)}</td></tr>" for k, v in keys)
    return (
        '<section id="review"><h2>Review</h2>'
        f'<p class="note">{escape(scope)} Decisions are kept in this browser (per audit) and saved with '
        '<b>Download reviews CSV</b>. Press <kbd>?</kbd> for the keys.'
        + (' On a card, ✗ marks an ensemble member that flags the row and ✓ one that accepts its label.'
           if data["members"] else "") + '</p>'
        + check_panel +
        '<div class="progress"><span class="txt" id="ls-progress-text"></span><div class="track">'
        '<span id="ls-progress-bar"></span></div><span class="sub" id="ls-progress-sub"></span></div>'
        '<div id="ls-banners"></div>'
        '<div class="bar-row">'
        f'<label>Show<select id="f-show">{show}</select></label>'
        '<label>Given label<select id="f-given"></select></label>'
        '<label>Suggested label<select id="f-sugg"></select></label>'
        '<label>Issue<select id="f-issue"></select></label>'
        '<label id="f-members-wrap">Ensemble members<select id="f-members"></select></label>'
        '<label>Path contains<input type="search" id="f-search" placeholder="text"></label>'
        f'<label>Sort by<select id="f-sort">{sort}</select></label></div>'
        '<div class="bar-row"><button class="primary" id="ls-download">Download reviews CSV</button>'
        '<label>Import a reviews CSV<input type="file" id="ls-import-file" accept=".csv,text/csv"></label>'
        '<button id="ls-help-btn">Keys (?)</button><span class="legend" id="ls-legend"></span></div>'
        '<div class="pager"><button id="pg-prev">← previous page</button><button id="pg-next">next page →</button>'
        f'<span class="where" id="pg-where"></span><select id="f-size" title="cards per page">{size}</select></div>'
        f'<div class="rgrid" id="ls-grid" style="--card:{thumb_size + 94}px;--thumb:{thumb_size}px"></div>'
        '<noscript><p class="note">The review tool needs JavaScript; the rest of this page does not.</p></noscript>'
        '<div class="overlay" id="ls-help"><div class="box"><h3>Keys</h3>'
        f'<table class="keys">{key_rows}</table><p class="note">After a decision the next row gets the focus. '
        'Click a card to focus it; the buttons on a card do the same as the keys.</p></div></div>'
        '<div class="overlay" id="ls-pick"><div class="box"><h3>Relabel to</h3>'
        '<input type="search" id="pick-q" placeholder="type to filter classes" autocomplete="off">'
        '<ul class="picklist" id="pick-list"></ul></div></div><div class="toast" id="ls-toast"></div>'
        f'<script type="application/json" id="ls-data">{payload}</script>'
        f"<script>{_asset('review.js')}</script></section>"
    )


def _rank_order(table: pd.DataFrame) -> np.ndarray:
    """Positions of all rows, worst first (by rank, else p_clean; ties in table order)."""
    key_col = "rank" if "rank" in table.columns else ("p_clean" if "p_clean" in table.columns else None)
    if key_col is None:
        return np.arange(len(table))
    key = pd.to_numeric(table[key_col], errors="coerce").to_numpy(dtype=np.float64)
    key = np.where(np.isnan(key), -np.inf if key_col == "p_clean" else np.inf, key)
    return np.argsort(key, kind="stable")


def _pick_gallery(table: pd.DataFrame, flagged: np.ndarray, k: int) -> np.ndarray:
    """Positions of the ``k`` most suspicious flagged rows, worst first (by rank, else p_clean)."""
    pos = np.flatnonzero(flagged)
    if k <= 0 or len(pos) == 0:
        return pos[:0]
    key_col = "rank" if "rank" in table.columns else ("p_clean" if "p_clean" in table.columns else None)
    if key_col is None:
        return pos[:k]
    key = pd.to_numeric(table[key_col].iloc[pos], errors="coerce").to_numpy(dtype=np.float64)
    key = np.where(np.isnan(key), np.inf, key)
    if len(pos) > k:
        part = np.argpartition(key, k - 1)[:k]
        pos, key = pos[part], key[part]
    order = np.lexsort((pos, key))
    return pos[order]


_PAYLOAD = re.compile(r'<script type="application/json" id="ls-data">(.*?)</script>', re.S)


def page_data(html: str) -> dict[str, Any]:
    """The rows, thumbnails and check-sample design a page embeds for its review tool (the inverse of what
    :func:`write_html` writes; its ``rows["p"]`` is p_clean at full precision). Tests and benchmarks read pages
    back with it."""
    (payload,) = _PAYLOAD.findall(html)
    return json.loads(payload)


def write_html(
    table: pd.DataFrame,
    summary: dict,
    *,
    image_root: Path,
    out_path: Path,
    max_gallery: int = DEFAULT_MAX_THUMBNAILS,
    thumb_size: int = 96,
    max_matrix_classes: int = 30,
    max_rows: int = DEFAULT_MAX_ROWS,
    locate: Callable[[str], Any] | None = None,
) -> Path:
    """Write ``audit.html``, the audit's report and review tool (see the module docstring).

    Parameters
    ----------
    table : DataFrame of shape (n, ≥4)
        The audit table: ``path``, ``given_label``, ``is_noisy`` and usually ``rank``, ``p_clean``,
        ``suggested_label``, ``suggested_prob``, ``issue``, ``review`` and, for an ensemble,
        ``agreement`` and ``is_noisy_<member>`` (missing optional columns are shown as blanks). Row
        order does not matter: the page orders by ``rank`` (else ``p_clean``).
    summary : dict
        The audit summary (``audit.json``): ``method``, ``model``, ``n_images``, ``n_flagged``,
        ``n_unreadable``, ``threshold``, ``noise_rate``, ``noise_rate_per_class``, ``classes``,
        ``version``, ``timings``, ``input.input_hash`` and ``created`` (the review's storage key);
        missing keys are shown as "–" or computed from ``table``. The whole summary is also embedded,
        as JSON, in a collapsed section.
    image_root : Path
        Folder the ``path`` values are relative to (thumbnails are read from there).
    out_path : Path
        Where to write the page (atomically; the folder is created if missing).
    max_gallery : int, default 1000
        Number of most suspicious flagged rows embedded with a thumbnail (0 for none: no thumbnail at all);
        the rows of the check sample get theirs on top of these. Only these images are decoded. Rows marked
        ``unreadable`` get none.
    thumb_size : int, default 96
        Longest side of a thumbnail, in pixels.
    max_matrix_classes : int, default 30
        The confusion matrix shows at most this many classes (those most involved in flagged rows);
        the others are folded into one ``(other)`` row and column.
    max_rows : int, default 50000
        Rows embedded for review: the first ``max_rows`` by rank (flagged rows come first). The page
        says how many of the audit's rows it holds.
    locate : callable, optional
        A row's ``path`` -> where its image is (None: nowhere), for images that are not files under
        ``image_root`` (a container member, :meth:`labelsieve.data.LabeledImages.locate`).

    Returns
    -------
    Path
        ``out_path``.

    Raises
    ------
    DataError
        If ``table`` lacks ``path``, ``given_label`` or ``is_noisy``.
    ParameterError
        If ``max_gallery``, ``thumb_size``, ``max_matrix_classes`` or ``max_rows`` is out of range.

    Notes
    -----
    A thumbnail image that is missing or cannot be decoded gets a placeholder; it never stops the
    writer. The confusion matrix and bars count flagged rows that are readable.
    """
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    check_param("write_html", "max_gallery", max_gallery, is_int(max_gallery) and max_gallery >= 0, "an int >= 0")
    check_param("write_html", "thumb_size", thumb_size, is_int(thumb_size) and 16 <= thumb_size <= 1024,
                "an int between 16 and 1024")
    check_param("write_html", "max_matrix_classes", max_matrix_classes,
                is_int(max_matrix_classes) and max_matrix_classes >= 1, "an int >= 1")
    check_param("write_html", "max_rows", max_rows, is_int(max_rows) and max_rows >= 1, "an int >= 1")
    missing = [c for c in ("path", "given_label", "is_noisy") if c not in table.columns]
    if missing:
        raise DataError(f"Cannot write the HTML report: the audit table has no column "
                        f"{', '.join(repr(m) for m in missing)}.")
    image_root = Path(image_root)
    out_path = Path(out_path)

    flagged = flagged_mask(table)
    unreadable = np.zeros(len(table), dtype=bool)
    if "issue" in table.columns:
        unreadable = (table["issue"] == "unreadable").to_numpy(dtype=bool, na_value=False)
    # Unreadable rows are listed on their own: they have no suggestion, and the audit ranks them first,
    # so among the thumbnails they would crowd out the rows a person can actually judge.
    to_review = flagged & ~unreadable
    n_flagged = int(to_review.sum())
    fl = table.loc[to_review, [c for c in ("given_label", "suggested_label") if c in table.columns]]
    given_f = _text_col(fl, "given_label", _NONE)
    sugg_f = _text_col(fl, "suggested_label", _NONE)
    counts = _confusion(given_f, sugg_f)
    flagged_per_class = {str(k): int(v) for k, v in given_f.value_counts(sort=False).items()}

    rates = _as_rates(summary.get("noise_rate_per_class"))
    if not rates:
        # No estimate in the summary: show the share of readable rows flagged per class.
        totals = table.loc[~unreadable, "given_label"].astype(object).value_counts(sort=False)
        rates = {str(c): flagged_per_class.get(str(c), 0) / int(n) for c, n in totals.items() if int(n) > 0}
    class_counts = summary.get("class_counts")

    data = _review_data(table, summary, flagged=flagged, to_review=to_review, image_root=image_root, locate=locate,
                        max_rows=max_rows, max_thumbs=max_gallery, thumb_size=thumb_size)
    bad_pos = np.flatnonzero(unreadable)
    bad_paths = _text_col(table.iloc[bad_pos[:_MAX_UNREADABLE_LISTED]], "path").tolist()
    summary_json = json.dumps(summary, indent=2, sort_keys=True, default=str)
    title = f"labelsieve audit — {summary.get('method', '')} — {n_flagged:,} flagged"
    doc = "".join([
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(title)}</title><style>{_CSS}{_asset('review.css')}</style></head><body>",
        _header_html(summary, n_rows=len(table), n_flagged=n_flagged, n_unreadable=len(bad_pos)),
        _review_html(data, n_flagged=n_flagged, thumb_size=thumb_size),
        _bars_html(rates, flagged_per_class, expected=_intervals(summary.get("noise_rate_per_class_interval")),
                   class_counts=class_counts if isinstance(class_counts, Mapping) else {}),
        _matrix_html(counts, max_classes=max_matrix_classes),
        _top_confusions_html(counts),
        _unreadable_html(bad_paths, len(bad_pos)),
        '<section><details><summary>Full summary (audit.json)</summary>',
        f"<pre>{escape(summary_json)}</pre></details></section>",
        "</main></body></html>\n",
    ])
    with atomic_open(out_path, newline=None) as f:
        f.write(doc)
    return out_path
