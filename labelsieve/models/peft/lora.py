"""LoRA (Hu et al. 2021): low-rank updates of a ViT's attention projections, or of every 1×1 convolution and
linear layer of another tower (through forward hooks, so parameter names stay as they were)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from labelsieve.core.errors import ModelError
from labelsieve.models.peft.base import HOOK_ID, LORA, ViTPeft, check_blocks, float_option, install_vit, int_option
from labelsieve.models.prompts.vit import is_open_clip_vit


class _LowRank(nn.Module):
    """LoRA factors of a weight update ``ΔW = (alpha / rank) · B @ A`` (A: (rank, in), B: (out, rank)).

    ``A`` is Kaiming-uniform initialised and ``B`` zero, so the update starts at 0 (Hu et al. 2021).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float,
                 *, like: torch.Tensor) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=like.device, dtype=like.dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=like.device, dtype=like.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = float(alpha) / rank

    def delta(self) -> torch.Tensor:
        """The weight update (out, in)."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ ΔW.T`` for a linear layer's input (…, in)."""
        return F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling

    def conv1x1(self, x: torch.Tensor, stride: tuple[int, ...] | int) -> torch.Tensor:
        """The update applied as a 1×1 convolution with ``stride`` to an input (B, in, H, W)."""
        a = F.conv2d(x, self.lora_A[:, :, None, None], stride=stride)
        return F.conv2d(a, self.lora_B[:, :, None, None]) * self.scaling


def _lora_hook(module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
    lora: _LowRank = getattr(module, LORA)
    x = inputs[0]
    if isinstance(module, nn.Conv2d):
        return output + lora.conv1x1(x, module.stride)
    return output + lora(x)



class _ViTLoRA(ViTPeft):
    uses_blocks = True

    def __init__(self, blocks: nn.ModuleList, rank: int, alpha: float) -> None:
        super().__init__()
        mods = []
        for blk in blocks:
            w = blk.attn.in_proj_weight
            d = w.shape[1]
            mods.append(nn.ModuleDict({
                "in_proj": _LowRank(d, w.shape[0], rank, alpha, like=w),
                "out_proj": _LowRank(d, blk.attn.out_proj.weight.shape[0], rank, alpha, like=w),
            }))
        self.blocks = nn.ModuleList(mods)

    def run_block(self, i: int, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        lo = self.blocks[i]
        attn = block.attn
        params = {
            "attn.in_proj_weight": attn.in_proj_weight + lo["in_proj"].delta(),
            "attn.out_proj.weight": attn.out_proj.weight + lo["out_proj"].delta(),
        }
        return torch.func.functional_call(block, params, (x,))



def _apply_lora(visual: nn.Module, opts: dict[str, Any]) -> str:
    rank = int_option("lora", opts, "rank")
    alpha = float_option("lora", opts, "alpha", lambda a: a > 0, "a float > 0")
    if is_open_clip_vit(visual):
        blocks = check_blocks(visual, "LoRA")
        install_vit(visual, _ViTLoRA(blocks, rank, alpha))
        return (f"LoRA rank {rank}, alpha {alpha:g} on the attention in/out projections of "
                f"{len(blocks)} ViT blocks; the rest of the model is frozen")
    skip: set[int] = set()
    for m in visual.modules():
        if isinstance(m, nn.MultiheadAttention) or type(m).__name__ == "AttentionPool2d":
            # their projections are read as weights inside F.multi_head_attention_forward: no hook fires
            skip.update(id(c) for c in m.modules() if c is not m)
    n_conv = n_lin = 0
    for m in list(visual.modules()):
        if id(m) in skip:
            continue
        if isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (1, 1) and m.groups == 1:
            n_conv += 1
            lora = _LowRank(m.in_channels, m.out_channels, rank, alpha, like=m.weight)
        elif isinstance(m, nn.Linear):
            n_lin += 1
            lora = _LowRank(m.in_features, m.out_features, rank, alpha, like=m.weight)
        else:
            continue
        lora.train(m.training)
        m.add_module(LORA, lora)
        lora.requires_grad_(True)
        handle = m.register_forward_hook(_lora_hook)
        object.__setattr__(m, HOOK_ID, handle.id)
    if n_conv + n_lin == 0:
        raise ModelError(f"LoRA found no 1×1 convolution or linear layer in the {type(visual).__name__} "
                         "image tower; use 'bitfit' or 'none'")
    return (f"LoRA rank {rank}, alpha {alpha:g} on {n_conv} pointwise (1×1) convolutions and {n_lin} linear "
            "layers of the image tower (forward hooks); the rest of the model is frozen; keep BatchNorm "
            "statistics frozen with set_peft_train_mode")
