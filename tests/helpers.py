"""Small helpers shared by tests (not fixtures; those are in conftest.py)."""

from __future__ import annotations

import csv
import os

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from sklearn.metrics import f1_score, roc_auc_score
from torch import nn

from labelsieve.detectors.common.base import DetectionContext
from labelsieve.models.encoders import Encoder


def inject_symmetric(labels: np.ndarray, n_classes: int, rate: float, seed: int = 0) -> np.ndarray:
    """Flip exactly round(rate * n) labels, each to a different class chosen uniformly."""
    rng = np.random.default_rng(seed)
    out = labels.copy()
    idx = rng.choice(len(labels), size=round(rate * len(labels)), replace=False)
    r = rng.integers(0, n_classes - 1, size=len(idx))
    out[idx] = r + (r >= labels[idx])
    return out


def with_noise(feats: tuple, rate: float, seed: int) -> tuple:
    """(images, features, noisy labels, truly-noisy mask): ``feats`` = (images, features) with symmetric noise."""
    images, x = feats
    noisy = inject_symmetric(images.labels, images.n_classes, rate, seed=seed)
    return images, x, noisy, noisy != images.labels


def scores(result, noisy_true: np.ndarray) -> tuple[float, float]:
    """(F1 of the flag, AUROC of 1 - p_clean) with noisy samples as positives."""
    return (float(f1_score(noisy_true, result.is_noisy)), float(roc_auc_score(noisy_true, 1 - result.p_clean)))


def make_context(images, feats, encoder, labels=None, seed=0):
    """A DetectionContext over cached features with (possibly noisy) ``labels``."""
    labels = images.labels if labels is None else labels
    imgs = images.subset(np.arange(len(images)))
    imgs.labels = np.asarray(labels, dtype=np.int64)
    return DetectionContext(labels=imgs.labels, classnames=images.classnames, images=imgs, encoder=encoder,
                            features_fn=lambda: feats, device=torch.device("cpu"), seed=seed, progress=False)


def tiny_clip(seed: int = 0, *, vision_layers: int = 2, text_layers: int = 2, custom_text: bool = False,
              **vision: object) -> nn.Module:
    """A tiny randomly initialised open_clip CLIP with a ViT image tower (64 px, patch 16, width 64)."""
    torch.manual_seed(seed)
    vcfg = open_clip.CLIPVisionCfg(layers=vision_layers, width=64, patch_size=16, image_size=64,
                                   head_width=32, **vision)
    tcfg = open_clip.CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=2, layers=text_layers,
                                 proj_bias=custom_text)
    cls = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    return cls(embed_dim=64, vision_cfg=vcfg, text_cfg=tcfg).eval()


def tiny_vit_encoder(seed: int = 0, layers: int = 3) -> Encoder:
    """An Encoder around :func:`tiny_clip` (``layers`` vision and text blocks) with CLIP's tokenizer."""
    model = tiny_clip(seed, vision_layers=layers, text_layers=layers)
    return Encoder(kind="open_clip", name="tiny-vit", pretrained=None, model=model, preprocess=lambda im: im,
                   tokenizer=open_clip.get_tokenizer("ViT-B-32"), mean=open_clip.OPENAI_DATASET_MEAN,
                   std=open_clip.OPENAI_DATASET_STD, image_size=64, embed_dim=64, device=torch.device("cpu"))


def read_subset(root, csv_path, n: int) -> tuple[list[Image.Image], list[int], list[str]]:
    """``n`` images taken round-robin over the classes; (images, label indices, class names)."""
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    classnames = sorted({r["label"] for r in rows})
    by = {c: [r for r in rows if r["label"] == c] for c in classnames}
    picked: list[dict[str, str]] = []
    i = 0
    while len(picked) < n:
        for c in classnames:
            if len(picked) < n and i < len(by[c]):
                picked.append(by[c][i])
        i += 1
    images = [Image.open(root / r["path"]).convert("RGB") for r in picked]
    return images, [classnames.index(r["label"]) for r in picked], classnames


def tiny_cnn(n_classes: int = 10) -> nn.Module:
    """A small randomly initialised CNN with BatchNorm (for engine tests)."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, n_classes))


def unavailable(reason: str) -> None:
    """Skip a test whose optional tool (a browser, FiftyOne, label-studio-sdk) is missing here; in CI
    (``LABELSIEVE_CI=1``, set by .ci/run, which installs them all) fail instead, so nothing is skipped there."""
    if os.environ.get("LABELSIEVE_CI"):
        pytest.fail(f"{reason} (LABELSIEVE_CI is set: .ci/run installs it, so this must not be skipped)")
    pytest.skip(reason)
