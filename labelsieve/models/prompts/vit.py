"""An open_clip ViT image tower run with extra prompt tokens inserted after the class token, optionally
replaced at every block (VPT deep, MaPLe); with no prompts it reproduces ``model.encode_image`` exactly."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from open_clip.transformer import VisionTransformer
from torch import nn

from labelsieve.core.errors import ModelError, check_param
from labelsieve.models.prompts.tokens import expand_tokens, replace_slots

__all__ = ["PromptedViT", "is_open_clip_vit", "vit_forward"]


def is_open_clip_vit(visual: Any) -> bool:
    return isinstance(visual, VisionTransformer)



def vit_forward(
    visual: nn.Module,
    images: torch.Tensor,
    prompts: torch.Tensor | None = None,
    deep_prompts: Sequence[torch.Tensor | None] | None = None,
    *,
    prompt_ln_pre: bool = False,
    run_block: Callable[[int, nn.Module, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Forward of an open_clip VisionTransformer with prompt tokens; see :class:`PromptedViT`.

    ``run_block(i, block, x) -> x`` replaces ``block(x)`` (PEFT adapters); ``None`` calls the block.
    """
    if not (hasattr(visual, "_embeds") and hasattr(visual, "_pool")):
        raise ModelError("prompted ViT forward needs open_clip >= 3.0 (VisionTransformer._embeds/_pool)")
    x = visual._embeds(images)
    n_p = 0
    if prompts is not None:
        p = expand_tokens(prompts, x.shape[0], x.dtype, "prompts")
        if prompt_ln_pre:
            p = visual.ln_pre(p)
        n_p = p.shape[1]
        x = torch.cat([x[:, :1], p, x[:, 1:]], dim=1)
    deep = list(deep_prompts) if deep_prompts else []
    tr = visual.transformer
    blocks = tr.resblocks
    if any(d is not None for d in deep) and n_p == 0:
        raise ValueError("deep prompts replace prompt tokens: give the input-layer prompts too")
    if len(deep) > len(blocks) - 1:
        raise ValueError(f"{len(deep)} deep prompts given; a {len(blocks)}-block ViT takes at most "
                         f"{len(blocks) - 1}")
    if n_p == 0 and run_block is None:
        x = tr(x)
    else:
        batch_first = getattr(tr, "batch_first", True)
        if not batch_first:
            x = x.transpose(0, 1)
        for i, blk in enumerate(blocks):
            d = deep[i - 1] if 1 <= i <= len(deep) else None
            if d is not None:
                check_param("PromptedViT", "deep_prompts", tuple(d.shape), d.shape[-2] == n_p,
                            f"tensors of {n_p} tokens, like the input-layer prompts")
                x = replace_slots(x, d, 1, n_p, batch_first=batch_first)
            x = run_block(i, blk, x) if run_block is not None else blk(x)
        if not batch_first:
            x = x.transpose(0, 1)
    if n_p:
        x = torch.cat([x[:, :1], x[:, 1 + n_p:]], dim=1)
    pooled, _ = visual._pool(x)
    if visual.proj is not None:
        pooled = pooled @ visual.proj
    return pooled


class PromptedViT(nn.Module):
    """An open_clip ViT image tower run with extra prompt tokens (VPT, MaPLe).

    The prompts are inserted after the class token, after ``ln_pre`` (VPT, DEFT) or passed through
    ``ln_pre`` (MaPLe, ``prompt_ln_pre=True``); deep prompts replace the prompt tokens at the input of
    blocks ``1 ..``; the prompt tokens are dropped before pooling, so pooling (class token, average,
    attentional pooler, ``final_ln_after_pool``) sees the same tokens as ``encode_image``. Prompt
    tokens carry no positional embedding, so where they sit in the sequence does not change the
    result. With no prompts the forward is ``visual.forward`` exactly. Only the pooled features are
    returned (also for towers built with ``output_tokens=True``); gradient checkpointing is not
    applied to the blocks.

    Parameters
    ----------
    visual : open_clip.transformer.VisionTransformer
        ``model.visual`` of an open_clip CLIP ViT; registered as the sub-module ``visual``.
    prompt_ln_pre : bool, default False
        Pass the input-layer prompts through ``ln_pre`` (MaPLe) instead of inserting them after it.

    Raises
    ------
    ModelError
        If ``visual`` is not an open_clip ``VisionTransformer`` (e.g. a timm CNN tower).

    Examples
    --------
    >>> vit = PromptedViT(model.visual)                                        # doctest: +SKIP
    >>> feats = vit(images, prompts=torch.zeros(4, vit.width))  # (B, embed_dim)  # doctest: +SKIP
    """

    def __init__(self, visual: nn.Module, *, prompt_ln_pre: bool = False) -> None:
        super().__init__()
        if not is_open_clip_vit(visual):
            raise ModelError(
                f"visual prompts need a ViT image tower (open_clip VisionTransformer); this model's image "
                f"tower is {type(visual).__name__}"
            )
        self.visual = visual
        self.prompt_ln_pre = bool(prompt_ln_pre)

    @property
    def n_layers(self) -> int:
        """Number of transformer blocks."""
        return len(self.visual.transformer.resblocks)

    @property
    def width(self) -> int:
        """Token width of the transformer."""
        return int(self.visual.class_embedding.shape[-1])

    @property
    def patch_size(self) -> tuple[int, int]:
        """Patch size (height, width)."""
        k = self.visual.conv1.kernel_size
        return (int(k[0]), int(k[1]))

    def forward(
        self,
        images: torch.Tensor,
        prompts: torch.Tensor | None = None,
        deep_prompts: Sequence[torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        """Image features (not normalised).

        Parameters
        ----------
        images : Tensor of shape (B, 3, H, W)
            Preprocessed images.
        prompts : Tensor of shape (P, width) or (B, P, width), optional
            Prompt tokens at the input of block 0.
        deep_prompts : sequence of Tensor or None, optional
            ``deep_prompts[j]`` (P tokens) replaces the prompt tokens at the input of block ``j + 1``;
            at most ``n_layers - 1`` entries; ``None`` keeps the previous block's output.

        Returns
        -------
        Tensor of shape (B, embed_dim)
        """
        return vit_forward(self.visual, images, prompts, deep_prompts, prompt_ln_pre=self.prompt_ln_pre)
