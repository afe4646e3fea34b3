"""The training views of the image-level detector paths, chosen by name.

``"flip_shift"``
    Random horizontal flip and a random translation: the image is zero-padded by 1/8 of its side and
    a window of the original size is cropped at random (``RandomCrop(32, padding=4)`` + flip on CIFAR,
    the weak view of DivideMix and FixMatch, and the DEFT authors' CIFAR training transform; their
    other loaders resize to 256 and crop 224 at random, a shift of the same size, 1/8 of the side).
    The papers' view, and the default of ``deft`` and ``codivide``.
``"resize_crop"``
    Random horizontal flip and a random crop of the original size out of the image resized to 8/7 of
    it (``Resize(256)`` + ``RandomCrop(224)`` + flip at 224 px): the noisy-label benchmarks' view for
    full-size photos (Clothing1M, WebVision loaders of DivideMix and DEFT), a shift of up to 1/8 of the
    side without a black border, after a slight zoom.
``"rrc"``
    Random resized crop (area 0.08-1) + flip (:func:`labelsieve.data.transforms.train_transform`):
    the ImageNet fine-tuning augmentation, much stronger; labelsieve's earlier default, kept as an
    option.

:func:`image_kind` tells small images (CIFAR-like, 64 px or less) from photos, for views chosen per
dataset kind (TURN's ``augment="auto"``: ``"flip_shift"`` for small images, ``"resize_crop"`` for photos).

:func:`strong_view` is FixMatch's strong view: the weak view's geometry, then RandAugment (2 ops,
magnitude 10), then normalisation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from labelsieve.core.errors import check_param
from labelsieve.data.transforms import strong_transform, train_transform

__all__ = ["SMALL_IMAGE_SIDE", "TRAIN_VIEWS", "WEAK_VIEWS", "image_kind", "strong_view", "train_view", "weak_view"]

WEAK_VIEWS = ("flip_shift", "rrc")
#: Every training view by name (:func:`train_view`).
TRAIN_VIEWS = ("flip_shift", "resize_crop", "rrc")
#: Images whose median shorter side is at most this many pixels are of the small (CIFAR-like) kind.
SMALL_IMAGE_SIDE = 64


def _flip_shift(image_size: int) -> list:
    pad = max(1, image_size // 8)
    return [v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size),
            v2.RandomCrop(image_size, padding=pad, fill=0), v2.RandomHorizontalFlip()]


def _resize_crop(image_size: int) -> list:
    return [v2.Resize(round(image_size * 8 / 7), antialias=True), v2.RandomCrop(image_size), v2.RandomHorizontalFlip()]


def _normalize(mean: Sequence[float], std: Sequence[float]) -> list:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]


def weak_view(kind: str, image_size: int, *, mean: Sequence[float],
              std: Sequence[float]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The weak (training) view ``kind`` (see the module docstring): uint8 (3, S, S) -> float32 (3, s, s)."""
    check_param("weak_view", "kind", kind, kind in WEAK_VIEWS, f"one of {', '.join(map(repr, WEAK_VIEWS))}")
    if kind == "rrc":
        return train_transform(image_size, mean=mean, std=std)
    return v2.Compose(_flip_shift(image_size) + _normalize(mean, std))


def strong_view(kind: str, image_size: int, *, mean: Sequence[float],
                std: Sequence[float]) -> Callable[[torch.Tensor], torch.Tensor]:
    """FixMatch's strong view on top of the weak view ``kind``'s geometry: + RandAugment(2, 10)."""
    check_param("strong_view", "kind", kind, kind in WEAK_VIEWS, f"one of {', '.join(map(repr, WEAK_VIEWS))}")
    if kind == "rrc":
        return strong_transform(image_size, mean=mean, std=std)
    return v2.Compose(_flip_shift(image_size) + [v2.RandAugment(num_ops=2, magnitude=10)] + _normalize(mean, std))


def train_view(kind: str, image_size: int, *, mean: Sequence[float],
               std: Sequence[float]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The training view ``kind`` (one of :data:`TRAIN_VIEWS`): uint8 (3, S, S) -> float32 (3, s, s)."""
    check_param("train_view", "kind", kind, kind in TRAIN_VIEWS, f"one of {', '.join(map(repr, TRAIN_VIEWS))}")
    if kind == "resize_crop":
        return v2.Compose(_resize_crop(image_size) + _normalize(mean, std))
    return weak_view(kind, image_size, mean=mean, std=std)


def image_kind(images: Any, *, sample: int = 64) -> tuple[str, int | None]:
    """``("small", side)`` when the median shorter side of up to ``sample`` evenly spaced images is at most
    :data:`SMALL_IMAGE_SIDE` pixels (CIFAR-like), else ``("photo", side)``; ``("photo", None)`` when no image
    size can be read (the images are not files: the photo kind, the common case)."""
    n = len(images)
    sides = []
    for i in np.unique(np.linspace(0, max(0, n - 1), min(n, sample)).astype(int)) if n else []:
        try:
            with Image.open(images.abspath(int(i))) as im:
                sides.append(min(im.size))
        except (OSError, AttributeError, ValueError):
            continue
    if not sides:
        return "photo", None
    side = int(np.median(sides))
    return ("small" if side <= SMALL_IMAGE_SIDE else "photo"), side
