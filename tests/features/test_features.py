"""The feature store: extracted once, keyed by content, resumable after an interruption."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from labelsieve.data import load_images
from labelsieve.features import FeatureStore, extract_features


class Interrupt(Exception):
    pass


@pytest.fixture()
def small(tmp_path, eurosat_small):
    src_root, src_csv = eurosat_small
    lines = src_csv.read_text().splitlines()[1:41]
    root = tmp_path / "imgs"
    root.mkdir()
    for line in lines:
        shutil.copy(src_root / line.split(",")[0], root)
    csv = tmp_path / "l.csv"
    csv.write_text("path,label\n" + "\n".join(lines) + "\n")
    return root, csv


def test_cache_reuse_resume_and_content_keys(small, tmp_path, mini_clip):
    root, csv = small
    images = load_images(root, csv)
    cache = tmp_path / "cache"
    calls = []

    def stop_after_two_chunks(done):
        calls.append(done)
        if done >= 16:
            raise Interrupt

    with pytest.raises(Interrupt):
        extract_features(images, mini_clip, cache_dir=cache, batch_size=8, chunk_images=8, num_workers=0,
                         progress=False, on_batch=stop_after_two_chunks)
    store = FeatureStore(cache, mini_clip.key)
    assert len(store._chunks()) == 2  # two committed chunks of 8 survive the interruption
    resumed = extract_features(images, mini_clip, cache_dir=cache, batch_size=8, chunk_images=8, num_workers=0,
                               progress=False)
    assert resumed.n_extracted == len(images) - 16
    fresh = extract_features(images, mini_clip, cache_dir=tmp_path / "cache2", batch_size=8, num_workers=0,
                             progress=False)
    np.testing.assert_allclose(np.asarray(resumed.vectors, np.float32), np.asarray(fresh.vectors, np.float32),
                               atol=2e-3)
    assert resumed.vectors.dtype == np.float16 and isinstance(resumed.vectors, np.memmap)
    warm = extract_features(images, mini_clip, cache_dir=cache, progress=False)
    assert warm.n_extracted == 0

    # Same bytes under new names and a new CSV order: nothing to extract, same vectors per image.
    root2 = tmp_path / "renamed"
    root2.mkdir()
    rows = csv.read_text().splitlines()[1:][::-1]
    out = []
    for k, line in enumerate(rows):
        p, lab = line.split(",")
        shutil.copy(root / p, root2 / f"r{k}.jpg")
        out.append(f"r{k}.jpg,{lab}")
    (tmp_path / "r.csv").write_text("path,label\n" + "\n".join(out) + "\n")
    images2 = load_images(root2, tmp_path / "r.csv")
    moved = extract_features(images2, mini_clip, cache_dir=cache, progress=False)
    assert moved.n_extracted == 0
    np.testing.assert_array_equal(np.asarray(moved.vectors)[::-1], np.asarray(warm.vectors))

    # Editing one image re-extracts exactly that image.
    (root2 / "r0.jpg").write_bytes((root2 / "r1.jpg").read_bytes())
    edited = extract_features(images2, mini_clip, cache_dir=cache, progress=False)
    assert edited.n_extracted == 0  # its new content equals r1's, already cached
    np.testing.assert_array_equal(np.asarray(edited.vectors)[0], np.asarray(edited.vectors)[1])
    assert edited.digests[0] == edited.digests[1]


def test_unreadable_images_are_reported_not_fatal(small, tmp_path, mini_clip):
    root, csv = small
    images = load_images(root, csv)
    (root / images.paths[3]).write_bytes(b"")
    (root / images.paths[5]).write_bytes((root / images.paths[5]).read_bytes()[:100])
    feats = extract_features(images, mini_clip, cache_dir=tmp_path / "c", num_workers=0, progress=False)
    assert list(np.nonzero(~feats.ok)[0]) == [3, 5]
    assert "empty" in feats.errors[3] and feats.errors[5]
    assert not np.asarray(feats.vectors)[3].any()
    again = extract_features(images, mini_clip, cache_dir=tmp_path / "c", progress=False)
    assert again.n_extracted == 0 and list(np.nonzero(~again.ok)[0]) == [3, 5]
