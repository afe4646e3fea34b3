"""What every PEFT method shares: the result and method records, and the plumbing of ViT methods."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from open_clip.transformer import CustomResidualAttentionBlock, ResidualAttentionBlock
from torch import nn

from labelsieve.core.errors import ModelError, check_param
from labelsieve.models.prompts.vit import vit_forward

MODULE = "labelsieve_peft"  # sub-module of model.visual holding ViT PEFT parameters
LORA = "labelsieve_lora"  # sub-module of a hooked conv/linear holding its LoRA factors
INFO = "_labelsieve_peft_info"  # attribute of model.visual: the PeftInfo of the applied method
HOOK_ID = "_labelsieve_lora_hook"


@dataclass(frozen=True)
class PeftInfo:
    """What :func:`apply_peft` did.

    Attributes
    ----------
    method : str
        The method applied (``auto`` resolved).
    n_trainable : int
        Number of trainable (PEFT) parameter values.
    n_total : int
        Number of parameter values in the image tower, PEFT ones included.
    note : str
        One sentence for audit.json / logs.
    params : tuple of str
        Names (in ``model.named_parameters()``) of the trainable parameters.
    options : dict
        The method's resolved options (e.g. ``{"n_tokens": 20}``).
    requested : str
        The method asked for (``auto`` stays ``auto`` here).
    """

    method: str
    n_trainable: int
    n_total: int
    note: str
    params: tuple[str, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)
    requested: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary (without the parameter names)."""
        return {"method": self.method, "requested": self.requested or self.method,
                "n_trainable": self.n_trainable, "n_total": self.n_total, "options": dict(self.options),
                "note": self.note}


@dataclass(frozen=True)
class PeftMethod:
    """A registered PEFT method.

    Attributes
    ----------
    name : str
    summary : str
    vit_only : bool
        Applies only to open_clip ViT towers.
    defaults : dict
        Options and their defaults (the only options accepted).
    apply : callable
        ``apply(visual, options) -> note``; adds parameters and sets ``requires_grad`` on the ones to
        train (everything is frozen before).
    """

    name: str
    summary: str
    vit_only: bool
    defaults: Mapping[str, Any]
    apply: Callable[[nn.Module, dict[str, Any]], str]



class ViTPeft(nn.Module):
    """PEFT parameters of an open_clip ViT, used by the patched ``visual.forward``."""

    def prompts(self) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """Input-layer prompt tokens and deep prompts (none by default)."""
        return None, []

    def run_block(self, i: int, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Block ``i``'s forward (the block itself by default)."""
        return block(x)

    uses_blocks = False


def peft_vit_forward(visual: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``visual.forward`` while a ViT PEFT method is applied."""
    peft: ViTPeft = getattr(visual, MODULE)
    prompts, deep = peft.prompts()
    runner = peft.run_block if peft.uses_blocks else None
    return vit_forward(visual, x, prompts, deep, prompt_ln_pre=False, run_block=runner)


def install_vit(visual: nn.Module, peft: ViTPeft) -> None:
    peft.train(visual.training)  # new modules start in training mode; follow the tower's mode
    visual.add_module(MODULE, peft)
    for p in peft.parameters():
        p.requires_grad_(True)
    visual.forward = functools.partial(peft_vit_forward, visual)


def check_blocks(visual: nn.Module, what: str) -> nn.ModuleList:
    blocks = visual.transformer.resblocks
    for blk in blocks:
        if not isinstance(blk, (ResidualAttentionBlock, CustomResidualAttentionBlock)) or not hasattr(
            blk.attn, "in_proj_weight"
        ):
            raise ModelError(f"{what} supports open_clip ViT blocks with a fused in_proj_weight; this tower "
                             f"has {type(blk).__name__} blocks")
    return blocks


def vit_dims(visual: nn.Module) -> tuple[int, int, tuple[int, int], torch.Tensor]:
    like = visual.class_embedding
    k = visual.conv1.kernel_size
    return len(visual.transformer.resblocks), int(like.shape[-1]), (int(k[0]), int(k[1])), like



def int_option(method: str, opts: dict[str, Any], name: str, lo: int = 1) -> int:
    v = opts[name]
    check_param(f"apply_peft({method!r})", name, v, isinstance(v, int) and not isinstance(v, bool) and v >= lo,
                f"an int >= {lo}")
    return int(v)


def float_option(method: str, opts: dict[str, Any], name: str, ok: Callable[[float], bool],
                  expected: str) -> float:
    v = opts[name]
    good = isinstance(v, (int, float)) and not isinstance(v, bool) and ok(float(v))
    check_param(f"apply_peft({method!r})", name, v, good, expected)
    return float(v)
