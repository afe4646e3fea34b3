"""``gmm``: DivideMix's clean/noisy split (Li et al., ICLR 2020) as a detector.

Per-sample cross-entropy of the given label, min-max normalised, one 2-component 1-D Gaussian
mixture (``max_iter=10, reg_covar=5e-4, tol=1e-2``, as DivideMix); ``p_clean`` is the posterior of
the low-mean component and a sample is flagged iff ``p_clean < 0.5`` (DivideMix's ``p_threshold``).
See :func:`~labelsieve.detectors.common.selection.fit_gmm_split` for the degenerate-input rules and for
the monotone tails (on by default; ``monotone=False`` is DivideMix's raw posterior).

Where the losses come from (``source``):

* ``"probe"`` (default): an out-of-fold linear probe on the cached features (the same losses as
  ``small_loss``; see :mod:`labelsieve.detectors.small_loss` for why out-of-fold and short).
* ``"finetune"``: DivideMix's warm-up on a pre-trained model — a cross-entropy linear probe on the
  cached features initialises a head on the image tower (a copy; the encoder is not changed), then
  ``finetune_epochs`` epochs of full fine-tuning of tower and head on all samples with
  cross-entropy, through the shared Trainer on decoded images (the same model, optimiser and
  BatchNorm handling as ``turn``); the losses are from one evaluation pass after it.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import numpy as np

from labelsieve.core.errors import check_param
from labelsieve.core.runtime import seed_everything
from labelsieve.detectors.common import tower
from labelsieve.detectors.common.base import DetectionContext, DetectionResult, Detector, softmax
from labelsieve.detectors.common.linear_probe import Rows, fit_linear_probe, oof_probe_losses
from labelsieve.detectors.common.selection import fit_gmm_split, per_class_gmm_posterior
from labelsieve.detectors.common.tower import check_finetune_params, is_pos_float, is_pos_int
from labelsieve.detectors.registry import register_detector

__all__ = ["GMMDetector"]

SOURCES = ("probe", "finetune")


@register_detector
class GMMDetector(Detector):
    """Two-component GMM on normalised cross-entropy losses (DivideMix).

    Parameters
    ----------
    source : {"probe", "finetune"}, default="probe"
        Where the losses come from (see the module docstring).
    folds : int, default=5
        ``source="probe"``: out-of-fold probe folds.
    probe_epochs : int, default=10
        Linear-probe epochs (per fold for ``"probe"``; of the head initialisation for ``"finetune"``).
    finetune_epochs : int, default=3
        ``source="finetune"``: epochs of full fine-tuning on all samples.
    per_class : bool, default=False
        One GMM per given class (TURN-style) instead of DivideMix's single GMM.
    max_iter : int, default=10
    reg_covar : float, default=5e-4
    monotone : bool, default=True
        Non-increasing posterior in the tails; False is DivideMix's raw posterior.
    threshold : float, default=0.5
        Flagged iff ``p_clean < threshold``.
    lr, head_lr, momentum, weight_decay, batch_size, image_size, freeze_bn, amp, num_workers
        ``source="finetune"``: as in :class:`~labelsieve.detectors.turn.TurnDetector`
        (defaults 1e-3, 1e-2, 0.9, 5e-4, 64, the encoder's size, True, "auto", None).
    """

    name = "gmm"
    summary = "DivideMix-style 2-component GMM on normalised CE losses (linear probe or fine-tuned model)"
    needs_text = False
    features_only = {"source": "probe"}  # what runs without images (labelsieve.detect, audit --features)

    def __init__(self, *, source: str = "probe", folds: int = 5, probe_epochs: int = 10, finetune_epochs: int = 3,
                 per_class: bool = False, max_iter: int = 10, reg_covar: float = 5e-4, monotone: bool = True,
                 threshold: float = 0.5, lr: float = 1e-3, head_lr: float = 1e-2, momentum: float = 0.9,
                 weight_decay: float = 5e-4, batch_size: int = 64, image_size: int | None = None,
                 freeze_bn: bool = True, amp: str = "auto", num_workers: int | None = None) -> None:
        own = type(self).__name__
        check_param(own, "source", source, source in SOURCES, f"one of {', '.join(map(repr, SOURCES))}")
        check_param(own, "folds", folds, is_pos_int(folds, 2), "an int >= 2")
        check_param(own, "probe_epochs", probe_epochs, is_pos_int(probe_epochs), "an int >= 1")
        check_param(own, "finetune_epochs", finetune_epochs, is_pos_int(finetune_epochs), "an int >= 1")
        check_param(own, "per_class", per_class, isinstance(per_class, bool), "True or False")
        check_param(own, "max_iter", max_iter, is_pos_int(max_iter), "an int >= 1")
        check_param(own, "reg_covar", reg_covar, is_pos_float(reg_covar), "a float > 0")
        check_param(own, "monotone", monotone, isinstance(monotone, bool), "True or False")
        check_param(own, "threshold", threshold, isinstance(threshold, (int, float)) and 0.0 < threshold < 1.0,
                    "a float in (0, 1)")
        self.source = source
        self.folds = folds
        self.probe_epochs = probe_epochs
        self.finetune_epochs = finetune_epochs
        self.per_class = per_class
        self.max_iter = max_iter
        self.reg_covar = float(reg_covar)
        self.monotone = monotone
        self.threshold = float(threshold)
        vars(self).update(check_finetune_params(own, lr=lr, head_lr=head_lr, momentum=momentum,
                                                weight_decay=weight_decay, batch_size=batch_size,
                                                image_size=image_size, freeze_bn=freeze_bn, amp=amp,
                                                num_workers=num_workers))

    def needs_images(self, ctx: DetectionContext) -> str | None:
        """``source="finetune"`` trains the image tower on the images (on features alone: ``source="probe"``)."""
        return ("source='finetune' fine-tunes the image tower on the images (on features alone: source='probe')"
                if self.source == "finetune" else None)

    def _finetuned_losses(self, ctx: DetectionContext, info: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        labels = np.asarray(ctx.labels, dtype=np.int64)
        probe = fit_linear_probe(Rows.of(ctx), labels, ctx.n_classes, loss="ce", epochs=self.probe_epochs,
                                 seed=ctx.seed, device=ctx.device)
        t = time.perf_counter()
        setup = tower.prepare_finetune(ctx, image_size=self.image_size, batch_size=self.batch_size,
                                 num_workers=self.num_workers)
        info["image_cache"] = {"size": setup.image_size, "n_decoded": setup.cache.n_decoded,
                               "seconds": time.perf_counter() - t}
        net = copy.deepcopy(tower.image_tower(ctx.encoder))
        model = tower.TowerClassifier.from_probe(net, probe, freeze_bn=self.freeze_bn)
        trainer = tower.finetune_trainer(model, lr=self.lr, head_lr=self.head_lr, momentum=self.momentum,
                                         weight_decay=self.weight_decay, epochs=self.finetune_epochs, device=ctx.device,
                                         amp=self.amp, progress=ctx.progress, desc="gmm warm-up")
        everyone = np.arange(len(labels))
        seed_everything(ctx.seed)  # the run depends on ctx.seed only, not on what ran before it
        history = trainer.fit(lambda epoch: setup.train_loader(everyone, seed=ctx.seed * 100_003 + epoch),
                              epochs=self.finetune_epochs)
        losses, logits, n_bad = tower.evaluate_losses(trainer, setup)
        info["history"] = [{k: v for k, v in r.items() if isinstance(v, (int, float, str, bool))} for r in history]
        info["n_unreadable"] = n_bad
        del trainer, model
        return losses, softmax(logits, axis=1)

    def detect(self, ctx: DetectionContext) -> DetectionResult:
        seed_everything(ctx.seed)
        t0 = time.perf_counter()
        labels = np.asarray(ctx.labels, dtype=np.int64)
        info: dict[str, Any] = {"source": self.source, "per_class": self.per_class, "max_iter": self.max_iter,
                                "reg_covar": self.reg_covar, "monotone": self.monotone}
        if self.source == "probe":
            losses, probs = oof_probe_losses(ctx, folds=self.folds, epochs=self.probe_epochs)
            what = f"an out-of-fold ({self.folds}-fold) linear probe"
        else:
            losses, probs = self._finetuned_losses(ctx, info)
            what = f"the image tower and head after {self.finetune_epochs} epoch(s) of cross-entropy fine-tuning"
        kw = {"max_iter": self.max_iter, "reg_covar": self.reg_covar, "seed": ctx.seed, "monotone": self.monotone}
        if self.per_class:
            p_clean = per_class_gmm_posterior(losses, labels, ctx.n_classes, **kw)
        else:
            split = fit_gmm_split(losses, **kw)
            p_clean = split.posterior
            info.update(gmm_rule=split.rule, means=split.means, weights=split.weights)
        info["n_flagged"] = int((p_clean < self.threshold).sum())
        info["seconds"] = time.perf_counter() - t0
        scope = "per given class" if self.per_class else "over all samples"
        return DetectionResult(
            p_clean=p_clean, probs=probs, threshold=self.threshold,
            rule=(f"p_clean = posterior of the low-loss component of a 2-component GMM ({scope}) on the min-max "
                  f"normalised cross-entropy of {what}; flagged if p_clean < {self.threshold}."),
            info=info,
        )
