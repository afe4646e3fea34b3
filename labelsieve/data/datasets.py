"""A torch ``Dataset`` over :class:`~labelsieve.data.images.LabeledImages` that never raises on a bad image."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from labelsieve.data.decode import UnreadableImage, load_image
from labelsieve.data.images import LabeledImages


class ImageDataset:
    """A torch ``Dataset`` over :class:`LabeledImages` that never raises on a bad image.

    Each item is ``(image_tensor, label, index, ok)``; an undecodable image yields a zero tensor of
    the right shape and ``ok = False`` (its error text is in :attr:`errors` of the worker that read
    it, and again from :func:`load_image` if asked).
    """

    def __init__(self, images: LabeledImages, transform, *, image_shape: tuple[int, int, int] | None = None,
                 index: Sequence[int] | None = None) -> None:
        self.images = images
        self.transform = transform
        self.image_shape = image_shape
        self.index = np.arange(len(images)) if index is None else np.asarray(index, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k: int):
        i = int(self.index[k])
        try:
            img = load_image(self.images.locate(i))
            x = self.transform(img)
            ok = True
        except UnreadableImage:
            if self.image_shape is None:
                raise
            x = torch.zeros(self.image_shape)
            ok = False
        return x, int(self.images.labels[i]), i, ok
