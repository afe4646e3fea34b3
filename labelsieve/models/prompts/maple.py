"""MaPLe (Khattak et al., CVPR 2023), the prompts of AVL-Prompter's co-divide: shared deep
vision-language prompts whose vision half is a linear function of the text half."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from labelsieve.core.errors import ModelError, check_param
from labelsieve.models.prompts.text_tower import (
    PLACEHOLDER,
    TextTower,
    check_prompt_args,
    context_init,
    prompt_buffers,
)
from labelsieve.models.prompts.tokens import freeze
from labelsieve.models.prompts.vit import PromptedViT, is_open_clip_vit

__all__ = ["MaPLeOutput", "MaPLePrompts"]




class MaPLeOutput(NamedTuple):
    """What :class:`MaPLePrompts` produces in one forward.

    Attributes
    ----------
    text_features : Tensor of shape (n_cls, embed_dim)
        L2-normalised class text features.
    vision_prompts : Tensor of shape (n_ctx, vision_width) or None
        Coupled input-layer vision prompts (None when ``text_only``).
    vision_deep_prompts : list of Tensor of shape (n_ctx, vision_width)
        Coupled prompts for vision blocks ``1 .. depth-1`` (empty when ``text_only``).
    """

    text_features: torch.Tensor
    vision_prompts: torch.Tensor | None
    vision_deep_prompts: list[torch.Tensor]


class MaPLePrompts(nn.Module):
    """MaPLe deep vision-language prompts (Khattak et al. 2023), as used by co-divide.

    The text prompt of class ``k`` is MaPLe's ``"<init> <classname_k>."`` whose first ``n_ctx`` tokens
    after the start token are the learnable ``ctx`` (with the defaults: learnable "a photo", fixed
    "of a"). Blocks ``1 .. depth-1`` of the text transformer get their context slots replaced by
    ``compound_text[j]`` (N(0, 0.02) init). The vision prompts are linear functions of the text ones:
    ``proj(ctx)`` enters the ViT after its class token and ``compound_proj[j](compound_text[j])``
    replaces them at vision block ``j + 1``.

    Parameters
    ----------
    model : open_clip.CLIP
        The CLIP model; all its weights are frozen (``requires_grad=False``) and not registered, so
        ``state_dict()`` holds only the prompts and the coupling layers.
    tokenizer : callable
        The model's open_clip tokenizer.
    classnames : sequence of str
    n_ctx : int, default 2
        Learnable context tokens per layer. With ``init``, at most the phrase's token count (MaPLe
        takes the embeddings of the phrase's first ``n_ctx`` tokens).
    depth : int, default 9
        Prompt depth (MaPLe's ``PROMPT_DEPTH``; 1 = input layer only). Clamped to the number of text
        blocks and, unless ``text_only``, of vision blocks: ``depth_ = min(depth, text_layers,
        vision_layers)``; the value used is ``depth_``.
    init : str or None, default "a photo of a"
        Initialisation phrase; None draws ``ctx`` from N(0, ``init_std``²) with placeholder words.
    init_std : float, default 0.02
        Standard deviation of the random initialisations (``compound_text``, and ``ctx`` without init).
    text_only : bool, default False
        Text-side deep prompts only (no coupling layers, no vision prompts): the documented fallback
        for image towers that are not ViTs (such as the mini CLIP's CNN), used with cached image
        features of the frozen tower (:meth:`logits_from_features`).

    Notes
    -----
    The learnable tensors are fp32 whatever the model's dtype (cast when used). The vision prompts
    run through :func:`~labelsieve.models.prompts.vit.vit_forward` on ``model.visual`` directly, so PEFT applied with
    :func:`labelsieve.models.peft.apply_peft` is not combined with MaPLe.

    Raises
    ------
    ModelError
        If the image tower is not an open_clip ViT and ``text_only`` is False.

    Examples
    --------
    >>> maple = MaPLePrompts(model, tokenizer, ["cat", "dog"])                  # doctest: +SKIP
    >>> logits = maple.logits(images)        # (B, 2) = scale · img @ text.T      # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        classnames: Sequence[str],
        *,
        n_ctx: int = 2,
        depth: int = 9,
        init: str | None = "a photo of a",
        init_std: float = 0.02,
        text_only: bool = False,
    ) -> None:
        super().__init__()
        owner = "MaPLePrompts"
        names = check_prompt_args(owner, classnames, init_std)
        check_param(owner, "n_ctx", n_ctx, isinstance(n_ctx, int) and not isinstance(n_ctx, bool)
                    and n_ctx >= 1, "an int >= 1")
        check_param(owner, "depth", depth, isinstance(depth, int) and not isinstance(depth, bool)
                    and depth >= 1, "an int >= 1")
        check_param(owner, "text_only", text_only, isinstance(text_only, bool), "a bool")
        visual = getattr(model, "visual", None)
        if not text_only and not is_open_clip_vit(visual):
            raise ModelError(
                f"co-divide/MaPLe needs a ViT image tower (an open_clip VisionTransformer); this model's "
                f"image tower is {type(visual).__name__}. Use the frozen fast path (CLI --frozen; "
                "MaPLePrompts(text_only=True)): text-side prompts only, on cached image features"
            )
        tower = TextTower(model)
        freeze(model)
        object.__setattr__(self, "_tower", tower)
        object.__setattr__(self, "_model", model)
        vit = None if text_only else PromptedViT(visual, prompt_ln_pre=True)
        object.__setattr__(self, "_vit", vit)

        n, init_vectors, n_init = context_init(tower, tokenizer, init, None if init else n_ctx, owner,
                                                default=n_ctx)
        if init is not None:
            check_param(owner, "n_ctx", n_ctx, n_ctx <= n_init,
                        f"an int in [1, {n_init}], the token count of init={init!r}")
            n = n_ctx
            assert init_vectors is not None
            ctx = init_vectors[:n].clone()
            prefix = str(init)
        else:
            ctx = torch.empty(n, tower.width).normal_(0.0, float(init_std))
            prefix = " ".join([PLACEHOLDER] * n)
        limits = [tower.n_layers] + ([] if vit is None else [vit.n_layers])
        self.depth_requested = depth
        self.depth = min([depth, *limits])
        self.n_ctx = n
        self.n_cls = len(names)
        self.classnames = names
        self.text_only = text_only
        self.init = init
        device = tower.token_embedding.weight.device
        dtype = torch.float32  # fp32 master weights; prompts are cast to the model's dtype when used
        tw = tower.width
        self.ctx = nn.Parameter(ctx.to(device=device, dtype=dtype))
        self.compound_text = nn.ParameterList(
            [nn.Parameter(torch.empty(n, tw, device=device, dtype=dtype).normal_(0.0, float(init_std)))
             for _ in range(self.depth - 1)]
        )
        if vit is not None:
            vw = vit.width
            self.proj: nn.Linear | None = nn.Linear(tw, vw).to(device=device, dtype=dtype)
            self.compound_proj = nn.ModuleList(
                [nn.Linear(tw, vw).to(device=device, dtype=dtype) for _ in range(self.depth - 1)]
            )
        else:
            self.proj = None
            self.compound_proj = nn.ModuleList()

        prompt_buffers(self, tower, tokenizer, names, prefix, n, device)

    @property
    def logit_scale(self) -> torch.Tensor:
        """CLIP's temperature ``exp(model.logit_scale)`` (a frozen scalar tensor)."""
        return self._model.logit_scale.detach().exp()

    def encode_text(self) -> torch.Tensor:
        """L2-normalised class text features (n_cls, embed_dim) with the deep text prompts."""
        ctx = self.ctx.unsqueeze(0).expand(self.n_cls, -1, -1).to(self.token_prefix.dtype)
        x = torch.cat([self.token_prefix, ctx, self.token_suffix], dim=1)
        return self._tower.encode_embeddings(x, self.eot_index, deep_prompts=list(self.compound_text),
                                             prompt_start=1, normalize=True)

    def vision_prompts(self) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """The coupled vision prompts: input layer (n_ctx, vision_width) and blocks 1 .. depth-1."""
        if self.proj is None:
            return None, []
        deep = [lin(p) for lin, p in zip(self.compound_proj, self.compound_text, strict=True)]
        return self.proj(self.ctx), deep

    def forward(self) -> MaPLeOutput:
        """Text features and coupled vision prompts; see :class:`MaPLeOutput`."""
        prompts, deep = self.vision_prompts()
        return MaPLeOutput(self.encode_text(), prompts, deep)

    def encode_image(self, images: torch.Tensor, *, out: MaPLeOutput | None = None) -> torch.Tensor:
        """L2-normalised image features (B, embed_dim) with the coupled vision prompts.

        Parameters
        ----------
        images : Tensor of shape (B, 3, H, W)
        out : MaPLeOutput, optional
            A forward's output to reuse (saves recomputing the coupling).

        With ``text_only`` this is the frozen tower's ``encode_image``.
        """
        if self._vit is None:
            return F.normalize(self._model.encode_image(images), dim=-1)
        if out is None:
            prompts, deep = self.vision_prompts()
        else:
            prompts, deep = out.vision_prompts, out.vision_deep_prompts
        return F.normalize(self._vit(images, prompts, deep), dim=-1)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """``logit_scale · encode_image(images) @ encode_text().T``, shape (B, n_cls)."""
        out = self.forward()
        img = self.encode_image(images, out=out).float()
        return self.logit_scale.float() * img @ out.text_features.float().t()

    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """Logits (B, n_cls) for cached image features of the frozen tower (``text_only`` only).

        Raises
        ------
        ModelError
            Unless ``text_only``: with vision prompts the image features must come from
            :meth:`encode_image`.
        """
        if not self.text_only:
            raise ModelError("cached image features lack the MaPLe vision prompts; use logits(images), "
                             "or build MaPLePrompts with text_only=True")
        img = F.normalize(features.float(), dim=-1)
        return self.logit_scale.float() * img @ self.encode_text().float().t()
