"""Tensor transforms on uint8 image tensors (CPU or GPU): the weak (training), strong (FixMatch) and
evaluation views every trainer uses."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torchvision.transforms import InterpolationMode, v2

from labelsieve.core.errors import check_param

__all__ = ["eval_transform", "strong_transform", "train_transform"]

_INTERPOLATIONS = ("bicubic", "bilinear", "nearest")


def _interp(name: str):
    check_param("transform", "interpolation", name, name in _INTERPOLATIONS, f"one of {_INTERPOLATIONS}")
    return InterpolationMode(name)


def _normalize(mean: Sequence[float], std: Sequence[float]) -> list:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]


def _crop_flip(image_size: int, scale: tuple[float, float], ratio: tuple[float, float], interpolation: str,
               hflip: bool) -> list:
    """Random resized crop (+ horizontal flip): the geometric part of the weak and strong views."""
    steps = [v2.RandomResizedCrop(image_size, scale=scale, ratio=ratio, interpolation=_interp(interpolation),
                                  antialias=True)]
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    return steps


def train_transform(image_size: int, *, mean: Sequence[float], std: Sequence[float],
                    scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                    hflip: bool = True, interpolation: str = "bicubic") -> Callable[[torch.Tensor], torch.Tensor]:
    """The papers' training augmentation on uint8 tensors: random resized crop + horizontal flip.

    Parameters
    ----------
    image_size : int
        Output side in pixels.
    mean, std : sequence of 3 floats
        Normalisation of the model.
    scale, ratio : tuple of float
        Area fraction and aspect-ratio range of the random crop (torchvision's defaults).
    hflip : bool
        Flip horizontally with probability 0.5.
    interpolation : {"bicubic", "bilinear", "nearest"}

    Returns
    -------
    callable
        uint8 tensor (3, S, S) -> float32 tensor (3, image_size, image_size); works on CPU or GPU
        tensors and on batches (B, 3, S, S) (one crop per call).
    """
    check_param("train_transform", "scale", scale, 0 < scale[0] <= scale[1] <= 1, "0 < min <= max <= 1")
    return v2.Compose(_crop_flip(image_size, scale, ratio, interpolation, hflip) + _normalize(mean, std))


def strong_transform(image_size: int, *, mean: Sequence[float], std: Sequence[float],
                     scale: tuple[float, float] = (0.08, 1.0), num_ops: int = 2, magnitude: int = 10,
                     interpolation: str = "bicubic") -> Callable[[torch.Tensor], torch.Tensor]:
    """FixMatch's strong view: :func:`train_transform`'s crop and flip, then RandAugment (on uint8) with
    ``num_ops`` operations per image of strength ``magnitude`` (of 31 bins), then normalisation.
    Returns a callable uint8 tensor (3, S, S) -> float32 tensor (3, image_size, image_size).
    """
    check_param("strong_transform", "num_ops", num_ops, isinstance(num_ops, int) and num_ops >= 1, "an int >= 1")
    check_param("strong_transform", "magnitude", magnitude, isinstance(magnitude, int) and 0 <= magnitude <= 30,
                "an int in [0, 30]")
    steps = _crop_flip(image_size, scale, (3 / 4, 4 / 3), interpolation, True)
    return v2.Compose([*steps, v2.RandAugment(num_ops=num_ops, magnitude=magnitude)] + _normalize(mean, std))


def eval_transform(image_size: int, *, mean: Sequence[float], std: Sequence[float],
                   interpolation: str = "bicubic") -> Callable[[torch.Tensor], torch.Tensor]:
    """Evaluation view: centre crop ``image_size`` out of the cached square (resize if it is smaller).

    With a cache of side ``floor(image_size / crop_pct)`` this is timm's evaluation transform
    (resize the shorter side, centre crop).

    Returns
    -------
    callable
        uint8 tensor (3, S, S) -> float32 tensor (3, image_size, image_size).
    """
    interp = _interp(interpolation)

    def fit(x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[-2:]) < image_size:
            return v2.functional.resize(x, [image_size], interpolation=interp, antialias=True)
        return x

    return v2.Compose([v2.Lambda(fit), v2.CenterCrop(image_size)] + _normalize(mean, std))
