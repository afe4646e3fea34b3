"""Noisy-label detectors: one module per detector, each registered by ``@register_detector``.

Build one with :func:`create_detector` (``create_detector("knn", k=20)``), list them with
:func:`list_detectors`. Every detector follows :class:`~labelsieve.detectors.common.base.Detector` and
returns a :class:`~labelsieve.detectors.common.base.DetectionResult`; the machinery they share lives in
:mod:`labelsieve.detectors.common`, which imports no detector.
"""

from labelsieve.core.defaults import DEFAULT_METHOD
from labelsieve.detectors.common.base import DetectionContext, DetectionResult, Detector
from labelsieve.detectors.registry import create_detector, get_detector_class, list_detectors, register_detector

__all__ = [
    "DEFAULT_METHOD",
    "DetectionContext",
    "DetectionResult",
    "Detector",
    "create_detector",
    "get_detector_class",
    "list_detectors",
    "register_detector",
]
