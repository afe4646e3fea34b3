"""BitFit (Ben Zaken et al. 2022): train the biases (and BatchNorm weights on CNN towers) only; and ``none``."""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from labelsieve.core.errors import ModelError
from labelsieve.models.prompts.vit import is_open_clip_vit


def _apply_bitfit(visual: nn.Module, opts: dict[str, Any]) -> str:
    vit = is_open_clip_vit(visual)
    n_bias = n_bn = 0
    for name, p in visual.named_parameters():
        if name.endswith("bias"):
            p.requires_grad_(True)
            n_bias += 1
    if not vit:
        for m in visual.modules():
            if isinstance(m, _BatchNorm) and m.weight is not None:
                m.weight.requires_grad_(True)
                n_bn += 1
    if n_bias + n_bn == 0:
        raise ModelError(f"BitFit found no bias in the {type(visual).__name__} image tower; use 'lora' or 'none'")
    if vit:
        return f"BitFit: {n_bias} bias vectors of the image tower trained; the rest of the model is frozen"
    return (f"BitFit: {n_bias} bias vectors and {n_bn} BatchNorm weights (γ; the BatchNorm β are among the "
            "biases) trained; the rest of the model is frozen; keep BatchNorm statistics frozen with "
            "set_peft_train_mode")


def _apply_none(visual: nn.Module, opts: dict[str, Any]) -> str:
    return "no PEFT: the image tower is frozen, so image features can be computed once and cached"
