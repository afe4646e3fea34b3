"""``labelsieve train`` and ``labelsieve predict``: fine-tune a classifier on the rows an audit kept,
export it, and label new images with it.

The training engine every method shares is :mod:`labelsieve.core.engine`; this package holds the two
commands only.
"""

from labelsieve.train.export import export_classifier, load_classifier
from labelsieve.train.finetune import TrainReport, train_from_audit, train_on_labels
from labelsieve.train.predict import predict

__all__ = ["TrainReport", "export_classifier", "load_classifier", "predict", "train_from_audit", "train_on_labels"]
