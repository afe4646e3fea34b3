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
The ViT methods run the tower through :func:`labelsieve.models.prompts.vit.vit_forward` (prompt tokens
inserted after the class token and dropped before pooling; adapters and LoRA inside each block);
LoRA on other towers uses forward hooks, so every parameter of the original model keeps its name and
a plain checkpoint still loads. :func:`peft_state_dict` / :func:`load_peft_state_dict` save and
restore only the PEFT parameters; :func:`remove_peft` takes the method off again.

On CNN towers call :func:`set_peft_train_mode` instead of ``model.train()``: it keeps BatchNorm
running statistics frozen (the original statistics are part of the frozen model). PEFT parameters
take the dtype of the tower's weights: load the model in fp32 and use autocast for mixed precision.
"""


from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from labelsieve.core.errors import ModelError, check_param
from labelsieve.models.peft.adaptformer import _apply_adaptformer
from labelsieve.models.peft.base import HOOK_ID, INFO, LORA, MODULE, PeftInfo, PeftMethod
from labelsieve.models.peft.bitfit import _apply_bitfit, _apply_none
from labelsieve.models.peft.lora import _apply_lora
from labelsieve.models.peft.vpt import _apply_vpt
from labelsieve.models.prompts.vit import is_open_clip_vit

__all__ = [
    "PEFT_METHODS", "PeftInfo", "PeftMethod", "apply_peft", "get_peft", "is_vit_tower",
    "load_peft_state_dict", "peft_parameters", "peft_state_dict", "remove_peft", "resolve_peft",
    "set_peft_train_mode",
]


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
    return is_open_clip_vit(getattr(model, "visual", model))


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
    return getattr(_visual(model), INFO, None)


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
    current = getattr(visual, INFO, None)
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
    object.__setattr__(visual, INFO, info)
    return info


def remove_peft(model: nn.Module) -> None:
    """Take the applied PEFT method off ``model`` (no-op without one).

    The original ``forward`` of the image tower comes back and the added parameters and hooks are
    removed. BitFit trains the model's own biases, so their changes stay. ``requires_grad`` flags are
    left as they are (all False): unfreeze what the next phase trains.
    """
    visual = _visual(model)
    if getattr(visual, INFO, None) is None:
        return
    if "forward" in visual.__dict__:
        del visual.forward
    if MODULE in visual._modules:
        delattr(visual, MODULE)
    for m in list(visual.modules()):
        if LORA in m._modules:
            hook_id = getattr(m, HOOK_ID, None)
            if hook_id is not None:
                m._forward_hooks.pop(hook_id, None)
                object.__delattr__(m, HOOK_ID)
            delattr(m, LORA)
    object.__setattr__(visual, INFO, None)


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
