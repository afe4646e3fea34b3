"""Prompt learning on an open_clip CLIP model.

* :class:`TextTower` runs the text side of a CLIP model on token *embeddings*, so that learnable
  context vectors can stand in for words; fed the model's own token embeddings it reproduces
  ``model.encode_text`` exactly. It can also replace the context slots at deeper layers (MaPLe).
* :class:`DualPromptLearner` is CoOp with two shared contexts, positive and negative, as used by DEFT
  (Wei et al., NeurIPS 2024): ``[SOT] ctx_1 … ctx_n <class name> . [EOT]``.
* :class:`PromptedViT` runs an open_clip :class:`~open_clip.transformer.VisionTransformer` with extra
  prompt tokens inserted after the class token, optionally replaced at every block (VPT deep, MaPLe);
  with no prompts it reproduces ``model.encode_image`` exactly.
* :class:`MaPLePrompts` is MaPLe (Khattak et al., CVPR 2023), the prompts of AVL-Prompter's co-divide:
  shared deep vision-language prompts whose vision half is a linear function of the text half.

The CLIP model's own weights are never registered as sub-modules of the prompt learners, so a learner's
``state_dict()`` holds only what it learns (see each class); the learners freeze the CLIP weights they
run through (``requires_grad=False``), as CoOp and MaPLe do.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from labelsieve.errors import ModelError, check_param

__all__ = ["DualPromptLearner", "MaPLeOutput", "MaPLePrompts", "PromptedViT", "TextTower"]

_PLACEHOLDER = "X"


def _vision_transformer_cls() -> type:
    from open_clip.transformer import VisionTransformer

    return VisionTransformer


def _is_open_clip_vit(visual: Any) -> bool:
    return isinstance(visual, _vision_transformer_cls())


def _expand_tokens(p: torch.Tensor, batch: int, dtype: torch.dtype, what: str) -> torch.Tensor:
    """(n, width) or (batch, n, width) -> (batch, n, width) in ``dtype``."""
    if p.dim() == 2:
        p = p.unsqueeze(0).expand(batch, -1, -1)
    elif p.dim() != 3 or p.shape[0] != batch:
        raise ValueError(f"{what} must have shape (n, width) or ({batch}, n, width); got {tuple(p.shape)}")
    return p.to(dtype)


def _freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


class TextTower(nn.Module):
    """The text side of an open_clip CLIP model, fed token embeddings instead of token ids.

    ``encode_embeddings(model.token_embedding(tokens), tower.pool_positions(tokens))`` equals
    ``model.encode_text(tokens)``: positional embedding, the text transformer with the model's causal
    ``attn_mask`` (batch-first or not, as the transformer is built), ``ln_final``, pooling at the
    end-of-text position (``argmax``/``eos``; ``first``/``last`` pool types also work), and
    ``text_projection`` (a matrix parameter or an ``nn.Linear``).

    Parameters
    ----------
    model : open_clip.CLIP or open_clip.CustomTextCLIP
        A CLIP model with a native open_clip text transformer. Its text modules are shared, not copied.

    Raises
    ------
    ModelError
        If the model has no native open_clip text transformer (Hugging Face text towers), appends a
        class token to the text (CoCa), uses a padding mask (bidirectional towers), or does not pool
        one token per text (``pool_type='none'``).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        text = getattr(model, "text", None)
        if hasattr(model, "token_embedding"):  # open_clip.CLIP (or a TextTransformer itself)
            src: nn.Module = model
        elif isinstance(text, nn.Module) and hasattr(text, "token_embedding"):  # CustomTextCLIP
            src = text
        else:
            raise ModelError(
                f"{type(model).__name__} has no native open_clip text transformer (token_embedding, "
                "transformer, ln_final); prompt learning needs one (Hugging Face text towers are not "
                "supported)"
            )
        if getattr(src, "cls_emb", None) is not None:
            raise ModelError("prompt learning does not support text towers that append a class token "
                             "(CoCa); use a CLIP model")
        if getattr(src, "use_pad_mask", False):
            raise ModelError("prompt learning does not support text towers with a padding mask (bidirectional "
                             "text transformers); use a CLIP model with a causal text transformer")
        # open_clip.CLIP copies the text tower's settings as text_pool_type / text_eos_id.
        pool_type = getattr(src, "text_pool_type", getattr(src, "pool_type", "argmax"))
        eos_id = getattr(src, "text_eos_id", getattr(src, "eos_id", None))
        if pool_type not in ("argmax", "eos", "first", "last"):
            raise ModelError(
                f"prompt learning needs a text tower that pools one token per text; this one pools "
                f"with {pool_type!r}"
            )
        self.token_embedding = src.token_embedding
        self.positional_embedding = src.positional_embedding
        self.transformer = src.transformer
        self.ln_final = src.ln_final
        self.text_projection = src.text_projection
        self.pool_type: str = pool_type
        self.eos_id: int | None = eos_id
        # The attention mask is read from the model at call time (a buffer the model moves itself).
        object.__setattr__(self, "_src", src)

    @property
    def width(self) -> int:
        """Width of the token embeddings (the text transformer's width)."""
        return int(self.token_embedding.weight.shape[1])

    @property
    def n_layers(self) -> int:
        """Number of text transformer blocks."""
        return len(self.transformer.resblocks)

    @property
    def context_length(self) -> int:
        """Longest sequence the positional embedding covers."""
        return int(self.positional_embedding.shape[0])

    @property
    def attn_mask(self) -> torch.Tensor | None:
        """The model's (causal, additive) attention mask, or ``None`` for bidirectional towers."""
        return getattr(self._src, "attn_mask", None)

    @property
    def is_causal(self) -> bool:
        """Whether the attention mask is causal (each position sees only itself and earlier ones)."""
        mask = self.attn_mask
        if mask is None:
            return False
        n = mask.shape[-1]
        upper = torch.ones(n, n, dtype=torch.bool, device=mask.device).triu(1)
        return bool(torch.isneginf(mask[upper]).all() and (mask[~upper] == 0).all())

    def needed_length(self, eot_index: torch.Tensor) -> int:
        """The shortest sequence length that gives the same features.

        With a causal mask and end-of-text pooling nothing after the last pooled position can change
        the result, so prompts can be cut there (CLIP pads every text to 77 tokens; class prompts are
        usually under 25). Otherwise the full context length.
        """
        if self.pool_type in ("argmax", "eos") and self.is_causal and eot_index.numel():
            return min(int(eot_index.max()) + 1, self.context_length)
        return self.context_length

    @property
    def cast_dtype(self) -> torch.dtype:
        """The dtype ``encode_text`` casts token embeddings to (the transformer weights' dtype)."""
        get = getattr(self.transformer, "get_cast_dtype", None)
        return get() if callable(get) else self.positional_embedding.dtype

    def pool_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        """The position each text is pooled at, as ``encode_text`` chooses it.

        Parameters
        ----------
        tokens : LongTensor of shape (B, L)
            Token ids from the model's tokenizer.

        Returns
        -------
        LongTensor of shape (B,)
            The end-of-text position for ``argmax``/``eos`` pooling, 0 for ``first``, ``L-1`` for
            ``last``.
        """
        if self.pool_type == "argmax":
            return tokens.argmax(dim=-1)
        if self.pool_type == "eos":
            return (tokens == self.eos_id).int().argmax(dim=-1)
        if self.pool_type == "first":
            return torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)
        return torch.full((tokens.shape[0],), tokens.shape[1] - 1, dtype=torch.long, device=tokens.device)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token embeddings of ``tokens`` (B, L) -> (B, L, width), without gradient."""
        with torch.no_grad():
            return self.token_embedding(tokens).detach()

    def encode_embeddings(
        self,
        x: torch.Tensor,
        eot_index: torch.Tensor,
        *,
        deep_prompts: Sequence[torch.Tensor | None] | None = None,
        prompt_start: int = 1,
        normalize: bool = False,
    ) -> torch.Tensor:
        """Text features of token-embedding sequences.

        Parameters
        ----------
        x : Tensor of shape (B, L, width)
            Token embeddings including the start- and end-of-text positions, ``L <= context_length``
            (``encode_text`` uses the full context length).
        eot_index : LongTensor of shape (B,)
            Position pooled for each sequence (:meth:`pool_positions` of the tokens that ``x`` stands
            for). Ignored for ``first``/``last`` pooling.
        deep_prompts : sequence of Tensor or None, optional
            MaPLe deep prompts: ``deep_prompts[j]``, of shape (n, width) or (B, n, width), replaces
            the hidden states at positions ``prompt_start .. prompt_start+n-1`` at the input of block
            ``j + 1`` (so at most ``n_layers - 1`` entries; ``None`` entries leave a block's input
            as it is).
        prompt_start : int, default 1
            First context position (1: just after the start-of-text token).
        normalize : bool, default False
            L2-normalise the features.

        Returns
        -------
        Tensor of shape (B, embed_dim)
        """
        if x.dim() != 3 or x.shape[-1] != self.width:
            raise ValueError(f"x must have shape (B, L, {self.width}); got {tuple(x.shape)}")
        length = x.shape[1]
        if length > self.context_length:
            raise ValueError(f"sequences of {length} tokens exceed the context length {self.context_length}")
        cast = self.cast_dtype
        x = x.to(cast) + self.positional_embedding[:length].to(cast)
        mask = self.attn_mask
        if mask is not None and mask.shape[-1] != length:
            mask = mask[:length, :length].contiguous()
        deep = list(deep_prompts) if deep_prompts else []
        if not any(p is not None for p in deep):
            x = self.transformer(x, attn_mask=mask)
        else:
            x = self._run_deep(x, mask, deep, prompt_start)
        x = self.ln_final(x)
        if self.pool_type in ("argmax", "eos"):
            pooled = x[torch.arange(x.shape[0], device=x.device), eot_index.to(x.device)]
        elif self.pool_type == "first":
            pooled = x[:, 0]
        else:
            pooled = x[:, -1]
        proj = self.text_projection
        if isinstance(proj, nn.Linear):
            pooled = proj(pooled)
        elif proj is not None:
            pooled = pooled @ proj
        return F.normalize(pooled, dim=-1) if normalize else pooled

    def _run_deep(
        self, x: torch.Tensor, mask: torch.Tensor | None, deep: list[torch.Tensor | None], start: int
    ) -> torch.Tensor:
        blocks = self.transformer.resblocks
        if len(deep) > len(blocks) - 1:
            raise ValueError(
                f"{len(deep)} deep prompts given; a {len(blocks)}-layer text transformer takes at most "
                f"{len(blocks) - 1} (layers 1..{len(blocks) - 1})"
            )
        batch_first = getattr(self.transformer, "batch_first", True)
        if not batch_first:
            x = x.transpose(0, 1)
        for i, blk in enumerate(blocks):
            p = deep[i - 1] if 1 <= i <= len(deep) else None
            if p is not None:
                if batch_first:
                    p = _expand_tokens(p, x.shape[0], x.dtype, "deep prompt")
                    x = torch.cat([x[:, :start], p, x[:, start + p.shape[1]:]], dim=1)
                else:
                    p = _expand_tokens(p, x.shape[1], x.dtype, "deep prompt").transpose(0, 1)
                    x = torch.cat([x[:start], p, x[start + p.shape[0]:]], dim=0)
            x = blk(x, attn_mask=mask)
        if not batch_first:
            x = x.transpose(0, 1)
        return x


def _tokenize(tokenizer: Any, texts: list[str]) -> torch.Tensor:
    tokens = tokenizer(texts)
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
        raise ModelError("the tokenizer must return a LongTensor of shape (n_texts, context_length)")
    return tokens.long()


def _check_start_token(tokens: torch.Tensor, tower: TextTower, tokenizer: Any) -> None:
    """Prompts are ``[SOT] ctx … [EOT]``: every text must start with one start-of-text token."""
    sot = getattr(tokenizer, "sot_token_id", None)
    first = tokens[:, 0]
    ok = bool((first == first[0]).all()) and (sot is None or int(first[0]) == int(sot))
    ok = ok and tower.pool_type in ("argmax", "eos")
    if not ok:
        raise ModelError(
            "prompt learning needs a CLIP-style tokenizer that starts every text with a start-of-text "
            "token and a text tower that pools at the end-of-text token"
        )


def _context_init(
    tower: TextTower, tokenizer: Any, init: str | None, n_ctx: int | None, owner: str, *, default: int
) -> tuple[int, torch.Tensor | None, int]:
    """Resolve the context length and initial context vectors.

    Returns ``(n_ctx, init_vectors or None, n_init_tokens)``; ``n_init_tokens`` is the token count of
    the init phrase (0 without one).
    """
    if init is None:
        n = default if n_ctx is None else n_ctx
        check_param(owner, "n_ctx", n_ctx,
                    isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= tower.context_length - 3,
                    f"an int in [1, {tower.context_length - 3}]")
        return n, None, 0
    check_param(owner, "init", init, isinstance(init, str) and init.strip() != "",
                "None or a non-empty phrase such as 'a photo of a'")
    tokens = _tokenize(tokenizer, [init])
    _check_start_token(tokens, tower, tokenizer)
    n_init = int(tower.pool_positions(tokens)[0]) - 1
    check_param(owner, "init", init, 1 <= n_init <= tower.context_length - 3,
                f"a phrase of 1 to {tower.context_length - 3} tokens")
    emb = tower.embed_tokens(tokens.to(tower.token_embedding.weight.device))
    return n_init, emb[0, 1:1 + n_init].float().cpu(), n_init


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
        names = [str(c).replace("_", " ") for c in classnames]
        check_param(owner, "classnames", classnames, len(names) >= 1 and all(n.strip() for n in names),
                    "a non-empty sequence of non-empty names")
        check_param(owner, "init_std", init_std,
                    isinstance(init_std, (int, float)) and not isinstance(init_std, bool) and init_std > 0,
                    "a float > 0")
        check_param(owner, "class_token_position", class_token_position,
                    class_token_position in ("end", "middle", "front"), "one of 'end', 'middle', 'front'")
        tower = TextTower(model)
        _freeze(tower)
        object.__setattr__(self, "_tower", tower)
        n, init_vectors, n_init = _context_init(tower, tokenizer, init, n_ctx, owner, default=16)
        if init is not None and n_ctx is not None and n_ctx != n_init:
            check_param(owner, "n_ctx", n_ctx, False,
                        f"None or {n_init}, the token count of init={init!r}")
        width = tower.width
        if init_vectors is None:
            ctx_pos = torch.empty(n, width).normal_(0.0, float(init_std))
            ctx_neg = torch.empty(n, width).normal_(0.0, float(init_std))
            prefix = " ".join([_PLACEHOLDER] * n)
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

        tokens = _tokenize(tokenizer, [f"{prefix} {name}." for name in names])
        _check_start_token(tokens, tower, tokenizer)
        eot = tower.pool_positions(tokens)
        too_long = [names[i] for i in range(len(names)) if int(eot[i]) < n + 2]
        if too_long:
            raise ModelError(f"the prompts for {too_long[:3]} do not fit the text context of "
                             f"{tokens.shape[1]} tokens with {n} context tokens")
        if init is None and not bool((tokens[:, 1:1 + n] == tokens[0, 1]).all()):
            raise ModelError(f"the tokenizer did not turn {n} placeholder words into {n} tokens")
        name_tokens = _tokenize(tokenizer, names)
        name_lens = (tower.pool_positions(name_tokens) - 1).clamp(min=0).tolist()
        tokens = tokens[:, : tower.needed_length(eot)]
        emb = tower.embed_tokens(tokens.to(device))
        self.register_buffer("token_prefix", emb[:, :1].clone(), persistent=False)
        self.register_buffer("token_suffix", emb[:, 1 + n:].clone(), persistent=False)
        self.register_buffer("tokens", tokens.to(device), persistent=False)
        self.register_buffer("eot_index", eot.to(device), persistent=False)
        self.name_lens: list[int] = [int(v) for v in name_lens]

    @property
    def text_tower(self) -> TextTower:
        """The (frozen, shared) text tower the prompts run through."""
        return self._tower

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


def _vit_forward(
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
        p = _expand_tokens(prompts, x.shape[0], x.dtype, "prompts")
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
                if batch_first:
                    d = _expand_tokens(d, x.shape[0], x.dtype, "deep prompt")
                    check_param("PromptedViT", "deep_prompts", tuple(d.shape), d.shape[1] == n_p,
                                f"tensors of {n_p} tokens, like the input-layer prompts")
                    x = torch.cat([x[:, :1], d, x[:, 1 + n_p:]], dim=1)
                else:
                    d = _expand_tokens(d, x.shape[1], x.dtype, "deep prompt").transpose(0, 1)
                    check_param("PromptedViT", "deep_prompts", tuple(d.shape), d.shape[0] == n_p,
                                f"tensors of {n_p} tokens, like the input-layer prompts")
                    x = torch.cat([x[:1], d, x[1 + n_p:]], dim=0)
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
        if not _is_open_clip_vit(visual):
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
        return _vit_forward(self.visual, images, prompts, deep_prompts, prompt_ln_pre=self.prompt_ln_pre)


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
    run through :func:`_vit_forward` on ``model.visual`` directly, so PEFT applied with
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
        names = [str(c).replace("_", " ") for c in classnames]
        check_param(owner, "classnames", classnames, len(names) >= 1 and all(n.strip() for n in names),
                    "a non-empty sequence of non-empty names")
        check_param(owner, "n_ctx", n_ctx, isinstance(n_ctx, int) and not isinstance(n_ctx, bool)
                    and n_ctx >= 1, "an int >= 1")
        check_param(owner, "depth", depth, isinstance(depth, int) and not isinstance(depth, bool)
                    and depth >= 1, "an int >= 1")
        check_param(owner, "init_std", init_std,
                    isinstance(init_std, (int, float)) and not isinstance(init_std, bool) and init_std > 0,
                    "a float > 0")
        check_param(owner, "text_only", text_only, isinstance(text_only, bool), "a bool")
        visual = getattr(model, "visual", None)
        if not text_only and not _is_open_clip_vit(visual):
            raise ModelError(
                f"co-divide/MaPLe needs a ViT image tower (an open_clip VisionTransformer); this model's "
                f"image tower is {type(visual).__name__}. Use the frozen fast path (CLI --frozen; "
                "MaPLePrompts(text_only=True)): text-side prompts only, on cached image features"
            )
        tower = TextTower(model)
        _freeze(model)
        object.__setattr__(self, "_tower", tower)
        object.__setattr__(self, "_model", model)
        vit = None if text_only else PromptedViT(visual, prompt_ln_pre=True)
        object.__setattr__(self, "_vit", vit)

        n, init_vectors, n_init = _context_init(tower, tokenizer, init, None if init else n_ctx, owner,
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
            prefix = " ".join([_PLACEHOLDER] * n)
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

        tokens = _tokenize(tokenizer, [f"{prefix} {name}." for name in names])
        _check_start_token(tokens, tower, tokenizer)
        eot = tower.pool_positions(tokens)
        too_long = [names[i] for i in range(len(names)) if int(eot[i]) < n + 2]
        if too_long:
            raise ModelError(f"the prompts for {too_long[:3]} do not fit the text context of "
                             f"{tokens.shape[1]} tokens")
        tokens = tokens[:, : tower.needed_length(eot)]
        emb = tower.embed_tokens(tokens.to(device))
        self.register_buffer("token_prefix", emb[:, :1].clone(), persistent=False)
        self.register_buffer("token_suffix", emb[:, 1 + n:].clone(), persistent=False)
        self.register_buffer("tokens", tokens.to(device), persistent=False)
        self.register_buffer("eot_index", eot.to(device), persistent=False)

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
