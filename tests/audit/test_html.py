"""audit.html: embedded review rows and thumbnails, escaping, confusion matrix, unreadable images, size and speed on
big tables. (The review tool itself runs in a browser: test_review_page.py.)"""

from __future__ import annotations

import base64
import io
import re
import shutil
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from labelsieve.audit import html as report_html
from labelsieve.audit.html import page_data as read_page_data
from labelsieve.audit.html import write_html
from labelsieve.core.errors import DataError, ParameterError

DATA_URI = re.compile(r'"data:image/jpeg;base64,([A-Za-z0-9+/=]+)"')
PAYLOAD = re.compile(r'<script type="application/json" id="ls-data">(.*?)</script>', re.S)
UNREADABLE = "broken/empty.jpg"
BROKEN_SINCE = "broken/emptied-later.jpg"


@pytest.fixture(scope="module")
def image_root(eurosat_small, tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    """A tmp copy of the 200 EuroSAT images plus two zero-byte (unreadable) files."""
    src_root, csv = eurosat_small
    rows = pd.read_csv(csv, dtype=str, keep_default_na=False)
    root = tmp_path_factory.mktemp("eurosat-copy")
    for p in rows["path"]:
        (root / p).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src_root / p, root / p)
    (root / UNREADABLE).parent.mkdir(parents=True, exist_ok=True)
    (root / UNREADABLE).write_bytes(b"")
    (root / BROKEN_SINCE).write_bytes(b"")
    return root, rows


def make_audit(rows: pd.DataFrame, *, seed: int = 0, n_noisy: int = 30, n_outlier: int = 3) -> pd.DataFrame:
    """An audit table over ``rows`` with label flips, outliers and two zero-byte files.

    One zero-byte file is marked ``unreadable`` (as the audit marks files it cannot decode); the other
    is a flagged ``label`` row, as if the file had been emptied after the audit.
    """
    rng = np.random.default_rng(seed)
    classes = sorted(rows["label"].unique())
    n = len(rows)
    given = rows["label"].to_numpy(dtype=object)
    suggested = given.copy()
    p_clean = rng.uniform(0.6, 1.0, n)
    issue = np.full(n, "", dtype=object)
    pick = rng.choice(n, size=n_noisy + n_outlier, replace=False)
    flips, outliers = pick[:n_noisy], pick[n_noisy:]
    for i in flips:
        suggested[i] = classes[(classes.index(given[i]) + 1 + int(rng.integers(0, 2))) % len(classes)]
    p_clean[flips] = rng.uniform(0.01, 0.4, n_noisy)
    issue[flips] = "label"
    p_clean[outliers] = rng.uniform(0.2, 0.45, n_outlier)
    issue[outliers] = "outlier"
    table = pd.DataFrame({
        "path": rows["path"].to_numpy(dtype=object),
        "given_label": given,
        "p_clean": p_clean,
        "is_noisy": p_clean < 0.5,
        "suggested_label": suggested,
        "suggested_prob": rng.uniform(0.5, 1.0, n),
        "issue": issue,
    })
    bad = pd.DataFrame({"path": [UNREADABLE, BROKEN_SINCE], "given_label": [classes[1], classes[2]],
                        "p_clean": [np.nan, 0.001], "is_noisy": [True, True], "suggested_label": [None, classes[3]],
                        "suggested_prob": [np.nan, 0.9], "issue": ["unreadable", "label"]})
    table = pd.concat([table, bad], ignore_index=True)
    # As the audit ranks: unreadable first, then by ascending p_clean.
    table = table.sort_values("p_clean", kind="stable", na_position="first").reset_index(drop=True)
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    table["review"] = ""
    return table


def make_summary(table: pd.DataFrame) -> dict:
    classes = sorted(table["given_label"].unique())
    readable = table[table["issue"] != "unreadable"]
    per_class = readable.groupby("given_label")["is_noisy"].mean().to_dict()
    return {
        "method": "deft", "model": {"name": "mini-clip", "pretrained": "local"}, "n_images": len(table),
        "n_flagged": int(readable["is_noisy"].sum()),
        "n_unreadable": 1, "threshold": 0.5, "noise_rate": 0.1234, "noise_rate_per_class": per_class,
        "classes": classes, "version": "0.1.0", "timings": {"features": 1.5, "detect": 0.25},
    }


class _Cells(HTMLParser):
    """Collects the confusion-matrix cells ``(given, suggested) -> count``."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: dict[tuple[str, str], int] = {}
        self._key: tuple[str, str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "td" and "data-given" in a:
            self._key = (a["data-given"] or "", a["data-suggested"] or "")

    def handle_data(self, data: str) -> None:
        if self._key is not None:
            self.cells[self._key] = int(data)
            self._key = None


def cells_of(text: str) -> dict[tuple[str, str], int]:
    parser = _Cells()
    parser.feed(text)
    return parser.cells


def page_data(text: str) -> dict:
    """The rows and thumbnails the page embeds for its review tool."""
    return read_page_data(text)


def thumbs_of(text: str) -> list[tuple[str, str | None]]:
    """(path, data URI or None for a placeholder) of the rows embedded with a thumbnail, worst first."""
    data = page_data(text)
    return [(data["rows"]["path"][int(j)], uri) for j, uri in sorted(data["thumbs"].items(), key=lambda t: int(t[0]))]


def test_thumbnails_placeholder_and_unreadable_list(image_root, tmp_path):
    root, rows = image_root
    table = make_audit(rows)
    out = write_html(table, make_summary(table), image_root=root, out_path=tmp_path / "audit.html",
                     max_gallery=10, thumb_size=48)
    assert out == tmp_path / "audit.html"
    text = out.read_text(encoding="utf-8")
    thumbs = thumbs_of(text)
    # Worst first, skipping the row marked unreadable (rank 1): ranks 2..11.
    assert [p for p, _ in thumbs] == table["path"].iloc[1:11].tolist()
    assert thumbs[0] == (BROKEN_SINCE, None)  # emptied since the audit: a placeholder
    uris = [u for _, u in thumbs if u is not None]
    assert len(uris) == 9 and len(DATA_URI.findall(text)) == 9
    for uri in uris:
        im = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
        assert im.format == "JPEG" and max(im.size) == 48
    # Every row is embedded for review, worst first, with its fields.
    data = page_data(text)
    assert data["rows"]["path"] == table["path"].tolist() and data["n_rows"] == data["n_embedded"] == len(table)
    assert data["rows"]["flag"] == table["is_noisy"].astype(int).tolist()
    assert [data["classes"][g] for g in data["rows"]["given"]] == table["given_label"].tolist()
    # The file the audit marked unreadable is listed by path, apart.
    assert "<h2>Unreadable files (1)</h2>" in text and f"<li>{UNREADABLE}</li>" in text
    # Nothing but the page is left in the folder (the temp file was renamed).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit.html"]


def test_all_flagged_rows_get_thumbnails_when_fewer_than_max(image_root, tmp_path):
    root, rows = image_root
    table = make_audit(rows)
    n_flagged = int((table["is_noisy"] & (table["issue"] != "unreadable")).sum())
    text = write_html(table, make_summary(table), image_root=root, out_path=tmp_path / "a.html",
                      max_gallery=500).read_text()
    thumbs = thumbs_of(text)
    assert len(thumbs) == n_flagged and sum(u is None for _, u in thumbs) == 1  # the emptied file
    assert f"thumbnails for all {n_flagged:,} flagged images" in text


def test_page_order_does_not_depend_on_table_order(image_root, tmp_path):
    root, rows = image_root
    table = make_audit(rows)
    shuffled = table.sample(frac=1.0, random_state=1)
    text = write_html(shuffled, make_summary(table), image_root=root, out_path=tmp_path / "a.html",
                      max_gallery=5).read_text()
    assert [p for p, _ in thumbs_of(text)] == table["path"].iloc[1:6].tolist()
    assert page_data(text)["rows"]["path"] == table["path"].tolist()


def test_missing_and_undecodable_images_get_placeholders(image_root, tmp_path):
    root, rows = image_root
    table = make_audit(rows)
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "text.jpg").write_text("not an image")
    extra = table.head(2).copy()
    extra["path"] = ["text.jpg", "does/not/exist.jpg"]
    extra["rank"] = [0, 0]
    extra["issue"] = "label"
    table = pd.concat([extra, table], ignore_index=True)
    root2 = tmp_path / "img"
    text = write_html(table, make_summary(table), image_root=root2, out_path=tmp_path / "a.html",
                      max_gallery=3).read_text()
    # Every thumbnail image is missing or broken under root2; none crashes the writer.
    thumbs = thumbs_of(text)
    assert [p for p, _ in thumbs][:2] == ["text.jpg", "does/not/exist.jpg"] and len(thumbs) == 3
    assert all(u is None for _, u in thumbs) and DATA_URI.findall(text) == []


def test_class_names_and_paths_are_escaped(image_root, tmp_path):
    root, rows = image_root
    table = make_audit(rows)
    nasty = 'Forest <b>&"x"'
    table["given_label"] = table["given_label"].replace("Forest", nasty)
    table["suggested_label"] = table["suggested_label"].replace("Forest", nasty)
    table.loc[5, "path"] = "evil/</script><script>alert(1)</script>.jpg"
    summary = make_summary(table)
    summary["model"] = "<script>alert(1)</script>"
    text = write_html(table, summary, image_root=root, out_path=tmp_path / "a.html", max_gallery=300).read_text()
    assert "Forest &lt;b&gt;&amp;&quot;x&quot;" in text
    assert '<b>&"x"' not in text
    assert "<script>alert" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    # The escaped class name is one bar and at least one matrix row/column.
    assert text.count('<div class="name">Forest &lt;b&gt;&amp;&quot;x&quot;</div>') == 1
    assert any(nasty in key for key in cells_of(text))
    # In the embedded rows, the names and the path come back exactly.
    data = page_data(text)
    assert nasty in data["classes"] and "evil/</script><script>alert(1)</script>.jpg" in data["rows"]["path"]


def test_confusion_cells_match_pandas(image_root, tmp_path):
    root, rows = image_root
    table = make_audit(rows)
    text = write_html(table, make_summary(table), image_root=root, out_path=tmp_path / "a.html",
                      max_gallery=0).read_text()
    cells = cells_of(text)
    flagged = table[table["is_noisy"] & (table["issue"] != "unreadable")]
    expected = pd.crosstab(flagged["given_label"], flagged["suggested_label"])
    assert len(expected) >= 5 and expected.to_numpy().sum() == len(flagged)
    for g in expected.index:
        for s in expected.columns:
            assert cells.get((g, s), 0) == int(expected.loc[g, s]), (g, s)
    assert sum(cells.values()) == len(flagged)
    # The unreadable row (no suggestion) is not in the matrix, so there is no "(none)" column.
    assert not any(s == "(none)" for _, s in cells)
    assert DATA_URI.findall(text) == []


def test_confusion_matrix_folds_classes_beyond_the_limit(image_root, tmp_path):
    root, rows = image_root
    table = make_audit(rows)
    text = write_html(table, make_summary(table), image_root=root, out_path=tmp_path / "a.html",
                      max_gallery=0, max_matrix_classes=3).read_text()
    cells = cells_of(text)
    names = {g for g, _ in cells} | {s for _, s in cells}
    assert "(other)" in names and len(names - {"(other)"}) <= 3
    assert sum(cells.values()) == int((table["is_noisy"] & (table["issue"] != "unreadable")).sum())


def test_header_and_noise_bars(image_root, tmp_path):
    root, rows = image_root
    table = make_audit(rows)
    summary = make_summary(table)
    summary.update(noise_rate_interval=[0.1004, 0.2049], decision_rule="p_clean < 0.5 (fixed)",
                   class_counts=rows["label"].value_counts().to_dict(), n_duplicates=0,
                   near_duplicates={"threshold": 0.94, "n_groups": 3, "n_conflicting_groups": 1})
    text = write_html(table, summary, image_root=root, out_path=tmp_path / "a.html", max_gallery=0).read_text()
    assert "method deft · model mini-clip (local)" in text
    assert "20.5%" in text and "Decision rule: p_clean &lt; 0.5 (fixed)" in text
    assert 'title="Forest: ' in text and "20 images" in text
    assert "12.3% (10.0%–20.5%)" in text  # overall noise estimate with its interval
    assert "near-duplicate groups (conflicting labels)" in text and ">3 (1)<" in text
    assert f">{summary['n_flagged']} (" in text
    widths = re.findall(r'<div class="bar" title="([^"]*)"><span style="width:([0-9.]+)%"></span></div>', text)
    assert len(widths) == len(summary["classes"])
    got = {t.split(":")[0]: float(w) for t, w in widths}
    for c, r in summary["noise_rate_per_class"].items():
        assert got[c] == pytest.approx(100 * r, abs=0.01)
    assert "features 1.5 s" in text


def test_without_per_class_estimate_bars_show_flagged_fraction(image_root, tmp_path):
    root, rows = image_root
    table = make_audit(rows)
    summary = {"method": "knn"}
    text = write_html(table, summary, image_root=root, out_path=tmp_path / "a.html", max_gallery=0).read_text()
    frac = table[table["issue"] != "unreadable"].groupby("given_label")["is_noisy"].mean()
    widths = dict(re.findall(r'<div class="name">([^<]*)</div><div class="bar" [^>]*><span style="width:([0-9.]+)%',
                             text))
    assert {k: float(v) for k, v in widths.items()} == pytest.approx({k: 100 * v for k, v in frac.items()}, abs=0.01)


def test_is_noisy_as_text_from_a_spreadsheet(image_root, tmp_path):
    root, rows = image_root
    table = make_audit(rows)
    as_text = table.assign(is_noisy=table["is_noisy"].map({True: "TRUE", False: "FALSE"}))
    text = write_html(as_text, make_summary(table), image_root=root, out_path=tmp_path / "a.html",
                      max_gallery=500).read_text()
    assert page_data(text)["rows"]["flag"] == table["is_noisy"].astype(int).tolist()
    assert len(thumbs_of(text)) == int((table["is_noisy"] & (table["issue"] != "unreadable")).sum())


def test_errors_leave_existing_page_untouched(image_root, tmp_path):
    root, rows = image_root
    table = make_audit(rows)
    out = tmp_path / "audit.html"
    out.write_text("old page")
    with pytest.raises(DataError, match="is_noisy"):
        write_html(table.drop(columns=["is_noisy"]), {}, image_root=root, out_path=out)
    with pytest.raises(ParameterError, match="'max_gallery' parameter of write_html"):
        write_html(table, {}, image_root=root, out_path=out, max_gallery=-1)
    with pytest.raises(ParameterError, match="thumb_size"):
        write_html(table, {}, image_root=root, out_path=out, thumb_size=0)
    assert out.read_text() == "old page"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit.html"]


def test_200k_rows_write_fast_decode_only_the_thumbnails_and_stay_bounded(image_root, tmp_path, monkeypatch):
    root, rows = image_root
    n, k = 200_000, 200
    rng = np.random.default_rng(0)
    classes = sorted(rows["label"].unique())
    given = rng.integers(0, len(classes), n)
    noisy = rng.random(n) < 0.1
    sugg = np.where(noisy, (given + 1 + rng.integers(0, 3, n)) % len(classes), given)
    p_clean = np.where(noisy, rng.uniform(0, 0.5, n), rng.uniform(0.5, 1, n))
    order = np.argsort(p_clean, kind="stable")
    paths = np.array([f"synthetic/{i:07d}.jpg" for i in range(n)], dtype=object)
    # Only the gallery rows (the k lowest p_clean) point at real images.
    paths[order[:k]] = rows["path"].to_numpy(dtype=object)[np.arange(k) % len(rows)]
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(1, n + 1)
    cls = np.array(classes, dtype=object)
    table = pd.DataFrame({"rank": rank, "path": paths, "given_label": cls[given], "p_clean": p_clean,
                          "is_noisy": noisy, "suggested_label": cls[sugg], "suggested_prob": 1 - p_clean,
                          "issue": np.where(noisy, "label", ""), "review": ""})
    summary = {"method": "knn", "model": "mini-clip", "n_images": n, "n_flagged": int(noisy.sum()),
               "threshold": 0.5, "noise_rate": float(noisy.mean()),
               "noise_rate_per_class": {c: 0.1 for c in classes}, "classes": classes}
    decoded: list[Path] = []
    real_thumbnail = report_html._thumbnail

    def counting_thumbnail(path, size):
        decoded.append(Path(path))
        return real_thumbnail(path, size)

    monkeypatch.setattr(report_html, "_thumbnail", counting_thumbnail)
    t0 = time.perf_counter()
    out = write_html(table, summary, image_root=root, out_path=tmp_path / "big.html", max_gallery=k)
    elapsed = time.perf_counter() - t0
    text = out.read_text()
    assert len(decoded) == k
    assert len(DATA_URI.findall(text)) == k
    assert sum(cells_of(text).values()) == int(noisy.sum())
    assert elapsed < 8.0, f"write_html took {elapsed:.1f} s for {n:,} rows"
    # The page holds the first 50,000 rows by rank (every flagged row among them), whatever the audit's size.
    data = page_data(text)
    assert data["n_rows"] == n and data["n_embedded"] == 50_000
    assert data["rows"]["rank"] == sorted(rank)[:50_000] and sum(data["rows"]["flag"]) == int(noisy.sum())
    assert f"holds the 50,000 most suspicious of {n:,} rows" in text
    assert out.stat().st_size < 5_000_000, out.stat().st_size
