"""``deft``: DEFT's noisy-label detector (Wei et al., "Vision-Language Models are Strong Noisy Label
Detectors", NeurIPS 2024), faithful to the paper and the authors' code, with a fast path.

Per class a positive and a negative learned prompt (CoOp, two shared 16-token contexts, class name
last). With image embedding I and text embeddings T⁺_k, T⁻_k (all L2-normalised) and s = CLIP's
logit scale::

    p_clean(i, k) = σ(s · (cos(I_i, T⁺_k) − cos(I_i, T⁻_k)))

A sample is clean iff p_clean of its given label > 0.5 (with ``consistency``, the real-world-noise
variant, its given label must also be the top class of the positive-prompt classifier).

Training, per epoch (SGD 0.03, momentum 0.9, wd 5e-4, batch 64, cosine, 10 epochs):

* CE over the positive-prompt logits ``s · cos(I, T⁺)`` — on all samples during warm-up, on the
  selected clean samples after it (zero, not NaN, when a batch has none);
* the dual-prompt NLL: "yes" (p_clean → 1) for the target class — the given label in warm-up, after
  it the given label if selected clean, else the predicted class — and "no" (p_clean → 0) for a
  complementary label drawn uniformly from the other classes, redrawn every epoch. The positive
  text features are detached in this term, so it trains the negative context (and the image side).
* The clean set used by an epoch comes from a separate evaluation pass over all samples after the
  previous epoch, never from training mini-batches; the final decision from one after the last.

The image side (``peft``):

* ``auto`` (default): ``vpt_deep`` on ViT image towers, ``none`` on others, recorded in audit.json;
* ``vpt_deep``, ``vpt_shallow``, ``lora``, ``adaptformer``, ``bitfit``: parameter-efficient tuning
  of the image tower on decoded images (:mod:`labelsieve.models.peft`), images decoded once into a
  uint8 cache;
* ``none``: the frozen tower on cached features — the fast path;
* ``feature_adapter``: the fast path plus a residual linear adapter on the cached embeddings
  (identity at init), an image side that adapts without touching the tower (labelsieve's addition;
  see docs/methods.md for why and how it compares).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from labelsieve.core.defaults import default_num_workers
from labelsieve.core.engine import Trainer, make_loader
from labelsieve.core.errors import check_param
from labelsieve.core.optim import cosine_schedule, make_optimizer
from labelsieve.data.imagecache import CachedImageDataset, DecodedImageCache
from labelsieve.data.transforms import eval_transform, train_transform
from labelsieve.detectors.common.base import DetectionContext, DetectionResult, Detector
from labelsieve.detectors.common.losses import dual_prompt_nll
from labelsieve.detectors.common.text_side import SINGLE_TEMPLATE, text_side_info
from labelsieve.detectors.registry import register_detector
from labelsieve.models.peft import apply_peft, resolve_peft, set_peft_train_mode
from labelsieve.models.prompts import DualPromptLearner

PEFT_CHOICES = ("auto", "none", "feature_adapter", "vpt_deep", "vpt_shallow", "lora", "adaptformer", "bitfit")
FEATURE_PATHS = ("none", "feature_adapter")


class FeatureAdapter(nn.Module):
    """Residual linear adapter on image embeddings: ``x + W x`` with W = 0 at init."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim, bias=False)
        nn.init.zeros_(self.linear.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.linear(x)


class DeftModel(nn.Module):
    """The trainable parts of DEFT around a prompt learner and an image-feature function.

    ``forward(x)`` returns (B, 2C): the positive-prompt logits ``s·cos(I, T⁺)`` and the dual logits
    ``s·(cos(I, T⁺) − cos(I, T⁻))``, so the engine's ordered inference yields both.
    """

    def __init__(self, learner: nn.Module, image_module: nn.Module, scale: float) -> None:
        super().__init__()
        self.learner = learner
        self.image_module = image_module
        self.scale = scale

    def image_features(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_module(x).float(), dim=-1)

    def cosines(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        img = self.image_features(x)
        t_pos, t_neg = self.learner()
        return img, t_pos, img @ t_pos.T, img @ t_neg.T

    def train(self, mode: bool = True) -> DeftModel:
        """Train mode for the trainable parts only: a frozen tower (BatchNorm statistics included) stays
        in eval mode."""
        super().train(mode)
        if isinstance(self.image_module, _Encoded):
            set_peft_train_mode(self.image_module.clip_model, mode)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, cp, cn = self.cosines(x)
        return torch.cat([self.scale * cp, self.scale * (cp - cn)], dim=1)


class _Encoded(nn.Module):
    """Image tower as a module: preprocessed images -> embeddings."""

    def __init__(self, clip_model: nn.Module) -> None:
        super().__init__()
        self.clip_model = clip_model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.clip_model.encode_image(x)


@dataclass
class _State:
    """Per-sample state the step function reads: clean selection and complementary labels."""

    clean: torch.Tensor
    comp: torch.Tensor
    warmup: bool


def complementary_labels(labels: np.ndarray, n_classes: int, rng: np.random.Generator) -> np.ndarray:
    """For each sample a class drawn uniformly from the classes other than its label."""
    r = rng.integers(0, n_classes - 1, size=len(labels))
    return r + (r >= labels)


def calibrated_scale(cosines: np.ndarray, labels: np.ndarray, *, max_scale: float = 100.0,
                     min_scale: float = 1.0) -> float:
    """The temperature s in [min_scale, max_scale] minimising the mean NLL of ``labels`` under
    ``softmax(s · cosines)`` (one scalar fitted by golden-section search on log s: robust to label noise,
    it only sets how sharp the classifier is, not what it predicts)."""
    cos = torch.as_tensor(np.asarray(cosines, dtype=np.float64))
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))

    def nll(log_s: float) -> float:
        return float(F.cross_entropy(np.exp(log_s) * cos, y))

    lo, hi = np.log(min_scale), np.log(max_scale)
    g = (np.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = nll(a), nll(b)
    for _ in range(40):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = nll(b)
    best = min((nll(v), v) for v in (lo, hi, (lo + hi) / 2, np.log(max_scale)))
    return float(np.exp(best[1]))


def deft_step(model: DeftModel, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor,
              state: _State) -> tuple[torch.Tensor, int, int]:
    """One DEFT loss: CE on positive prompts (all in warm-up, clean after) + dual-prompt NLL."""
    img, t_pos, cp, cn = model.cosines(x)
    s = model.scale
    logits = s * cp
    clean = torch.ones_like(y, dtype=torch.bool) if state.warmup else state.clean[idx]
    ce = F.cross_entropy(logits[clean], y[clean], reduction="sum") / clean.sum().clamp_min(1)
    target = y if state.warmup else torch.where(clean, y, logits.detach().argmax(1))
    cp_detached = img @ t_pos.detach().T  # the dual term does not move the positive context
    comp = state.comp[idx]
    pos = torch.cat([cp_detached.gather(1, target[:, None]), cp_detached.gather(1, comp[:, None])]).squeeze(1)
    neg = torch.cat([cn.gather(1, target[:, None]), cn.gather(1, comp[:, None])]).squeeze(1)
    yes = torch.cat([torch.ones_like(y, dtype=torch.bool), torch.zeros_like(y, dtype=torch.bool)])
    dual = dual_prompt_nll(s * pos, s * neg, yes=yes, reduction="mean")
    n_correct = int((logits.detach().argmax(1) == y).sum())
    return ce + dual, n_correct, int(len(y))


@register_detector
class DeftDetector(Detector):
    """DEFT dual-prompt noisy-label detector.

    Parameters
    ----------
    peft : str, default="auto"
        Image-side adaptation: one of ``auto``, ``none``, ``feature_adapter``, ``vpt_deep``,
        ``vpt_shallow``, ``lora``, ``adaptformer``, ``bitfit`` (see the module docstring).
    epochs : int, default=10
    warmup_epochs : int, default=1
        1 in the paper for synthetic noise, 5 for real-world noise.
    lr : float, default=0.03
    momentum : float, default=0.9
    weight_decay : float, default=5e-4
    batch_size : int, default=64
    n_ctx : int, default=16
    ctx_init : str or None, default=None
        None: contexts drawn from N(0, 0.02) (the paper); a phrase (e.g. "a photo of a"): both
        contexts start from its token embeddings (n_ctx becomes its length).
    consistency : bool, default=False
        Real-world-noise variant: clean also requires the given label to be the predicted class.
    image_size : int or None
        PEFT path: decoded-image cache size (default: the model's input size).
    adapter_lr : float, default=0.003
        Learning rate of the ``feature_adapter`` (its gradients are ~100× those of the contexts).
    logit_scale : "calibrated", "model" or float, default="calibrated"
        s in the losses and in p_clean. ``"model"`` is the paper's (CLIP's learned scale, 100).
        ``"calibrated"`` fits one temperature to the data first: the s ≤ the model's scale that
        minimises the zero-shot NLL of the given labels (see :func:`calibrated_scale`). On a model whose
        image-text cosines are spread wider than CLIP's (the mini CLIP's are ~3× wider), s = 100 makes the
        CE start at ~7 nats and the prompt training diverge; the calibrated s keeps it stable.
    amp : str, default="auto"
    """

    name = "deft"
    summary = "DEFT: dual (positive/negative) learned prompts per class, image side tuned by PEFT (default)"
    needs_text = True

    def __init__(self, *, peft: str = "auto", epochs: int = 10, warmup_epochs: int = 1, lr: float = 0.03,
                 momentum: float = 0.9, weight_decay: float = 5e-4, batch_size: int = 64, n_ctx: int = 16,
                 ctx_init: str | None = None, consistency: bool = False, image_size: int | None = None,
                 adapter_lr: float = 0.003, logit_scale: float | str = "calibrated", amp: str = "auto",
                 num_workers: int | None = None) -> None:
        own = type(self).__name__
        check_param(own, "peft", peft, peft in PEFT_CHOICES, f"one of {', '.join(PEFT_CHOICES)}")
        check_param(own, "epochs", epochs, isinstance(epochs, int) and epochs >= 1, "an int >= 1")
        check_param(own, "warmup_epochs", warmup_epochs, isinstance(warmup_epochs, int) and warmup_epochs >= 0,
                    "an int >= 0")
        check_param(own, "lr", lr, isinstance(lr, (int, float)) and lr > 0, "a float > 0")
        check_param(own, "batch_size", batch_size, isinstance(batch_size, int) and batch_size >= 2, "an int >= 2")
        check_param(own, "n_ctx", n_ctx, isinstance(n_ctx, int) and 1 <= n_ctx <= 60, "an int in [1, 60]")
        self.peft = peft
        self.epochs = epochs
        self.warmup_epochs = warmup_epochs
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.n_ctx = n_ctx
        self.ctx_init = ctx_init
        self.consistency = consistency
        self.image_size = image_size
        self.adapter_lr = adapter_lr
        check_param(own, "logit_scale", logit_scale, logit_scale in ("model", "calibrated") or (
            isinstance(logit_scale, (int, float)) and not isinstance(logit_scale, bool) and logit_scale > 0),
            "'model', 'calibrated' or a float > 0")
        self.logit_scale = logit_scale
        self.amp = amp
        self.num_workers = num_workers

    # ------------------------------------------------------------------------------------------
    def _resolve_peft(self, ctx: DetectionContext) -> str:
        if self.peft in FEATURE_PATHS:
            return self.peft
        return resolve_peft(ctx.encoder.model, self.peft)

    def detect(self, ctx: DetectionContext) -> DetectionResult:
        with torch.random.fork_rng(devices=[]):  # seeded from ctx.seed; the caller's RNG state is untouched
            torch.manual_seed(ctx.seed)
            return self._detect(ctx)

    def _detect(self, ctx: DetectionContext) -> DetectionResult:
        ctx.encoder.require_text("DEFT")
        peft = self._resolve_peft(ctx)
        device = ctx.device
        clip_model = ctx.encoder.model
        if peft not in FEATURE_PATHS:
            # PEFT changes the tower in place: work on a copy so the caller's encoder stays frozen and intact.
            clip_model = copy.deepcopy(clip_model)
        for p in clip_model.parameters():
            p.requires_grad_(False)
        learner = DualPromptLearner(clip_model, ctx.encoder.tokenizer, ctx.classnames,
                                    n_ctx=None if self.ctx_init else self.n_ctx, init=self.ctx_init).to(device)
        n, C = len(ctx.labels), ctx.n_classes
        labels = torch.as_tensor(ctx.labels, dtype=torch.long)
        peft_info: dict = {}
        if peft in FEATURE_PATHS:
            feats = torch.as_tensor(ctx.features())
            image_module: nn.Module = FeatureAdapter(feats.shape[1]) if peft == "feature_adapter" else nn.Identity()
            dataset = torch.utils.data.TensorDataset(feats, labels, torch.arange(n), torch.ones(n, dtype=torch.bool))
            train_ds = eval_ds = dataset
            workers = 0
        else:
            info = apply_peft(clip_model, peft)
            peft_info = {"n_trainable": info.n_trainable, "n_total": info.n_total, "note": info.note}
            image_module = _Encoded(clip_model)
            size = self.image_size or ctx.encoder.image_size
            cache = DecodedImageCache.from_images(ctx.images, size=size, cache_dir=ctx.cache_dir,
                                                  progress=ctx.progress)
            norm = {"mean": ctx.encoder.mean, "std": ctx.encoder.std}
            train_ds = CachedImageDataset(cache, labels=ctx.labels, transform=train_transform(size, **norm))
            eval_ds = CachedImageDataset(cache, labels=ctx.labels, transform=eval_transform(size, **norm))
            workers = self.num_workers if self.num_workers is not None else default_num_workers(4)
        scale, text_info = self._scale(ctx)
        model = DeftModel(learner, image_module, scale).to(device)
        groups = [{"params": [p for p in learner.parameters() if p.requires_grad]}]
        image_params = [p for p in image_module.parameters() if p.requires_grad]
        if image_params:
            groups.append({"params": image_params,
                           **({"lr": self.adapter_lr} if peft == "feature_adapter" else {})})
        opt = make_optimizer(groups, name="sgd", lr=self.lr, weight_decay=self.weight_decay, momentum=self.momentum)
        steps = max(1, (n + self.batch_size - 1) // self.batch_size)
        sched = cosine_schedule(opt, epochs=self.epochs, steps_per_epoch=steps)
        trainer = Trainer(model, optimizer=opt, scheduler=sched, device=device, amp=self.amp,
                          progress=ctx.progress, desc=f"deft ({peft})")
        rng = np.random.default_rng(ctx.seed)
        state = _State(clean=torch.ones(n, dtype=torch.bool, device=device),
                       comp=torch.zeros(n, dtype=torch.long, device=device), warmup=True)
        eval_loader = make_loader(eval_ds, batch_size=max(256, self.batch_size), num_workers=workers)

        def step(tr: Trainer, batch) -> tuple[torch.Tensor, int, int]:
            x, y, idx, ok = tr.to_device(batch)
            keep = ok.bool()
            return deft_step(model, x[keep], y[keep], idx[keep], state)

        history = []
        for epoch in range(self.epochs):
            state.warmup = epoch < self.warmup_epochs
            state.comp = torch.as_tensor(complementary_labels(ctx.labels, C, rng), device=device)
            if not state.warmup:
                state.clean = torch.as_tensor(self._clean(trainer, eval_loader, ctx.labels)[0], device=device)
            loader = make_loader(train_ds, batch_size=self.batch_size, shuffle=True, seed=ctx.seed + epoch,
                                 num_workers=workers)
            rec = trainer.train_epoch(loader, epoch=epoch, step_fn=step)
            rec["n_clean_selected"] = int(state.clean.sum()) if not state.warmup else n
            history.append({k: v for k, v in rec.items() if isinstance(v, (int, float, str))})
        clean, p_clean, probs = self._clean(trainer, eval_loader, ctx.labels)
        rule = ("p_clean = σ(s·(cos(img, positive prompt of the given label) − cos(img, negative prompt))), "
                f"s = {model.scale:.1f}; flagged if p_clean < 0.5")
        rule += " or the given label is not the top class (consistency variant)." if self.consistency else "."
        return DetectionResult(
            p_clean=p_clean, probs=probs, threshold=0.5, flags=~clean if self.consistency else None, rule=rule,
            info={"peft": peft, "peft_requested": self.peft, **peft_info, "history": history,
                  "logit_scale": model.scale, **text_info},
        )

    def _scale(self, ctx: DetectionContext) -> tuple[float, dict[str, Any]]:
        """(logit scale, :func:`~labelsieve.detectors.label_match.text_side_info` of the zero-shot classifier)."""
        text = ctx.encoder.class_text_embeddings(ctx.classnames, SINGLE_TEMPLATE)
        cos = ctx.features() @ text.T  # unscaled: the calibration fits the scale to these
        text_info = text_side_info(cos, ctx.labels)
        if self.logit_scale == "model":
            return ctx.encoder.logit_scale, text_info
        if self.logit_scale == "calibrated":
            return calibrated_scale(cos, ctx.labels, max_scale=ctx.encoder.logit_scale), text_info
        return float(self.logit_scale), text_info

    def _clean(self, trainer, loader, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Evaluation pass over all samples: (clean mask, p_clean of the given label, class probs)."""
        out, _ = trainer.predict(loader)
        C = out.shape[1] // 2
        logits, dual = out[:, :C].astype(np.float64), out[:, C:].astype(np.float64)
        p_clean = 1.0 / (1.0 + np.exp(-dual[np.arange(len(labels)), labels]))
        z = logits - logits.max(1, keepdims=True)
        probs = np.exp(z) / np.exp(z).sum(1, keepdims=True)
        clean = p_clean > 0.5
        if self.consistency:
            clean &= logits.argmax(1) == labels
        return clean, p_clean, probs
