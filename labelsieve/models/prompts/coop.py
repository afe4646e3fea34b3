"""CoOp prompts with two shared contexts, positive and negative, as used by DEFT (Wei et al., NeurIPS
2024): ``[SOT] ctx_1 … ctx_n <class name> . [EOT]``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from labelsieve.core.errors import ModelError, check_param
from labelsieve.models.prompts.text_tower import (
    PLACEHOLDER,
    TextTower,
    check_prompt_args,
    context_init,
    prompt_buffers,
    tokenize,
)
from labelsieve.models.prompts.tokens import freeze

__all__ = ["DualPromptLearner"]




class DualPromptLearner(nn.Module):
    """CoOp prompts with two shared learnable contexts, positive and negative (DEFT).

    Each class ``k`` reads ``[SOT] ctx_1 … ctx_n <classname_k> . [EOT]`` with ``ctx = ctx_pos`` or
    ``ctx_neg``; DEFT scores ``p_clean_k = σ(s·(cos(img, pos_k) − cos(img, neg_k)))``.

    Parameters
    ----------
    model : open_clip.CLIP
        The CLIP model; its text tower is run (and frozen: ``requires_grad=False``) but not registered,
        so ``state_dict()`` holds only ``ctx_pos`` and ``ctx_neg``.
    tokenizer : callable
        The model's open_clip tokenizer (``open_clip.get_tokenizer``).
    classnames : sequence of str
        The text read for each class index.
    n_ctx : int, optional
        Number of context tokens; 16 when ``init`` is None. With ``init`` it is the phrase's token
        count, and giving a different ``n_ctx`` is an error.
    init : str, optional
        None: both contexts drawn from N(0, ``init_std``²) (DEFT). A phrase (e.g. ``"a photo of a"``):
        both contexts start as its token embeddings, so the prompts start as
        ``"a photo of a <classname>."`` and positive and negative agree (p_clean = 0.5).
    init_std : float, default 0.02
        Standard deviation of the random initialisation.
    class_token_position : {"end", "middle", "front"}, default "end"
        Where the class name goes relative to the context (CoOp).

    Attributes
    ----------
    ctx_pos, ctx_neg : Parameter of shape (n_ctx, width)
    n_ctx, n_cls : int

    Notes
    -----
    Every call runs all ``n_cls`` prompts (×2 for :meth:`forward`) through the text transformer with
    activations kept for backward. Under the causal mask of CLIP text towers the prompts are cut after
    the longest one's end-of-text token (:meth:`TextTower.needed_length`; ``n_ctx + name + 3`` tokens,
    not 77), which gives the same features at a fraction of the cost. That is fine up to about 1000
    classes on a GPU; for more, encode the classes in chunks. Random initialisation uses torch's
    global generator: seed it (``torch.manual_seed``) for reproducible contexts. The contexts are fp32
    whatever the model's dtype (cast when the prompts are built).

    Examples
    --------
    >>> learner = DualPromptLearner(model, tokenizer, ["cat", "dog"])     # doctest: +SKIP
    >>> pos, neg = learner()          # (2, D) each, L2-normalised          # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        classnames: Sequence[str],
        *,
        n_ctx: int | None = None,
        init: str | None = None,
        init_std: float = 0.02,
        class_token_position: str = "end",
    ) -> None:
        super().__init__()
        owner = "DualPromptLearner"
        names = check_prompt_args(owner, classnames, init_std)
        check_param(owner, "class_token_position", class_token_position,
                    class_token_position in ("end", "middle", "front"), "one of 'end', 'middle', 'front'")
        tower = TextTower(model)
        freeze(tower)
        object.__setattr__(self, "_tower", tower)
        n, init_vectors, n_init = context_init(tower, tokenizer, init, n_ctx, owner, default=16)
        if init is not None and n_ctx is not None and n_ctx != n_init:
            check_param(owner, "n_ctx", n_ctx, False,
                        f"None or {n_init}, the token count of init={init!r}")
        width = tower.width
        if init_vectors is None:
            ctx_pos = torch.empty(n, width).normal_(0.0, float(init_std))
            ctx_neg = torch.empty(n, width).normal_(0.0, float(init_std))
            prefix = " ".join([PLACEHOLDER] * n)
        else:
            ctx_pos, ctx_neg = init_vectors.clone(), init_vectors.clone()
            prefix = str(init)
        device = tower.token_embedding.weight.device
        # fp32 master weights whatever the model's dtype; cast when the prompts are built
        self.ctx_pos = nn.Parameter(ctx_pos.to(device=device, dtype=torch.float32))
        self.ctx_neg = nn.Parameter(ctx_neg.to(device=device, dtype=torch.float32))
        self.n_ctx = n
        self.n_cls = len(names)
        self.classnames = names
        self.class_token_position = class_token_position
        self.init = init

        tokens = prompt_buffers(self, tower, tokenizer, names, prefix, n, device)
        if init is None and not bool((tokens[:, 1:1 + n] == tokens[0, 1]).all()):
            raise ModelError(f"the tokenizer did not turn {n} placeholder words into {n} tokens")
        name_tokens = tokenize(tokenizer, names)
        self.name_lens: list[int] = [int(v) for v in (tower.pool_positions(name_tokens) - 1).clamp(min=0).tolist()]

    def _prompts(self, ctx: torch.Tensor) -> torch.Tensor:
        """Embedded prompts (n_cls, L, width) for one context."""
        prefix, suffix = self.token_prefix, self.token_suffix
        ctx = ctx.unsqueeze(0).expand(self.n_cls, -1, -1).to(prefix.dtype)
        if self.class_token_position == "end":
            return torch.cat([prefix, ctx, suffix], dim=1)
        rows = []
        half = self.n_ctx // 2
        for i, name_len in enumerate(self.name_lens):
            pre, cls_i, rest = prefix[i:i + 1], suffix[i:i + 1, :name_len], suffix[i:i + 1, name_len:]
            c = ctx[i:i + 1]
            if self.class_token_position == "middle":
                rows.append(torch.cat([pre, c[:, :half], cls_i, c[:, half:], rest], dim=1))
            else:
                rows.append(torch.cat([pre, cls_i, c, rest], dim=1))
        return torch.cat(rows, dim=0)

    def encode(self, which: str = "pos", *, normalize: bool = True) -> torch.Tensor:
        """Class text features for one context.

        Parameters
        ----------
        which : {"pos", "neg"}
        normalize : bool, default True

        Returns
        -------
        Tensor of shape (n_cls, embed_dim)
        """
        check_param("DualPromptLearner.encode", "which", which, which in ("pos", "neg"), "'pos' or 'neg'")
        ctx = self.ctx_pos if which == "pos" else self.ctx_neg
        return self._tower.encode_embeddings(self._prompts(ctx), self.eot_index, normalize=normalize)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Positive and negative class text features, both L2-normalised, each (n_cls, embed_dim)."""
        x = torch.cat([self._prompts(self.ctx_pos), self._prompts(self.ctx_neg)], dim=0)
        eot = torch.cat([self.eot_index, self.eot_index])
        feats = self._tower.encode_embeddings(x, eot, normalize=True)
        return feats[: self.n_cls], feats[self.n_cls:]
