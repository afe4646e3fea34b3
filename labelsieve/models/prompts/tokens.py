"""Token-sequence helpers shared by the text and vision prompt modules."""

from __future__ import annotations

import torch
from torch import nn


def expand_tokens(p: torch.Tensor, batch: int, dtype: torch.dtype, what: str) -> torch.Tensor:
    """(n, width) or (batch, n, width) -> (batch, n, width) in ``dtype``."""
    if p.dim() == 2:
        p = p.unsqueeze(0).expand(batch, -1, -1)
    elif p.dim() != 3 or p.shape[0] != batch:
        raise ValueError(f"{what} must have shape (n, width) or ({batch}, n, width); got {tuple(p.shape)}")
    return p.to(dtype)


def freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


def replace_slots(x: torch.Tensor, p: torch.Tensor, start: int, width: int, *, batch_first: bool,
                  what: str = "deep prompt") -> torch.Tensor:
    """Hidden states ``x`` with positions ``start .. start+width-1`` replaced by the prompt tokens ``p``.

    ``p`` is (n, d) or (B, n, d); ``x`` is (B, L, d) when ``batch_first`` else (L, B, d). MaPLe's deep
    prompts and VPT-deep's per-block tokens are inserted this way at the input of every block.
    """
    if batch_first:
        p = expand_tokens(p, x.shape[0], x.dtype, what)
        return torch.cat([x[:, :start], p, x[:, start + width:]], dim=1)
    p = expand_tokens(p, x.shape[1], x.dtype, what).transpose(0, 1)
    return torch.cat([x[:start], p, x[start + width:]], dim=0)
