"""AdaptFormer (Chen et al. 2022): bottleneck adapters parallel to each ViT block's MLP."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from open_clip.transformer import CustomResidualAttentionBlock
from torch import nn

from labelsieve.models.peft.base import ViTPeft, check_blocks, float_option, install_vit, int_option, vit_dims


class _Bottleneck(nn.Module):
    """AdaptFormer's adapter: down (d→b), ReLU, dropout, up (b→d), times a fixed scale."""

    def __init__(self, width: int, bottleneck: int, scale: float, dropout: float,
                 *, like: torch.Tensor) -> None:
        super().__init__()
        kw = {"device": like.device, "dtype": like.dtype}
        self.down = nn.Linear(width, bottleneck, **kw)
        self.up = nn.Linear(bottleneck, width, **kw)
        self.dropout = nn.Dropout(dropout)
        self.scale = float(scale)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.dropout(F.relu(self.down(x)))) * self.scale


def _attention_branch(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The residual branch of a block's self-attention, as the block computes it."""
    if isinstance(block, CustomResidualAttentionBlock):
        return block.ls_1(block.ln_attn(block.attn(block.ln_1(x))))
    return block.ls_1(block.attention(q_x=block.ln_1(x)))


class _AdaptFormer(ViTPeft):
    uses_blocks = True

    def __init__(self, blocks: nn.ModuleList, width: int, bottleneck: int, scale: float, dropout: float,
                 *, like: torch.Tensor) -> None:
        super().__init__()
        self.adapters = nn.ModuleList(
            [_Bottleneck(width, bottleneck, scale, dropout, like=like) for _ in blocks]
        )

    def run_block(self, i: int, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        x = x + _attention_branch(block, x)
        return x + block.ls_2(block.mlp(block.ln_2(x))) + self.adapters[i](x)



def _apply_adaptformer(visual: nn.Module, opts: dict[str, Any]) -> str:
    bottleneck = int_option("adaptformer", opts, "bottleneck")
    scale = float_option("adaptformer", opts, "scale", math.isfinite, "a finite float")
    dropout = float_option("adaptformer", opts, "dropout", lambda p: 0.0 <= p < 1.0, "a float in [0, 1)")
    blocks = check_blocks(visual, "AdaptFormer")
    _, width, _, like = vit_dims(visual)
    install_vit(visual, _AdaptFormer(blocks, width, bottleneck, scale, dropout, like=like))
    return (f"AdaptFormer: bottleneck-{bottleneck} adapters parallel to the MLP of {len(blocks)} ViT blocks, "
            f"scale {scale:g}, dropout {dropout:g}; the rest of the model is frozen")
