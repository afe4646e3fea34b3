"""The text side of an open_clip CLIP model run on token *embeddings*, so learnable context vectors can
stand in for words (CoOp, MaPLe); fed the model's own token embeddings it reproduces
``model.encode_text`` exactly, and it can replace the context slots at deeper layers (MaPLe)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from labelsieve.core.errors import ModelError, check_param
from labelsieve.models.prompts.tokens import replace_slots

__all__ = ["PLACEHOLDER", "TextTower", "check_prompt_args", "check_start_token", "context_init", "prompt_buffers",
           "tokenize"]

#: The word standing in for each context slot when the contexts start random.
PLACEHOLDER = "X"


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
                x = replace_slots(x, p, start, p.shape[-2], batch_first=batch_first)
            x = blk(x, attn_mask=mask)
        if not batch_first:
            x = x.transpose(0, 1)
        return x


def tokenize(tokenizer: Any, texts: list[str]) -> torch.Tensor:
    tokens = tokenizer(texts)
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
        raise ModelError("the tokenizer must return a LongTensor of shape (n_texts, context_length)")
    return tokens.long()


def check_start_token(tokens: torch.Tensor, tower: TextTower, tokenizer: Any) -> None:
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


def context_init(
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
    tokens = tokenize(tokenizer, [init])
    check_start_token(tokens, tower, tokenizer)
    n_init = int(tower.pool_positions(tokens)[0]) - 1
    check_param(owner, "init", init, 1 <= n_init <= tower.context_length - 3,
                f"a phrase of 1 to {tower.context_length - 3} tokens")
    emb = tower.embed_tokens(tokens.to(tower.token_embedding.weight.device))
    return n_init, emb[0, 1:1 + n_init].float().cpu(), n_init



def prompt_buffers(module: nn.Module, tower: TextTower, tokenizer: Any, names: list[str], prefix: str, n: int,
                   device: torch.device) -> torch.Tensor:
    """Tokenise ``"<prefix> <name>."`` per class and register the frozen parts of the prompts on ``module``.

    Registers (non-persistent buffers) ``token_prefix`` (the start-of-text embedding), ``token_suffix``
    (class name, full stop, end-of-text and padding), ``tokens`` and ``eot_index``, cut to the shortest
    length that gives the same features (:meth:`TextTower.needed_length`); the ``n`` context slots in
    between are what the learner fills in. Returns the uncut tokens.

    Raises
    ------
    ModelError
        If a class's prompt does not fit the text context.
    """
    tokens = tokenize(tokenizer, [f"{prefix} {name}." for name in names])
    check_start_token(tokens, tower, tokenizer)
    eot = tower.pool_positions(tokens)
    too_long = [names[i] for i in range(len(names)) if int(eot[i]) < n + 2]
    if too_long:
        raise ModelError(f"the prompts for {too_long[:3]} do not fit the text context of "
                         f"{tokens.shape[1]} tokens with {n} context tokens")
    cut = tokens[:, : tower.needed_length(eot)]
    emb = tower.embed_tokens(cut.to(device))
    module.register_buffer("token_prefix", emb[:, :1].clone(), persistent=False)
    module.register_buffer("token_suffix", emb[:, 1 + n:].clone(), persistent=False)
    module.register_buffer("tokens", cut.to(device), persistent=False)
    module.register_buffer("eot_index", eot.to(device), persistent=False)
    return tokens


def check_prompt_args(owner: str, classnames: Sequence[str], init_std: float) -> list[str]:
    """Validate the arguments every prompt learner takes; returns the class names as the prompts read them
    (underscores as spaces)."""
    names = [str(c).replace("_", " ") for c in classnames]
    check_param(owner, "classnames", classnames, len(names) >= 1 and all(n.strip() for n in names),
                "a non-empty sequence of non-empty names")
    check_param(owner, "init_std", init_std,
                isinstance(init_std, (int, float)) and not isinstance(init_std, bool) and init_std > 0,
                "a float > 0")
    return names
