"""Parameter-efficient tuning (PEFT) of a CLIP model's image tower, selected by name.

``apply_peft(model, method, **options)`` adds the method's parameters to ``model.visual``, freezes
every other parameter of the model (``requires_grad=False``: image tower, text tower and logit scale)
and returns a :class:`PeftInfo`. Afterwards ``model.encode_image`` runs the adapted tower, and the
trainable parameters of ``model`` are exactly the PEFT ones (:func:`peft_parameters`).

==================  =========================================================  ================
method              what is trained                                             towers
==================  =========================================================  ================
``vpt_deep``        20 prompt tokens per transformer block, replaced at every   ViT
                    block, init U(±sqrt(6 / (3·p·p + d))) (VPT, DEFT)
``vpt_shallow``     20 prompt tokens at the input of the first block only       ViT
``lora``            rank-8 LoRA (alpha 16): ViT attention in/out projections;   any
                    other towers: every 1×1 convolution (groups 1) and linear
                    layer (the pointwise convs of EfficientNet / MobileNet)
``adaptformer``     bottleneck-8 adapter parallel to each block's MLP, scale    ViT
                    0.1 (AdaptFormer)
``bitfit``          biases; on non-ViT towers also BatchNorm weights (γ)        any
``none``            nothing: frozen tower, cached image features                any
``auto``            ``vpt_deep`` on ViT towers, ``none`` on others              any
==================  =========================================================  ================

"ViT" means an open_clip :class:`~open_clip.transformer.VisionTransformer` (:func:`is_vit_tower`).
The ViT methods run the tower through :func:`labelsieve.models.prompts._vit_forward` (prompt tokens
inserted after the class token and dropped before pooling; adapters and LoRA inside each block);
LoRA on other towers uses forward hooks, so every parameter of the original model keeps its name and
a plain checkpoint still loads. :func:`peft_state_dict` / :func:`load_peft_state_dict` save and
restore only the PEFT parameters; :func:`remove_peft` takes the method off again.

On CNN towers call :func:`set_peft_train_mode` instead of ``model.train()``: it keeps BatchNorm
running statistics frozen (the original statistics are part of the frozen model). PEFT parameters
take the dtype of the tower's weights: load the model in fp32 and use autocast for mixed precision.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from labelsieve.errors import ModelError, check_param
from labelsieve.models.prompts import _is_open_clip_vit, _vit_forward

__all__ = [
    "PEFT_METHODS", "PeftInfo", "PeftMethod", "apply_peft", "get_peft", "is_vit_tower",
    "load_peft_state_dict", "peft_parameters", "peft_state_dict", "remove_peft", "resolve_peft",
    "set_peft_train_mode",
]

_MODULE = "labelsieve_peft"  # sub-module of model.visual holding ViT PEFT parameters
_LORA = "labelsieve_lora"  # sub-module of a hooked conv/linear holding its LoRA factors
_INFO = "_labelsieve_peft_info"  # attribute of model.visual: the PeftInfo of the applied method
_HOOK_ID = "_labelsieve_lora_hook"


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


# ----------------------------------------------------------------------------------------------------
# Building blocks


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
    lora: _LowRank = getattr(module, _LORA)
    x = inputs[0]
    if isinstance(module, nn.Conv2d):
        return output + lora.conv1x1(x, module.stride)
    return output + lora(x)


class _ViTPeft(nn.Module):
    """PEFT parameters of an open_clip ViT, used by the patched ``visual.forward``."""

    def prompts(self) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """Input-layer prompt tokens and deep prompts (none by default)."""
        return None, []

    def run_block(self, i: int, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Block ``i``'s forward (the block itself by default)."""
        return block(x)

    uses_blocks = False


class _VPT(_ViTPeft):
    def __init__(self, n_layers: int, n_tokens: int, width: int, patch_size: tuple[int, int],
                 *, like: torch.Tensor) -> None:
        super().__init__()
        val = math.sqrt(6.0 / float(3 * patch_size[0] * patch_size[1] + width))
        self.tokens = nn.Parameter(torch.empty(n_layers, n_tokens, width, device=like.device, dtype=like.dtype))
        nn.init.uniform_(self.tokens, -val, val)
        self.init_bound = val

    def prompts(self) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        return self.tokens[0], list(self.tokens[1:])


class _ViTLoRA(_ViTPeft):
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
    from open_clip.transformer import CustomResidualAttentionBlock

    if isinstance(block, CustomResidualAttentionBlock):
        return block.ls_1(block.ln_attn(block.attn(block.ln_1(x))))
    return block.ls_1(block.attention(q_x=block.ln_1(x)))


class _AdaptFormer(_ViTPeft):
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


def _peft_vit_forward(visual: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``visual.forward`` while a ViT PEFT method is applied."""
    peft: _ViTPeft = getattr(visual, _MODULE)
    prompts, deep = peft.prompts()
    runner = peft.run_block if peft.uses_blocks else None
    return _vit_forward(visual, x, prompts, deep, prompt_ln_pre=False, run_block=runner)


def _install_vit(visual: nn.Module, peft: _ViTPeft) -> None:
    peft.train(visual.training)  # new modules start in training mode; follow the tower's mode
    visual.add_module(_MODULE, peft)
    for p in peft.parameters():
        p.requires_grad_(True)
    visual.forward = functools.partial(_peft_vit_forward, visual)


def _check_blocks(visual: nn.Module, what: str) -> nn.ModuleList:
    from open_clip.transformer import CustomResidualAttentionBlock, ResidualAttentionBlock

    blocks = visual.transformer.resblocks
    for blk in blocks:
        if not isinstance(blk, (ResidualAttentionBlock, CustomResidualAttentionBlock)) or not hasattr(
            blk.attn, "in_proj_weight"
        ):
            raise ModelError(f"{what} supports open_clip ViT blocks with a fused in_proj_weight; this tower "
                             f"has {type(blk).__name__} blocks")
    return blocks


def _vit_dims(visual: nn.Module) -> tuple[int, int, tuple[int, int], torch.Tensor]:
    like = visual.class_embedding
    k = visual.conv1.kernel_size
    return len(visual.transformer.resblocks), int(like.shape[-1]), (int(k[0]), int(k[1])), like


# ----------------------------------------------------------------------------------------------------
# Methods


def _int_option(method: str, opts: dict[str, Any], name: str, lo: int = 1) -> int:
    v = opts[name]
    check_param(f"apply_peft({method!r})", name, v, isinstance(v, int) and not isinstance(v, bool) and v >= lo,
                f"an int >= {lo}")
    return int(v)


def _float_option(method: str, opts: dict[str, Any], name: str, ok: Callable[[float], bool],
                  expected: str) -> float:
    v = opts[name]
    good = isinstance(v, (int, float)) and not isinstance(v, bool) and ok(float(v))
    check_param(f"apply_peft({method!r})", name, v, good, expected)
    return float(v)


def _apply_vpt(deep: bool) -> Callable[[nn.Module, dict[str, Any]], str]:
    method = "vpt_deep" if deep else "vpt_shallow"

    def apply(visual: nn.Module, opts: dict[str, Any]) -> str:
        n_tok = _int_option(method, opts, "n_tokens")
        n_layers, width, patch, like = _vit_dims(visual)
        vpt = _VPT(n_layers if deep else 1, n_tok, width, patch, like=like)
        _install_vit(visual, vpt)
        where = f"at each of the {n_layers} blocks, replaced at every block" if deep else "at the input only"
        return (f"VPT: {n_tok} learnable prompt tokens {where}, init U(±{vpt.init_bound:.4f}); the rest of "
                "the model is frozen")

    return apply


def _apply_lora(visual: nn.Module, opts: dict[str, Any]) -> str:
    rank = _int_option("lora", opts, "rank")
    alpha = _float_option("lora", opts, "alpha", lambda a: a > 0, "a float > 0")
    if _is_open_clip_vit(visual):
        blocks = _check_blocks(visual, "LoRA")
        _install_vit(visual, _ViTLoRA(blocks, rank, alpha))
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
        m.add_module(_LORA, lora)
        lora.requires_grad_(True)
        handle = m.register_forward_hook(_lora_hook)
        object.__setattr__(m, _HOOK_ID, handle.id)
    if n_conv + n_lin == 0:
        raise ModelError(f"LoRA found no 1×1 convolution or linear layer in the {type(visual).__name__} "
                         "image tower; use 'bitfit' or 'none'")
    return (f"LoRA rank {rank}, alpha {alpha:g} on {n_conv} pointwise (1×1) convolutions and {n_lin} linear "
            "layers of the image tower (forward hooks); the rest of the model is frozen; keep BatchNorm "
            "statistics frozen with set_peft_train_mode")


def _apply_adaptformer(visual: nn.Module, opts: dict[str, Any]) -> str:
    bottleneck = _int_option("adaptformer", opts, "bottleneck")
    scale = _float_option("adaptformer", opts, "scale", math.isfinite, "a finite float")
    dropout = _float_option("adaptformer", opts, "dropout", lambda p: 0.0 <= p < 1.0, "a float in [0, 1)")
    blocks = _check_blocks(visual, "AdaptFormer")
    _, width, _, like = _vit_dims(visual)
    _install_vit(visual, _AdaptFormer(blocks, width, bottleneck, scale, dropout, like=like))
    return (f"AdaptFormer: bottleneck-{bottleneck} adapters parallel to the MLP of {len(blocks)} ViT blocks, "
            f"scale {scale:g}, dropout {dropout:g}; the rest of the model is frozen")


def _apply_bitfit(visual: nn.Module, opts: dict[str, Any]) -> str:
    vit = _is_open_clip_vit(visual)
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


PEFT_METHODS: dict[str, PeftMethod] = {
    m.name: m
    for m in (
        PeftMethod("vpt_deep", "learnable prompt tokens at every ViT block (VPT deep)", True,
                   {"n_tokens": 20}, _apply_vpt(True)),
        PeftMethod("vpt_shallow", "learnable prompt tokens at the ViT input (VPT shallow)", True,
                   {"n_tokens": 20}, _apply_vpt(False)),
        PeftMethod("lora", "low-rank updates of attention projections (ViT) or 1×1 convs and linears", False,
                   {"rank": 8, "alpha": 16.0}, _apply_lora),
        PeftMethod("adaptformer", "bottleneck adapters parallel to each ViT block's MLP", True,
                   {"bottleneck": 8, "scale": 0.1, "dropout": 0.1}, _apply_adaptformer),
        PeftMethod("bitfit", "biases (and BatchNorm weights on CNNs)", False, {}, _apply_bitfit),
        PeftMethod("none", "frozen image tower (cached features)", False, {}, _apply_none),
    )
}
"""Registry of PEFT methods by name; ``"auto"`` is resolved by :func:`resolve_peft`."""


# ----------------------------------------------------------------------------------------------------
# Public functions


def _visual(model: nn.Module) -> nn.Module:
    visual = getattr(model, "visual", None)
    if not isinstance(visual, nn.Module):
        raise ModelError(f"PEFT needs an open_clip CLIP model with an image tower (.visual); got "
                         f"{type(model).__name__}")
    return visual


def is_vit_tower(model: nn.Module) -> bool:
    """Whether ``model``'s image tower (or ``model`` itself) is an open_clip ``VisionTransformer``."""
    return _is_open_clip_vit(getattr(model, "visual", model))


def _applicable(vit: bool) -> list[str]:
    return [n for n, m in PEFT_METHODS.items() if vit or not m.vit_only]


def resolve_peft(model: nn.Module, method: str) -> str:
    """The method ``method`` stands for on ``model``: ``auto`` → ``vpt_deep`` (ViT) or ``none``.

    Parameters
    ----------
    model : open_clip.CLIP
    method : str
        A key of :data:`PEFT_METHODS` or ``"auto"``.

    Returns
    -------
    str

    Raises
    ------
    ParameterError
        For an unknown method.
    ModelError
        If the method does not apply to the model's image tower.
    """
    check_param("apply_peft", "method", method, method == "auto" or method in PEFT_METHODS,
                f"one of {sorted([*PEFT_METHODS, 'auto'])}")
    vit = is_vit_tower(model)
    if method == "auto":
        return "vpt_deep" if vit else "none"
    if PEFT_METHODS[method].vit_only and not vit:
        tower = type(_visual(model)).__name__
        trunk = getattr(_visual(model), "trunk", None)
        if trunk is not None:
            tower += f" ({type(trunk).__name__})"
        raise ModelError(
            f"PEFT method {method!r} needs a ViT image tower (open_clip VisionTransformer); this model's "
            f"image tower is {tower}. Methods for this tower: {', '.join(_applicable(False))}; "
            "'auto' and 'none' work on any tower"
        )
    return method


def get_peft(model: nn.Module) -> PeftInfo | None:
    """The :class:`PeftInfo` of the method applied to ``model``, or None."""
    return getattr(_visual(model), _INFO, None)


def apply_peft(model: nn.Module, method: str = "auto", **options: Any) -> PeftInfo:
    """Adapt ``model``'s image tower with a PEFT method and freeze everything else.

    Parameters
    ----------
    model : open_clip.CLIP
        Modified in place: PEFT parameters are added to ``model.visual``, every other parameter of
        ``model`` gets ``requires_grad=False``, and ``model.encode_image`` uses the adapted tower.
    method : str, default "auto"
        A key of :data:`PEFT_METHODS` or ``"auto"`` (see the module docstring).
    **options
        The method's options, only those in ``PEFT_METHODS[method].defaults``: ``n_tokens`` (VPT,
        20), ``rank`` (8) and ``alpha`` (16.0) (LoRA), ``bottleneck`` (8), ``scale`` (0.1) and
        ``dropout`` (0.1) (AdaptFormer). With ``auto`` the ``vpt_deep`` options are accepted; when
        ``auto`` resolves to ``none`` they are recorded as unused in the note.

    Returns
    -------
    PeftInfo

    Raises
    ------
    ParameterError
        Unknown method or option, or an option out of range.
    ModelError
        The method does not apply to this image tower, or a method is already applied
        (:func:`remove_peft` first).

    Examples
    --------
    >>> info = apply_peft(model, "auto")     # vpt_deep on a ViT, none on a CNN   # doctest: +SKIP
    >>> feats = model.encode_image(images)   # runs the adapted tower             # doctest: +SKIP
    """
    visual = _visual(model)
    resolved = resolve_peft(model, method)
    current = getattr(visual, _INFO, None)
    if current is not None:
        raise ModelError(f"PEFT {current.method!r} is already applied to this model; call remove_peft first")
    spec = PEFT_METHODS["vpt_deep" if method == "auto" else resolved]
    unknown = sorted(set(options) - set(spec.defaults))
    check_param("apply_peft", "options", sorted(options), not unknown,
                f"options of {spec.name!r} ({', '.join(spec.defaults) or 'none'})")
    unused = ""
    if resolved != spec.name:
        opts: dict[str, Any] = {}
        unused = f" (options {sorted(options)} unused: no PEFT on this tower)" if options else ""
        spec = PEFT_METHODS[resolved]
    else:
        opts = {**spec.defaults, **options}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.requires_grad_(False)
    try:
        note = spec.apply(visual, opts) + unused
    except BaseException:  # an option out of range: leave the model as it was
        for p, flag in flags:
            p.requires_grad_(flag)
        raise
    params = tuple(n for n, p in model.named_parameters() if p.requires_grad)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in visual.parameters())
    info = PeftInfo(resolved, n_trainable, n_total, note, params, opts, method)
    object.__setattr__(visual, _INFO, info)
    return info


def remove_peft(model: nn.Module) -> None:
    """Take the applied PEFT method off ``model`` (no-op without one).

    The original ``forward`` of the image tower comes back and the added parameters and hooks are
    removed. BitFit trains the model's own biases, so their changes stay. ``requires_grad`` flags are
    left as they are (all False): unfreeze what the next phase trains.
    """
    visual = _visual(model)
    if getattr(visual, _INFO, None) is None:
        return
    if "forward" in visual.__dict__:
        del visual.forward
    if _MODULE in visual._modules:
        delattr(visual, _MODULE)
    for m in list(visual.modules()):
        if _LORA in m._modules:
            hook_id = getattr(m, _HOOK_ID, None)
            if hook_id is not None:
                m._forward_hooks.pop(hook_id, None)
                object.__delattr__(m, _HOOK_ID)
            delattr(m, _LORA)
    object.__setattr__(visual, _INFO, None)


def peft_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable PEFT parameters of ``model`` (empty for ``none``), for the optimiser."""
    info = get_peft(model)
    if info is None:
        return []
    named = dict(model.named_parameters())
    return [named[n] for n in info.params]


def peft_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The PEFT parameters only, ``{name: tensor}`` (detached copies), names as in
    ``model.named_parameters()``.

    Raises
    ------
    ModelError
        If no PEFT method is applied.
    """
    info = get_peft(model)
    if info is None:
        raise ModelError("no PEFT method is applied to this model (apply_peft first)")
    named = dict(model.named_parameters())
    return {n: named[n].detach().clone() for n in info.params}


def load_peft_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load PEFT parameters saved by :func:`peft_state_dict` into ``model``.

    ``model`` must have the same method applied with the same options (``apply_peft`` first).

    Raises
    ------
    ModelError
        If no method is applied, or names or shapes do not match.
    """
    info = get_peft(model)
    if info is None:
        raise ModelError("apply the PEFT method (apply_peft) before loading its parameters")
    expected, given = set(info.params), set(state_dict)
    if expected != given:
        missing, unexpected = sorted(expected - given), sorted(given - expected)
        raise ModelError(f"the PEFT state does not match method {info.method!r}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    named = dict(model.named_parameters())
    for n in info.params:
        src = state_dict[n]
        if tuple(src.shape) != tuple(named[n].shape):
            raise ModelError(f"PEFT parameter {n!r} has shape {tuple(src.shape)} in the state but "
                             f"{tuple(named[n].shape)} in the model (different options?)")
    with torch.no_grad():
        for n in info.params:
            named[n].copy_(state_dict[n].to(device=named[n].device, dtype=named[n].dtype))


def set_peft_train_mode(model: nn.Module, mode: bool = True) -> nn.Module:
    """``model.train(mode)``, but BatchNorm layers of the image tower stay in eval mode.

    PEFT trains a few parameters of a frozen network; letting BatchNorm update its running statistics
    would change the frozen part too (and makes them depend on the batch). Returns ``model``.
    """
    model.train(mode)
    if mode:
        for m in _visual(model).modules():
            if isinstance(m, _BatchNorm):
                m.eval()
    return model
