"""The text side of a vision-language model as evidence: zero-shot logits and the check, shared by every
text-guided detector (label_match, deft, codivide), that the model's text side can read these classes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from labelsieve.detectors.common.base import DetectionContext, feature_cosines

__all__ = ["ENSEMBLE_TEMPLATES", "LOW_AGREEMENT", "SINGLE_TEMPLATE", "agreement_info", "resolve_templates",
           "text_side_info", "zero_shot", "zero_shot_check", "zero_shot_logits"]

SINGLE_TEMPLATE = ("a photo of a {}.",)
# open_clip's SIMPLE_IMAGENET_TEMPLATES (CLIP's 7 "best" ImageNet templates).
ENSEMBLE_TEMPLATES = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)


def resolve_templates(templates: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(templates, str):
        if templates == "single":
            return SINGLE_TEMPLATE
        if templates == "ensemble":
            return ENSEMBLE_TEMPLATES
        return (templates,)
    return tuple(templates)


def zero_shot_logits(ctx: DetectionContext, templates: Sequence[str]) -> np.ndarray:
    """Scaled cosine logits (n, C) between image features and per-class text embeddings (in memory: for
    collections of any size use :func:`zero_shot`)."""
    ctx.encoder.require_text("Zero-shot classification")
    text = ctx.encoder.class_text_embeddings(ctx.classnames, templates)
    return ctx.encoder.logit_scale * feature_cosines(ctx, text)


def zero_shot(ctx: DetectionContext, templates: Sequence[str]) -> tuple[np.ndarray, np.ndarray, float]:
    """The zero-shot classifier on every row, block by block (bounded memory for any n).

    Returns
    -------
    probs : ndarray of shape (n, C), float32
        ``softmax(s · cos(image, class text))``, s = the model's logit scale.
    p_given : ndarray of shape (n,), float64
        The probability of the given label.
    agreement : float
        Share of rows whose top class is the given label (see :func:`text_side_info`).
    """
    ctx.encoder.require_text("Zero-shot classification")
    text = ctx.encoder.class_text_embeddings(ctx.classnames, templates)
    labels = np.asarray(ctx.labels)
    probs = np.empty((ctx.n_samples, len(text)), dtype=np.float32)
    p_given = np.empty(ctx.n_samples, dtype=np.float64)
    agree = 0
    for s, rows in ctx.feature_batches():
        logits = ctx.encoder.logit_scale * (rows @ text.T)
        z = logits.astype(np.float64)
        z = np.exp(z - z.max(axis=1, keepdims=True))
        pb = z / z.sum(axis=1, keepdims=True)
        lab = labels[s : s + len(rows)]
        probs[s : s + len(rows)], p_given[s : s + len(rows)] = pb, pb[np.arange(len(rows)), lab]
        agree += int((logits.argmax(1) == lab).sum())
    return probs, p_given, agree / len(labels) if len(labels) else 1.0


#: Below this zero-shot agreement with the given labels, text-guided detectors warn (see
#: :func:`text_side_info`). Measured with the mini CLIP: Imagenette with 20-40 % noise 0.59-0.79
#: (DEFT best there), CIFAR-10N aggre 0.49 and worst 0.38, the EuroSAT demo 0.16 (image-feature
#: detectors best).
LOW_AGREEMENT = 0.5


def text_side_info(logits: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """``{"zero_shot_agreement", "warnings"}`` for a text-guided detector's ``info``: the zero-shot top-1
    agreement with the given labels, and a warning when it is low.

    Low agreement means that much of the labelling is wrong, or that the model's text side does not
    know these classes (a weak CLIP, or class names it cannot read) — and a text-guided detector
    (deft, label_match, codivide) is then weak; image-feature detectors are not affected.
    """
    agreement = float((np.asarray(logits).argmax(1) == np.asarray(labels)).mean()) if len(labels) else 1.0
    return agreement_info(agreement)


def agreement_info(agreement: float) -> dict[str, Any]:
    """``{"zero_shot_agreement", "warnings"}`` for a zero-shot agreement already computed."""
    warnings = []
    if agreement < LOW_AGREEMENT:
        warnings.append(
            f"The model's zero-shot prediction agrees with only {agreement:.0%} of the given labels. Either much "
            "of the labelling is wrong, or the model's text side does not know these class names; this detector "
            "relies on it. Check the class names (--classnames), use a stronger CLIP, or compare with an "
            "image-feature detector (--method turn, gmm or confident_learning) or the ensemble.")
    return {"zero_shot_agreement": agreement, "warnings": warnings}


def zero_shot_check(ctx: DetectionContext) -> dict[str, Any]:
    """:func:`text_side_info` of the "a photo of a {}." zero-shot classifier on the cached image
    features; empty when the context has no cached features."""
    if ctx.raw_features() is None:
        return {}
    return agreement_info(zero_shot(ctx, SINGLE_TEMPLATE)[2])
