"""codivide (AVL-Prompter co-divide): the loss, the frozen fast path on real mini-CLIP features with injected
noise, and the image-level MaPLe path end to end on a tiny randomly initialised open_clip ViT with real images.

Bounds were measured on this machine (numbers in the comments) and set with margin.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import inject_symmetric, make_context, scores, tiny_vit_encoder, with_noise

from labelsieve.core.errors import ModelError, ParameterError
from labelsieve.detectors import create_detector, list_detectors
from labelsieve.detectors.codivide import RECIPE, CoDivideDetector, codivide_loss, strong_feature_view
from labelsieve.detectors.common.budget import text_budget_scale
from labelsieve.detectors.common.recipe import UNKNOWN
from labelsieve.detectors.common.views import strong_view, weak_view
from labelsieve.detectors.ensemble import CODIVIDE_FAST

# ---------------------------------------------------------------------------------------------------
# the loss and the feature-space strong view


def test_loss_parts_and_empty_parts_are_zero_not_nan():
    torch.manual_seed(0)
    lw = torch.randn(6, 4, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    # nothing labelled, no strong view: only the prior penalty remains
    loss, st = codivide_loss(lw, None, y, torch.zeros(6, dtype=torch.bool))
    assert torch.isfinite(loss) and st["l_x"] == 0.0 and st["l_u"] == 0.0 and st["n_confident"] == 0
    mean = torch.softmax(lw.detach(), 1).mean(0)
    assert float(loss.detach()) == pytest.approx(float((0.25 * torch.log(0.25 / mean)).sum()), rel=1e-5)
    # everything labelled: CE + penalty; lambda_r = 0 leaves plain mean CE
    loss, st = codivide_loss(lw, None, y, torch.ones(6, dtype=torch.bool), lambda_r=0.0)
    assert float(loss.detach()) == pytest.approx(float(torch.nn.functional.cross_entropy(lw.detach(), y)), rel=1e-5)
    assert st["n_labelled"] == 6 and st["n_unlabelled"] == 0
    # unlabelled but none confident: the FixMatch term is exactly zero
    lab = torch.tensor([True, True, False, False, False, False])
    ls = torch.randn(4, 4, requires_grad=True)
    loss, st = codivide_loss(lw, ls, y, lab, lambda_r=0.0)
    assert st["l_u"] == 0.0 and st["n_confident"] == 0
    with pytest.raises(ValueError, match="one row per unlabelled sample"):
        codivide_loss(lw, ls[:3], y, lab)


def test_fixmatch_term_uses_confident_weak_pseudo_labels_on_the_strong_view():
    lw = torch.zeros(4, 3)
    lw[2, 1] = 10.0  # confident (p ~ 0.9999) -> pseudo-label 1
    lw[3, 2] = 1.0  # not confident
    lw.requires_grad_(True)
    ls = torch.zeros(2, 3, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0])
    lab = torch.tensor([True, True, False, False])
    loss, st = codivide_loss(lw, ls, y, lab, lambda_r=0.0, lambda_u=2.0)
    assert st["n_confident"] == 1 and st["n_unlabelled"] == 2
    # CE(uniform strong logits, 1) = log 3 for the confident one, averaged over the 2 unlabelled samples
    assert st["l_u"] == pytest.approx(np.log(3) / 2, rel=1e-5)
    loss.backward()
    assert ls.grad[0].abs().sum() > 0 and ls.grad[1].abs().sum() == 0  # only the confident row
    assert lw.grad[2:].abs().sum() == 0  # the pseudo-labels are targets, not trained through the weak view


def test_strong_feature_view_is_normalised_seeded_and_identity_without_noise():
    x = torch.nn.functional.normalize(torch.randn(5, 32), dim=-1)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = strong_feature_view(x, dropout=0.3, noise=0.3, generator=g1)
    b = strong_feature_view(x, dropout=0.3, noise=0.3, generator=g2)
    assert torch.equal(a, b)
    assert torch.allclose(a.norm(dim=1), torch.ones(5), atol=1e-5)
    cos = (a * x).sum(1)
    assert bool((cos > 0.3).all() and (cos < 0.99).all())  # perturbed, still close to the feature
    assert torch.allclose(strong_feature_view(x, dropout=0.0, noise=0.0), x, atol=1e-6)
    assert strong_feature_view(x[:0], dropout=0.5, noise=0.5).shape == (0, 32)


def test_registry_recipe_and_parameter_checks():
    assert "codivide" in list_detectors()
    det = create_detector("codivide", frozen=True, epochs=3)
    assert isinstance(det, CoDivideDetector) and det.needs_text
    assert det.get_params()["frozen"] is True and det.get_params()["warmup_epochs"] == 0
    rows = {r["name"]: r for r in RECIPE.rows(create_detector("codivide").get_params())}
    for name in ("frozen", "batch_mode", "max_steps", "text_budget", "feature_dropout", "encoder_lr"):
        assert rows[name]["origin"] == "labelsieve" and (rows[name]["note"] or rows[name]["source"]), name
    assert rows["frozen"]["paper"] is False
    assert "J. Visual Communication and Image Representation" in RECIPE.reference
    bad = [({"frozen": "yes"}, "'frozen'"), ({"epochs": 2, "warmup_epochs": 2}, "'warmup_epochs'"),
           ({"tau": 1.5}, "'tau'"), ({"lr": 0}, "'lr'"), ({"batch_size": 1}, "'batch_size'"),
           ({"confidence": 0.0}, "'confidence'"), ({"feature_dropout": 1.0}, "'feature_dropout'"),
           ({"amp": "fp8"}, "'amp'"), ({"epochs": True}, "'epochs'"), ({"weak": "crop"}, "'weak'"),
           ({"max_steps": 0}, "'max_steps'"), ({"text_budget": 0}, "'text_budget'")]
    for kw, msg in bad:
        with pytest.raises(ParameterError, match=msg):
            create_detector("codivide", **kw)


def test_the_paper_recipe_cannot_drift():
    """Co-divide's recipe (issue 21): DivideMix's lambda_u 25 with its 16-epoch linear ramp, the encoders fine-tuned
    with the prompts, and the values issue 10 read; a departure coming back as a default fails here."""
    rows = {r["name"]: r for r in RECIPE.rows(create_detector("codivide").get_params())}
    paper = {"epochs": 60, "warmup_epochs": 0, "lr": 0.02, "batch_size": 64, "tau": 0.5, "monotone": False,
             "weak": "flip_shift", "gmm_max_iter": 10, "gmm_reg_covar": 5e-4, "confidence": 0.95, "lambda_u": 25.0,
             "lambda_u_rampup": 16, "lambda_r": 1.0, "finetune_encoders": True, "n_ctx": 2, "depth": 9,
             "ctx_init": "a photo of a"}
    for name, value in paper.items():
        assert rows[name]["value"] == value and rows[name]["origin"] == "paper", name
    assert "DivideMix" in rows["lambda_u"]["source"] and "linear_rampup" in rows["lambda_u_rampup"]["source"]
    assert "fine-tune the V-L encoders" in rows["finetune_encoders"]["source"]
    # the paper is silent on the batch make-up: DivideMix's, chosen by the grid (docs/methods.md)
    assert rows["batch_mode"]["value"] == "dividemix" and rows["batch_mode"]["paper"] == UNKNOWN
    assert rows["batch_mode"]["origin"] == "labelsieve" and "DivideMix" in rows["batch_mode"]["source"]
    # the default ensemble's member keeps the settings it was measured with, whatever the recipe says
    fast = {r["name"]: r for r in RECIPE.rows(create_detector("codivide", **CODIVIDE_FAST).get_params())}
    assert (fast["lambda_u"]["value"], fast["lambda_u_rampup"]["value"], fast["batch_mode"]["value"]) == (
        1.0, 0, "split")
    assert fast["lambda_u"]["origin"] == "user"


def test_lambda_u_ramps_up_as_in_dividemix(imagenette_feats, mini_clip):
    """lambda_u(t) = 25 · clip((t - warm-up) / 16, 0, 1) at fractional epoch t, per step (DivideMix's linear_rampup);
    'split' batches here, so that every epoch has the same 4 steps (the ramp is the same in both batch modes)."""
    images, x = imagenette_feats
    noisy = inject_symmetric(images.labels, images.n_classes, 0.4, seed=5)
    ctx = make_context(images, x, mini_clip, noisy, seed=2)
    res = create_detector("codivide", epochs=3, batch_size=100, batch_mode="split").detect(ctx)
    steps = 4  # 400 rows in batches of 100
    hist = res.info["history"]
    for h in hist:  # the mean over an epoch's steps of 25 · (epoch + i / 4) / 16
        expect = np.mean([25 * (h["epoch"] + i / steps) / 16 for i in range(steps)])
        assert h["net1"]["lambda_u"] == pytest.approx(expect) and h["net2"]["lambda_u"] == pytest.approx(expect)
    flat = create_detector("codivide", epochs=2, batch_size=100, lambda_u=1.0, lambda_u_rampup=0,
                           batch_mode="split").detect(ctx)
    assert all(h[k]["lambda_u"] == 1.0 for h in flat.info["history"] for k in ("net1", "net2"))
    # the learning rate follows the cosine over fractional epochs: the first step of epoch 1 of 3 at 0.02 · 0.75
    assert hist[0]["net1"]["lr"] == pytest.approx(0.02 * 0.5 * (1 + np.cos(np.pi * (3 / 4) / 3)))


def test_dividemix_batches_iterate_the_labelled_rows_with_a_separate_unlabelled_batch(imagenette_feats, mini_clip):
    """batch_mode='dividemix': an epoch is ceil(|labelled| / B) steps, each with a batch of labelled rows and a batch
    of unlabelled rows drawn separately (cycling through them); 'split' runs ceil(n / B) steps over all rows."""
    images, x = imagenette_feats
    noisy = inject_symmetric(images.labels, images.n_classes, 0.4, seed=5)
    ctx = make_context(images, x, mini_clip, noisy, seed=2)
    res = create_detector("codivide", epochs=2, batch_size=64).detect(ctx)  # the default, DivideMix's
    for h in res.info["history"]:
        for k in ("net1", "net2"):
            e = h[k]
            n_lab = e["n_labelled"]
            assert e["iterated"] == "labelled" and e["steps"] == -(-n_lab // 64)
            # one unlabelled batch per step, from a loader over the unlabelled rows (re-shuffled when spent; its last
            # batch of a pass is short, as DivideMix's): every unlabelled row at least once when the steps allow
            assert min(400 - n_lab, 64 * e["steps"]) <= e["n_unlabelled"] <= 64 * e["steps"]
            assert e["n"] == n_lab + e["n_unlabelled"]  # every labelled row once, plus the unlabelled batches
    split = create_detector("codivide", epochs=2, batch_size=64, batch_mode="split").detect(ctx)
    assert all(h[k]["steps"] == -(-400 // 64) and h[k]["iterated"] == "all" and h[k]["n"] == 400
               for h in split.info["history"] for k in ("net1", "net2"))
    for r in (res, split):
        f1, auroc = scores(r, noisy != images.labels)
        assert auroc > 0.95 and f1 > 0.85, (auroc, f1)


# ---------------------------------------------------------------------------------------------------
# frozen path on real mini-CLIP features


def _clean_precision(res, truth):
    kept = ~res.is_noisy
    return float((~truth[kept]).mean())


@pytest.fixture(scope="module")
def noisy_cifar(cifar_feats):
    return with_noise(cifar_feats, 0.4, seed=4)


@pytest.fixture(scope="module")
def cifar_result(noisy_cifar, mini_clip):
    images, x, noisy, _ = noisy_cifar
    return create_detector("codivide", **CODIVIDE_FAST).detect(make_context(images, x, mini_clip, noisy, seed=1))


def test_frozen_path_finds_40pc_noise_on_cifar(noisy_cifar, mini_clip, cifar_result):
    """CIFAR-10 with mini CLIP (52.8 % zero-shot), 40 % symmetric noise, labelsieve's fast settings (10 epochs,
    the default ensemble's member). Measured:
    AUROC 0.921, F1 0.828, clean-selection precision 0.896 vs a clean rate of 0.60 (label_match: AUROC 0.882,
    F1 0.709), ~13 s on one CPU thread."""
    images, x, noisy, truth = noisy_cifar
    res = cifar_result
    f1, auroc = scores(res, truth)
    assert auroc > 0.89 and f1 > 0.76, (auroc, f1)
    assert _clean_precision(res, truth) > (~truth).mean() + 0.2
    # training beats reading the zero-shot prediction of the given label
    lm = create_detector("label_match").detect(make_context(images, x, mini_clip, noisy))
    assert auroc > scores(lm, truth)[1] + 0.015
    assert res.probs.shape == (len(images), images.n_classes)
    np.testing.assert_allclose(res.probs.sum(1), 1.0, atol=1e-6)
    info = res.info
    assert info["path"] == "text_only_features" and info["tower"] == "TimmModel"
    assert info["depth"] == 4 and info["n_ctx"] == 2  # depth 9 clamped to the mini CLIP's 4 text layers
    # 52.8 % zero-shot x 60 % clean labels: the prompted-text classifier warns that its text side is weak
    assert 0.2 < info["zero_shot_agreement"] < 0.5 and len(info["warnings"]) == 1
    hist = info["history"]
    assert [h["phase"] for h in hist] == ["warmup"] + ["codivide"] * 9
    for h in hist[1:]:
        for k in ("net1", "net2"):
            e = h[k]
            assert 0 < e["n_labelled"] < len(images) and e["gmm_rule"] == "gmm"
            assert np.isfinite(e["loss"]) and e["n_confident"] >= 0 and h["seconds"] > 0
    assert "codivide" in json.dumps(info)


def test_the_two_networks_split_differently_but_mostly_agree(cifar_result):
    p1, p2 = cifar_result.columns["p_clean_net1"], cifar_result.columns["p_clean_net2"]
    split1, split2 = p1 > 0.5, p2 > 0.5
    agree = float((split1 == split2).mean())  # measured 0.967
    assert 0.85 < agree < 1.0
    assert not np.allclose(p1, p2)
    np.testing.assert_allclose(cifar_result.p_clean, (p1 + p2) / 2)
    # each network trains on the other's split (co-divide), and the splits differ in every epoch
    hist = cifar_result.info["history"][1:]
    for h in hist:
        assert h["net1"]["n_labelled"] == h["net2"]["n_selected"]
        assert h["net2"]["n_labelled"] == h["net1"]["n_selected"]
        assert 0.8 < h["split_agreement"] < 1.0  # measured 0.88 .. 0.97
    assert any(h["net1"]["n_labelled"] != h["net2"]["n_labelled"] for h in hist)


def test_frozen_path_imagenette_and_determinism(imagenette_feats, mini_clip):
    """Imagenette (mini CLIP 98.8 % zero-shot), 40 % noise, 3 epochs. Measured: AUROC 0.99+, F1 0.97."""
    images, x = imagenette_feats
    noisy = inject_symmetric(images.labels, images.n_classes, 0.4, seed=5)
    truth = noisy != images.labels
    ctx = make_context(images, x, mini_clip, noisy, seed=2)
    fast = {**CODIVIDE_FAST, "epochs": 3}
    a = create_detector("codivide", **fast).detect(ctx)
    f1, auroc = scores(a, truth)
    assert auroc > 0.97 and f1 > 0.9, (auroc, f1)
    assert _clean_precision(a, truth) > 0.95
    assert a.info["zero_shot_agreement"] > 0.5 and a.info["warnings"] == []
    b = create_detector("codivide", **fast).detect(ctx)
    np.testing.assert_array_equal(a.p_clean, b.p_clean)
    np.testing.assert_array_equal(a.probs, b.probs)
    c = create_detector("codivide", **fast).detect(
        make_context(images, x, mini_clip, noisy, seed=3))
    assert not np.array_equal(a.p_clean, c.p_clean)  # the seed matters


def test_degenerate_inputs_stay_finite(imagenette_feats, mini_clip):
    images, x = imagenette_feats
    # every label right
    res = create_detector("codivide", **{**CODIVIDE_FAST, "epochs": 2}).detect(make_context(images, x, mini_clip))
    assert np.all(np.isfinite(res.p_clean)) and np.all(np.isfinite(res.probs))
    assert res.is_noisy.mean() < 0.05  # measured 0.0025
    # a class with a single sample, and a tiny dataset smaller than two batches
    keep = np.concatenate([np.flatnonzero(images.labels == 0)[:1], np.flatnonzero(images.labels != 0)[::8]])
    sub = images.subset(keep)
    noisy = inject_symmetric(sub.labels, sub.n_classes, 0.4, seed=0)
    res = create_detector("codivide", frozen=True, epochs=3, batch_size=16).detect(
        make_context(sub, x[keep], mini_clip, noisy))
    assert res.p_clean.shape == (len(keep),) and np.all(np.isfinite(res.p_clean))
    assert np.all(np.isfinite(res.probs)) and res.probs.shape == (len(keep), images.n_classes)


def test_cnn_tower_needs_frozen(imagenette_feats, mini_clip):
    images, x = imagenette_feats
    ctx = make_context(images, x, mini_clip)
    with pytest.raises(ModelError, match="--frozen"):
        create_detector("codivide", frozen=False).detect(ctx)
    path, why = create_detector("codivide").resolve_path(ctx)  # the default, auto, on a CNN tower
    assert path == "text_only_features" and "not a ViT" in why


def test_paper_recipe_falls_back_to_the_frozen_path_on_a_cnn_and_max_steps_caps_the_rows(imagenette_feats,
                                                                                          mini_clip):
    """The paper's settings (lr 0.02, batch 64, no warm-up, raw GMM posterior) on the frozen fallback, shortened
    to 3 epochs, with a budget of 4 steps per network and epoch: each epoch iterates at most 256 of the labelled
    rows (DivideMix's batches, the default), each step with a batch of unlabelled rows beside them."""
    images, x = imagenette_feats
    noisy = inject_symmetric(images.labels, images.n_classes, 0.4, seed=5)
    ctx = make_context(images, x, mini_clip, noisy, seed=2)
    res = create_detector("codivide", epochs=3, max_steps=12).detect(ctx)
    info = res.info
    assert info["path"] == "text_only_features" and "not a ViT" in info["path_reason"]
    assert info["rows_per_epoch"] == 4 * 64
    assert [h["phase"] for h in info["history"]] == ["codivide"] * 3  # no warm-up
    for h in info["history"]:
        for k in ("net1", "net2"):
            e = h[k]
            assert e["iterated"] == "labelled" and e["steps"] == -(-min(e["n_labelled"], 256) // 64) <= 4, e
            assert e["n"] == min(e["n_labelled"], 256) + e["n_unlabelled"], e
    rows = {r["name"]: r for r in info["recipe"]}
    assert rows["frozen"]["resolved"] is True and rows["frozen"]["origin"] == "labelsieve"
    # the paper fine-tunes the encoders; the frozen fallback has none to fine-tune, and says so
    assert rows["finetune_encoders"]["value"] is True and rows["finetune_encoders"]["resolved"] is False
    ft = rows["finetune_encoders"]
    assert ft["origin"] == "labelsieve" and "no image encoder" in ft["reason"]
    assert info["finetune_encoders"] is False
    assert rows["max_steps"]["origin"] == "user" and rows["lr"]["origin"] == "paper"
    f1, auroc = scores(res, noisy != images.labels)
    assert auroc > 0.95 and f1 > 0.85, (auroc, f1)


def test_text_budget_grows_the_batch_not_the_text_tower_passes(imagenette_feats, mini_clip):
    """Every step runs all class prompts through the text tower, so ``text_budget`` caps steps × classes by
    training on k-times larger batches at a k-times larger learning rate: the same rows, k times fewer steps.
    The default ensemble's budget leaves 10 classes alone (every benchmark set runs as before) and gives
    k = 10 at 100 classes."""
    assert text_budget_scale(steps_per_epoch=13, epochs=2, n_classes=10, budget=None) == 1
    assert text_budget_scale(steps_per_epoch=13, epochs=2, n_classes=10, budget=65) == 4
    assert text_budget_scale(steps_per_epoch=3, epochs=50, n_classes=1000, budget=10) == 3  # at most one step/epoch
    fast = CODIVIDE_FAST
    per_epoch = fast["max_steps"] // fast["epochs"]  # the step cap's share: 320 steps per epoch
    assert text_budget_scale(steps_per_epoch=313, epochs=10, n_classes=10, budget=fast["text_budget"]) == 1  # CIFAR
    assert text_budget_scale(steps_per_epoch=per_epoch, epochs=10, n_classes=10, budget=fast["text_budget"]) == 1
    assert text_budget_scale(steps_per_epoch=per_epoch, epochs=10, n_classes=100, budget=fast["text_budget"]) == 10

    images, x = imagenette_feats
    noisy = inject_symmetric(images.labels, images.n_classes, 0.4, seed=5)
    ctx = make_context(images, x, mini_clip, noisy, seed=2)
    params = {**CODIVIDE_FAST, "epochs": 2, "warmup_epochs": 1}
    steps = -(-len(noisy) // 32)
    base = create_detector("codivide", **params).detect(ctx)
    capped = create_detector("codivide", **{**params, "text_budget": 2 * steps * images.n_classes // 4}).detect(ctx)
    assert (base.info["text_scale"], base.info["batch_size"], base.info["lr"]) == (1, 32, 0.002)
    assert (capped.info["text_scale"], capped.info["batch_size"]) == (4, 128)
    assert capped.info["lr"] == pytest.approx(0.008)
    # the same rows are seen in each epoch
    assert all(h[k]["n"] == len(noisy) for h in capped.info["history"] for k in ("net1", "net2"))
    assert not np.array_equal(base.p_clean, capped.p_clean)
    rows = {r["name"]: r for r in capped.info["recipe"]}
    assert rows["text_budget"]["origin"] == "user" and rows["text_budget"]["paper"] is None
    for res in (base, capped):
        f1, auroc = scores(res, noisy != images.labels)
        assert auroc > 0.95 and f1 > 0.85, (auroc, f1)


def test_flip_shift_view_is_a_flip_and_a_translation(cache40):
    """The papers' weak view: random horizontal flip + random translation by up to 1/8 of the side (zero padding);
    the strong view adds RandAugment on top."""
    torch.manual_seed(0)
    img = cache40[3]
    view = weak_view("flip_shift", 40, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    ref = img.float() / 255
    found_shift = False
    for _ in range(8):
        out = view(img)
        assert out.shape == (3, 40, 40)
        matched = False
        for cand in (ref, ref.flip(-1)):
            for dy in range(-5, 6):
                for dx in range(-5, 6):
                    a = out[:, max(0, dy):40 + min(0, dy), max(0, dx):40 + min(0, dx)]
                    b = cand[:, max(0, -dy):40 + min(0, -dy), max(0, -dx):40 + min(0, -dx)]
                    if torch.allclose(a, b, atol=1e-6):
                        matched, found_shift = True, found_shift or (dx, dy) != (0, 0)
        assert matched  # every view is the image, maybe flipped, moved by at most 5 = 40 // 8 pixels
    assert found_shift
    strong = strong_view("flip_shift", 40, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))(img)
    assert strong.shape == (3, 40, 40) and torch.isfinite(strong).all()


# ---------------------------------------------------------------------------------------------------
# image-level MaPLe on a tiny ViT CLIP


def test_image_level_maple_runs_end_to_end_and_trains_both_networks(imagenette_small, tmp_path):
    from labelsieve.data import load_images

    images = load_images(*imagenette_small)
    order = np.concatenate([np.flatnonzero(images.labels == c)[:7] for c in range(images.n_classes)])[:64]
    sub = images.subset(order)
    noisy = inject_symmetric(sub.labels, sub.n_classes, 0.4, seed=0)
    enc = tiny_vit_encoder()
    ctx = make_context(sub, None, enc, noisy)
    ctx.cache_dir = tmp_path
    det = create_detector("codivide", frozen=False, epochs=2, warmup_epochs=1, batch_size=16, lr=0.05,
                          num_workers=0, finetune_encoders=False)  # the prompts alone (the next test: the encoders)
    assert det.resolve_path(ctx) == ("maple_images", "requested (frozen=False)")
    path, why = create_detector("codivide").resolve_path(ctx)  # the default, auto: a ViT, but no GPU
    assert path == "text_only_features" and "no GPU" in why
    res = det.detect(ctx)
    assert res.p_clean.shape == (64,) and res.probs.shape == (64, sub.n_classes)
    assert np.all(np.isfinite(res.p_clean)) and np.all(np.isfinite(res.probs))
    np.testing.assert_allclose(res.probs.sum(1), 1.0, atol=1e-6)
    info = res.info
    assert info["path"] == "maple_images" and info["depth"] == 3 and info["tower"] == "VisionTransformer"
    assert [h["phase"] for h in info["history"]] == ["warmup", "codivide"]
    assert all(np.isfinite(info["history"][1][k]["loss"]) for k in ("net1", "net2"))
    # the CLIP weights stayed frozen during training and get their requires_grad flags back
    assert all(p.requires_grad for p in enc.model.parameters())
    # every learned tensor of both networks moved away from its (seeded) initial value
    init = det.build_networks(ctx, "maple_images")
    for trained, start in zip(det.networks_, init, strict=True):
        names = [n for n, _ in trained.named_parameters()]
        assert any(n.startswith("prompts.compound_proj") for n in names) and "prompts.proj.weight" in names
        start_sd = dict(start.named_parameters())
        for name, p in trained.named_parameters():
            assert not torch.equal(p.detach(), start_sd[name].detach()), name
    assert not torch.equal(det.networks_[0].prompts.compound_text[0], det.networks_[1].prompts.compound_text[0])
    # the two networks split the data differently, and each trained on the other's split
    p1, p2 = res.columns["p_clean_net1"], res.columns["p_clean_net2"]
    assert not np.allclose(p1, p2)
    e = info["history"][1]
    assert e["net1"]["n_labelled"] == e["net2"]["n_selected"] and e["net2"]["n_labelled"] == e["net1"]["n_selected"]
    assert e["split_agreement"] < 1.0 or e["net1"]["n_selected"] != e["net2"]["n_selected"]


def test_finetune_encoders_trains_a_copy_of_both_towers_per_network(imagenette_small, tmp_path):
    from labelsieve.data import load_images

    images = load_images(*imagenette_small)
    sub = images.subset(np.concatenate([np.flatnonzero(images.labels == c)[:3] for c in range(images.n_classes)]))
    enc = tiny_vit_encoder()
    ctx = make_context(sub, None, enc, sub.labels)
    ctx.cache_dir = tmp_path
    before = {k: v.clone() for k, v in enc.model.state_dict().items()}
    det = create_detector("codivide", frozen=False, epochs=1, batch_size=10, encoder_lr=0.01, num_workers=0)
    assert det.finetune_encoders is True  # the paper recipe on the image path
    res = det.detect(ctx)
    assert res.info["finetune_encoders"] is True
    assert {r["name"]: r for r in res.info["recipe"]}["finetune_encoders"]["origin"] == "paper"
    for k, v in enc.model.state_dict().items():
        assert torch.equal(before[k], v), k  # the caller's model is untouched
    n1, n2 = det.networks_
    assert n1.encoders is not None and n1.encoders is not n2.encoders
    for net in (n1, n2):
        moved = {name for name, p in net.encoders.named_parameters() if not torch.equal(p.detach(), before[name])}
        assert any(n.startswith("visual.transformer") for n in moved)  # the image encoder trained
        assert any(n.startswith("transformer.") for n in moved)  # and the text encoder
        assert "logit_scale" not in moved
