"""Training: the shared engine, fine-tuning on kept rows with export, and prediction.

``Trainer`` is the one training loop (DEFT, TURN, co-divide and ``labelsieve train`` all use it);
``train_from_audit`` / ``train_on_labels`` fine-tune and export a classifier; ``load_classifier`` /
``predict`` use an exported one. Import the submodule functions from their modules
(``from labelsieve.train.predict import predict``) or from here.
"""

from __future__ import annotations

from labelsieve.train.engine import (
    Trainer,
    cosine_schedule,
    make_loader,
    make_optimizer,
    resolve_device,
    seed_everything,
)
from labelsieve.train.finetune import TrainReport, export_classifier, train_from_audit, train_on_labels
from labelsieve.train.predict import load_classifier, predict

__all__ = [
    "TrainReport",
    "Trainer",
    "cosine_schedule",
    "export_classifier",
    "load_classifier",
    "make_loader",
    "make_optimizer",
    "predict",
    "resolve_device",
    "seed_everything",
    "train_from_audit",
    "train_on_labels",
]
