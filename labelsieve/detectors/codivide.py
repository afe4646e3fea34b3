"""``codivide``: AVL-Prompter's co-divide noisy-label detector (Hu, Nagarajan, Marques and Radeva,
J. Visual Communication and Image Representation 111, 104550, 2025), DivideMix-style.

Two networks, each a set of MaPLe prompts (:class:`~labelsieve.models.prompts.MaPLePrompts`: 2 context
tokens, depth 9, "a photo of a" init, a linear text→vision coupling per layer) on the same frozen CLIP
model, built from different seeds. Logits are ``s · cos(image, class text)`` with s = CLIP's logit scale.

Training (SGD lr 0.02, momentum 0.9, wd 5e-4, batch 64, 60 epochs on CIFAR, no warm-up: the paper's
values as issue 10 reads them; λ_u 25 with DivideMix's 16-epoch ramp; every parameter and its origin is in
:data:`RECIPE`,
``labelsieve detectors --show codivide``):

* **warm-up** (``warmup_epochs``, default 0): both networks, cross-entropy with the given label on all
  samples (weak view).
* **co-divide epochs**: at the start of each epoch a separate evaluation pass gives every network the
  per-sample cross-entropy of the given label on all samples; the losses are min-max normalised and a
  2-component GMM (DivideMix: ``max_iter`` 10, ``reg_covar`` 5e-4, raw posterior; ``monotone=True`` is
  labelsieve's tail correction) is fitted; the posterior of the low-loss component is the clean
  probability. Samples with posterior > ``tau`` (0.5) under network A are the *labelled* set of network
  B and the rest its *unlabelled* set, and vice versa — each network trains on the other's split. Then
  network 1 trains one epoch, then network 2. ``batch_mode`` says how a step draws its rows:
  ``"dividemix"`` (default) iterates the labelled rows and draws a separate batch of unlabelled rows each step, as
  DivideMix's ``train()`` does; ``"split"`` iterates all rows and splits each batch into its labelled and
  unlabelled rows. The paper is silent; the grid chose ``"dividemix"`` (docs/methods.md: the same F1 within the
  seeds' spread, in 51–85 % of the time). Each step's loss::

      loss = CE(weak view, given label)                       over the labelled samples
           + lambda_u(t) · FixMatch(unlabelled)               pseudo-label = argmax of the network's own
                                                              weak-view prediction when its probability
                                                              >= confidence (0.95); CE of the strong
                                                              (RandAugment) view to it, averaged over the
                                                              unlabelled samples of the batch
           + lambda_r · KL(uniform || mean weak-view prediction over the batch)   (DivideMix's prior)

  ``lambda_u(t)`` rises linearly from 0 to ``lambda_u`` = 25 over ``lambda_u_rampup`` = 16 epochs after the
  warm-up (DivideMix's value and ramp; the paper sets λ_u "as used in DivideMix"); FixMatch's weight 1 is an
  option. An empty part (no labelled, no unlabelled or no confident sample in a batch) contributes zero, never
  NaN.
* **decision**: one final evaluation pass and GMM per network; ``p_clean`` is the mean of the two
  networks' clean posteriors, ``probs`` the mean of their softmax outputs, flagged iff
  ``p_clean < tau``.

The image side (``frozen``):

* ``"auto"`` (default) — the paper's image-level path on a ViT image tower with a GPU; the frozen
  text-side path on a CPU or a CNN tower. audit.json (``path``, ``path_reason``) and the printed summary
  say which ran and why.
* ``False`` — image-level MaPLe: the coupled vision prompts run through the ViT image tower on images
  decoded once into a uint8 cache (:mod:`labelsieve.data.imagecache`); weak view = ``weak`` (the papers'
  flip-and-shift by default), strong view = the same + RandAugment. Both encoders of a per-network copy of
  the CLIP model train with the prompts and coupling layers (``finetune_encoders``, the paper's "We fine-tune
  the V-L encoders along with learning the context prompts"), at ``encoder_lr`` (default: lr);
  ``finetune_encoders=False`` trains the prompts alone. Needs an open_clip ViT image tower; any other raises
  :class:`~labelsieve.core.errors.ModelError`.
* ``True`` (CLI ``--frozen``) — text-side MaPLe prompts (``text_only``) on cached image features of the
  frozen tower: works with any tower (the mini CLIP's CNN) and is the fast path. There are no image views
  here, so labelsieve adapts FixMatch to feature space: the weak view is the cached feature itself, the
  strong view is the feature with dropout (``feature_dropout``) and Gaussian noise of norm about
  ``feature_noise`` added, then re-normalised. This adaptation is labelsieve's, not the paper's, and so is
  the frozen tower itself: there is no encoder to fine-tune here (audit.json's recipe records
  ``finetune_encoders`` resolved to False with the reason).

``max_steps`` (labelsieve's option for large datasets) caps the optimisation steps of each network over
the whole run: each epoch trains on a random subset of ``ceil(max_steps / epochs) · batch_size`` rows
instead of all of them (the evaluation passes and GMM still see every row).

``text_budget`` (labelsieve's option for many classes) caps steps × classes: every optimisation step runs all
``C`` class prompts through the text tower, which on a CPU costs about 2.4 ms per class and step with the mini
CLIP, whatever the batch. Above the cap the batch size and the learning rate are multiplied by
``k = ceil(steps · C / text_budget)`` and the steps divided by ``k``: the same rows are seen, in ``k`` times
fewer, larger steps (the linear scaling rule of Goyal et al. 2017). ``k`` is at most the number of batches
of an epoch.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from labelsieve.core import distributed
from labelsieve.core.defaults import default_num_workers
from labelsieve.core.engine import Trainer, make_loader
from labelsieve.core.errors import ModelError, check_param
from labelsieve.core.optim import make_optimizer
from labelsieve.data.imagecache import CachedImageDataset, CachedTwoViewDataset, DecodedImageCache
from labelsieve.data.transforms import eval_transform
from labelsieve.detectors.common.base import (
    DetectionContext,
    DetectionResult,
    Detector,
    feature_dataset,
    softmax_blocks,
)
from labelsieve.detectors.common.budget import derived_seed, epoch_subset, rows_per_epoch, text_budget_scale
from labelsieve.detectors.common.recipe import (
    UNKNOWN,
    Param,
    Recipe,
    amp_param,
    is_float,
    is_int,
    one_of,
    workers_param,
)
from labelsieve.detectors.common.selection import fit_gmm_split
from labelsieve.detectors.common.text_side import zero_shot_check
from labelsieve.detectors.common.views import WEAK_VIEWS, strong_view, weak_view
from labelsieve.detectors.registry import register_detector
from labelsieve.models.peft import is_vit_tower
from labelsieve.models.prompts import MaPLePrompts

__all__ = ["RECIPE", "CoDivideDetector", "CoDivideNet", "codivide_loss", "strong_feature_view"]

PATH_IMAGES = "maple_images"
PATH_FEATURES = "text_only_features"
#: How a co-divide step draws its labelled and unlabelled rows (``batch_mode``).
BATCH_MODES = ("split", "dividemix")
_ISSUE = "issue 10's reading of the paper (not verifiable in our stored sources)"
_ISSUE21 = "issue 21 quotes the full text; not in our stored sources"
_DM = "DivideMix (LiJunnan1992/DivideMix Train_CIFAR.py)"
_MAPLE = "MaPLe defaults (muzairkhattak/multimodal-prompt-learning), the prompts AVL-Prompter builds on"

#: Co-divide's recipe: every hyperparameter, its default, and whether that is the paper's or labelsieve's.
RECIPE = Recipe("CoDivideDetector", "Hu, Nagarajan, Marques & Radeva, AVL-Prompter, J. Visual Communication and "
                "Image Representation 111 (2025) 104550 (the full text as issues 10 and 21 quote it; only the "
                "abstract is in our stored sources; no code released)", [
    Param("frozen", "auto", "labelsieve", "AVL-Prompter (image-level MaPLe prompts)",
          "auto: the paper's image-level path on a ViT tower with a GPU, the text-side fast path on a CPU or a CNN "
          "tower (where the vision prompts cannot run)", paper=False, check=one_of(True, False, "auto"),
          expected="True, False or 'auto'"),
    Param("epochs", 60, "paper", f"{_ISSUE}: 60 on CIFAR", "total epochs, warm-up included",
          check=is_int(1), expected="an int >= 1"),
    Param("warmup_epochs", 0, "paper", _ISSUE, "epochs of plain CE on all samples before co-dividing",
          check=is_int(0), expected="an int >= 0"),
    Param("lr", 0.02, "paper", _ISSUE, check=is_float(0, lo_open=True), expected="a float > 0", convert=float),
    Param("momentum", 0.9, "labelsieve", _DM, "DivideMix's SGD momentum", paper=UNKNOWN,
          check=is_float(0, 1, hi_open=True), expected="a float in [0, 1)", convert=float),
    Param("weight_decay", 5e-4, "labelsieve", _DM, "DivideMix's", paper=UNKNOWN, check=is_float(0),
          expected="a float >= 0", convert=float),
    Param("batch_size", 64, "paper", _ISSUE, check=is_int(2), expected="an int >= 2"),
    Param("n_ctx", 2, "paper", _MAPLE, "MaPLe's N_CTX; AVL-Prompter's own value is not in our sources",
          check=is_int(1), expected="an int >= 1"),
    Param("depth", 9, "paper", _MAPLE, "MaPLe's PROMPT_DEPTH, clamped to the towers' layer counts",
          check=is_int(1), expected="an int >= 1"),
    Param("ctx_init", "a photo of a", "paper", _MAPLE,
          check=lambda v: v is None or (isinstance(v, str) and bool(v.strip())),
          expected="None or a non-empty phrase such as 'a photo of a'"),
    Param("tau", 0.5, "paper", f"{_DM} p_threshold", "also the flag threshold on p_clean",
          check=is_float(0, 1, lo_open=True, hi_open=True), expected="a float in (0, 1)", convert=float),
    Param("confidence", 0.95, "paper", "FixMatch (kekmodel/FixMatch-pytorch) threshold",
          check=is_float(0, 1, lo_open=True), expected="a float in (0, 1]", convert=float),
    Param("lambda_u", 25.0, "paper", f"{_DM} --lambda_u (default 25); the paper sets lambda_u 'as used in DivideMix'",
          "weight of the FixMatch term; 1 (FixMatch's own weight, labelsieve's default before issue 21) is the option, "
          "measured far better where the text side reads the classes poorly (CIFAR-10N on the stand-in, seeds 0-2: F1 "
          ".44 / .75 against .23 / .63 on aggre / worst) and the same elsewhere (docs/methods.md)",
          check=is_float(0), expected="a float >= 0", convert=float),
    Param("lambda_u_rampup", 16, "paper", f"{_DM} linear_rampup(rampup_length=16)",
          "epochs over which the weight rises linearly from 0 to lambda_u after the warm-up, as DivideMix uses it; "
          "0: the full weight from the first co-divide step", check=is_int(0), expected="an int >= 0"),
    Param("batch_mode", "dividemix", "labelsieve", _DM,
          "'dividemix': each step a batch of the labelled rows (the epoch iterates the labelled set) and a separate "
          "batch of unlabelled rows (DivideMix's train()); 'split': one loader over all rows, each batch split into "
          "its labelled and unlabelled rows; the paper is silent, chosen by measurement (the same F1 as 'split' over "
          "seeds 0-2 of the grid, in 51-85 % of the time: docs/methods.md)",
          paper=UNKNOWN, check=one_of(*BATCH_MODES), expected=f"one of {', '.join(map(repr, BATCH_MODES))}"),
    Param("lambda_r", 1.0, "paper", f"{_DM} (uniform-prior penalty, weight 1)", check=is_float(0),
          expected="a float >= 0", convert=float),
    Param("gmm_max_iter", 10, "paper", _DM, check=is_int(1), expected="an int >= 1"),
    Param("gmm_reg_covar", 5e-4, "paper", _DM, check=is_float(0, lo_open=True), expected="a float > 0",
          convert=float),
    Param("monotone", False, "paper", f"{_DM} eval_train (raw predict_proba[:, means_.argmin()])",
          "True: labelsieve's non-increasing tails of the GMM posterior", check=one_of(True, False),
          expected="True or False"),
    Param("weak", "flip_shift", "paper", f"{_ISSUE}; {_DM} (RandomCrop(32, 4) + flip)",
          "image path: the weak view; 'rrc' = random resized crop 0.08-1 + flip (labelsieve's earlier view)",
          check=one_of(*WEAK_VIEWS), expected=f"one of {', '.join(WEAK_VIEWS)}"),
    Param("finetune_encoders", True, "paper", "AVL-Prompter, training details ('We fine-tune the V-L encoders along "
          f"with learning the context prompts'; {_ISSUE21})",
          "image path: both encoders of a per-network copy of the CLIP model train with the prompts; on the frozen "
          "path (cached features: a CPU or a CNN tower) there is no encoder to train, a departure audit.json records",
          check=one_of(True, False), expected="True or False"),
    Param("encoder_lr", None, "labelsieve", note="finetune_encoders: the encoders' learning rate (None: lr, the one "
          "learning rate the paper gives)", paper=UNKNOWN, check=is_float(0, lo_open=True, none=True),
          expected="None or a float > 0"),
    Param("max_steps", None, "labelsieve", note="cap on each network's optimisation steps over the run (each "
          "epoch trains on a random subset of rows); None: every row every epoch",
          check=is_int(1, none=True), expected="None or an int >= 1"),
    Param("text_budget", None, "labelsieve",
          note="cap on each network's optimisation steps × classes over the run (each step runs every class's "
          "prompt through the text tower, so a step costs in proportion to the classes); above it the batch and "
          "the learning rate grow by the same factor k and the steps shrink by k (rows seen unchanged; linear "
          "scaling rule). None: no cap",
          check=is_int(1, none=True), expected="None or an int >= 1"),
    Param("feature_dropout", 0.3, "labelsieve", note="frozen path: coordinate dropout of the feature-space strong "
          "view", check=is_float(0, 1, hi_open=True), expected="a float in [0, 1)", convert=float),
    Param("feature_noise", 0.3, "labelsieve", note="frozen path: norm of the Gaussian noise of the feature-space "
          "strong view", check=is_float(0), expected="a float >= 0", convert=float),
    amp_param(),
    workers_param("image path: DataLoader workers"),
], fixed=[
    Param("lr_schedule", "cosine over the run, set every step from the fractional epoch", "labelsieve", paper=UNKNOWN,
          note="DivideMix divides by 10 at epoch 150 of 300; MaPLe steps a cosine per epoch"),
    Param("strong_view", "weak view + RandAugment(2 ops, magnitude 10)", "paper", "FixMatch"),
    Param("fixmatch_loss", "CE to confident weak-view pseudo-labels, averaged over all unlabelled samples", "paper",
          "FixMatch (kekmodel/FixMatch-pytorch train.py)"),
    Param("decision", "mean of the two networks' final GMM posteriors < tau", "labelsieve", paper=UNKNOWN),
])

def _rng_devices(device: torch.device) -> list[int]:
    """The CUDA devices whose RNG state :func:`torch.random.fork_rng` must save for ``device``."""
    return [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []


class CoDivideNet(nn.Module):
    """One co-divide network: MaPLe prompts on a frozen CLIP, images or cached features -> logits.

    Parameters
    ----------
    prompts : MaPLePrompts
        The learnable prompts (the only parameters of this module; the CLIP model is not registered).
    on_features : bool
        True: inputs are cached image features of the frozen tower (``prompts.text_only`` must be True);
        False: inputs are preprocessed images run through the prompted ViT.
    encoders : nn.Module, optional
        The CLIP model the prompts run on, registered (and so trained) when the encoders are fine-tuned
        with the prompts (``finetune_encoders``); it must be this network's own copy.
    """

    def __init__(self, prompts: nn.Module, *, on_features: bool, encoders: nn.Module | None = None) -> None:
        super().__init__()
        self.prompts = prompts
        self.on_features = bool(on_features)
        self.encoders = encoders
        self._text: torch.Tensor | None = None

    @contextlib.contextmanager
    def text_once(self) -> Iterator[None]:
        """Within: on cached features, the prompted text features are computed once and reused by every
        batch (an evaluation pass: no gradient, the prompts do not change), instead of running the text tower
        for every batch. The same numbers, one text-tower pass instead of one per batch."""
        if self.on_features:
            was_training = self.training
            self.eval()  # as the evaluation pass will run it
            with torch.no_grad():
                self._text = self.prompts.encode_text().float()
            self.train(was_training)
        try:
            yield
        finally:
            self._text = None

    def views(self, weak: torch.Tensor,
              strong: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits of the weak view and (optionally) of a strong view, sharing one prompt forward.

        Parameters
        ----------
        weak : Tensor of shape (B, ...)
            Images (B, 3, H, W) or features (B, D).
        strong : Tensor of shape (B', ...), optional
            Another batch of the same kind (e.g. the strong views of the unlabelled samples).

        Returns
        -------
        logits_weak : Tensor of shape (B, n_cls), float32
        logits_strong : Tensor of shape (B', n_cls), float32, or None
        """
        p = self.prompts
        scale = p.logit_scale.float()
        if self.on_features:
            text = self._text if self._text is not None else p.encode_text().float()

            def encode(x: torch.Tensor) -> torch.Tensor:
                return F.normalize(x.float(), dim=-1)
        else:
            out = p()
            text = out.text_features.float()

            def encode(x: torch.Tensor) -> torch.Tensor:
                return p.encode_image(x, out=out).float()

        lw = scale * encode(weak) @ text.t()
        ls = scale * encode(strong) @ text.t() if strong is not None and strong.shape[0] else None
        return lw, ls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, n_cls) of a batch of images or features."""
        return self.views(x)[0]


def strong_feature_view(features: torch.Tensor, *, dropout: float, noise: float,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """labelsieve's feature-space strong view for the frozen path: dropout + Gaussian noise, re-normalised.

    Parameters
    ----------
    features : Tensor of shape (B, D)
        L2-normalised image features.
    dropout : float in [0, 1)
        Probability of zeroing each coordinate.
    noise : float >= 0
        Norm (in expectation) of the isotropic Gaussian noise added, relative to the unit feature:
        per-coordinate standard deviation ``noise / sqrt(D)``.
    generator : torch.Generator, optional
        Source of randomness (on the features' device); default the global RNG.

    Returns
    -------
    Tensor of shape (B, D), float32, L2-normalised
    """
    x = features.float()
    if x.numel() == 0:
        return x
    keep = torch.rand(x.shape, generator=generator, device=x.device) >= dropout
    eps = torch.randn(x.shape, generator=generator, device=x.device) * (noise / math.sqrt(x.shape[-1]))
    return F.normalize(x * keep + eps, dim=-1)


def codivide_loss(logits_weak: torch.Tensor, logits_strong: torch.Tensor | None, targets: torch.Tensor,
                  labelled: torch.Tensor, *, confidence: float = 0.95, lambda_u: float = 1.0,
                  lambda_r: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """One co-divide training loss: CE on labelled, FixMatch on unlabelled, uniform-prior penalty.

    Parameters
    ----------
    logits_weak : Tensor of shape (B, C)
        Logits of the weakly augmented view of every sample of the batch.
    logits_strong : Tensor of shape (U, C) or None
        Logits of the strong view of the unlabelled samples (``U = (~labelled).sum()``, in batch order);
        None when there are none.
    targets : LongTensor of shape (B,)
        Given labels.
    labelled : BoolTensor of shape (B,)
        Samples in the labelled (presumed clean) set of this network.
    confidence : float, default 0.95
        FixMatch threshold on the weak-view probability of the pseudo-label.
    lambda_u, lambda_r : float, default 1.0
        Weights of the FixMatch term and of ``KL(uniform || mean prediction)``.

    Returns
    -------
    loss : scalar Tensor
        ``CE_labelled + lambda_u · L_u + lambda_r · penalty``; each empty part is exactly zero.
    stats : dict of str to float
        ``l_x``, ``l_u``, ``penalty`` and the counts ``n_labelled``, ``n_unlabelled``, ``n_confident``.
    """
    lw = logits_weak.float()
    labelled = labelled.bool()
    n_classes = lw.shape[1]
    n_l = labelled.sum()
    l_x = F.cross_entropy(lw[labelled], targets[labelled], reduction="sum") / n_l.clamp_min(1)
    unl = ~labelled
    n_u = unl.sum()
    l_u = lw.new_zeros(())
    n_conf = 0
    if logits_strong is not None and logits_strong.shape[0]:
        if logits_strong.shape[0] != int(n_u):
            raise ValueError(f"logits_strong must have one row per unlabelled sample ({int(n_u)}); "
                             f"got {logits_strong.shape[0]}")
        with torch.no_grad():
            conf, pseudo = F.softmax(lw[unl].detach(), dim=1).max(dim=1)
            mask = (conf >= confidence).float()
        ce_u = F.cross_entropy(logits_strong.float(), pseudo, reduction="none")
        l_u = (ce_u * mask).sum() / n_u.clamp_min(1)
        n_conf = int(mask.sum())
    mean_pred = F.softmax(lw, dim=1).mean(0).clamp_min(1e-12)
    prior = 1.0 / n_classes
    penalty = (prior * (math.log(prior) - torch.log(mean_pred))).sum()
    loss = l_x + lambda_u * l_u + lambda_r * penalty
    stats = {"l_x": float(l_x.detach()), "l_u": float(l_u.detach()), "penalty": float(penalty.detach()),
             "n_labelled": int(n_l), "n_unlabelled": int(n_u), "n_confident": n_conf}
    return loss, stats


# --------------------------------------------------------------------------------------------------- training


class _CoDivideRun:
    """One co-divide training run: two networks, their trainers, data and the per-epoch loop.

    Parameters
    ----------
    det : CoDivideDetector
        The parameters.
    ctx : DetectionContext
    path : str
        :data:`PATH_IMAGES` or :data:`PATH_FEATURES`.
    nets : list of two CoDivideNet

    The learning rate follows a cosine over the run, set before every step from the fractional epoch
    ``epoch + i / steps_in_epoch`` (the same per-step cosine for a fixed number of steps per epoch; with
    ``batch_mode="dividemix"`` an epoch's steps follow the size of the labelled set, so the schedule goes by
    epochs, not by a step count fixed in advance). ``lambda_u`` rises linearly over ``lambda_u_rampup`` epochs
    after the warm-up, on the same fractional epoch (DivideMix's ``linear_rampup``).
    """

    def __init__(self, det: CoDivideDetector, ctx: DetectionContext, path: str, nets: list[CoDivideNet]) -> None:
        self.det, self.ctx, self.path, self.nets = det, ctx, path, nets
        self.n = len(ctx.labels)
        self.labels = np.asarray(ctx.labels, dtype=np.int64)
        self.warm_ds, self.two_ds, eval_ds, self.workers = self._datasets()
        per_epoch = self.rows_per_epoch()
        self.text_scale = text_budget_scale(steps_per_epoch=math.ceil(per_epoch / det.batch_size),
                                            epochs=det.epochs, n_classes=int(ctx.n_classes), budget=det.text_budget)
        self.batch_size = det.batch_size * self.text_scale
        self.lr = det.lr * self.text_scale
        self.trainers = []
        self.base_lrs: list[list[float]] = []
        for k, net in enumerate(nets):
            groups: list[dict[str, Any]] = [{"params": list(net.prompts.parameters())}]
            if net.encoders is not None:
                groups.append({"params": list(net.encoders.parameters()),
                               "lr": (det.encoder_lr or det.lr) * self.text_scale})
            opt = make_optimizer(groups, name="sgd", lr=self.lr, weight_decay=det.weight_decay, momentum=det.momentum)
            self.base_lrs.append([float(g["lr"]) for g in opt.param_groups])
            self.trainers.append(Trainer(net, optimizer=opt, scheduler=None, device=ctx.device, amp=det.amp,
                                         progress=ctx.progress, desc=f"codivide net {k + 1} ({path})"))
        self.eval_loader = make_loader(eval_ds, batch_size=max(256, self.batch_size), num_workers=self.workers)
        self.gen = torch.Generator(device=ctx.device)
        self.gen.manual_seed(derived_seed(ctx.seed, 3))

    def rows_per_epoch(self) -> int:
        """Rows each network trains on per epoch: all, or the ``max_steps`` budget's share."""
        return rows_per_epoch(self.n, max_steps=self.det.max_steps, epochs=self.det.epochs,
                              batch_size=self.det.batch_size)

    def _datasets(self) -> tuple[Any, Any, Any, int]:
        """(warm-up dataset, co-divide dataset, evaluation dataset, loader workers)."""
        ctx, det = self.ctx, self.det
        labels = torch.as_tensor(ctx.labels, dtype=torch.long)
        if self.path == PATH_FEATURES:
            ds = feature_dataset(ctx, labels)
            return ds, ds, ds, 0
        workers = det.num_workers if det.num_workers is not None else default_num_workers(4)
        size = ctx.encoder.image_size
        # on every rank under torchrun: rank 0 decodes while the others wait, then they open it
        cache = distributed.main_first(DecodedImageCache.from_images, ctx.images, size=size, cache_dir=ctx.cache_dir,
                                       progress=ctx.progress, num_workers=workers)
        norm = {"mean": ctx.encoder.mean, "std": ctx.encoder.std}
        weak = weak_view(det.weak, size, **norm)
        warm_ds = CachedImageDataset(cache, labels=ctx.labels, transform=weak)
        two_ds = CachedTwoViewDataset(cache, labels=ctx.labels, transform=weak, strong=strong_view(det.weak, size,
                                                                                                   **norm))
        eval_ds = CachedImageDataset(cache, labels=ctx.labels, transform=eval_transform(size, **norm))
        return warm_ds, two_ds, eval_ds, workers

    def evaluate(self, k: int, *, probs: bool = True) -> dict[str, Any]:
        """Evaluation pass of network ``k`` + GMM split: clean posterior, softmax (only with ``probs``: the
        per-epoch splits do not need the (n, C) array), losses, the GMM's rule."""
        det = self.det
        with self.trainers[k].model.text_once():
            ev = self.trainers[k].evaluate(self.eval_loader, targets=self.labels)
        ok = ev["ok"]
        posterior = np.zeros(self.n, dtype=np.float64)
        split = fit_gmm_split(ev["losses"][ok], max_iter=det.gmm_max_iter, reg_covar=det.gmm_reg_covar,
                              seed=self.ctx.seed, monotone=det.monotone)
        posterior[ok] = split.posterior
        out = None
        if probs:
            out = softmax_blocks(ev["logits"], inplace=True)  # float32 over the logits, in float64 by blocks
            out[~ok] = 1.0 / out.shape[1]
        return {"posterior": posterior, "probs": out, "ok": ok, "loss": ev["loss"], "acc": ev["acc"],
                "rule": split.rule, "means": split.means, "weights": split.weights}

    def _loader(self, k: int, epoch: int, warm: bool) -> torch.utils.data.DataLoader:
        """Warm-up and ``batch_mode="split"``: one loader over all rows (or the ``max_steps`` share)."""
        ds = self.warm_ds if warm else self.two_ds
        ds = epoch_subset(ds, self.n, self.rows_per_epoch(), seed=derived_seed(self.ctx.seed, k, epoch, 7))
        return make_loader(ds, batch_size=self.batch_size, shuffle=True, seed=derived_seed(self.ctx.seed, k, epoch),
                           num_workers=self.workers)

    def _dividemix_loaders(self, k: int, epoch: int,
                           labelled: np.ndarray) -> tuple[torch.utils.data.DataLoader, Callable[[], Any] | None, str]:
        """``batch_mode="dividemix"``: (the loader the epoch iterates, a function giving the next batch of the other
        part or None, which part the loader holds). DivideMix iterates the labelled rows and draws a separate batch
        of unlabelled rows each step, cycling through them; with no labelled row the epoch iterates the unlabelled
        rows alone, with no unlabelled row the labelled rows alone. Under ``max_steps`` the iterated part is a seeded
        random share of at most ``rows_per_epoch`` rows."""
        seed = self.ctx.seed
        lab, unl = np.flatnonzero(labelled), np.flatnonzero(~labelled)
        main, other, part = (lab, unl, "labelled") if len(lab) else (unl, lab, "unlabelled")
        budget = self.rows_per_epoch()
        if len(main) > budget:
            main = np.sort(np.random.default_rng(derived_seed(seed, k, epoch, 7)).choice(main, budget, replace=False))
        loader = make_loader(torch.utils.data.Subset(self.two_ds, main.tolist()), batch_size=self.batch_size,
                             shuffle=True, seed=derived_seed(seed, k, epoch), num_workers=self.workers)
        if not len(other) or not len(lab):
            return loader, None, part
        other_ds = torch.utils.data.Subset(self.two_ds, other.tolist())
        state: dict[str, Any] = {"pass": 0, "it": None}

        def next_other() -> Any:
            while True:
                if state["it"] is None:
                    state["it"] = iter(make_loader(other_ds, batch_size=self.batch_size, shuffle=True,
                                                   seed=derived_seed(seed, k, epoch, 11, state["pass"]),
                                                   num_workers=self.workers))
                    state["pass"] += 1
                try:
                    return next(state["it"])
                except StopIteration:
                    state["it"] = None

        return loader, next_other, part

    def run(self) -> list[dict[str, Any]]:
        """Train both networks for ``epochs``; the per-epoch history for audit.json."""
        det, device = self.det, self.ctx.device
        labelled = [torch.ones(self.n, dtype=torch.bool, device=device) for _ in self.nets]
        history: list[dict[str, Any]] = []
        for epoch in range(det.epochs):
            t0 = time.perf_counter()
            warm = epoch < det.warmup_epochs
            rec: dict[str, Any] = {"epoch": epoch, "phase": "warmup" if warm else "codivide"}
            evals: list[dict[str, Any]] = []
            if not warm:
                evals = [self.evaluate(k, probs=False) for k in range(2)]
                # under torchrun every rank gathered the same losses; the splits are rank 0's all the same
                splits = distributed.from_main([e["posterior"] > det.tau for e in evals])
                for k in range(2):
                    # co-divide: network k trains on the split made by the other network
                    labelled[k] = torch.as_tensor(splits[1 - k], device=device)
                rec["split_agreement"] = float(((evals[0]["posterior"] > det.tau)
                                                == (evals[1]["posterior"] > det.tau)).mean())
            for k in range(2):
                stats: dict[str, float] = {}
                other, part = None, "all"
                if warm or det.batch_mode == "split":
                    loader = self._loader(k, epoch, warm)
                else:
                    loader, other, part = self._dividemix_loaders(k, epoch, labelled[k].cpu().numpy())
                step = self._make_step(k, epoch, len(loader), None if warm else labelled[k], stats, other, part)
                r = self.trainers[k].train_epoch(loader, epoch=epoch, step_fn=step, epochs=det.epochs)
                entry: dict[str, Any] = {"loss": r["loss"], "acc": r["acc"], "lr": r["lr"], "seconds": r["seconds"],
                                         "skipped": r["skipped"], "n": r["n"], "steps": len(loader)}
                if not warm:
                    ev = evals[1 - k]
                    batches = max(1, int(stats.pop("batches", 0)))
                    entry.update({key: v / batches if key in ("l_x", "l_u", "penalty", "lambda_u") else int(v)
                                  for key, v in stats.items()})
                    # n_labelled: this network's labelled set (the other's split); n_selected: its own split,
                    # which became the other network's labelled set
                    entry.update(n_labelled=int(labelled[k].sum()), gmm_rule=ev["rule"], gmm_means=ev["means"],
                                 n_selected=int((evals[k]["posterior"] > det.tau).sum()),
                                 eval_loss=evals[k]["loss"], eval_acc=evals[k]["acc"], iterated=part)
                rec[f"net{k + 1}"] = entry
            rec["seconds"] = time.perf_counter() - t0
            history.append(rec)
        return history

    def lambda_u_at(self, progress: float) -> float:
        """``lambda_u`` at fractional epoch ``progress``: DivideMix's linear ramp from the end of the warm-up."""
        det = self.det
        if det.lambda_u_rampup <= 0:
            return det.lambda_u
        return det.lambda_u * float(np.clip((progress - det.warmup_epochs) / det.lambda_u_rampup, 0.0, 1.0))

    def _set_lr(self, k: int, progress: float) -> None:
        """Cosine decay over the run at fractional epoch ``progress`` (0 .. epochs)."""
        f = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress / self.det.epochs)))
        for g, base in zip(self.trainers[k].optimizer.param_groups, self.base_lrs[k], strict=True):
            g["lr"] = base * f

    def _make_step(self, k: int, epoch: int, n_steps: int, labelled: torch.Tensor | None, stats: dict[str, float],
                   other: Callable[[], Any] | None = None,
                   part: str = "all") -> Callable[[Any, Sequence[Any]], tuple[torch.Tensor | None, int, int]]:
        """The engine's ``step_fn`` for network ``k`` in ``epoch`` (``labelled=None``: warm-up). ``other`` gives the
        separate batch of the other part of the split (``batch_mode="dividemix"``); ``part`` says which part the
        loader iterates (``"all"``: both, split by ``labelled``)."""
        det, gen, net = self.det, self.gen, self.nets[k]
        i_step = [0]

        def step(trainer: Any, batch: Sequence[Any]) -> tuple[torch.Tensor | None, int, int]:
            progress = epoch + i_step[0] / max(1, n_steps)
            i_step[0] += 1
            self._set_lr(k, progress)
            if other is not None:  # DivideMix: a labelled batch and a separate unlabelled batch, one step
                batch = [torch.cat([a, b]) for a, b in zip(batch, trainer.to_device(other()), strict=True)]
            if len(batch) == 5:
                weak, strong, y, idx, ok = batch
            else:
                weak, y, idx, ok = batch
                strong = None
            keep = ok.bool()
            if not bool(keep.all()):
                weak, y, idx = weak[keep], y[keep], idx[keep]
                strong = strong[keep] if strong is not None else None
            if weak.shape[0] == 0:
                return None, 0, 0
            if labelled is None:
                lw, _ = net.views(weak)
                loss = F.cross_entropy(lw, y)
            else:
                lab = labelled[idx]
                unl = ~lab
                if net.on_features:
                    strong_u = strong_feature_view(weak[unl], dropout=det.feature_dropout, noise=det.feature_noise,
                                                   generator=gen)
                else:
                    assert strong is not None
                    strong_u = strong[unl]
                lw, ls = net.views(weak, strong_u)
                lam = self.lambda_u_at(progress)
                loss, parts = codivide_loss(lw, ls, y, lab, confidence=det.confidence, lambda_u=lam,
                                            lambda_r=det.lambda_r)
                parts["lambda_u"] = lam
                for key, v in parts.items():
                    stats[key] = stats.get(key, 0) + v
                stats["batches"] = stats.get("batches", 0) + 1
            n_correct = int((lw.detach().argmax(1) == y).sum())
            return loss, n_correct, int(y.shape[0])

        return step


# --------------------------------------------------------------------------------------------------- detector


@register_detector
class CoDivideDetector(Detector):
    """AVL-Prompter's co-divide detector: two MaPLe-prompted CLIP networks, each trained on the other's
    DivideMix GMM split (see the module docstring).

    Parameters are those of :data:`RECIPE` (``labelsieve detectors --show codivide`` prints them with their
    origin and source).

    Attributes
    ----------
    networks_ : list of CoDivideNet
        The two trained networks, after :meth:`detect`.
    """

    name = "codivide"
    summary = "Co-divide (AVL-Prompter): two MaPLe-prompted CLIP networks trained on each other's GMM split"
    needs_text = True
    recipe = RECIPE
    features_only = {"frozen": True}  # what runs without images (labelsieve.detect, audit --features)

    def _check_params(self) -> None:
        check_param(type(self).__name__, "warmup_epochs", self.warmup_epochs, self.warmup_epochs < self.epochs,
                    f"an int in [0, epochs) = [0, {self.epochs})")

    # ------------------------------------------------------------------------------------------
    def resolve_path(self, ctx: DetectionContext) -> tuple[str, str]:
        """(``"maple_images"`` or ``"text_only_features"``, why).

        Raises
        ------
        ModelError
            For ``frozen=False`` on an image tower that is not an open_clip ViT.
        """
        vit = is_vit_tower(ctx.encoder.model)
        tower = type(getattr(ctx.encoder.model, "visual", ctx.encoder.model)).__name__
        if self.frozen is True:
            return PATH_FEATURES, "requested (frozen=True)"
        if self.frozen is False:
            if not vit:
                raise ModelError(
                    f"codivide with frozen=False trains MaPLe vision prompts, which need a ViT image tower (an "
                    f"open_clip VisionTransformer); this model's image tower is {tower}. Use --frozen "
                    "(frozen=True: text-side prompts on cached image features, works with any tower) or "
                    "frozen='auto'."
                )
            return PATH_IMAGES, "requested (frozen=False)"
        if not vit:
            return PATH_FEATURES, (f"the image tower is {tower}, not a ViT: MaPLe's vision prompts need one, so "
                                   "text-side prompts run on cached image features")
        if ctx.device.type == "cpu":
            return PATH_FEATURES, ("no GPU: image-level prompts run two networks through the image tower on every "
                                   "image in every epoch, so text-side prompts run on cached image features; "
                                   "frozen=False forces the image-level path")
        return PATH_IMAGES, "a ViT image tower on a GPU: the paper's image-level MaPLe"

    def _resolved(self, path: str, reason: str) -> dict[str, tuple[Any, str]]:
        """The settings decided at run time, for audit.json's recipe: the path, and on the frozen path that no
        encoder is fine-tuned (the paper fine-tunes both encoders with the prompts)."""
        out: dict[str, tuple[Any, str]] = {"frozen": (path == PATH_FEATURES, reason)}
        if path == PATH_FEATURES and self.finetune_encoders:
            out["finetune_encoders"] = (False, "the frozen path trains text-side prompts on cached image features: "
                                               "there is no image encoder to fine-tune (labelsieve's CPU fallback)")
        return out

    def trains_on_every_rank(self, ctx: DetectionContext) -> bool:
        """The image-level path trains both networks under DDP on every rank (torchrun); the frozen path reads
        the cached features, which are on rank 0, and runs there alone."""
        return self.resolve_path(ctx)[0] == PATH_IMAGES

    def build_networks(self, ctx: DetectionContext, path: str) -> list[CoDivideNet]:
        """The two untrained networks for ``ctx`` (seeded from ``ctx.seed``: network k from (seed, k)).

        With ``finetune_encoders`` on the image path each network gets its own copy of the CLIP model,
        trainable except its logit scale.
        """
        nets = []
        tune = self.finetune_encoders and path == PATH_IMAGES
        for k in range(2):
            model = copy.deepcopy(ctx.encoder.model) if tune else ctx.encoder.model
            with torch.random.fork_rng(devices=_rng_devices(ctx.device)):
                torch.manual_seed(derived_seed(ctx.seed, k))
                prompts = MaPLePrompts(model, ctx.encoder.tokenizer, ctx.classnames, n_ctx=self.n_ctx,
                                       depth=self.depth, init=self.ctx_init, text_only=path == PATH_FEATURES)
            if tune:
                for name, p in model.named_parameters():
                    p.requires_grad_(name != "logit_scale")
            nets.append(CoDivideNet(prompts, on_features=path == PATH_FEATURES,
                                    encoders=model if tune else None).to(ctx.device))
        return nets

    def detect(self, ctx: DetectionContext) -> DetectionResult:
        ctx.encoder.require_text("co-divide")
        path, reason = self.resolve_path(ctx)
        model = ctx.encoder.model
        grad_flags = [p.requires_grad for p in model.parameters()]  # MaPLePrompts freezes the CLIP model
        try:
            with torch.random.fork_rng(devices=_rng_devices(ctx.device)):
                torch.manual_seed(derived_seed(ctx.seed, 2))
                result = self._detect(ctx, path, reason)
        finally:
            for p, flag in zip(model.parameters(), grad_flags, strict=True):
                p.requires_grad_(flag)
        # the classifier is prompted text: say so when the zero-shot side disagrees with most labels
        result.info.update(zero_shot_check(ctx))
        return result

    def _detect(self, ctx: DetectionContext, path: str, reason: str) -> DetectionResult:
        t_start = time.perf_counter()
        nets = self.build_networks(ctx, path)
        run = _CoDivideRun(self, ctx, path, nets)
        history = run.run()
        finals = [run.evaluate(k) for k in range(2)]
        p_nets = [f["posterior"] for f in finals]
        p_clean = 0.5 * (p_nets[0] + p_nets[1])
        probs = finals[0]["probs"]  # the two networks' mean, in place: (a + b) / 2, no third (n, C) array
        probs += finals[1]["probs"]
        probs *= 0.5
        finals[1]["probs"] = None
        ok = finals[0]["ok"]
        p_clean[~ok] = self.tau  # undecodable images: no evidence either way, not flagged
        self.networks_ = nets
        prompts = nets[0].prompts
        rule = ("p_clean = mean over the two co-divide networks of the DivideMix GMM posterior of the low-loss "
                "component of each network's cross-entropy on the given label (2 components, min-max normalised "
                f"losses, max_iter {self.gmm_max_iter}, reg_covar {self.gmm_reg_covar:g}"
                f"{', monotone tails' if self.monotone else ''}); flagged if p_clean < {self.tau:g}, the co-divide "
                "split threshold.")
        info = {
            "path": path, "path_reason": reason, "frozen_requested": self.frozen,
            "tower": type(getattr(ctx.encoder.model, "visual", ctx.encoder.model)).__name__,
            "n_ctx": int(prompts.n_ctx), "depth": int(prompts.depth), "depth_requested": self.depth,
            "n_trainable_per_net": int(sum(p.numel() for p in nets[0].parameters() if p.requires_grad)),
            "rows_per_epoch": run.rows_per_epoch(),
            "ranks": distributed.world_size() if distributed.sharding() else 1,
            "text_scale": run.text_scale, "batch_size": run.batch_size, "lr": run.lr,
            "strong_view": (f"RandAugment (2 ops, magnitude 10) after the weak view ({self.weak})"
                            if path == PATH_IMAGES else
                            f"feature dropout {self.feature_dropout:g} + Gaussian noise of norm "
                            f"{self.feature_noise:g}, re-normalised (labelsieve's feature-space adaptation)"),
            "finetune_encoders": bool(self.finetune_encoders and path == PATH_IMAGES),
            "recipe": RECIPE.rows(self.get_params(), self._resolved(path, reason)),
            "history": history,
            "final": {f"net{k + 1}": {"gmm_rule": f["rule"], "gmm_means": f["means"], "gmm_weights": f["weights"],
                                      "n_clean": int((f["posterior"] > self.tau).sum()), "eval_acc": f["acc"]}
                      for k, f in enumerate(finals)},
            "final_split_agreement": float(((p_nets[0] > self.tau) == (p_nets[1] > self.tau)).mean()),
            "n_undecodable": int((~ok).sum()),
            "seconds": time.perf_counter() - t_start,
        }
        return DetectionResult(p_clean=p_clean, probs=probs, threshold=self.tau, rule=rule, info=info,
                               columns={"p_clean_net1": p_nets[0], "p_clean_net2": p_nets[1]})
