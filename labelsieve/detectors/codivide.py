"""``codivide``: AVL-Prompter's co-divide noisy-label detector (Pattern Recognition 2025), DivideMix-style.

Two networks, each a set of MaPLe prompts (:class:`~labelsieve.models.prompts.MaPLePrompts`: 2 context
tokens, depth 9, "a photo of a" init, a linear text→vision coupling per layer) on the same frozen CLIP
model, built from different seeds. Logits are ``s · cos(image, class text)`` with s = CLIP's logit scale.

Training (SGD lr 0.002, momentum 0.9, wd 5e-4, batch 32, cosine schedule, 10 epochs, all configurable):

* **warm-up** (``warmup_epochs``, default 1): both networks, cross-entropy with the given label on all
  samples (weakly augmented view).
* **co-divide epochs**: at the start of each epoch a separate evaluation pass gives every network the
  per-sample cross-entropy of the given label on all samples; the losses are min-max normalised and a
  2-component GMM (DivideMix: ``max_iter`` 10, ``reg_covar`` 5e-4) is fitted; the posterior of the
  low-loss component is the clean probability. Samples with posterior > ``tau`` (0.5) under network A
  are the *labelled* set of network B and the rest its *unlabelled* set, and vice versa — each network
  trains on the other's split. Then network 1 trains one epoch, then network 2, each batch with::

      loss = CE(weak view, given label)                       over the labelled samples
           + lambda_u · FixMatch(unlabelled)                  pseudo-label = argmax of the network's own
                                                              weak-view prediction when its probability
                                                              >= confidence (0.95); CE of the strong
                                                              (RandAugment) view to it, averaged over the
                                                              unlabelled samples of the batch
           + lambda_r · KL(uniform || mean weak-view prediction over the batch)   (DivideMix's prior)

  An empty part (no labelled, no unlabelled or no confident sample in a batch) contributes zero, never NaN.
* **decision**: one final evaluation pass and GMM per network; ``p_clean`` is the mean of the two
  networks' clean posteriors, ``probs`` the mean of their softmax outputs, flagged iff
  ``p_clean < tau``.

The image side (``frozen``):

* ``False`` — image-level MaPLe: the coupled vision prompts run through the ViT image tower on images
  decoded once into a uint8 cache (:mod:`labelsieve.data.imagecache`); weak view = random resized crop + flip,
  strong view = the same + RandAugment. Only the prompts and coupling layers are trained ("prompts
  only"); the CLIP weights stay frozen (AVL-Prompter also fine-tunes the encoders; labelsieve does not).
  Needs an open_clip ViT image tower; any other raises :class:`~labelsieve.core.errors.ModelError`.
* ``True`` (default; CLI ``--frozen``) — text-side MaPLe prompts (``text_only``) on cached image features of
  the frozen tower: works with any tower (the mini CLIP's CNN) and is the fast path. There are no
  image views here, so labelsieve adapts FixMatch to feature space: the weak view is the cached feature
  itself, the strong view is the feature with dropout (``feature_dropout``) and Gaussian noise of norm
  about ``feature_noise`` added, then re-normalised. This adaptation is labelsieve's, not the paper's.
* ``"auto"`` — ``False`` on ViT towers, ``True`` on others; audit.json records which.

``True`` is the default because it is the configuration the benchmark measured best among single
detectors (docs/benchmarks.md: the highest mean F1 and AUROC over six noisy datasets and three seeds
with the mini CLIP; it is also the main member of the default ensemble) and it runs on cached
features, on any machine; ``frozen=False`` (CLI ``--no-frozen``) is AVL-Prompter's image-level
path.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from labelsieve.core.defaults import default_num_workers
from labelsieve.core.engine import Trainer, make_loader
from labelsieve.core.errors import ModelError, check_param
from labelsieve.core.optim import cosine_schedule, make_optimizer
from labelsieve.core.runtime import check_amp
from labelsieve.data.imagecache import CachedImageDataset, CachedTwoViewDataset, DecodedImageCache
from labelsieve.data.transforms import eval_transform, strong_transform, train_transform
from labelsieve.detectors.common.base import DetectionContext, DetectionResult, Detector, softmax
from labelsieve.detectors.common.selection import fit_gmm_split
from labelsieve.detectors.common.text_side import zero_shot_check
from labelsieve.detectors.registry import register_detector
from labelsieve.models.peft import is_vit_tower
from labelsieve.models.prompts import MaPLePrompts

__all__ = ["CoDivideDetector", "CoDivideNet", "codivide_loss", "strong_feature_view"]

PATH_IMAGES = "maple_images"
PATH_FEATURES = "text_only_features"


class CoDivideNet(nn.Module):
    """One co-divide network: MaPLe prompts on a frozen CLIP, images or cached features -> logits.

    Parameters
    ----------
    prompts : MaPLePrompts
        The learnable prompts (the only parameters of this module; the CLIP model is not registered).
    on_features : bool
        True: inputs are cached image features of the frozen tower (``prompts.text_only`` must be True);
        False: inputs are preprocessed images run through the prompted ViT.
    """

    def __init__(self, prompts: nn.Module, *, on_features: bool) -> None:
        super().__init__()
        self.prompts = prompts
        self.on_features = bool(on_features)

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
            text = p.encode_text().float()

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


def _seed(*parts: int) -> int:
    """A 32-bit seed derived from ``parts`` (distinct streams for each network and epoch)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _rng_devices(device: torch.device) -> list[int]:
    """The CUDA devices whose RNG state :func:`torch.random.fork_rng` must save for ``device``."""
    return [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@register_detector
class CoDivideDetector(Detector):
    """AVL-Prompter's co-divide detector: two MaPLe-prompted CLIP networks, each trained on the other's
    DivideMix GMM split (see the module docstring).

    Parameters
    ----------
    frozen : {"auto", True, False}, default True
        ``False``: image-level MaPLe on a ViT image tower (decoded images, prompts + coupling trained);
        ``True``: text-side MaPLe prompts on cached image features (any tower, fast path);
        ``"auto"``: ``False`` on ViT towers, ``True`` otherwise.
    epochs : int, default 10
        Total epochs, warm-up included.
    warmup_epochs : int, default 1
        Epochs of plain cross-entropy on all samples before co-dividing; ``< epochs``.
    lr : float, default 0.002
    momentum : float, default 0.9
    weight_decay : float, default 5e-4
    batch_size : int, default 32
    n_ctx : int, default 2
        MaPLe context tokens per layer.
    depth : int, default 9
        MaPLe prompt depth (clamped to the towers' layer counts; the value used is in audit.json).
    ctx_init : str or None, default "a photo of a"
        Initialisation phrase of the contexts (None: random N(0, 0.02)).
    tau : float, default 0.5
        GMM clean-posterior threshold for the labelled set, and the flag threshold on ``p_clean``.
    confidence : float, default 0.95
        FixMatch confidence threshold of the pseudo-labels.
    lambda_u : float, default 1.0
        Weight of the FixMatch loss on the unlabelled samples.
    lambda_r : float, default 1.0
        Weight of the uniform-prior regulariser ``KL(uniform || mean prediction)``.
    gmm_max_iter : int, default 10
    gmm_reg_covar : float, default 5e-4
    feature_dropout : float, default 0.3
        Frozen path: coordinate dropout of the feature-space strong view.
    feature_noise : float, default 0.3
        Frozen path: norm of the Gaussian noise of the feature-space strong view.
    amp : {"auto", "bf16", "fp16", "off"}, default "auto"
        Mixed precision on CUDA (see :class:`~labelsieve.core.engine.Trainer`).
    num_workers : int or None, default None
        Image path: DataLoader workers (default ``min(4, cpu_count)``).

    Attributes
    ----------
    networks_ : list of CoDivideNet
        The two trained networks, after :meth:`detect`.
    """

    name = "codivide"
    summary = "Co-divide (AVL-Prompter): two MaPLe-prompted CLIP networks trained on each other's GMM split"
    needs_text = True

    def __init__(self, *, frozen: bool | str = True, epochs: int = 10, warmup_epochs: int = 1,
                 lr: float = 0.002, momentum: float = 0.9, weight_decay: float = 5e-4, batch_size: int = 32,
                 n_ctx: int = 2, depth: int = 9, ctx_init: str | None = "a photo of a", tau: float = 0.5,
                 confidence: float = 0.95, lambda_u: float = 1.0, lambda_r: float = 1.0,
                 gmm_max_iter: int = 10, gmm_reg_covar: float = 5e-4, feature_dropout: float = 0.3,
                 feature_noise: float = 0.3, amp: str = "auto", num_workers: int | None = None) -> None:
        own = type(self).__name__

        def is_int(v: object) -> bool:
            return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

        check_param(own, "frozen", frozen, isinstance(frozen, bool) or frozen == "auto", "True, False or 'auto'")
        check_param(own, "epochs", epochs, is_int(epochs) and epochs >= 1, "an int >= 1")
        check_param(own, "warmup_epochs", warmup_epochs,
                    is_int(warmup_epochs) and 0 <= warmup_epochs < (epochs if is_int(epochs) else 1),
                    f"an int in [0, epochs) = [0, {epochs})")
        check_param(own, "lr", lr, _is_number(lr) and lr > 0, "a float > 0")
        check_param(own, "momentum", momentum, _is_number(momentum) and 0 <= momentum < 1, "a float in [0, 1)")
        check_param(own, "weight_decay", weight_decay, _is_number(weight_decay) and weight_decay >= 0,
                    "a float >= 0")
        check_param(own, "batch_size", batch_size, is_int(batch_size) and batch_size >= 2, "an int >= 2")
        check_param(own, "n_ctx", n_ctx, is_int(n_ctx) and n_ctx >= 1, "an int >= 1")
        check_param(own, "depth", depth, is_int(depth) and depth >= 1, "an int >= 1")
        check_param(own, "ctx_init", ctx_init, ctx_init is None or (isinstance(ctx_init, str) and ctx_init.strip()),
                    "None or a non-empty phrase such as 'a photo of a'")
        check_param(own, "tau", tau, _is_number(tau) and 0 < tau < 1, "a float in (0, 1)")
        check_param(own, "confidence", confidence, _is_number(confidence) and 0 < confidence <= 1,
                    "a float in (0, 1]")
        check_param(own, "lambda_u", lambda_u, _is_number(lambda_u) and lambda_u >= 0, "a float >= 0")
        check_param(own, "lambda_r", lambda_r, _is_number(lambda_r) and lambda_r >= 0, "a float >= 0")
        check_param(own, "gmm_max_iter", gmm_max_iter, is_int(gmm_max_iter) and gmm_max_iter >= 1, "an int >= 1")
        check_param(own, "gmm_reg_covar", gmm_reg_covar, _is_number(gmm_reg_covar) and gmm_reg_covar > 0,
                    "a float > 0")
        check_param(own, "feature_dropout", feature_dropout,
                    _is_number(feature_dropout) and 0 <= feature_dropout < 1, "a float in [0, 1)")
        check_param(own, "feature_noise", feature_noise, _is_number(feature_noise) and feature_noise >= 0,
                    "a float >= 0")
        check_amp(own, amp)
        check_param(own, "num_workers", num_workers, num_workers is None or (is_int(num_workers) and num_workers >= 0),
                    "None or an int >= 0")
        self.frozen = frozen
        self.epochs = int(epochs)
        self.warmup_epochs = int(warmup_epochs)
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self.batch_size = int(batch_size)
        self.n_ctx = int(n_ctx)
        self.depth = int(depth)
        self.ctx_init = ctx_init
        self.tau = float(tau)
        self.confidence = float(confidence)
        self.lambda_u = float(lambda_u)
        self.lambda_r = float(lambda_r)
        self.gmm_max_iter = int(gmm_max_iter)
        self.gmm_reg_covar = float(gmm_reg_covar)
        self.feature_dropout = float(feature_dropout)
        self.feature_noise = float(feature_noise)
        self.amp = amp
        self.num_workers = num_workers

    # ------------------------------------------------------------------------------------------
    def resolve_path(self, ctx: DetectionContext) -> str:
        """``"maple_images"`` (image-level MaPLe) or ``"text_only_features"`` (frozen fast path).

        Raises
        ------
        ModelError
            For ``frozen=False`` on an image tower that is not an open_clip ViT.
        """
        vit = is_vit_tower(ctx.encoder.model)
        if self.frozen is True or (self.frozen == "auto" and not vit):
            return PATH_FEATURES
        if not vit:
            tower = type(getattr(ctx.encoder.model, "visual", ctx.encoder.model)).__name__
            raise ModelError(
                f"codivide with frozen=False trains MaPLe vision prompts, which need a ViT image tower (an "
                f"open_clip VisionTransformer); this model's image tower is {tower}. Use --frozen "
                "(frozen=True: text-side prompts on cached image features, works with any tower) or "
                "frozen='auto'."
            )
        return PATH_IMAGES

    def build_networks(self, ctx: DetectionContext, path: str) -> list[CoDivideNet]:
        """The two untrained networks for ``ctx`` (seeded from ``ctx.seed``: network k from (seed, k)).

        Parameters
        ----------
        ctx : DetectionContext
        path : str
            What :meth:`resolve_path` returned.

        Returns
        -------
        list of two CoDivideNet
        """
        nets = []
        for k in range(2):
            with torch.random.fork_rng(devices=_rng_devices(ctx.device)):
                torch.manual_seed(_seed(ctx.seed, k))
                prompts = MaPLePrompts(ctx.encoder.model, ctx.encoder.tokenizer, ctx.classnames, n_ctx=self.n_ctx,
                                       depth=self.depth, init=self.ctx_init, text_only=path == PATH_FEATURES)
            nets.append(CoDivideNet(prompts, on_features=path == PATH_FEATURES).to(ctx.device))
        return nets

    def detect(self, ctx: DetectionContext) -> DetectionResult:
        ctx.encoder.require_text("co-divide")
        path = self.resolve_path(ctx)
        model = ctx.encoder.model
        grad_flags = [p.requires_grad for p in model.parameters()]  # MaPLePrompts freezes the CLIP model
        try:
            with torch.random.fork_rng(devices=_rng_devices(ctx.device)):
                torch.manual_seed(_seed(ctx.seed, 2))
                result = self._detect(ctx, path)
        finally:
            for p, flag in zip(model.parameters(), grad_flags, strict=True):
                p.requires_grad_(flag)
        # the classifier is prompted text: say so when the zero-shot side disagrees with most labels
        result.info.update(zero_shot_check(ctx))
        return result

    # ------------------------------------------------------------------------------------------
    def _datasets(self, ctx: DetectionContext, path: str) -> tuple[Any, Any, Any, int]:
        """(warm-up dataset, co-divide dataset, evaluation dataset, loader workers)."""
        n = len(ctx.labels)
        labels = torch.as_tensor(ctx.labels, dtype=torch.long)
        if path == PATH_FEATURES:
            feats = torch.as_tensor(ctx.features())
            ds = torch.utils.data.TensorDataset(feats, labels, torch.arange(n), torch.ones(n, dtype=torch.bool))
            return ds, ds, ds, 0
        workers = self.num_workers if self.num_workers is not None else default_num_workers(4)
        size = ctx.encoder.image_size
        cache = DecodedImageCache.from_images(ctx.images, size=size, cache_dir=ctx.cache_dir, progress=ctx.progress,
                                              num_workers=workers)
        norm = {"mean": ctx.encoder.mean, "std": ctx.encoder.std}
        weak = train_transform(size, **norm)
        warm_ds = CachedImageDataset(cache, labels=ctx.labels, transform=weak)
        two_ds = CachedTwoViewDataset(cache, labels=ctx.labels, transform=weak, strong=strong_transform(size, **norm))
        eval_ds = CachedImageDataset(cache, labels=ctx.labels, transform=eval_transform(size, **norm))
        return warm_ds, two_ds, eval_ds, workers

    def _evaluate(self, trainer: Any, loader: Any, labels: np.ndarray, seed: int) -> dict[str, Any]:
        """Evaluation pass + GMM split: clean posterior, softmax, losses, the GMM's rule and components."""
        ev = trainer.evaluate(loader, targets=labels)
        ok = ev["ok"]
        posterior = np.zeros(len(labels), dtype=np.float64)
        split = fit_gmm_split(ev["losses"][ok], max_iter=self.gmm_max_iter, reg_covar=self.gmm_reg_covar, seed=seed)
        posterior[ok] = split.posterior
        probs = softmax(ev["logits"], axis=1)
        probs[~ok] = 1.0 / probs.shape[1]
        return {"posterior": posterior, "probs": probs, "ok": ok, "loss": ev["loss"], "acc": ev["acc"],
                "rule": split.rule, "means": split.means, "weights": split.weights}

    def _detect(self, ctx: DetectionContext, path: str) -> DetectionResult:
        t_start = time.perf_counter()
        device = ctx.device
        n = len(ctx.labels)
        labels_np = np.asarray(ctx.labels, dtype=np.int64)
        nets = self.build_networks(ctx, path)
        warm_ds, two_ds, eval_ds, workers = self._datasets(ctx, path)
        steps = max(1, (n + self.batch_size - 1) // self.batch_size)
        trainers = []
        for k, net in enumerate(nets):
            opt = make_optimizer(net, name="sgd", lr=self.lr, weight_decay=self.weight_decay, momentum=self.momentum)
            sched = cosine_schedule(opt, epochs=self.epochs, steps_per_epoch=steps)
            trainers.append(Trainer(net, optimizer=opt, scheduler=sched, device=device, amp=self.amp,
                                    progress=ctx.progress, desc=f"codivide net {k + 1} ({path})"))
        eval_loader = make_loader(eval_ds, batch_size=max(256, self.batch_size), num_workers=workers)
        gen = torch.Generator(device=device)
        gen.manual_seed(_seed(ctx.seed, 3))
        labelled = [torch.ones(n, dtype=torch.bool, device=device) for _ in nets]
        history: list[dict[str, Any]] = []
        for epoch in range(self.epochs):
            t0 = time.perf_counter()
            warm = epoch < self.warmup_epochs
            rec: dict[str, Any] = {"epoch": epoch, "phase": "warmup" if warm else "codivide"}
            if not warm:
                evals = [self._evaluate(tr, eval_loader, labels_np, ctx.seed) for tr in trainers]
                for k in range(2):
                    # co-divide: network k trains on the split made by the other network
                    labelled[k] = torch.as_tensor(evals[1 - k]["posterior"] > self.tau, device=device)
                rec["split_agreement"] = float(((evals[0]["posterior"] > self.tau)
                                                == (evals[1]["posterior"] > self.tau)).mean())
            for k, (net, tr) in enumerate(zip(nets, trainers, strict=True)):
                stats: dict[str, float] = {}
                step = self._make_step(net, None if warm else labelled[k], stats, gen)
                loader = make_loader(warm_ds if warm else two_ds, batch_size=self.batch_size, shuffle=True,
                                     seed=_seed(ctx.seed, k, epoch), num_workers=workers)
                r = tr.train_epoch(loader, epoch=epoch, step_fn=step, epochs=self.epochs)
                entry: dict[str, Any] = {"loss": r["loss"], "acc": r["acc"], "lr": r["lr"], "seconds": r["seconds"],
                                         "skipped": r["skipped"]}
                if not warm:
                    ev = evals[1 - k]
                    batches = max(1, int(stats.pop("batches", 0)))
                    entry.update({key: v / batches if key in ("l_x", "l_u", "penalty") else int(v)
                                  for key, v in stats.items()})
                    # n_labelled: this network's labelled set (the other's split); n_selected: its own split,
                    # which became the other network's labelled set
                    entry.update(n_labelled=int(labelled[k].sum()), gmm_rule=ev["rule"], gmm_means=ev["means"],
                                 n_selected=int((evals[k]["posterior"] > self.tau).sum()),
                                 eval_loss=evals[k]["loss"], eval_acc=evals[k]["acc"])
                rec[f"net{k + 1}"] = entry
            rec["seconds"] = time.perf_counter() - t0
            history.append(rec)
        finals = [self._evaluate(tr, eval_loader, labels_np, ctx.seed) for tr in trainers]
        p_nets = [f["posterior"] for f in finals]
        p_clean = 0.5 * (p_nets[0] + p_nets[1])
        probs = 0.5 * (finals[0]["probs"] + finals[1]["probs"])
        ok = finals[0]["ok"]
        p_clean[~ok] = self.tau  # undecodable images: no evidence either way, not flagged
        self.networks_ = nets
        prompts = nets[0].prompts
        rule = ("p_clean = mean over the two co-divide networks of the DivideMix GMM posterior of the low-loss "
                "component of each network's cross-entropy on the given label (2 components, min-max normalised "
                f"losses, max_iter {self.gmm_max_iter}, reg_covar {self.gmm_reg_covar:g}); flagged if "
                f"p_clean < {self.tau:g}, the co-divide split threshold.")
        info = {
            "path": path, "frozen_requested": self.frozen,
            "tower": type(getattr(ctx.encoder.model, "visual", ctx.encoder.model)).__name__,
            "n_ctx": int(prompts.n_ctx), "depth": int(prompts.depth), "depth_requested": self.depth,
            "n_trainable_per_net": int(sum(p.numel() for p in nets[0].parameters() if p.requires_grad)),
            "strong_view": ("RandAugment (2 ops, magnitude 10) after random resized crop + flip"
                            if path == PATH_IMAGES else
                            f"feature dropout {self.feature_dropout:g} + Gaussian noise of norm "
                            f"{self.feature_noise:g}, re-normalised (labelsieve's feature-space adaptation)"),
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

    def _make_step(self, net: CoDivideNet, labelled: torch.Tensor | None, stats: dict[str, float],
                   gen: torch.Generator) -> Callable[[Any, Sequence[Any]], tuple[torch.Tensor | None, int, int]]:
        """The engine's ``step_fn`` for one network and epoch (``labelled=None``: warm-up)."""

        def step(trainer: Any, batch: Sequence[Any]) -> tuple[torch.Tensor | None, int, int]:
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
                    strong_u = strong_feature_view(weak[unl], dropout=self.feature_dropout, noise=self.feature_noise,
                                                   generator=gen)
                else:
                    assert strong is not None
                    strong_u = strong[unl]
                lw, ls = net.views(weak, strong_u)
                loss, parts = codivide_loss(lw, ls, y, lab, confidence=self.confidence, lambda_u=self.lambda_u,
                                            lambda_r=self.lambda_r)
                for key, v in parts.items():
                    stats[key] = stats.get(key, 0) + v
                stats["batches"] = stats.get("batches", 0) + 1
            n_correct = int((lw.detach().argmax(1) == y).sum())
            return loss, n_correct, int(y.shape[0])

        return step
