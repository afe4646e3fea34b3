"""``audit.html``: one static, self-contained page for a person reviewing an audit.

The page has a header (method, model, counts, threshold, noise estimate), per-class noise bars, the
given → suggested confusion matrix of the flagged rows, the most frequent confusions, a gallery of
the most suspicious flagged images as embedded JPEG thumbnails, and the list of unreadable files.
It needs no network, no JavaScript and no files beside it.

The writer is built for very large audits: it touches the whole table only with vectorised column
operations (the flagged mask, one ``groupby`` over the flagged rows, a partial sort to pick the
gallery), and decodes only the gallery's images. Rows whose ``issue`` is ``unreadable`` are listed
apart (by path) rather than in the matrix and gallery; a gallery image that cannot be decoded (changed
or removed since the audit) gets a placeholder.
"""

from __future__ import annotations

import base64
import io
import json
import math
from collections.abc import Mapping
from html import escape
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from labelsieve.audit.schema import flagged_mask
from labelsieve.core.errors import DataError, check_param
from labelsieve.core.io import atomic_open
from labelsieve.data import UnreadableImage, load_image

__all__ = ["write_html"]

_OTHER = "(other)"
_NONE = "(none)"
_TOP_CONFUSIONS = 25
_MAX_UNREADABLE_LISTED = 100

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
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(var(--card),1fr));gap:10px}
.card{border:1px solid #e1e4ea;border-radius:6px;padding:6px;font-size:12px;overflow-wrap:anywhere}
.card img,.card .ph{display:block;margin:0 auto 4px;max-width:100%}
.card .ph{width:var(--thumb);height:var(--thumb);
 background:repeating-linear-gradient(45deg,#f3d6d5,#f3d6d5 6px,#fbeeee 6px,#fbeeee 12px);
 color:#a12622;display:flex;align-items:center;justify-content:center;font-weight:600}
.card .path{color:#5b6475}
.card .lab{font-weight:600}
.card .given{color:#a12622}
.card .sugg{color:#1f7a3a}
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


def _thumbnail(path: Path, size: int) -> str | None:
    """A base64 JPEG data URI of the image at ``path`` fitted in ``size`` pixels, or None if unreadable."""
    try:
        im = load_image(path)
        im.thumbnail((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=82, optimize=False)
    except (UnreadableImage, OSError, ValueError, Image.DecompressionBombError):
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
    stats = [
        _stat("images", _fmt_num(n_images)),
        _stat("flagged", _fmt_num(flagged) + frac),
        _stat("unreadable", _fmt_num(summary.get("n_unreadable", n_unreadable))),
        _stat("threshold (p_clean <)", _fmt_num(summary.get("threshold"))),
        _stat("estimated noise rate", _fmt_pct(summary.get("noise_rate"))),
    ]
    if "noise_rate_expected" in summary:
        stats.append(_stat("expected noise (mean 1 − p_clean)", _fmt_pct(summary.get("noise_rate_expected"))))
    if "n_duplicates" in summary:
        stats.append(_stat("duplicates", _fmt_num(summary.get("n_duplicates"))))
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
    body = (f'<section><h2>Summary</h2><div class="stats">{"".join(stats)}</div>{note_html}'
            '<p class="note">Review in audit.csv: write keep, relabel, relabel:&lt;class&gt; or drop in '
            'the <code>review</code> column, then run '
            '<code>labelsieve apply audit.csv -o labels.clean.csv</code>.</p></section>')
    return head + "<main>" + body


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


def _bars_html(rates: Mapping[str, float], flagged_per_class: Mapping[str, int], *,
               expected: Mapping[str, float], class_counts: Mapping[str, Any]) -> str:
    title = "<h2>Estimated noise per class</h2>"
    if not rates:
        return f'<section>{title}<p class="note">No per-class estimate.</p></section>'
    items = sorted(rates.items(), key=lambda t: (-t[1], t[0]))
    rows = []
    for name, v in items:
        detail = [f"{100 * v:.1f}% estimated noise", f"{flagged_per_class.get(name, 0):,} flagged"]
        if name in class_counts:
            detail.append(f"{_fmt_num(class_counts[name])} images")
        if name in expected:
            detail.append(f"expected {100 * expected[name]:.1f}%")
        tip = f"{name}: {', '.join(detail)}"
        rows.append(
            f'<div class="name">{escape(name)}</div>'
            f'<div class="bar" title="{escape(tip)}"><span style="width:{100 * v:.2f}%"></span></div>'
            f'<div class="pct">{100 * v:.1f}%</div>'
        )
    return (f'<section>{title}<p class="note">Share of each class\'s readable images that are flagged, worst '
            'first; hover a bar for counts.</p>'
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


def _gallery_html(rows: pd.DataFrame, *, image_root: Path, thumb_size: int, n_flagged: int) -> str:
    title = "<h2>Most suspicious flagged images</h2>"
    if rows.empty:
        return f'<section>{title}<p class="note">No flagged rows.</p></section>'
    paths = _text_col(rows, "path").tolist()
    given = _text_col(rows, "given_label").tolist()
    sugg = _text_col(rows, "suggested_label", _NONE).tolist()
    issue = _text_col(rows, "issue").tolist()
    p_clean = rows["p_clean"].tolist() if "p_clean" in rows.columns else [None] * len(rows)
    s_prob = rows["suggested_prob"].tolist() if "suggested_prob" in rows.columns else [None] * len(rows)
    rank = rows["rank"].tolist() if "rank" in rows.columns else list(range(1, len(rows) + 1))
    cards = []
    for k in range(len(rows)):
        uri = _thumbnail(image_root / paths[k], thumb_size) if paths[k] else None
        if uri is None:
            img = '<div class="ph">unreadable</div>'
        else:
            img = f'<img src="{uri}" alt="{escape(paths[k])}" loading="lazy">'
        tag = f' <span class="tag">{escape(issue[k])}</span>' if issue[k] else ""
        sp = f" ({_fmt_num(s_prob[k])})" if s_prob[k] is not None and not pd.isna(s_prob[k]) else ""
        cards.append(
            f'<div class="card" title="{escape(paths[k])}">{img}'
            f'<div>#{escape(_fmt_num(rank[k]))} · p_clean {escape(_fmt_num(p_clean[k]))}{tag}</div>'
            f'<div class="lab"><span class="given">{escape(given[k])}</span> → '
            f'<span class="sugg">{escape(sugg[k])}</span>{escape(sp)}</div>'
            f'<div class="path">{escape(paths[k])}</div></div>'
        )
    shown = (f'<p class="note">The {len(rows):,} most suspicious of {n_flagged:,} flagged images, '
             'worst first. Red: given label; green: suggested label.</p>')
    style = f' style="--card:{thumb_size + 60}px;--thumb:{thumb_size}px"'
    return f'<section>{title}{shown}<div class="gallery"{style}>{"".join(cards)}</div></section>'


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


def write_html(
    table: pd.DataFrame,
    summary: dict,
    *,
    image_root: Path,
    out_path: Path,
    max_gallery: int = 200,
    thumb_size: int = 96,
    max_matrix_classes: int = 30,
) -> Path:
    """Write the static review page ``audit.html`` for an audit.

    Parameters
    ----------
    table : DataFrame of shape (n, ≥4)
        The audit table: ``path``, ``given_label``, ``is_noisy`` and usually ``rank``, ``p_clean``,
        ``suggested_label``, ``suggested_prob``, ``issue`` (missing optional columns are shown as
        blanks). Row order does not matter: the gallery is ordered by ``rank`` (else ``p_clean``).
    summary : dict
        The audit summary (``audit.json``): ``method``, ``model``, ``n_images``, ``n_flagged``,
        ``n_unreadable``, ``threshold``, ``noise_rate``, ``noise_rate_per_class``, ``classes``,
        ``version``, ``timings``; missing keys are shown as "–" or computed from ``table``. The whole
        summary is also embedded, as JSON, in a collapsed section.
    image_root : Path
        Folder the ``path`` values are relative to (thumbnails are read from there).
    out_path : Path
        Where to write the page (atomically; the folder is created if missing).
    max_gallery : int, default 200
        Number of most suspicious flagged images shown as thumbnails (0 for none); rows marked
        ``unreadable`` are listed separately, not shown here. Only these images are decoded.
    thumb_size : int, default 96
        Longest side of a thumbnail, in pixels.
    max_matrix_classes : int, default 30
        The confusion matrix shows at most this many classes (those most involved in flagged rows);
        the others are folded into one ``(other)`` row and column.

    Returns
    -------
    Path
        ``out_path``.

    Raises
    ------
    DataError
        If ``table`` lacks ``path``, ``given_label`` or ``is_noisy``.
    ParameterError
        If ``max_gallery``, ``thumb_size`` or ``max_matrix_classes`` is out of range.

    Notes
    -----
    A gallery image that is missing or cannot be decoded gets a placeholder instead of a thumbnail;
    it never stops the writer. The confusion matrix and bars count flagged rows that are readable.
    """
    check_param("write_html", "max_gallery", max_gallery,
                isinstance(max_gallery, int) and not isinstance(max_gallery, bool) and max_gallery >= 0,
                "an int >= 0")
    check_param("write_html", "thumb_size", thumb_size,
                isinstance(thumb_size, int) and not isinstance(thumb_size, bool) and 16 <= thumb_size <= 1024,
                "an int between 16 and 1024")
    check_param("write_html", "max_matrix_classes", max_matrix_classes,
                isinstance(max_matrix_classes, int) and not isinstance(max_matrix_classes, bool)
                and max_matrix_classes >= 1, "an int >= 1")
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
    # so in the gallery they would crowd out the rows a person can actually judge.
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

    gallery = table.iloc[_pick_gallery(table, to_review, max_gallery)]
    bad_pos = np.flatnonzero(unreadable)
    bad_paths = _text_col(table.iloc[bad_pos[:_MAX_UNREADABLE_LISTED]], "path").tolist()
    summary_json = json.dumps(summary, indent=2, sort_keys=True, default=str)
    title = f"labelsieve audit — {summary.get('method', '')} — {n_flagged:,} flagged"
    doc = "".join([
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(title)}</title><style>{_CSS}</style></head><body>",
        _header_html(summary, n_rows=len(table), n_flagged=n_flagged, n_unreadable=len(bad_pos)),
        _bars_html(rates, flagged_per_class, expected=_as_rates(summary.get("noise_rate_expected_per_class")),
                   class_counts=class_counts if isinstance(class_counts, Mapping) else {}),
        _matrix_html(counts, max_classes=max_matrix_classes),
        _top_confusions_html(counts),
        _gallery_html(gallery, image_root=image_root, thumb_size=thumb_size, n_flagged=n_flagged),
        _unreadable_html(bad_paths, len(bad_pos)),
        '<section><details><summary>Full summary (audit.json)</summary>',
        f"<pre>{escape(summary_json)}</pre></details></section>",
        "</main></body></html>\n",
    ])
    with atomic_open(out_path, newline=None) as f:
        f.write(doc)
    return out_path
