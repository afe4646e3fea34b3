"""VPT (Jia et al. 2022): learnable prompt tokens at the ViT input (shallow) or at every block (deep, DEFT)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from labelsieve.models.peft.base import ViTPeft, install_vit, int_option, vit_dims


class _VPT(ViTPeft):
    def __init__(self, n_layers: int, n_tokens: int, width: int, patch_size: tuple[int, int],
                 *, like: torch.Tensor) -> None:
        super().__init__()
        val = math.sqrt(6.0 / float(3 * patch_size[0] * patch_size[1] + width))
        self.tokens = nn.Parameter(torch.empty(n_layers, n_tokens, width, device=like.device, dtype=like.dtype))
        nn.init.uniform_(self.tokens, -val, val)
        self.init_bound = val

    def prompts(self) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        return self.tokens[0], list(self.tokens[1:])



def _apply_vpt(deep: bool) -> Callable[[nn.Module, dict[str, Any]], str]:
    method = "vpt_deep" if deep else "vpt_shallow"

    def apply(visual: nn.Module, opts: dict[str, Any]) -> str:
        n_tok = int_option(method, opts, "n_tokens")
        n_layers, width, patch, like = vit_dims(visual)
        vpt = _VPT(n_layers if deep else 1, n_tok, width, patch, like=like)
        install_vit(visual, vpt)
        where = f"at each of the {n_layers} blocks, replaced at every block" if deep else "at the input only"
        return (f"VPT: {n_tok} learnable prompt tokens {where}, init U(±{vpt.init_bound:.4f}); the rest of "
                "the model is frozen")

    return apply
