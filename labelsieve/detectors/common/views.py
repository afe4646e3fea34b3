"""The training views of the image-level detector paths, chosen by name.

``"flip_shift"``
    Random horizontal flip and a random translation: the image is zero-padded by 1/8 of its side and
    a window of the original size is cropped at random (``RandomCrop(32, padding=4)`` + flip on CIFAR,
    the weak view of DivideMix and FixMatch, and the DEFT authors' CIFAR training transform; their
    other loaders resize to 256 and crop 224 at random, a shift of the same size, 1/8 of the side).
    The papers' view, and the default of ``deft`` and ``codivide``.
``"rrc"``
    Random resized crop (area 0.08-1) + flip (:func:`labelsieve.data.transforms.train_transform`):
    the ImageNet fine-tuning augmentation, much stronger; labelsieve's earlier default, kept as an
    option.

:func:`strong_view` is FixMatch's strong view: the weak view's geometry, then RandAugment (2 ops,
magnitude 10), then normalisation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torchvision.transforms import v2

from labelsieve.core.errors import check_param
from labelsieve.data.transforms import strong_transform, train_transform

__all__ = ["WEAK_VIEWS", "strong_view", "weak_view"]

WEAK_VIEWS = ("flip_shift", "rrc")


def _flip_shift(image_size: int) -> list:
    pad = max(1, image_size // 8)
    return [v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size),
            v2.RandomCrop(image_size, padding=pad, fill=0), v2.RandomHorizontalFlip()]


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
