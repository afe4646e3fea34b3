"""Shared fixtures: real images from ../shared/data, real weights from ../shared/models, offline."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from helpers import with_noise

from labelsieve import testing
from labelsieve.data import load_images
from labelsieve.data.imagecache import DecodedImageCache
from labelsieve.features import extract_features
from labelsieve.models.encoders import create_encoder

# One intra-op thread: on 2 cores with DataLoader workers beside it, more threads oversubscribe the CPU.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def shared():
    try:
        return testing.shared_dir()
    except FileNotFoundError:
        pytest.skip("../shared not present")


@pytest.fixture(scope="session")
def mini_clip_dir(shared):
    return shared / "models" / "mini-clip"


@pytest.fixture(scope="session")
def lite0_file(shared):
    return shared / "models" / "tf_efficientnet_lite0.safetensors"


@pytest.fixture(scope="session")
def imagenette_small(shared):
    """(root, csv): 40 Imagenette train images per class (400), seeded."""
    return testing.extract_subset("imagenette", per_class=40, seed=0)


@pytest.fixture(scope="session")
def nette(imagenette_small):
    """The 400 Imagenette images of ``imagenette_small`` as LabeledImages."""
    return load_images(*imagenette_small)


@pytest.fixture(scope="session")
def cache40(nette, tmp_path_factory):
    """All 400 ``nette`` images decoded once at 40 px."""
    return DecodedImageCache.from_images(nette, size=40, cache_dir=tmp_path_factory.mktemp("cache"), num_workers=0,
                                         progress=False)


@pytest.fixture(scope="session")
def cifar_small(shared):
    """(root, csv): 60 CIFAR-10 train images per class (600), seeded."""
    return testing.extract_subset("cifar10", per_class=60, seed=0)


@pytest.fixture(scope="session")
def eurosat_small(shared):
    """(root, csv): 20 EuroSAT images per class (200), seeded."""
    return testing.extract_subset("eurosat", per_class=20, seed=0)


@pytest.fixture()
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def feature_cache(tmp_path_factory):
    """One feature store for the whole test session."""
    return tmp_path_factory.mktemp("feature-cache")


@pytest.fixture(scope="session")
def mini_clip(mini_clip_dir):
    return create_encoder(str(mini_clip_dir), pretrained=None, device="cpu")


def _features(root, csv, encoder, cache):
    images = load_images(root, csv)
    feats = extract_features(images, encoder, cache_dir=cache, progress=False, num_workers=2)
    x = np.asarray(feats.vectors, dtype=np.float32)
    return images, x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="session")
def imagenette_feats(imagenette_small, mini_clip, feature_cache):
    """(LabeledImages, normalised mini-CLIP features) of the 400 Imagenette images."""
    return _features(*imagenette_small, mini_clip, feature_cache)


@pytest.fixture(scope="session")
def cifar_feats(cifar_small, mini_clip, feature_cache):
    """(LabeledImages, normalised mini-CLIP features) of the 600 CIFAR-10 images."""
    return _features(*cifar_small, mini_clip, feature_cache)



@pytest.fixture(scope="session")
def noisy_imagenette(imagenette_feats):
    """``imagenette_feats`` with 30 % symmetric noise (seed 1): (images, features, noisy labels, truly noisy)."""
    return with_noise(imagenette_feats, 0.3, seed=1)
