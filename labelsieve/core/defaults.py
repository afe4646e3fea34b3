"""Defaults in one place: what labelsieve does when a user does not say.

The CLI, the Python API and the modules below them read these names; none of them writes a default
of its own. docs/architecture.md explains how each was chosen (the detector and its settings by
measurement, docs/benchmarks.md).
"""

from __future__ import annotations

import os
from pathlib import Path

#: The model an audit loads without ``--model``: CLIP ViT-B/16 through open_clip.
DEFAULT_MODEL = "ViT-B-16"
#: open_clip weight tags used when a known architecture is given without ``--pretrained``; other
#: architectures take the first tag open_clip lists for them.
DEFAULT_PRETRAINED_TAGS = {"ViT-B-16": "openai", "ViT-B-32": "openai", "ViT-L-14": "openai", "RN50": "openai"}

#: What ``labelsieve audit`` runs without ``--method``: chosen on the benchmark's grid (docs/benchmarks.md §1) for
#: its quality and its speed: the ensemble of co-divide (budgeted), TURN's probe and kNN, stacked.
DEFAULT_METHOD = "ensemble"
#: The default ensemble's members in words, for help texts (``labelsieve.detectors.ensemble.DEFAULT_MEMBERS`` holds
#: them with their parameters; a test checks that the two agree).
DEFAULT_ENSEMBLE_SUMMARY = ("codivide (labelsieve's fast settings on a text budget), turn (its probe, no fine-tuning) "
                            "and knn")

#: What :func:`labelsieve.detect` and ``labelsieve audit --features`` run on features without a text model:
#: TURN's GCE linear probe and per-class GMM without fine-tuning (nothing but the features needed), the best
#: image-feature detector measured (docs/benchmarks.md).
DEFAULT_FEATURES_METHOD = "turn"
DEFAULT_FEATURES_PARAMS = {"finetune": False}

#: Flagged rows whose best class has a lower probability are marked ``outlier`` (no class fits).
DEFAULT_OUTLIER_PROB = 0.4

#: Near-duplicates: two images among each other's nearest feature neighbours whose 16 px thumbnails correlate
#: at least this much are reported as one ``duplicate_group`` (labelsieve.detectors.common.duplicates). Chosen
#: by benchmarks/near_duplicates.py: the highest recall with pair precision >= 0.99 (docs/benchmarks.md).
DEFAULT_DUPLICATE_THRESHOLD = 0.94

#: Rows in an audit's check sample (``--check-size``): a random, stratified sample whose review gives the error
#: rate with an interval that holds whatever the model (labelsieve.audit.checksample).
DEFAULT_CHECK_SIZE = 100

#: Feature-extraction batch size.
DEFAULT_BATCH_SIZE = 64

#: The feature store commits extracted vectors at least this often (seconds) and every 2,048 images, so
#: an interrupted or killed extraction loses at most about this much work (plus one batch).
DEFAULT_COMMIT_SECONDS = 20.0

#: The classifier ``labelsieve train`` fine-tunes without ``--backbone``.
DEFAULT_BACKBONE = "convnext_tiny"

#: Mixed-precision choices of every trainer (see :func:`labelsieve.core.runtime.autocast_dtype`).
AMP_MODES = ("auto", "bf16", "fp16", "off")


def default_cache_dir() -> Path:
    """Feature store and other caches: ``$LABELSIEVE_CACHE`` or ``~/.cache/labelsieve``."""
    env = os.environ.get("LABELSIEVE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "labelsieve"


def default_num_workers(cap: int = 8, *, reserve: int = 0) -> int:
    """Worker processes for image decoding: the machine's cores less ``reserve``, at most ``cap``."""
    return min(cap, max(0, (os.cpu_count() or 1) - reserve))
