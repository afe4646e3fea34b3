"""``label_match``: CLIP zero-shot classification; is the given label what CLIP sees?

p_clean is the zero-shot softmax probability of the given label, ``softmax(s · cos(img, text_c))``
with s = the model's logit scale; flagged when it is below ``threshold`` (0.5: the given label is
more likely wrong than right under the zero-shot classifier).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from labelsieve.detectors import register_detector
from labelsieve.detectors.base import DetectionContext, DetectionResult, Detector, given_label_prob, softmax
from labelsieve.errors import check_param

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
    """Scaled cosine logits (n, C) between image features and per-class text embeddings."""
    ctx.encoder.require_text("Zero-shot classification")
    text = ctx.encoder.class_text_embeddings(ctx.classnames, templates)
    return ctx.encoder.logit_scale * (ctx.features() @ text.T)


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
    if ctx.optional_features() is None:
        return {}
    return text_side_info(zero_shot_logits(ctx, SINGLE_TEMPLATE), ctx.labels)


@register_detector
class LabelMatchDetector(Detector):
    """CLIP zero-shot label match.

    Parameters
    ----------
    templates : {"single", "ensemble"} or str or list of str, default="single"
        ``"single"`` = "a photo of a {}."; ``"ensemble"`` = CLIP's 7 ImageNet templates averaged; a
        string with ``{}`` or a list of them.
    threshold : float, default=0.5
    """

    name = "label_match"
    summary = "CLIP zero-shot: p_clean = zero-shot probability of the given label"
    needs_text = True

    def __init__(self, *, templates: str | Sequence[str] = "single", threshold: float = 0.5) -> None:
        t = resolve_templates(templates)
        check_param(type(self).__name__, "templates", templates, all("{}" in s for s in t),
                    "'single', 'ensemble' or template strings containing '{}'")
        check_param(type(self).__name__, "threshold", threshold, 0.0 < threshold < 1.0, "a float in (0, 1)")
        self.templates = templates if isinstance(templates, str) else list(templates)
        self.threshold = threshold

    def detect(self, ctx: DetectionContext) -> DetectionResult:
        logits = zero_shot_logits(ctx, resolve_templates(self.templates))
        probs = softmax(logits)
        return DetectionResult(
            p_clean=given_label_prob(probs, ctx.labels), probs=probs, threshold=self.threshold,
            rule=f"p_clean = CLIP zero-shot softmax probability of the given label (templates: {self.templates}); "
                 f"flagged if p_clean < {self.threshold}.",
            info=text_side_info(logits, ctx.labels),
        )
