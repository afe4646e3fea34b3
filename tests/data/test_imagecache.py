"""The decoded-image cache and the tensor transforms, on real Imagenette images (small and few)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from labelsieve.core.errors import DataError, ParameterError
from labelsieve.core.runtime import seed_everything
from labelsieve.data import imagecache, load_image
from labelsieve.data.imagecache import CachedImageDataset, CachedTwoViewDataset, DecodedImageCache
from labelsieve.data.transforms import eval_transform, strong_transform, train_transform

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


class Interrupted(Exception):
    pass


def test_cache_matches_direct_decoding(nette, cache40):
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    assert cache40.array.shape == (400, 40, 40, 3) and cache40.array.dtype == np.uint8
    assert cache40.ok.all() and cache40.n_decoded == 400

    def reference(i: int, size: int) -> np.ndarray:  # full decode, torchvision's Resize + CenterCrop
        im = load_image(nette.abspath(i))
        return np.asarray(TF.center_crop(TF.resize(im, size, interpolation=InterpolationMode.BICUBIC), [size, size]))

    for i in (0, 57, 399):
        # 224 px JPEGs at 40 px are decoded at half DCT scale (112 >= 2 * 40): off by < 1 level on average.
        diff = np.abs(cache40.array[i].astype(int) - reference(i, 40).astype(int))
        assert diff.mean() < 1.0 and diff.max() <= 16
        assert torch.equal(cache40[i], torch.from_numpy(np.array(cache40.array[i])).permute(2, 0, 1))
        # At 64 px no reduced decoding applies (112 < 128): identical pixels.
        assert np.array_equal(imagecache.decode_resized(nette.abspath(i), 64), reference(i, 64))
    # "resize" mode squeezes the whole image instead of cropping it.
    whole = imagecache.decode_resized(nette.abspath(0), 64, mode="resize")
    ref = np.asarray(load_image(nette.abspath(0)).resize((64, 64), Image.Resampling.BICUBIC))
    assert np.array_equal(whole, ref)


def test_cache_reused_without_decoding(nette, cache40, monkeypatch):
    def fail(*a, **k):
        raise AssertionError("decoded an image although the cache is complete")

    monkeypatch.setattr(imagecache, "decode_resized", fail)
    again = DecodedImageCache.from_images(nette, size=40, cache_dir=cache40.root.parent.parent, num_workers=0,
                                          progress=False)
    assert again.n_decoded == 0 and again.root == cache40.root
    assert np.array_equal(again.array, cache40.array)


def test_cache_resumes_after_interruption(nette, cache40, tmp_path):
    sub = nette.subset(np.arange(0, 400, 5))  # 80 images
    calls = []

    def stop(done: int) -> None:
        calls.append(done)
        if done >= 40:
            raise Interrupted

    with pytest.raises(Interrupted):
        DecodedImageCache.from_images(sub, size=40, cache_dir=tmp_path, num_workers=0, batch_size=8,
                                      flush_images=16, progress=False, on_batch=stop)
    resumed = DecodedImageCache.from_images(sub, size=40, cache_dir=tmp_path, num_workers=0, batch_size=8,
                                            flush_images=16, progress=False)
    # 40 decoded before the interruption, 32 of them flushed (two chunks of 16): 48 remain.
    assert resumed.n_decoded == 80 - 32
    assert np.array_equal(resumed.array, cache40.array[np.arange(0, 400, 5)])


def test_building_the_cache_leaves_the_global_rng_alone(nette, tmp_path):
    """Decoding must not draw from the global torch RNG, or a warm and a cold cache would give different
    training runs for the same seed."""
    sub = nette.subset(np.arange(0, 400, 20))
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    DecodedImageCache.from_images(sub, size=24, cache_dir=tmp_path, num_workers=0, progress=False)
    assert torch.equal(torch.rand(3), expected)


def test_cache_parallel_workers_and_bad_files(nette, tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    rows = []
    for i in range(0, 400, 40):
        shutil.copy(nette.abspath(i), root / f"{i}.jpg")
        rows.append((f"{i}.jpg", nette.classes[nette.labels[i]]))
    (root / "empty.jpg").write_bytes(b"")
    (root / "junk.jpg").write_bytes(b"not a jpeg at all")
    rows += [("empty.jpg", rows[0][1]), ("junk.jpg", rows[1][1])]
    files = [root / p for p, _ in rows]
    serial = DecodedImageCache.open(files, size=32, cache_dir=tmp_path / "a", num_workers=0, progress=False)
    parallel = DecodedImageCache.open(files, size=32, cache_dir=tmp_path / "b", num_workers=2, batch_size=4,
                                      progress=False)
    assert np.array_equal(serial.array, parallel.array)
    assert serial.ok.tolist() == [True] * 10 + [False, False]
    assert "empty" in serial.errors[10] and "cannot decode" in serial.errors[11]
    assert not serial.array[10:].any()
    with pytest.raises(DataError):
        DecodedImageCache.open([], size=32, cache_dir=tmp_path)
    with pytest.raises(ParameterError, match="'mode' parameter"):
        DecodedImageCache.open(files, size=32, mode="stretch", cache_dir=tmp_path)


def test_cached_datasets_and_transforms(nette, cache40):
    seed_everything(0)
    ev = CachedImageDataset(cache40, [3, 1], nette.labels, eval_transform(32, mean=MEAN, std=STD))
    x, y, idx, ok = ev[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and (y, idx, ok) == (int(nette.labels[3]), 3, True)
    manual = (cache40[3][:, 4:36, 4:36].float() / 255 - 0.5) / 0.5
    assert torch.allclose(x, manual, atol=1e-6)
    tr = CachedImageDataset(cache40, None, nette.labels, train_transform(32, mean=MEAN, std=STD))
    a, b = tr[5][0], tr[5][0]
    assert a.shape == (3, 32, 32) and not torch.equal(a, b)  # random crops differ
    two = CachedTwoViewDataset(cache40, [7], nette.labels, train_transform(32, mean=MEAN, std=STD),
                               strong=strong_transform(32, mean=MEAN, std=STD))
    weak, strong, y, idx, ok = two[0]
    assert weak.shape == strong.shape == (3, 32, 32) and idx == 7 and ok
    with pytest.raises(ValueError, match="one entry per cache row"):
        CachedImageDataset(cache40, None, nette.labels[:10])


