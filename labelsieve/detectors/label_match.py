"""``label_match``: CLIP zero-shot classification; is the given label what CLIP sees?

p_clean is the zero-shot softmax probability of the given label, ``softmax(s · cos(img, text_c))``
with s = the model's logit scale; flagged when it is below ``threshold`` (0.5: the given label is
more likely wrong than right under the zero-shot classifier).
"""

from __future__ import annotations

from collections.abc import Sequence

from labelsieve.core.errors import check_param
from labelsieve.detectors.common.base import DetectionContext, DetectionResult, Detector
from labelsieve.detectors.common.text_side import agreement_info, resolve_templates, zero_shot
from labelsieve.detectors.registry import register_detector


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
        probs, p_given, agreement = zero_shot(ctx, resolve_templates(self.templates))
        return DetectionResult(
            p_clean=p_given, probs=probs, threshold=self.threshold,
            rule=f"p_clean = CLIP zero-shot softmax probability of the given label (templates: {self.templates}); "
                 f"flagged if p_clean < {self.threshold}.",
            info=agreement_info(agreement),
        )
