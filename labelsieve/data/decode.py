"""Decoding image files to RGB: EXIF orientation honoured, any mode converted, bad files reported.

Images that exist but cannot be decoded are *not* errors: they raise :class:`UnreadableImage`, which
the feature store and the datasets turn into ``issue=unreadable`` rows of the audit.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps

from labelsieve.core.paths import read_regular

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

# Truncated files must raise, not decode half an image silently.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class UnreadableImage(Exception):
    """An image file exists but cannot be decoded (the audit reports it; the run goes on)."""




def decode_image(data: bytes, *, name: str = "image") -> Image.Image:
    """Decode bytes to an RGB PIL image, honouring EXIF orientation.

    Any mode (L, LA, P, RGBA, CMYK, I;16, …) becomes RGB; transparency is composited on white.
    Raises :class:`UnreadableImage` for empty, truncated or non-image data.
    """
    if not data:
        raise UnreadableImage(f"{name}: file is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            return to_rgb(im)
    except UnreadableImage:
        raise
    except Exception as exc:  # PIL raises many types for bad data
        raise UnreadableImage(f"{name}: cannot decode image ({type(exc).__name__}: {exc})") from exc


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB (16-bit greyscale is rescaled, alpha composited on white)."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        arr = np.clip(arr / hi * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = ((arr - lo) / max(hi - lo, 1e-12) * 255.0).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return im.convert("RGB")


def read_image_bytes(source: Any) -> bytes:
    """The bytes of an image: a file path (a regular file only: :func:`labelsieve.core.paths.read_regular`), or
    anything with ``read_bytes()`` that is not a path (a member of a container,
    :class:`labelsieve.data.members.Member`). :class:`UnreadableImage` when they cannot be read."""
    try:
        if isinstance(source, (str, os.PathLike)):
            return read_regular(source)
        return source.read_bytes()
    except OSError as exc:
        raise UnreadableImage(f"{source}: cannot read {'file' if isinstance(source, (str, os.PathLike)) else 'image'} "
                              f"({exc.strerror or exc})") from exc


def load_image(path: Any) -> Image.Image:
    """Read and decode one image (a file path, or a container member) to RGB; :class:`UnreadableImage` if it cannot
    be read or decoded."""
    return decode_image(read_image_bytes(path), name=str(path))
