"""Near-duplicates: altered copies of real images are grouped with their original, distinct images are not,
and a copy with another label ranks at the top of the audit as a label conflict."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from labelsieve.audit.table import build_table, near_duplicate_summary
from labelsieve.core.defaults import DEFAULT_DUPLICATE_THRESHOLD
from labelsieve.data import LabeledImages
from labelsieve.detectors import DetectionResult
from labelsieve.detectors.common import duplicates
from labelsieve.detectors.common.duplicates import connected_groups, near_duplicate_groups
from labelsieve.features import extract_features


def _jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


ALTER = {
    "resized": lambda im: _jpeg(im.resize((im.width // 2, im.height // 2), Image.BICUBIC), 90),
    "jpeg15": lambda im: _jpeg(im, 15),
    "cropped": lambda im: _jpeg(im.crop((16, 14, im.width - 18, im.height - 15)), 90),
}


@pytest.fixture(scope="module")
def with_copies(nette, mini_clip, feature_cache, tmp_path_factory):
    """40 distinct Imagenette images (4 per class) and an altered copy of 3 of them; the cropped copy carries
    another class's label (the same picture with two labels). Returns (images, features, source row per row)."""
    tmp = tmp_path_factory.mktemp("dups")
    pick = np.concatenate([np.nonzero(nette.labels == c)[0][:4] for c in range(nette.n_classes)])
    (tmp / "orig").mkdir()
    (tmp / "copies").mkdir()
    paths = []
    for i in pick:
        paths.append(f"orig/{Path(nette.paths[i]).name}")
        shutil.copy(nette.abspath(int(i)), tmp / paths[-1])
    labels = nette.labels[pick].tolist()
    source = [-1] * len(pick)
    for j, (name, fn) in enumerate(ALTER.items()):
        s = 5 * j + 1
        with Image.open(tmp / paths[s]) as im:
            (tmp / "copies" / f"{name}.jpg").write_bytes(fn(im.convert("RGB")))
        paths.append(f"copies/{name}.jpg")
        labels.append(labels[s] if name != "cropped" else (labels[s] + 1) % nette.n_classes)
        source.append(s)
    images = LabeledImages(root=tmp, paths=paths, labels=np.array(labels), classes=nette.classes,
                           classnames=nette.classnames, source="test")
    feats = extract_features(images, mini_clip, cache_dir=feature_cache, progress=False, num_workers=0)
    x = np.asarray(feats.vectors, dtype=np.float32)
    return images, x / np.linalg.norm(x, axis=1, keepdims=True), np.array(source)


def test_copies_grouped_with_their_original_and_distinct_images_alone(with_copies):
    images, x, source = with_copies
    groups = near_duplicate_groups(images, x, threshold=DEFAULT_DUPLICATE_THRESHOLD, progress=False)
    copies = np.nonzero(source >= 0)[0]
    for c in copies:
        assert groups[c] >= 0 and groups[c] == groups[source[c]], images.paths[c]
    # exactly the three (original, copy) pairs: no distinct image joins a group
    assert (groups >= 0).sum() == 6 and len(np.unique(groups[groups >= 0])) == 3
    # on the features alone a threshold that keeps distinct images apart misses the JPEG-15 copy
    sims = np.einsum("ij,ij->i", x[copies], x[source[copies]])
    assert sims.min() < 0.95


def test_label_conflict_ranks_first_and_is_counted(with_copies):
    images, x, source = with_copies
    groups = near_duplicate_groups(images, x, threshold=DEFAULT_DUPLICATE_THRESHOLD, progress=False)
    n = len(images)
    rng = np.random.default_rng(0)
    p = rng.uniform(0.6, 1.0, size=n)
    p[[2, 3, 4]] = 0.1  # three flagged rows, none of them in a group (the copied rows are 1, 6 and 11)
    probs = np.full((n, images.n_classes), 0.1 / (images.n_classes - 1))
    probs[np.arange(n), images.labels] = 0.9
    result = DetectionResult(p_clean=p, probs=probs, threshold=0.5)
    table = build_table(images, np.ones(n, dtype=bool), result, duplicate_groups=groups)
    cropped = images.paths[-1]
    conflict = {cropped, images.paths[source[-1]]}
    assert set(table["path"][:2]) == conflict  # the same picture with two labels: first
    assert table["duplicate_group"][:2].tolist() == [1, 1]
    assert table["is_noisy"][2:5].all() and not table["is_noisy"][:2].any()
    assert set(table.loc[table["duplicate_group"].notna(), "issue"]) == {"duplicate"}
    assert table["duplicate_group"].notna().sum() == 6 and table["duplicate_group"].max() == 3
    s = near_duplicate_summary(table)
    assert s == {"n_groups": 3, "n_rows": 6, "n_conflicting_groups": 1, "n_rows_conflicting": 2,
                 "n_groups_across_folders": 3}  # copies/ and orig/, as a train/val split would be


def test_connected_groups_joins_chains():
    pairs = np.array([[0, 3], [3, 5], [2, 6]])
    assert connected_groups(8, pairs).tolist() == [0, -1, 1, 0, -1, 0, 1, -1]
    assert connected_groups(3, np.zeros((0, 2), dtype=np.int64)).tolist() == [-1, -1, -1]


def test_large_collections_keep_thumbnails_on_disk_and_find_the_same_groups(with_copies, tmp_path, monkeypatch):
    """Above THUMBS_IN_MEMORY_BYTES the uint8 thumbnails go to a memory map in ``work_dir`` (removed after) and
    pairs are scored a block at a time: the groups are those found in memory."""
    images, x, source = with_copies
    ref = near_duplicate_groups(images, x, threshold=DEFAULT_DUPLICATE_THRESHOLD, progress=False)
    made = []
    real = np.lib.format.open_memmap

    def spy(path, *a, **kw):
        made.append(Path(path))
        return real(path, *a, **kw)

    monkeypatch.setattr(duplicates, "THUMBS_IN_MEMORY_BYTES", 0)
    monkeypatch.setattr(np.lib.format, "open_memmap", spy)
    big = near_duplicate_groups(images, x, threshold=DEFAULT_DUPLICATE_THRESHOLD, progress=False, work_dir=tmp_path)
    assert made and made[0].is_relative_to(tmp_path) and not made[0].exists()
    assert np.array_equal(big, ref)
    thumbs, ok = duplicates.thumbnails(images, np.arange(len(images)), progress=False)
    assert thumbs.dtype == np.uint8 and ok.all()
    pairs = duplicates.candidate_pairs(x, 8)[0]
    assert np.array_equal(duplicates.pair_similarity(thumbs, pairs, block=7), duplicates.pair_similarity(thumbs, pairs))
