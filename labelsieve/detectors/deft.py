"""``deft``: DEFT's noisy-label detector (Wei et al., "Vision-Language Models are Strong Noisy Label
Detectors", NeurIPS 2024), following the authors' code (HotanLee/DeFT ``main_phase1.py``,
``main_real_phase1.py``, ``model/CLIP.py``, ``config/PEFT/*.yaml``), with labelsieve's options named.

Per class a positive and a negative learned prompt (CoOp, two shared 16-token contexts, class name
last). With image embedding I and text embeddings T⁺_k, T⁻_k (all L2-normalised) and s = CLIP's
logit scale (100)::

    p_clean(i, k) = p_yes(i, k) = softmax([s·cos(I_i, T⁺_k), s·cos(I_i, T⁻_k)])[0]

A sample is clean iff p_clean of its given label > 0.5; with ``consistency`` (the authors' real-world
variant, ``main_real_phase1.py``) its given label must also be the argmax over classes of p_clean.

Training, per epoch (SGD 0.03, momentum 0.9, wd 5e-4, batch 64, 10 epochs, cosine stepped per epoch):

* L_sim: CE over the positive-prompt logits ``s · cos(I, T⁺)`` — on all samples during warm-up (1
  epoch; 5 and symmetric CE with α = β = 1 for the real-world variant), on the selected clean samples
  after it (zero, not NaN, when a batch has none). It trains the positive context and the image side.
* L_dp (:func:`~labelsieve.detectors.common.losses.deft_dual_loss`): ``mean NLL(log p_no, complementary)
  + mean NLL(log p_yes, target)``, p clamped to ≥ 1e-5, with the positive logits and the image features
  detached, so it trains the negative context only. "yes" target: the given label in warm-up, after it
  the given label if selected clean, else the positive-prompt prediction (real-world variant: pseudo-labels
  from the second epoch on). "no": a class drawn uniformly from those other than the given label, redrawn
  every epoch. ``positive_weight`` weights the "yes" term; ``severe_noise`` is the paper's setting for severe
  noise: weight 0.25 together with learning rate 0.01 instead of 0.03.
* Selection (``selection``): ``"eval_pass"`` (default, labelsieve's): the clean set an epoch trains on
  comes from an evaluation pass over all samples before it, and the decision from one after training;
  ``"batch"`` (the authors'): each training batch selects on its own forward pass, and the decision is
  what the last epoch's batches said.

The image side (``peft``):

* ``auto`` (default): ``vpt_deep`` — the paper's — on a ViT image tower with a GPU; on a CPU or a CNN
  tower the frozen tower on cached features (``none``). audit.json says which ran and why.
* ``vpt_deep``, ``vpt_shallow``, ``lora``, ``adaptformer``, ``bitfit``: parameter-efficient tuning
  of the image tower on decoded images (:mod:`labelsieve.models.peft`), images decoded once into a
  uint8 cache, augmented by ``augment`` (the authors' flip-and-shift by default);
* ``none``: the frozen tower on cached features — the fast path;
* ``feature_adapter``: the fast path plus a residual linear adapter on the cached embeddings
  (identity at init; labelsieve's addition, trained by L_sim only like any image side).

Budgets for many rows and many classes (labelsieve's options, off in the paper recipe;
:mod:`labelsieve.detectors.common.budget`): ``max_steps`` caps the optimisation steps over the run (each
epoch trains on a random subset of rows; the evaluation passes still score every row), ``text_budget`` caps
steps × classes (every step runs the 2C prompts through the text tower) by growing the batch and the
learning rates and cutting the steps by the same factor. The evaluation passes run the text tower once per
pass, not once per batch (the same numbers).

Every parameter, its value, and whether it is the paper's or labelsieve's is in :data:`RECIPE`
(``labelsieve detectors --show deft``; audit.json records it as ``detector_info.recipe``).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from labelsieve.core import distributed
from labelsieve.core.defaults import default_num_workers
from labelsieve.core.engine import Trainer, make_loader
from labelsieve.core.errors import check_param
from labelsieve.core.optim import cosine_schedule, make_optimizer
from labelsieve.data.imagecache import CachedImageDataset, DecodedImageCache
from labelsieve.data.transforms import eval_transform
from labelsieve.detectors.common.base import (
    DetectionContext,
    DetectionResult,
    Detector,
    feature_cosines,
    feature_dataset,
)
from labelsieve.detectors.common.budget import derived_seed, epoch_subset, rows_per_epoch, text_budget_scale
from labelsieve.detectors.common.losses import deft_dual_loss, sce_loss
from labelsieve.detectors.common.recipe import Param, Recipe, amp_param, is_float, is_int, one_of, workers_param
from labelsieve.detectors.common.text_side import SINGLE_TEMPLATE, text_side_info
from labelsieve.detectors.common.views import WEAK_VIEWS, weak_view
from labelsieve.detectors.registry import register_detector
from labelsieve.models.peft import apply_peft, is_vit_tower, resolve_peft, set_peft_train_mode
from labelsieve.models.prompts import DualPromptLearner

__all__ = ["RECIPE", "DeftDetector", "DeftModel", "budget_warning", "calibrated_scale", "complementary_labels",
           "deft_step"]

PEFT_CHOICES = ("auto", "none", "feature_adapter", "vpt_deep", "vpt_shallow", "lora", "adaptformer", "bitfit")
FEATURE_PATHS = ("none", "feature_adapter")
SELECTIONS = ("eval_pass", "batch")
SCHEDULES = ("cosine_epoch", "cosine_step", "constant")
_CODE = "HotanLee/DeFT"
_YAML = f"{_CODE} config/PEFT/*.yaml"
_SEVERE = ("the paper's severe-noise setting (appendix A.1 as issues 10 and 21 read it; not in the authors' released "
           "code or our stored sources)")
#: The severe-noise setting (``severe_noise=True``): learning rate and weight of the "yes" term.
SEVERE_LR, SEVERE_WEIGHT = 0.01, 0.25


def _is_scale(v: Any) -> bool:
    return v in ("model", "calibrated") or is_float(0, lo_open=True)(v)


#: DEFT's recipe: every hyperparameter, its default, and whether that is the paper's or labelsieve's.
RECIPE = Recipe("DeftDetector", "Wei et al., NeurIPS 2024; authors' code HotanLee/DeFT @ dafcc14", [
    Param("peft", "auto", "labelsieve", f"{_YAML} (vpt_deep: True, vpt_len: 20)",
          "auto: VPT-deep (the paper's) on a ViT tower with a GPU; the frozen tower on cached features on a CPU "
          "or a CNN tower, where VPT cannot run or costs ~50x more per image", paper="vpt_deep",
          check=one_of(*PEFT_CHOICES), expected=f"one of {', '.join(PEFT_CHOICES)}"),
    Param("epochs", 10, "paper", _YAML, check=is_int(1), expected="an int >= 1"),
    Param("warmup_epochs", None, "paper", f"{_YAML} warmup: 1 (synthetic), 5 (clothing1m, webvision, cifar100N)",
          "None: 1, or 5 with consistency", check=is_int(0, none=True), expected="None or an int >= 0"),
    Param("lr", 0.03, "paper", _YAML, check=is_float(0, lo_open=True), expected="a float > 0", convert=float),
    Param("momentum", 0.9, "paper", f"{_YAML}; model/load_clip.py (SGD)", check=is_float(0, 1, hi_open=True),
          expected="a float in [0, 1)", convert=float),
    Param("weight_decay", 5e-4, "paper", _YAML, check=is_float(0), expected="a float >= 0", convert=float),
    Param("batch_size", 64, "paper", f"{_YAML} (32 for Clothing1M)", check=is_int(2), expected="an int >= 2"),
    Param("n_ctx", 16, "paper", f"{_YAML} N_CTX", check=is_int(1, 60), expected="an int in [1, 60]"),
    Param("ctx_init", None, "paper", f"{_CODE} model/text_encoder.py PromptLearner (random N(0, 0.02); "
          "CTX_INIT is ignored)", "a phrase starts both contexts from its token embeddings",
          check=lambda v: v is None or (isinstance(v, str) and bool(v.strip())), expected="None or a phrase"),
    Param("logit_scale", "model", "paper", f"{_CODE} model/CLIP.py (clip_model.logit_scale.exp(), frozen)",
          "'calibrated' (labelsieve option): the s <= the model's that minimises the zero-shot NLL of the given "
          "labels; a float: that s", check=_is_scale, expected="'model', 'calibrated' or a float > 0"),
    Param("lr_schedule", "cosine_epoch", "paper", f"{_CODE} main_phase1.py L150/L157 (CosineAnnealingLR(T_max="
          "epochs), stepped per epoch)", "'cosine_step' (labelsieve option); 'constant' is what the authors' "
          "real-world scripts run (they never step the scheduler)", check=one_of(*SCHEDULES),
          expected=f"one of {', '.join(SCHEDULES)}"),
    Param("selection", "eval_pass", "labelsieve", f"{_CODE} main_phase1.py L53-L61 (per training batch)",
          "DESIGN §3: select with a separate evaluation pass over all samples, never from training "
          "mini-batches; 'batch' is the authors'", paper="batch", check=one_of(*SELECTIONS),
          expected=f"one of {', '.join(SELECTIONS)}"),
    Param("consistency", False, "paper", f"{_CODE} main_real_phase1.py (real-world noise)",
          "True: the real-world variant (argmax of p_clean over classes, SCE warm-up, pseudo-labels after "
          "epoch 1)", check=one_of(True, False), expected="True or False"),
    Param("severe_noise", False, "paper", _SEVERE,
          f"True: the paper's setting for severe noise, lr {SEVERE_LR:g} (instead of 0.03) together with weight "
          f"{SEVERE_WEIGHT:g} on the 'yes' term; the two are one option",
          check=one_of(True, False), expected="True or False"),
    Param("positive_weight", 1.0, "paper", f"{_CODE} main_phase1.py L69/L74 (weight 1)",
          f"weight of the 'yes' term; severe_noise sets it to {SEVERE_WEIGHT:g} with the lower learning rate",
          check=is_float(0), expected="a float >= 0", convert=float),
    Param("augment", "flip_shift", "paper", f"{_CODE} dataloader/dataloader_cifar.py (RandomCrop(32, 4) + flip)",
          "PEFT paths only; 'rrc' = random resized crop 0.08-1 + flip (labelsieve's earlier view)",
          check=one_of(*WEAK_VIEWS), expected=f"one of {', '.join(WEAK_VIEWS)}"),
    Param("image_size", None, "labelsieve", note="PEFT paths: decoded-image size; None: the model's input size",
          check=is_int(16, none=True), expected="None or an int >= 16"),
    Param("adapter_lr", 0.003, "labelsieve", note="feature_adapter only (its gradients are ~100x the contexts')",
          check=is_float(0, lo_open=True), expected="a float > 0", convert=float),
    Param("max_steps", None, "labelsieve", note="cap on the optimisation steps over the run (each epoch trains on a "
          "random subset of rows; the evaluation passes still score every row); None: every row every epoch",
          check=is_int(1, none=True), expected="None or an int >= 1"),
    Param("text_budget", None, "labelsieve", note="cap on steps × classes (each step runs all 2C prompts through "
          "the text tower); above it the batch and the learning rates grow by k and the steps shrink by k (rows "
          "seen unchanged; linear scaling rule). None: no cap. Measured (issue 21): keeps DEFT's ranking with "
          "logit_scale=calibrated, costs much of it at the model's scale (a warning says so)",
          check=is_int(1, none=True), expected="None or an int >= 1"),
    amp_param(source=f"{_CODE} utils/config.py prec fp16", paper="fp16 parameters",
              note="fp32 master weights with bf16/fp16 autocast on CUDA; the authors train fp16 parameters with "
                   "plain SGD"),
    workers_param("PEFT paths: DataLoader workers"),
], fixed=[
    Param("dual_loss", "mean NLL(log p_no, comp) + w·mean NLL(log p_yes, target), p clamped >= 1e-5", "paper",
          f"{_CODE} main_phase1.py L64-L69"),
    Param("dual_loss_gradient", "negative context only (positive logits and image features detached)", "paper",
          f"{_CODE} main_phase1.py L53; model/CLIP.py Model.forward"),
    Param("sim_loss", "CE on all samples in warm-up, on the selected clean samples after", "paper",
          f"{_CODE} main_phase1.py L67-L71"),
    Param("complementary_labels", "uniform over classes != given label, redrawn every epoch", "paper",
          f"{_CODE} dataloader/*.py __getitem__"),
    Param("vpt", "20 tokens per block, replaced at every block, init U(±sqrt(6/(3·p·p+d)))", "paper",
          f"{_CODE} model/peft_modelus.py VPT; model/CLIP.py"),
    Param("context_init_std", 0.02, "paper", f"{_CODE} model/text_encoder.py"),
    Param("empty_selection", "loss 0", "labelsieve", f"{_CODE} main_phase1.py L71 (mean of an empty tensor)",
          "the authors' code gives NaN", paper="NaN"),
    Param("normalisation", "the model's mean/std", "labelsieve", f"{_CODE} dataloader_cifar.py (CIFAR statistics)",
          "a dataset-agnostic tool uses the statistics the model was trained with", paper="dataset statistics"),
])


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
    ``s·(cos(I, T⁺) − cos(I, T⁻))`` (p_clean = σ of them), so the engine's ordered inference yields both.
    """

    def __init__(self, learner: nn.Module, image_module: nn.Module, scale: float) -> None:
        super().__init__()
        self.learner = learner
        self.image_module = image_module
        self.scale = scale
        self._text: tuple[torch.Tensor, torch.Tensor] | None = None

    @contextlib.contextmanager
    def text_once(self) -> Iterator[None]:
        """Within: the prompts' text features are computed once (in eval mode, without gradient) and reused by
        every batch of an evaluation pass instead of running the text tower per batch. The same numbers."""
        was_training = self.training
        self.eval()
        with torch.no_grad():
            t_pos, t_neg = self.learner()
            self._text = (t_pos.detach(), t_neg.detach())
        self.train(was_training)
        try:
            yield
        finally:
            self._text = None

    def image_features(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_module(x).float(), dim=-1)

    def logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(positive logits, negative logits), each (B, C) and scaled by s. The negative ones are computed
        on **detached** image features (the authors' ``image_features.detach()``): only L_sim, through the
        positive logits, reaches the image side."""
        img = self.image_features(x)
        t_pos, t_neg = self._text if self._text is not None else self.learner()
        return self.scale * img @ t_pos.T, self.scale * img.detach() @ t_neg.T

    def train(self, mode: bool = True) -> DeftModel:
        """Train mode for the trainable parts only: a frozen tower (BatchNorm statistics included) stays
        in eval mode."""
        super().train(mode)
        if isinstance(self.image_module, _Encoded):
            set_peft_train_mode(self.image_module.clip_model, mode)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos, neg = self.logits(x)
        return torch.cat([pos, pos - neg], dim=1)


class _Encoded(nn.Module):
    """Image tower as a module: preprocessed images -> embeddings."""

    def __init__(self, clip_model: nn.Module) -> None:
        super().__init__()
        self.clip_model = clip_model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.clip_model.encode_image(x)


#: Rows per block when the evaluation pass's outputs are turned into probabilities.
_EVAL_BLOCK = 1 << 16


@dataclass
class _State:
    """What the step function reads and writes for the current epoch.

    Attributes
    ----------
    clean : BoolTensor (n,)
        The eval-pass selection (``selection="eval_pass"``).
    comp : LongTensor (n,)
        Complementary labels of this epoch.
    warmup : bool
        L_sim on every sample (SCE in the real-world variant).
    pseudo : bool
        L_dp's "yes" target: pseudo-labels (the given label if selected, else the prediction).
    batch_select : bool
        Select on the batch's own forward pass (``selection="batch"``).
    consistency : bool
        The real-world rule (argmax of p_clean over classes must be the given label) and SCE warm-up.
    positive_weight : float
    record : dict of Tensor, optional
        When set (the last epoch, ``selection="batch"``): per-sample ``p_clean`` (n,), ``top`` (n,),
        ``probs`` (n, C) and ``seen`` (n,), written by every batch.
    """

    clean: torch.Tensor
    comp: torch.Tensor
    warmup: bool = True
    pseudo: bool = False
    batch_select: bool = False
    consistency: bool = False
    positive_weight: float = 1.0
    record: dict[str, torch.Tensor] | None = None


def complementary_labels(labels: np.ndarray, n_classes: int, rng: np.random.Generator) -> np.ndarray:
    """For each sample a class drawn uniformly from the classes other than its label."""
    r = rng.integers(0, n_classes - 1, size=len(labels))
    return r + (r >= labels)


def clean_rule(p_yes: torch.Tensor, labels: torch.Tensor, *, consistency: bool) -> torch.Tensor:
    """DEFT's selection from p_yes (N, C): p_yes of the given label > 0.5, and with ``consistency`` the
    given label is also the argmax of p_yes over classes (``main_real_phase1.py``)."""
    clean = p_yes.gather(1, labels[:, None]).squeeze(1) > 0.5
    if consistency:
        clean &= p_yes.argmax(1) == labels
    return clean


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
    """One DEFT loss, L_sim + L_dp (see the module docstring); returns (loss, n_correct, n)."""
    pos, neg = model.logits(x)
    with torch.no_grad():
        p_yes = torch.sigmoid(pos - neg)
        pred = pos.argmax(1)
    clean = clean_rule(p_yes, y, consistency=state.consistency) if state.batch_select else state.clean[idx]
    if state.warmup:
        sim = (sce_loss(pos, y, alpha=1.0, beta=1.0, log_clip=math.log(1e-4)) if state.consistency
               else F.cross_entropy(pos, y))
    else:
        sim = F.cross_entropy(pos[clean], y[clean], reduction="sum") / clean.sum().clamp_min(1)
    target = torch.where(clean, y, pred) if state.pseudo else y
    dual = deft_dual_loss(pos, neg, target, state.comp[idx], positive_weight=state.positive_weight)
    if state.record is not None:
        state.record["p_clean"][idx] = p_yes.gather(1, y[:, None]).squeeze(1)
        state.record["top"][idx] = p_yes.argmax(1)
        state.record["probs"][idx] = torch.softmax(pos.detach(), dim=1)
        state.record["seen"][idx] = True
    return sim + dual, int((pred == y).sum()), int(len(y))


def budget_warning(k: int, scale: float) -> str:
    """The warning for ``text_budget`` at a scale that was not calibrated (measured in issue 21's grid)."""
    return (f"text_budget trains DEFT in {k}-fold fewer steps of {k}-fold larger batches at {k}x the learning "
            f"rate, here at the logit scale s = {scale:.0f}. On labelsieve's benchmark grid (a stand-in CLIP at "
            "its learned s = 35, 10 classes, k = 10) that cost much of DEFT's ranking (mean AUROC 0.78 against "
            "0.91, F1 0.60 against 0.72 without the budget, and unstable across seeds), while with the calibrated "
            "scale the same budget kept it (AUROC 0.93 against 0.94; docs/methods.md, 'step and text budgets'). "
            "Use --method \"deft(logit_scale=calibrated, text_budget=...)\", or no text budget.")


def _merge_records(record: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The last epoch's batch scores of every row: under torchrun each rank scored its share of the rows, so
    each row's scores come from the rank that saw it (on every rank); in one process, ``record``."""
    if not distributed.sharding():
        return record
    out = {k: v.cpu().clone() for k, v in record.items()}
    for part in distributed.all_gather_object({k: v.cpu() for k, v in record.items()}):
        seen = part["seen"]
        for key in ("p_clean", "top", "probs"):
            out[key][seen] = part[key][seen]
        out["seen"] |= seen
    return out


def _schedule(opt: torch.optim.Optimizer, kind: str, epochs: int, steps: int) -> tuple[Any, str]:
    """(scheduler or None, Trainer interval) for ``lr_schedule``."""
    if kind == "cosine_epoch":
        return cosine_schedule(opt, epochs=epochs, steps_per_epoch=1), "epoch"
    if kind == "cosine_step":
        return cosine_schedule(opt, epochs=epochs, steps_per_epoch=steps), "step"
    return None, "step"


@register_detector
class DeftDetector(Detector):
    """DEFT dual-prompt noisy-label detector.

    Parameters are those of :data:`RECIPE` (``labelsieve detectors --show deft`` prints them with their
    origin): ``peft``, ``epochs``, ``warmup_epochs``, ``lr``, ``momentum``, ``weight_decay``,
    ``batch_size``, ``n_ctx``, ``ctx_init``, ``logit_scale``, ``lr_schedule``, ``selection``,
    ``consistency``, ``positive_weight``, ``augment``, ``image_size``, ``adapter_lr``, ``amp``,
    ``num_workers``. See the module docstring for what each does.
    """

    name = "deft"
    summary = "DEFT: dual (positive/negative) learned prompts per class, image side tuned by VPT on a ViT with a GPU"
    needs_text = True
    recipe = RECIPE
    features_only = {"peft": "none"}  # what runs without images (labelsieve.detect, audit --features)

    # ------------------------------------------------------------------------------------------
    def resolve_path(self, ctx: DetectionContext) -> tuple[str, str]:
        """(the image-side method that runs, why). ``auto``: ``vpt_deep`` on a ViT tower with a GPU, else
        ``none``; an explicit method runs as asked (a ViT-only one on a CNN tower raises ModelError)."""
        if self.peft in FEATURE_PATHS:
            return self.peft, "requested"
        if self.peft != "auto":
            return resolve_peft(ctx.encoder.model, self.peft), "requested"
        if not is_vit_tower(ctx.encoder.model):
            tower = type(getattr(ctx.encoder.model, "visual", ctx.encoder.model)).__name__
            return "none", (f"the image tower is {tower}, not a ViT: VPT-deep (the paper's image side) needs one, so "
                            "the frozen tower runs on cached features")
        if ctx.device.type == "cpu":
            return "none", ("no GPU: VPT-deep trains through the image tower on every image in every epoch (about 50x "
                            "slower per image than cached features, docs/benchmarks.md §2), so the frozen tower runs "
                            "on cached features; peft='vpt_deep' forces VPT")
        return "vpt_deep", "a ViT image tower on a GPU: the paper's VPT-deep"

    def _check_params(self) -> None:
        if self.severe_noise:
            paper = RECIPE.defaults
            for name in ("lr", "positive_weight"):
                check_param(type(self).__name__, name, getattr(self, name), getattr(self, name) == paper[name],
                            f"left at its default ({paper[name]:g}) with severe_noise=True, which sets it "
                            f"(lr {SEVERE_LR:g}, positive_weight {SEVERE_WEIGHT:g}); give severe_noise or the values")

    def effective_lr_and_weight(self) -> tuple[float, float]:
        """(learning rate, weight of the "yes" term) that run: the severe-noise pair, or the parameters."""
        if self.severe_noise:
            return SEVERE_LR, SEVERE_WEIGHT
        return self.lr, self.positive_weight

    def trains_on_every_rank(self, ctx: DetectionContext) -> bool:
        """PEFT through the image tower trains under DDP on every rank (torchrun); the feature paths read the
        cached features, which are on rank 0, and run there alone."""
        return self.resolve_path(ctx)[0] not in FEATURE_PATHS

    def detect(self, ctx: DetectionContext) -> DetectionResult:
        with torch.random.fork_rng(devices=[]):  # seeded from ctx.seed; the caller's RNG state is untouched
            torch.manual_seed(ctx.seed)
            return self._detect(ctx)

    def _data(self, ctx: DetectionContext, peft: str, clip_model: nn.Module
              ) -> tuple[nn.Module, Any, Any, int, dict[str, Any]]:
        """(image module, training dataset, evaluation dataset, loader workers, PEFT info)."""
        labels = torch.as_tensor(ctx.labels, dtype=torch.long)
        if peft in FEATURE_PATHS:
            dim = int(ctx.raw_features().shape[1])
            module: nn.Module = FeatureAdapter(dim) if peft == "feature_adapter" else nn.Identity()
            ds = feature_dataset(ctx, labels)
            return module, ds, ds, 0, {}
        info = apply_peft(clip_model, peft)
        size = self.image_size or ctx.encoder.image_size
        # on every rank under torchrun: rank 0 decodes while the others wait, then they open it
        cache = distributed.main_first(DecodedImageCache.from_images, ctx.images, size=size, cache_dir=ctx.cache_dir,
                                       progress=ctx.progress)
        norm = {"mean": ctx.encoder.mean, "std": ctx.encoder.std}
        train_ds = CachedImageDataset(cache, labels=ctx.labels, transform=weak_view(self.augment, size, **norm))
        eval_ds = CachedImageDataset(cache, labels=ctx.labels, transform=eval_transform(size, **norm))
        workers = self.num_workers if self.num_workers is not None else default_num_workers(4)
        return (_Encoded(clip_model), train_ds, eval_ds, workers,
                {"n_trainable": info.n_trainable, "n_total": info.n_total, "note": info.note})

    def _detect(self, ctx: DetectionContext) -> DetectionResult:
        ctx.encoder.require_text("DEFT")
        peft, reason = self.resolve_path(ctx)
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
        warmup = self.warmup_epochs if self.warmup_epochs is not None else (5 if self.consistency else 1)
        image_module, train_ds, eval_ds, workers, peft_info = self._data(ctx, peft, clip_model)
        # the zero-shot cosines read the cached features: on rank 0 under torchrun, sent to every rank
        scale, scale_how, text_info = distributed.computed_on_main(self._scale, ctx)
        model = DeftModel(learner, image_module, scale).to(device)
        groups = [{"params": [p for p in learner.parameters() if p.requires_grad]}]
        image_params = [p for p in image_module.parameters() if p.requires_grad]
        if image_params:
            groups.append({"params": image_params,
                           **({"lr": self.adapter_lr} if peft == "feature_adapter" else {})})
        per_epoch = rows_per_epoch(n, max_steps=self.max_steps, epochs=self.epochs, batch_size=self.batch_size)
        k = text_budget_scale(steps_per_epoch=math.ceil(per_epoch / self.batch_size), epochs=self.epochs,
                              n_classes=C, budget=self.text_budget)
        batch_size = self.batch_size * k
        if k > 1 and self.logit_scale != "calibrated":
            text_info = {**text_info, "warnings": [*text_info.get("warnings", []), budget_warning(k, scale)]}
        lr, positive_weight = self.effective_lr_and_weight()
        for g in groups:  # the linear scaling rule: k times the batch, k times the learning rate
            g["lr"] = g.get("lr", lr) * k
        opt = make_optimizer(groups, name="sgd", lr=lr * k, weight_decay=self.weight_decay,
                             momentum=self.momentum)
        steps = max(1, math.ceil(per_epoch / batch_size))
        sched, interval = _schedule(opt, self.lr_schedule, self.epochs, steps)
        trainer = Trainer(model, optimizer=opt, scheduler=sched, scheduler_interval=interval, device=device,
                          amp=self.amp, progress=ctx.progress, desc=f"deft ({peft})")
        rng = np.random.default_rng(ctx.seed)
        labels = torch.as_tensor(ctx.labels, dtype=torch.long, device=device)
        state = _State(clean=torch.ones(n, dtype=torch.bool, device=device),
                       comp=torch.zeros(n, dtype=torch.long, device=device),
                       batch_select=self.selection == "batch", consistency=self.consistency,
                       positive_weight=positive_weight)
        eval_loader = make_loader(eval_ds, batch_size=max(256, batch_size), num_workers=workers)

        def step(tr: Trainer, batch) -> tuple[torch.Tensor, int, int]:
            x, y, idx, ok = tr.to_device(batch)
            keep = ok.bool()
            return deft_step(model, x[keep], y[keep], idx[keep], state)

        history = []
        for epoch in range(self.epochs):
            state.warmup = epoch < warmup
            # the real-world script switches L_dp to pseudo-labels after epoch 1 whatever the warm-up length
            state.pseudo = epoch >= 1 if self.consistency else not state.warmup
            state.comp = torch.as_tensor(complementary_labels(ctx.labels, C, rng), device=device)
            if not state.batch_select and (state.pseudo or not state.warmup):
                clean = distributed.from_main(self._evaluate(trainer, eval_loader, labels)[0])  # rank 0's selection
                state.clean = torch.as_tensor(clean, device=device)
            if state.batch_select and epoch == self.epochs - 1:
                state.record = {"p_clean": torch.ones(n, device=device), "top": labels.clone(),
                                "probs": torch.full((n, C), 1.0 / C, device=device),
                                "seen": torch.zeros(n, dtype=torch.bool, device=device)}
            rows = epoch_subset(train_ds, n, per_epoch, seed=derived_seed(ctx.seed, epoch, 7))  # all unless max_steps
            loader = make_loader(rows, batch_size=batch_size, shuffle=True, seed=ctx.seed + epoch,
                                 num_workers=workers)
            rec = trainer.train_epoch(loader, epoch=epoch, step_fn=step)
            # which loss ran: L_sim on every sample (CE, or SCE in the real-world variant) or on the selected ones,
            # and L_dp's "yes" target (the given label, or pseudo-labels)
            rec["sim_loss"] = ("sce_all" if self.consistency else "ce_all") if state.warmup else "ce_selected"
            rec["dp_target"] = "pseudo" if state.pseudo else "given"
            if not state.batch_select:
                rec["n_clean_selected"] = n if state.warmup else int(state.clean.sum())
            history.append({k: v for k, v in rec.items() if isinstance(v, (int, float, str))})
        if state.batch_select and state.record is not None:
            r = _merge_records(state.record)
            p_clean, probs = r["p_clean"].cpu().double().numpy(), r["probs"].cpu().double().numpy()
            clean = p_clean > 0.5
            if self.consistency:
                clean &= r["top"].cpu().numpy() == ctx.labels
        else:
            clean, p_clean, probs = self._evaluate(trainer, eval_loader, labels)
        rule = ("p_clean = softmax over (s·cos(img, positive prompt), s·cos(img, negative prompt)) of the given "
                f"label, s = {model.scale:.1f}; flagged if p_clean < 0.5")
        rule += (" or the given label is not the class of highest p_clean (real-world variant)."
                 if self.consistency else ".")
        if state.batch_select:
            rule += " Scores from the last epoch's training batches (the authors' selection)."
        resolved = {"peft": (peft, reason), "logit_scale": (model.scale, scale_how),
                    "warmup_epochs": (warmup, "given" if self.warmup_epochs is not None else
                                      "5 for the real-world variant" if self.consistency else "1 (synthetic noise)")}
        return DetectionResult(
            p_clean=p_clean, probs=probs, threshold=0.5, flags=~clean if self.consistency else None, rule=rule,
            info={"path": peft, "path_reason": reason, "peft": peft, "peft_requested": self.peft, **peft_info,
                  "ranks": distributed.world_size() if distributed.sharding() else 1,
                  "rows_per_epoch": per_epoch, "text_scale": k, "batch_size": batch_size, "lr": lr * k,
                  "positive_weight": positive_weight,
                  "history": history, "logit_scale": model.scale, "recipe": RECIPE.rows(self.get_params(), resolved),
                  **text_info},
        )

    def _scale(self, ctx: DetectionContext) -> tuple[float, str, dict[str, Any]]:
        """(logit scale, how it was set, :func:`~labelsieve.detectors.common.text_side.text_side_info`)."""
        text = ctx.encoder.class_text_embeddings(ctx.classnames, SINGLE_TEMPLATE)
        cos = feature_cosines(ctx, text)  # unscaled: the calibration fits the scale to these
        text_info = text_side_info(cos, ctx.labels)
        if self.logit_scale == "model":
            return ctx.encoder.logit_scale, "the model's learned scale (the paper's)", text_info
        if self.logit_scale == "calibrated":
            s = calibrated_scale(cos, ctx.labels, max_scale=ctx.encoder.logit_scale)
            return s, "fitted to the zero-shot NLL of the given labels (labelsieve's calibration)", text_info
        return float(self.logit_scale), "given", text_info

    def _evaluate(self, trainer: Trainer, loader: Any,
                  labels: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Evaluation pass over all samples: (clean mask, p_clean of the given label, class probs)."""
        with trainer.model.text_once():  # one text-tower pass for the whole evaluation
            out, _ = trainer.predict(loader)  # float32 (n, 2C): positive logits, then the dual logits
        n, C = len(out), out.shape[1] // 2
        lab = labels.cpu()
        clean, p_clean = np.empty(n, dtype=bool), np.empty(n, dtype=np.float64)
        probs = np.empty((n, C), dtype=np.float32)
        for i in range(0, n, _EVAL_BLOCK):  # float64 a block at a time: no (n, 2C) float64 copy at 10M rows
            o = torch.as_tensor(np.asarray(out[i : i + _EVAL_BLOCK]), dtype=torch.float64)
            p_yes, y = torch.sigmoid(o[:, C:]), lab[i : i + _EVAL_BLOCK]
            clean[i : i + len(o)] = clean_rule(p_yes, y, consistency=self.consistency).numpy()
            p_clean[i : i + len(o)] = p_yes.gather(1, y[:, None]).squeeze(1).numpy()
            probs[i : i + len(o)] = torch.softmax(o[:, :C], dim=1).numpy()
        return clean, p_clean, probs
