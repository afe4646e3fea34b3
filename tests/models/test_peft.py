"""labelsieve.models.peft: each PEFT method trains exactly its own parameters, learns, saves and loads.

ViT methods run on a tiny randomly initialised open_clip ViT CLIP (64 px); LoRA and BitFit also on the
mini CLIP's EfficientNet tower. Training checks are a few SGD steps of cross-entropy on zero-shot-style
logits (``scale · img @ text.T`` with frozen class text features) over 64 real Imagenette images.
"""

from __future__ import annotations

import copy

import open_clip
import pytest
import torch
import torch.nn.functional as F
from helpers import read_subset, tiny_clip
from torch import nn

from labelsieve.core.errors import ModelError, ParameterError
from labelsieve.models.peft import (
    PEFT_METHODS,
    apply_peft,
    get_peft,
    is_vit_tower,
    load_peft_state_dict,
    peft_parameters,
    peft_state_dict,
    remove_peft,
    resolve_peft,
    set_peft_train_mode,
)

N_IMAGES = 64
LAYERS, WIDTH = 2, 64
# The mini CLIP's training checks use the 64 images at 96 px with its own normalisation
# (it is a CNN, so any size works): a few SGD steps through EfficientNet must stay short on 2 CPU cores.
MINI_SIZE, N_MINI = 96, 64


def class_text(model: nn.Module, tokenizer, classnames: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return F.normalize(model.encode_text(tokenizer([f"a photo of a {c}." for c in classnames])), dim=-1)


def zero_shot_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    img = F.normalize(model.encode_image(x), dim=-1)
    return F.cross_entropy(model.logit_scale.exp().detach() * img @ text.t(), y)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, text: torch.Tensor, *, steps: int, lr: float
          ) -> tuple[float, float]:
    """(loss before, loss after) of ``steps`` SGD steps on the PEFT parameters, both in eval mode."""
    params = peft_parameters(model)
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    with torch.no_grad():
        before = zero_shot_loss(model.eval(), x, y, text).item()
    set_peft_train_mode(model, True)
    for _ in range(steps):
        loss = zero_shot_loss(model, x, y, text)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        trained = [p for p in model.parameters() if p.grad is not None]
        assert {id(p) for p in trained} <= {id(p) for p in params}
        assert sum(p.grad.abs().sum().item() for p in params) > 0
        opt.step()
    with torch.no_grad():
        after = zero_shot_loss(model.eval(), x, y, text).item()
    assert all(torch.isfinite(p).all() for p in params)
    return before, after


@pytest.fixture(scope="module")
def subset(imagenette_small):
    root, csv_path = imagenette_small
    return read_subset(root, csv_path, N_IMAGES)


@pytest.fixture(scope="module")
def tiny_data(subset):
    images, labels, classnames = subset
    tf = open_clip.image_transform(64, is_train=False)
    x = torch.stack([tf(im) for im in images])
    # A random ViT CLIP has no zero-shot ability, and its random text tower maps the class prompts to
    # nearly parallel features (cos > 0.8), so a seeded random unit vector per class plays the text side.
    text = F.normalize(torch.randn(len(classnames), 64, generator=torch.Generator().manual_seed(0)), dim=-1)
    return x, torch.tensor(labels), text


@pytest.fixture(scope="module")
def mini_base(mini_clip_dir):
    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + str(mini_clip_dir))
    return model.eval(), open_clip.get_tokenizer("local-dir:" + str(mini_clip_dir))


@pytest.fixture()
def mini(mini_base):
    return copy.deepcopy(mini_base[0])


@pytest.fixture(scope="module")
def mini_data(mini_base, subset):
    model, tokenizer = mini_base
    images, labels, classnames = subset
    cfg = model.visual.preprocess_cfg
    tf = open_clip.image_transform(MINI_SIZE, is_train=False, mean=cfg["mean"], std=cfg["std"],
                                   interpolation=cfg["interpolation"])
    x = torch.stack([tf(im) for im in images[:N_MINI]])
    return x, torch.tensor(labels[:N_MINI]), class_text(model, tokenizer, classnames)


# ---------------------------------------------------------------------------------------------------
# Expected trainable parameters per method on the tiny ViT (2 blocks, width 64, patch 16)

BIAS_NUMEL = sum(p.numel() for n, p in tiny_clip().visual.named_parameters() if n.endswith("bias"))
VIT_EXPECTED = {
    # method: (number of trainable values, predicate on each trainable name, output unchanged at init, lr)
    "vpt_deep": (LAYERS * 20 * WIDTH, lambda n: n == "visual.labelsieve_peft.tokens", False, 0.1),
    "vpt_shallow": (20 * WIDTH, lambda n: n == "visual.labelsieve_peft.tokens", False, 0.1),
    "lora": (LAYERS * 8 * (WIDTH + 3 * WIDTH + WIDTH + WIDTH),
             lambda n: n.startswith("visual.labelsieve_peft.blocks.") and n[-6:] in ("lora_A", "lora_B"), True,
             0.1),
    # The adapter's output is scaled by 0.1 and its up-projection starts at 0: a 10x larger step.
    "adaptformer": (LAYERS * (WIDTH * 8 + 8 + 8 * WIDTH + WIDTH),
                    lambda n: n.startswith("visual.labelsieve_peft.adapters."), True, 1.0),
    "bitfit": (BIAS_NUMEL, lambda n: n.startswith("visual.") and n.endswith("bias") and "peft" not in n, True,
               0.1),
}


@pytest.mark.parametrize("method", sorted(VIT_EXPECTED))
def test_vit_method_trains_only_its_parameters_and_learns(method, tiny_data):
    x, y, text = tiny_data
    model = tiny_clip()
    with torch.no_grad():
        ref = model.encode_image(x[:8])
    info = apply_peft(model, method)
    n_expected, is_peft_name, unchanged, lr = VIT_EXPECTED[method]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert info.method == method and list(info.params) == trainable and trainable
    assert all(is_peft_name(n) for n in trainable), trainable
    assert info.n_trainable == n_expected == sum(p.numel() for p in peft_parameters(model))
    assert info.n_total == sum(p.numel() for p in model.visual.parameters())
    assert get_peft(model) is info and info.to_dict()["method"] == method
    with torch.no_grad():
        out = model.encode_image(x[:8])
    assert out.shape == ref.shape and torch.isfinite(out).all()
    if unchanged:  # zero-initialised updates: the adapted tower starts as the original
        assert (out - ref).abs().max().item() < 1e-5
    else:
        assert (out - ref).abs().max().item() > 1e-4
    before, after = train(model, x, y, text, steps=4, lr=lr)
    assert after < 0.95 * before, (before, after)


def test_vpt_prompt_initialisation_follows_vpt():
    model = tiny_clip()
    apply_peft(model, "vpt_deep", n_tokens=5)
    tokens = model.visual.labelsieve_peft.tokens
    bound = (6.0 / (3 * 16 * 16 + WIDTH)) ** 0.5
    assert tokens.shape == (LAYERS, 5, WIDTH)
    assert tokens.abs().max().item() <= bound and tokens.abs().max().item() > 0.8 * bound


def test_lora_on_the_cnn_tower_of_the_mini_clip(mini, mini_data):
    x, y, text = mini_data
    with torch.no_grad():
        ref = mini.encode_image(x[:4])
    info = apply_peft(mini, "lora")
    visual = mini.visual
    convs = [m for m in visual.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1]
    linears = [m for m in visual.modules() if type(m) is nn.Linear]
    assert len(convs) == 32 and len(linears) == 1  # the pointwise convs of EfficientNet-Lite0 + the projection
    expected = sum(8 * (m.in_channels + m.out_channels) for m in convs) + 8 * (1280 + 512)
    assert info.n_trainable == expected
    assert all(n.endswith(("labelsieve_lora.lora_A", "labelsieve_lora.lora_B")) for n in info.params)
    assert not any(p.requires_grad for p in mini.transformer.parameters())
    with torch.no_grad():
        assert torch.equal(mini.encode_image(x[:4]), ref)  # B = 0 at init
    bn = next(m for m in visual.modules() if isinstance(m, nn.BatchNorm2d))
    stats = bn.running_mean.clone()
    before, after = train(mini, x, y, text, steps=3, lr=0.01)
    assert after < before - 1e-3, (before, after)
    assert torch.equal(bn.running_mean, stats)  # set_peft_train_mode kept BatchNorm statistics frozen


def test_bitfit_on_the_cnn_tower_of_the_mini_clip(mini, mini_data):
    x, y, text = mini_data
    info = apply_peft(mini, "bitfit")
    bns = [m for m in mini.visual.modules() if isinstance(m, nn.BatchNorm2d)]
    biases = [p for n, p in mini.visual.named_parameters() if n.endswith("bias")]
    assert info.n_trainable == sum(p.numel() for p in biases) + sum(m.weight.numel() for m in bns)
    assert all(n.endswith(("bias", "bn1.weight", "bn2.weight", "bn3.weight")) for n in info.params), info.params
    assert "BatchNorm" in info.note
    before, after = train(mini, x, y, text, steps=3, lr=0.01)
    assert after < before - 1e-3, (before, after)


def test_methods_that_need_a_vit_refuse_the_cnn_tower(mini):
    for method in ("vpt_deep", "vpt_shallow", "adaptformer"):
        with pytest.raises(ModelError, match=r"needs a ViT image tower.*lora, bitfit, none.*'auto' and 'none'"):
            apply_peft(mini, method)
    assert get_peft(mini) is None and all(p.requires_grad for p in mini.visual.parameters())


def test_auto_resolves_by_tower(mini):
    tiny = tiny_clip()
    assert is_vit_tower(tiny) and not is_vit_tower(mini) and is_vit_tower(tiny.visual)
    assert resolve_peft(tiny, "auto") == "vpt_deep" and resolve_peft(mini, "auto") == "none"
    assert resolve_peft(mini, "lora") == "lora"
    info = apply_peft(mini, "auto", n_tokens=10)
    assert info.method == "none" and info.requested == "auto" and info.n_trainable == 0 and "unused" in info.note
    assert not any(p.requires_grad for p in mini.parameters()) and peft_parameters(mini) == []
    info = apply_peft(tiny, "auto", n_tokens=10)
    assert info.method == "vpt_deep" and info.n_trainable == LAYERS * 10 * WIDTH


def test_parameter_and_state_refusals(mini):
    model = tiny_clip()
    with pytest.raises(ParameterError, match="'method'"):
        apply_peft(model, "prefix_tuning")
    with pytest.raises(ParameterError, match="'options'"):
        apply_peft(model, "lora", n_tokens=4)
    with pytest.raises(ParameterError, match="'rank'"):
        apply_peft(model, "lora", rank=0)
    assert get_peft(model) is None and all(p.requires_grad for p in model.parameters())  # left as it was
    with pytest.raises(ParameterError, match="'dropout'"):
        apply_peft(model, "adaptformer", dropout=1.0)
    with pytest.raises(ModelError, match="image tower"):
        apply_peft(nn.Linear(2, 2), "none")
    with pytest.raises(ModelError, match="apply_peft"):
        peft_state_dict(model)
    with pytest.raises(ModelError, match="apply"):
        load_peft_state_dict(model, {})
    apply_peft(model, "vpt_deep")
    with pytest.raises(ModelError, match="already applied"):
        apply_peft(model, "lora")
    with pytest.raises(ModelError, match="missing"):
        load_peft_state_dict(model, {"visual.other": torch.zeros(1)})
    shallow = tiny_clip()
    apply_peft(shallow, "vpt_shallow")
    with pytest.raises(ModelError, match="shape"):
        load_peft_state_dict(model, peft_state_dict(shallow))
    assert set(PEFT_METHODS) == {"vpt_deep", "vpt_shallow", "lora", "adaptformer", "bitfit", "none"}


@pytest.mark.parametrize("method", ["vpt_deep", "vpt_shallow", "lora", "adaptformer", "bitfit"])
def test_peft_state_round_trip(method, tmp_path):
    x = torch.randn(4, 3, 64, 64)
    model = tiny_clip()
    apply_peft(model, method)
    with torch.no_grad():
        for p in peft_parameters(model):
            p.add_(0.05 * torch.randn_like(p))
        trained = model.encode_image(x)
    sd = peft_state_dict(model)
    assert set(sd) == set(get_peft(model).params)
    torch.save(sd, tmp_path / "peft.pt")
    fresh = tiny_clip()
    apply_peft(fresh, method)
    with torch.no_grad():
        assert (fresh.encode_image(x) - trained).abs().max().item() > 1e-5
        load_peft_state_dict(fresh, torch.load(tmp_path / "peft.pt"))
        assert torch.equal(fresh.encode_image(x), trained)


def test_lora_state_round_trip_on_the_cnn_tower(mini, mini_base, mini_data, tmp_path):
    x = mini_data[0][:2]
    apply_peft(mini, "lora")
    with torch.no_grad():
        for p in peft_parameters(mini):
            p.add_(0.01 * torch.randn_like(p))
        trained = mini.encode_image(x)
    torch.save(peft_state_dict(mini), tmp_path / "lora.pt")
    fresh = copy.deepcopy(mini_base[0])
    apply_peft(fresh, "lora")
    load_peft_state_dict(fresh, torch.load(tmp_path / "lora.pt"))
    with torch.no_grad():
        assert torch.equal(fresh.encode_image(x), trained)


@pytest.mark.parametrize("method", ["vpt_deep", "lora", "adaptformer"])
def test_original_parameter_names_survive_and_remove_restores(method):
    x = torch.randn(2, 3, 64, 64)
    model = tiny_clip()
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model.encode_image(x)
    apply_peft(model, method)
    result = model.load_state_dict(plain, strict=False)  # a plain checkpoint still loads
    assert not result.unexpected_keys and all("labelsieve" in k for k in result.missing_keys)
    # A deep copy carries its own PEFT parameters and its forward runs on the copy.
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in peft_parameters(twin):
            p.add_(torch.randn_like(p))
        assert not torch.allclose(twin.encode_image(x), model.encode_image(x))
    remove_peft(model)
    assert get_peft(model) is None and not any("labelsieve" in k for k in model.state_dict())
    with torch.no_grad():
        assert torch.equal(model.encode_image(x), ref)
    apply_peft(model, "bitfit")  # another method can follow


def test_remove_lora_hooks_from_the_cnn_tower(mini, mini_data):
    x = mini_data[0][:2]
    with torch.no_grad():
        ref = mini.encode_image(x)
    apply_peft(mini, "lora")
    with torch.no_grad():
        for p in peft_parameters(mini):
            p.add_(0.01)
        assert not torch.equal(mini.encode_image(x), ref)
    remove_peft(mini)
    assert not any(m._forward_hooks for m in mini.visual.modules())
    with torch.no_grad():
        assert torch.equal(mini.encode_image(x), ref)
