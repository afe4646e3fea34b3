"""labelsieve: find wrong labels in image classification datasets.

The Python API mirrors the CLI::

    import labelsieve
    audit = labelsieve.audit("images/", "labels.csv", out_dir="audit/")   # the default ensemble

Heavy libraries (torch, open_clip, timm, faiss) are imported lazily.
"""

from __future__ import annotations

__version__ = "0.1.0"

from labelsieve.errors import DataError, LabelsieveError, ModelError, ParameterError

__all__ = ["DataError", "LabelsieveError", "ModelError", "ParameterError", "__version__", "audit",
           "create_detector", "list_detectors", "load_images"]


def __getattr__(name: str):
    if name == "audit":
        from labelsieve.api import audit

        return audit
    if name in ("create_detector", "list_detectors"):
        from labelsieve import detectors

        return getattr(detectors, name)
    if name == "load_images":
        from labelsieve.data import load_images

        return load_images
    raise AttributeError(name)
