"""Detectors on collections too large for a float32 copy of their features (issue 13): above
``FEATURES_IN_MEMORY_BYTES`` they read the float16 memory-mapped view a batch at a time, never build the
(n, d) float32 matrix, and decide exactly as they do in memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from labelsieve.detectors import create_detector
from labelsieve.detectors.common import base
from labelsieve.detectors.common.base import FeatureRowsDataset, feature_dataset
from labelsieve.detectors.ensemble import CODIVIDE_FAST
from tests.helpers import make_context

# (name, params): every feature-path detector whose training reads rows by batch
DETECTORS = [
    ("turn", {"finetune": False}),
    ("deft", {"epochs": 2}),
    ("codivide", {**CODIVIDE_FAST, "epochs": 2, "max_steps": 40}),
    ("label_match", {}),
]


@pytest.fixture(scope="module")
def memmapped(noisy_imagenette, tmp_path_factory):
    """The 400 noisy Imagenette rows with their features as a float16 memory map (what the feature store gives)."""
    images, x, noisy, truth = noisy_imagenette
    path = tmp_path_factory.mktemp("stream") / "view.npy"
    np.save(path, np.asarray(x, dtype=np.float16))
    return images, np.load(path, mmap_mode="r"), noisy


@pytest.mark.parametrize(("name", "params"), DETECTORS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(DETECTORS)])
def test_streamed_detector_equals_in_memory_and_builds_no_float32_copy(memmapped, mini_clip, monkeypatch, name,
                                                                       params):
    images, view, noisy = memmapped
    in_memory = make_context(images, view, mini_clip, noisy)
    ref = create_detector(name, **params).detect(in_memory)
    if name != "label_match":  # (which always reads by block)
        assert in_memory._features is not None  # small collections do take the fast in-memory copy
    monkeypatch.setattr(base, "FEATURES_IN_MEMORY_BYTES", 0)
    streamed = make_context(images, view, mini_clip, noisy)
    res = create_detector(name, **params).detect(streamed)
    assert streamed._features is None, f"{name} built the (n, d) float32 copy"
    # blocks sum in another order than one matrix product: equal to float32 rounding
    np.testing.assert_allclose(res.p_clean, ref.p_clean, rtol=0, atol=1e-5)
    assert np.array_equal(res.is_noisy, ref.is_noisy)


def test_feature_rows_dataset_gives_the_in_memory_items_and_batches(memmapped, mini_clip, monkeypatch):
    images, view, noisy = memmapped
    labels = torch.as_tensor(noisy, dtype=torch.long)
    ctx = make_context(images, view, mini_clip, noisy)
    mem = feature_dataset(ctx, labels)
    assert isinstance(mem, torch.utils.data.TensorDataset)
    monkeypatch.setattr(base, "FEATURES_IN_MEMORY_BYTES", 0)
    streamed = feature_dataset(make_context(images, view, mini_clip, noisy), labels)
    assert isinstance(streamed, FeatureRowsDataset) and len(streamed) == len(mem)
    order = torch.randperm(len(mem), generator=torch.Generator().manual_seed(0)).tolist()[:37]
    a = torch.utils.data.default_collate([mem[i] for i in order])
    b = torch.utils.data.default_collate(streamed.__getitems__(order))
    for u, v in zip(a, b, strict=True):
        assert u.dtype == v.dtype and torch.equal(u, v)
