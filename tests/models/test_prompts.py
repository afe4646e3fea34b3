"""labelsieve.models.prompts: the text tower on embeddings, CoOp dual prompts, PromptedViT and MaPLe.

Equivalences are checked against open_clip's own ``encode_text``/``encode_image`` on the mini CLIP
(real weights) and on tiny randomly initialised open_clip ViT CLIPs; training checks use 64 real
Imagenette images.
"""

from __future__ import annotations

import open_clip
import pytest
import torch
import torch.nn.functional as F
from helpers import read_subset, tiny_clip
from torch import nn

from labelsieve.core.errors import ModelError, ParameterError
from labelsieve.models.prompts import DualPromptLearner, MaPLePrompts, PromptedViT, TextTower

N_IMAGES = 64
N_MINI = 64


@pytest.fixture(scope="module")
def bpe_tokenizer():
    return open_clip.get_tokenizer("ViT-B-32")


@pytest.fixture(scope="module")
def mini(mini_clip_dir):
    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + str(mini_clip_dir))
    tokenizer = open_clip.get_tokenizer("local-dir:" + str(mini_clip_dir))
    return model.eval(), preprocess, tokenizer


@pytest.fixture(scope="module")
def subset(imagenette_small):
    root, csv_path = imagenette_small
    return read_subset(root, csv_path, N_IMAGES)


@pytest.fixture(scope="module")
def mini_features(mini, subset):
    """Normalised mini-CLIP image features of the images (the model's own 224 px preprocessing)."""
    model, preprocess, _ = mini
    images, labels, classnames = subset
    images, labels = images[:N_MINI], labels[:N_MINI]
    with torch.no_grad():
        x = torch.stack([preprocess(im) for im in images])
        feats = F.normalize(model.encode_image(x), dim=-1)
    return feats, torch.tensor(labels), classnames


@pytest.fixture(scope="module")
def tiny_images(subset):
    images, labels, classnames = subset
    tf = open_clip.image_transform(64, is_train=False)
    return torch.stack([tf(im) for im in images]), torch.tensor(labels), classnames


# ---------------------------------------------------------------------------------------------------
# TextTower


TEXTS = ["a photo of a tench.", "golf ball", "x", "an extremely long sentence " * 20, "a photo of a cat."]


def test_text_tower_reproduces_encode_text_on_mini_clip(mini):
    model, _, tokenizer = mini
    tokens = tokenizer(TEXTS)
    tower = TextTower(model)
    with torch.no_grad():
        ours = tower.encode_embeddings(model.token_embedding(tokens), tower.pool_positions(tokens))
        ref = model.encode_text(tokens)
    assert ours.shape == (len(TEXTS), 512)
    assert (ours - ref).abs().max().item() < 1e-5
    assert torch.allclose(tower.encode_embeddings(tower.embed_tokens(tokens), tower.pool_positions(tokens),
                                                  normalize=True), F.normalize(ref, dim=-1), atol=1e-5)


@pytest.mark.parametrize("custom_text", [False, True], ids=["CLIP-param-proj", "CustomTextCLIP-linear-proj"])
def test_text_tower_reproduces_encode_text_on_tiny_vit_clip(bpe_tokenizer, custom_text):
    model = tiny_clip(custom_text=custom_text)
    tokens = bpe_tokenizer(TEXTS)
    tower = TextTower(model)
    assert isinstance(tower.text_projection, nn.Linear) == custom_text
    with torch.no_grad():
        ours = tower.encode_embeddings(tower.embed_tokens(tokens), tower.pool_positions(tokens))
        ref = model.encode_text(tokens)
    assert (ours - ref).abs().max().item() < 1e-5


def test_text_tower_deep_prompts_replace_the_context_slots(mini):
    model, _, tokenizer = mini
    tokens = tokenizer(TEXTS[:3])
    tower = TextTower(model)
    n, start = 3, 1
    with torch.no_grad():
        x = tower.embed_tokens(tokens)
        # The hidden states the blocks produce at the context slots, fed back as deep prompts, change nothing.
        h = x + model.positional_embedding
        _, inter = model.transformer.forward_intermediates(h, attn_mask=model.attn_mask, indices=[0, 1, 2])
        same = [t[:, start:start + n] for t in inter]
        ref = model.encode_text(tokens)
        ours = tower.encode_embeddings(x, tower.pool_positions(tokens), deep_prompts=same, prompt_start=start)
        assert (ours - ref).abs().max().item() < 1e-5
        with_none = tower.encode_embeddings(x, tower.pool_positions(tokens), deep_prompts=[None, None])
        assert (with_none - ref).abs().max().item() < 1e-5
    deep = [torch.zeros(n, tower.width, requires_grad=True) for _ in range(3)]
    out = tower.encode_embeddings(x, tower.pool_positions(tokens), deep_prompts=deep)
    assert (out - ref).abs().max().item() > 1e-3
    out.sum().backward()
    assert all(d.grad is not None and d.grad.abs().sum() > 0 for d in deep)
    with pytest.raises(ValueError, match="at most 3"):
        tower.encode_embeddings(x, tower.pool_positions(tokens), deep_prompts=deep + [deep[0]])


def test_text_tower_refuses_models_without_an_open_clip_text_transformer():
    with pytest.raises(ModelError, match="text transformer"):
        TextTower(nn.Linear(2, 2))


# ---------------------------------------------------------------------------------------------------
# PromptedViT


@pytest.mark.parametrize(
    "vision",
    [{}, {"pool_type": "avg", "final_ln_after_pool": True}, {"no_ln_pre": True},
     {"attentional_pool": True, "attn_pooler_queries": 4, "attn_pooler_heads": 2}, {"patch_dropout": 0.5}],
    ids=["tok", "avg-ln-after-pool", "no-ln-pre", "attn-pool", "patch-dropout-eval"],
)
def test_prompted_vit_without_prompts_is_encode_image(vision):
    model = tiny_clip(**vision)
    x = torch.randn(3, 3, 64, 64)
    vit = PromptedViT(model.visual)
    with torch.no_grad():
        assert torch.equal(vit(x), model.encode_image(x))
    assert vit.n_layers == 2 and vit.width == 64 and vit.patch_size == (16, 16)


@pytest.mark.parametrize("pool_type", ["tok", "avg"])
def test_prompted_vit_prompts_and_deep_replacement(pool_type):
    model = tiny_clip(vision_layers=3, pool_type=pool_type)
    vit = PromptedViT(model.visual)
    x = torch.randn(2, 3, 64, 64)
    prompts = torch.randn(5, 64, requires_grad=True)
    with torch.no_grad():
        base = vit(x)
    out = vit(x, prompts)
    assert out.shape == (2, 64) and torch.isfinite(out).all()
    assert (out - base).abs().max().item() > 1e-4
    # ``None`` deep entries keep the previous block's prompt outputs.
    assert torch.allclose(vit(x, prompts, [None, None]), out, atol=1e-6)
    # Replacing the prompt slots with what block 0 produced there is the identity.
    seen: list[torch.Tensor] = []
    handle = model.visual.transformer.resblocks[0].register_forward_hook(lambda m, i, o: seen.append(o))
    vit(x, prompts)
    handle.remove()
    same = seen[0][:, 1:6].detach()
    assert torch.allclose(vit(x, prompts, [same]), out, atol=1e-6)
    deep = [torch.randn(5, 64, requires_grad=True), torch.randn(2, 5, 64, requires_grad=True)]
    out2 = vit(x, prompts, deep)
    out2.square().sum().backward()
    assert prompts.grad is not None and prompts.grad.abs().sum() > 0
    assert all(d.grad is not None and d.grad.abs().sum() > 0 for d in deep)
    with pytest.raises(ParameterError, match="5 tokens"):
        vit(x, prompts, [torch.randn(4, 64)])
    with pytest.raises(ValueError, match="input-layer prompts"):
        vit(x, None, [torch.randn(5, 64)])


def test_prompt_position_does_not_matter_for_class_token_pooling():
    """VPT/DEFT and MaPLe append the prompts after the patches; PromptedViT puts them after the class
    token. Without positional embeddings on the prompts both give the same features."""
    model = tiny_clip()
    visual = model.visual
    x = torch.randn(2, 3, 64, 64)
    prompts = torch.randn(2, 5, 64)  # input layer (block 0) and deep prompts of block 1
    with torch.no_grad():
        h = torch.cat([visual._embeds(x), prompts[0].expand(2, -1, -1)], dim=1)
        for i, blk in enumerate(visual.transformer.resblocks):
            if i > 0:
                h = torch.cat([h[:, :-5], prompts[i].expand(2, -1, -1)], dim=1)
            h = blk(h)
        pooled, _ = visual._pool(h[:, :-5])
        appended = pooled @ visual.proj
        ours = PromptedViT(visual)(x, prompts[0], [prompts[1]])
    assert (ours - appended).abs().max().item() < 1e-5


def test_prompted_vit_refuses_a_cnn_tower(mini):
    with pytest.raises(ModelError, match="ViT image tower"):
        PromptedViT(mini[0].visual)


# ---------------------------------------------------------------------------------------------------
# DualPromptLearner


def test_dual_prompts_from_an_init_phrase_start_as_the_handwritten_prompts(mini):
    model, _, tokenizer = mini
    names = ["tench", "golf ball", "english springer"]
    learner = DualPromptLearner(model, tokenizer, names, init="a photo of a")
    assert learner.n_ctx == 4 and learner.ctx_pos.shape == (4, 256)
    pos, neg = learner()
    with torch.no_grad():
        ref = F.normalize(model.encode_text(tokenizer([f"a photo of a {n}." for n in names])), dim=-1)
    assert pos.shape == neg.shape == (3, 512)
    assert (pos - ref).abs().max().item() < 1e-5 and torch.equal(pos, neg)
    # Class-name positions of CoOp: "front" and "middle" read as the same words in another order.
    for position, texts in [("front", [f"{n} a photo of a." for n in names]),
                            ("middle", [f"a photo {n} of a." for n in names])]:
        lr = DualPromptLearner(model, tokenizer, names, init="a photo of a", class_token_position=position)
        with torch.no_grad():
            ref = F.normalize(model.encode_text(tokenizer(texts)), dim=-1)
            assert (lr.encode("pos") - ref).abs().max().item() < 1e-5


def test_dual_prompts_random_init_state_and_freezing(mini):
    model, _, tokenizer = mini
    torch.manual_seed(0)
    learner = DualPromptLearner(model, tokenizer, ["tench", "church"])
    assert learner.n_ctx == 16 and learner.ctx_pos.shape == (16, 256)
    assert 0.015 < learner.ctx_pos.std().item() < 0.025
    assert not torch.equal(learner.ctx_pos, learner.ctx_neg)
    assert set(learner.state_dict()) == {"ctx_pos", "ctx_neg"}
    assert [n for n, _ in learner.named_parameters()] == ["ctx_pos", "ctx_neg"]
    assert not any(p.requires_grad for p in TextTower(model).parameters())
    pos, neg = learner()
    assert torch.allclose(pos.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(learner.encode("neg"), neg, atol=1e-6)


def test_dual_prompt_gradients_reach_only_the_contexts(mini, mini_features):
    model, _, tokenizer = mini
    feats, labels, classnames = mini_features
    model.zero_grad(set_to_none=True)
    learner = DualPromptLearner(model, tokenizer, classnames)
    pos, neg = learner()
    scale = model.logit_scale.exp().detach()
    ce = F.cross_entropy(scale * feats @ pos.t(), labels)
    # DEFT's dual term: "yes" for the given label through the negative context (positive side detached).
    sim_pos, sim_neg = feats @ pos.t().detach(), feats @ neg.t()
    p_clean = torch.sigmoid(scale * (sim_pos - sim_neg)).gather(1, labels[:, None])
    loss = ce - torch.log(p_clean.clamp_min(1e-8)).mean()
    loss.backward()
    assert learner.ctx_pos.grad is not None and learner.ctx_pos.grad.abs().sum() > 0
    assert learner.ctx_neg.grad is not None and learner.ctx_neg.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_dual_prompt_training_reduces_the_loss_on_real_images(mini, mini_features):
    model, _, tokenizer = mini
    feats, labels, classnames = mini_features
    torch.manual_seed(0)
    learner = DualPromptLearner(model, tokenizer, classnames)
    opt = torch.optim.SGD(learner.parameters(), lr=0.03, momentum=0.9)
    scale = model.logit_scale.exp().detach()
    losses = []
    for _ in range(6):
        pos, _ = learner()
        loss = F.cross_entropy(scale * feats @ pos.t(), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0], losses


def test_dual_prompts_save_load_round_trip(mini, tmp_path):
    model, _, tokenizer = mini
    names = ["tench", "church", "parachute"]
    torch.manual_seed(1)
    a = DualPromptLearner(model, tokenizer, names)
    torch.save(a.state_dict(), tmp_path / "ctx.pt")
    torch.manual_seed(2)
    b = DualPromptLearner(model, tokenizer, names)
    assert not torch.equal(a.ctx_pos, b.ctx_pos)
    b.load_state_dict(torch.load(tmp_path / "ctx.pt"))
    with torch.no_grad():
        for x, y in zip(a(), b(), strict=True):
            assert torch.equal(x, y)


def test_dual_prompt_parameter_checks(mini):
    model, _, tokenizer = mini
    with pytest.raises(ParameterError, match="'n_ctx'.*token count"):
        DualPromptLearner(model, tokenizer, ["cat"], init="a photo of a", n_ctx=16)
    with pytest.raises(ParameterError, match="class_token_position"):
        DualPromptLearner(model, tokenizer, ["cat"], class_token_position="start")
    with pytest.raises(ParameterError, match="classnames"):
        DualPromptLearner(model, tokenizer, [])
    with pytest.raises(ParameterError, match="init_std"):
        DualPromptLearner(model, tokenizer, ["cat"], init_std=0)
    with pytest.raises(ParameterError, match="n_ctx"):
        DualPromptLearner(model, tokenizer, ["cat"], n_ctx=0)
    with pytest.raises(ParameterError, match="which"):
        DualPromptLearner(model, tokenizer, ["cat"], n_ctx=2).encode("both")


# ---------------------------------------------------------------------------------------------------
# MaPLe


def test_maple_shapes_depth_clamp_and_init(bpe_tokenizer):
    model = tiny_clip(vision_layers=3, text_layers=2)
    names = ["tench", "golf ball", "church"]
    maple = MaPLePrompts(model, bpe_tokenizer, names)
    assert maple.depth_requested == 9 and maple.depth == 2  # min(9, 2 text blocks, 3 vision blocks)
    assert maple.n_ctx == 2 and maple.ctx.shape == (2, 64)
    phrase = bpe_tokenizer(["a photo of a"])
    assert torch.equal(maple.ctx.detach(), model.token_embedding(phrase)[0, 1:3].detach())  # "a photo"
    out = maple()
    assert out.text_features.shape == (3, 64)
    assert torch.allclose(out.text_features.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert out.vision_prompts is not None and out.vision_prompts.shape == (2, 64)
    assert len(out.vision_deep_prompts) == 1 and out.vision_deep_prompts[0].shape == (2, 64)
    x = torch.randn(4, 3, 64, 64)
    assert maple.encode_image(x).shape == (4, 64) and maple.logits(x).shape == (4, 3)
    assert set(maple.state_dict()) == {"ctx", "compound_text.0", "proj.weight", "proj.bias",
                                       "compound_proj.0.weight", "compound_proj.0.bias"}
    assert not any(p.requires_grad for p in model.parameters())
    # Depth 1 (no deep prompts): the text side reads MaPLe's "a photo of a <name>." exactly.
    shallow = MaPLePrompts(model, bpe_tokenizer, names, depth=1)
    with torch.no_grad():
        ref = F.normalize(model.encode_text(bpe_tokenizer([f"a photo of a {n}." for n in names])), dim=-1)
        assert (shallow.encode_text() - ref).abs().max().item() < 1e-5
    with pytest.raises(ParameterError, match="n_ctx"):
        MaPLePrompts(model, bpe_tokenizer, names, n_ctx=5)
    with pytest.raises(ParameterError, match="depth"):
        MaPLePrompts(model, bpe_tokenizer, names, depth=0)


def test_maple_gradients_reach_text_context_and_coupling(bpe_tokenizer, tiny_images):
    x, labels, classnames = tiny_images
    model = tiny_clip(vision_layers=3, text_layers=3)
    maple = MaPLePrompts(model, bpe_tokenizer, classnames, depth=3)
    loss = F.cross_entropy(maple.logits(x[:16]), labels[:16])
    loss.backward()
    learnt = dict(maple.named_parameters())
    assert len(learnt) == 1 + 2 + 2 + 2 * 2  # ctx, 2 compound text, proj (w, b), 2 compound proj (w, b)
    for name, p in learnt.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in model.parameters())


def test_maple_training_reduces_the_loss_on_real_images(bpe_tokenizer, tiny_images):
    x, labels, classnames = tiny_images
    model = tiny_clip(vision_layers=2, text_layers=2)
    maple = MaPLePrompts(model, bpe_tokenizer, classnames)
    opt = torch.optim.SGD(maple.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(6):
        loss = F.cross_entropy(maple.logits(x), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.05, losses


def test_maple_save_load_round_trip(bpe_tokenizer, tmp_path):
    names = ["tench", "church"]
    a = MaPLePrompts(tiny_clip(), bpe_tokenizer, names)
    with torch.no_grad():
        for p in a.parameters():
            p.add_(0.1 * torch.randn_like(p))
    torch.save(a.state_dict(), tmp_path / "maple.pt")
    model_b = tiny_clip()
    b = MaPLePrompts(model_b, bpe_tokenizer, names)
    b.load_state_dict(torch.load(tmp_path / "maple.pt"))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(a.logits(x), b.logits(x), atol=1e-6)


def test_maple_needs_a_vit_unless_text_only(mini, mini_features):
    model, _, tokenizer = mini
    feats, labels, classnames = mini_features
    with pytest.raises(ModelError, match="needs a ViT image tower.*text_only=True"):
        MaPLePrompts(model, tokenizer, classnames)
    maple = MaPLePrompts(model, tokenizer, classnames, text_only=True)
    assert maple.depth == 4 and maple.proj is None and len(maple.compound_text) == 3  # 4 text blocks
    out = maple()
    assert out.vision_prompts is None and out.vision_deep_prompts == []
    logits = maple.logits_from_features(feats)
    assert logits.shape == (N_MINI, 10) and torch.isfinite(logits).all()
    F.cross_entropy(logits, labels).backward()
    assert maple.ctx.grad is not None and all(p.grad is not None for p in maple.compound_text)
    with pytest.raises(ModelError, match="vision prompts"):
        MaPLePrompts(tiny_clip(), open_clip.get_tokenizer("ViT-B-32"), ["a"]).logits_from_features(feats)


def test_learners_keep_fp32_weights_on_a_bf16_model(bpe_tokenizer):
    model = tiny_clip().to(torch.bfloat16)
    dual = DualPromptLearner(model, bpe_tokenizer, ["tench", "church"])
    pos, neg = dual()
    assert pos.dtype == torch.bfloat16 and dual.ctx_pos.dtype == torch.float32
    (pos.float() @ neg.float().t()).trace().backward()
    assert dual.ctx_pos.grad.dtype == torch.float32 and torch.isfinite(dual.ctx_pos.grad).all()
    maple = MaPLePrompts(model, bpe_tokenizer, ["tench", "church"])
    logits = maple.logits(torch.randn(3, 3, 64, 64, dtype=torch.bfloat16))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    F.cross_entropy(logits, torch.tensor([0, 1, 0])).backward()
    assert all(p.dtype == torch.float32 and p.grad is not None for p in maple.parameters())
