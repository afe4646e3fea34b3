"""TURN: GCE linear probe + per-class GMM selection on real mini-CLIP features, and full fine-tuning of
the mini CLIP's image tower on real Imagenette images through the shared engine."""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
from helpers import inject_symmetric, make_context, scores
from sklearn.metrics import roc_auc_score

from labelsieve.core.errors import ParameterError
from labelsieve.data import load_images
from labelsieve.detectors import create_detector
from labelsieve.detectors.common.linear_probe import fit_linear_probe
from labelsieve.detectors.common.selection import per_class_gmm_posterior
from labelsieve.detectors.common.tower import (
    TowerClassifier,
    ce_losses,
    evaluate_losses,
    finetune_trainer,
    image_tower,
    prepare_finetune,
)
from labelsieve.detectors.common.views import image_kind, train_view
from labelsieve.detectors.turn import RECIPE


def test_no_finetune_finds_noise_and_is_deterministic(noisy_imagenette, cifar_feats, mini_clip):
    images, x, noisy, truth = noisy_imagenette
    ctx = make_context(images, x, mini_clip, noisy)
    res = create_detector("turn", finetune=False).detect(ctx)
    f1, auroc = scores(res, truth)
    # measured with the paper's probe (Table 8: weight decay 1e-6, batch 128; issue 21): F1 .879, AUROC .909; the
    # earlier labelsieve probe (1e-4, 256) gives .914 / .933 here. The GMM posterior saturates near 0 and 1, so AUROC
    # stays below the loss's own AUROC.
    assert f1 > 0.85 and auroc > 0.88, (f1, auroc)
    assert res.threshold == 0.6 and "GMM" in res.rule
    assert res.probs.shape == (400, 10) and np.allclose(res.probs.sum(1), 1.0)
    json.dumps(res.info)
    again = create_detector("turn", finetune=False).detect(ctx)
    np.testing.assert_array_equal(res.p_clean, again.p_clean)

    cimages, cx = cifar_feats
    cnoisy = inject_symmetric(cimages.labels, cimages.n_classes, 0.3, seed=2)
    cres = create_detector("turn", finetune=False).detect(make_context(cimages, cx, mini_clip, cnoisy))
    f1, auroc = scores(cres, cnoisy != cimages.labels)
    assert f1 > 0.65 and auroc > 0.8, (f1, auroc)  # measured: F1 .768, AUROC .883 (issue 21's probe)


def test_per_class_split_names_its_rules(noisy_imagenette):
    images, x, noisy, _ = noisy_imagenette
    probe = fit_linear_probe(x, noisy, 10, loss="gce", epochs=20)
    losses = ce_losses(probe.logits(x), noisy)
    lab = noisy.copy()
    lab[np.flatnonzero(lab == 3)[3:]] = 4  # class 3 keeps 3 samples: pooled
    losses[lab == 5] = 1.25  # class 5: constant losses
    post, rules = per_class_gmm_posterior(losses, lab, 10, return_rules=True)
    np.testing.assert_array_equal(post, per_class_gmm_posterior(losses, lab, 10))
    assert rules["pooled:gmm"] == [3] and rules["constant"] == [5]
    assert np.all(post[lab == 5] == 1.0)
    assert sorted(sum(rules.values(), [])) == list(range(10))


def test_degenerate_inputs_stay_finite(imagenette_feats, mini_clip):
    """A class with 3 samples that are all wrongly labelled (no clean sample), and all-equal losses."""
    images, x = imagenette_feats
    keep = np.flatnonzero(images.labels != 0)
    sub = images.subset(keep)
    xs = x[keep]
    lab = sub.labels.copy()
    lab[np.flatnonzero(lab == 1)[:3]] = 0  # class 0: three images of class 1
    res = create_detector("turn", finetune=False).detect(make_context(sub, xs, mini_clip, lab))
    assert np.isfinite(res.p_clean).all() and np.isfinite(res.probs).all()
    assert 0 in res.info["final"]["gmm_fallbacks"]["pooled:gmm"]
    assert res.info["final"]["empty_clean_classes"] == [0]
    assert res.is_noisy[lab == 0].all()

    same = np.repeat(x[:1], len(images), axis=0)  # identical features: every loss of a class is equal
    flat = create_detector("turn", finetune=False).detect(make_context(images, same, mini_clip))
    assert np.isfinite(flat.p_clean).all()
    assert set(flat.info["final"]["gmm_fallbacks"]) == {"constant"}
    assert not flat.is_noisy.any()


def test_the_paper_recipe_cannot_drift(noisy_imagenette, mini_clip):
    """TURN's recipe (Table 8's CLIP column, "20 epochs of LP with 4 epochs for FFT", DivideMix's raw GMM posterior,
    A.2.2's augmentation per dataset kind): a labelsieve value coming back as a default fails here, and the probe
    really trains with the recipe's values."""
    rows = {r["name"]: r for r in RECIPE.rows(create_detector("turn").get_params())}
    paper = {"finetune": True, "lp_epochs": 20, "fft_epochs": 4, "lp_lr": 1e-3, "lp_weight_decay": 1e-6,
             "lp_batch_size": 128, "optimizer": "adamw", "lr": 1e-5, "head_lr": None, "weight_decay": 1e-5,
             "batch_size": 128, "tau": 0.6, "q": 0.7, "monotone": False, "augment": "auto"}
    for name, value in paper.items():
        assert rows[name]["value"] == value and rows[name]["origin"] == "paper", name
    for name in ("lp_lr", "lp_weight_decay", "lp_batch_size", "optimizer", "lr", "weight_decay", "batch_size"):
        assert "Table 8" in rows[name]["source"], name
    assert "20 epochs of LP with 4 epochs for FFT" in rows["lp_epochs"]["source"] == rows["fft_epochs"]["source"]
    assert "A.2.2" in rows["augment"]["source"] and "DivideMix" in rows["monotone"]["source"]
    assert not RECIPE.departures(create_detector("turn").get_params())  # every setting with a paper value is it
    images, x, noisy, _ = noisy_imagenette
    lp = create_detector("turn", finetune=False).detect(make_context(images, x, mini_clip, noisy)).info["linear_probe"]
    assert (lp["optimizer"], lp["lr"], lp["weight_decay"], lp["batch_size"], lp["epochs"]) == (
        "adamw", 1e-3, 1e-6, 128, 20)


def test_augmentation_per_dataset_kind(nette, cifar_small, cache40):
    """A.2.2: small CIFAR-like images get the padded shift + flip, photos a random 224 crop of the image resized to
    256 + flip (scaled to the training size)."""
    det = create_detector("turn")
    assert image_kind(nette)[0] == "photo"
    assert det.resolve_augment(make_context(nette, None, None))[0] == "resize_crop"
    cifar = load_images(*cifar_small)
    assert image_kind(cifar) == ("small", 32)
    view, why = det.resolve_augment(make_context(cifar, None, None))
    assert view == "flip_shift" and "32 px" in why
    assert create_detector("turn", augment="rrc").resolve_augment(make_context(cifar, None, None))[0] == "rrc"
    torch.manual_seed(0)
    img = cache40[3]
    out = train_view("resize_crop", 40, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))(img)
    assert out.shape == (3, 40, 40)
    # a crop of the image resized to 46 px: it matches some 40 px window of that resize, maybe flipped
    big = torch.nn.functional.interpolate(img[None].float() / 255, size=(46, 46), mode="bilinear",
                                          antialias=True, align_corners=False)[0]
    best = min(float((out - c[:, dy:dy + 40, dx:dx + 40]).abs().mean())
               for c in (big, big.flip(-1)) for dy in range(7) for dx in range(7))
    assert best < 0.01, best
    with pytest.raises(ParameterError, match="'augment'"):
        create_detector("turn", augment="crop")


def test_parameters_are_validated():
    with pytest.raises(ParameterError, match="'tau' parameter of TurnDetector must be a float in"):
        create_detector("turn", tau=1.5)
    with pytest.raises(ParameterError, match="'fft_epochs'"):
        create_detector("turn", fft_epochs=0)
    with pytest.raises(ParameterError, match="'image_size'"):
        create_detector("turn", image_size=8)
    assert create_detector("turn", epochs=2).fft_epochs == 2  # the CLI's --epochs
    assert create_detector("turn").needs_text is False


@pytest.fixture(scope="module")
def small_imagenette(imagenette_small, imagenette_feats):
    """200 real Imagenette images (20 per class), their mini-CLIP features and 30 % symmetric noise."""
    images, x = imagenette_feats
    full = load_images(*imagenette_small)
    assert full.paths == images.paths
    keep = np.sort(np.concatenate([np.flatnonzero(images.labels == c)[:20] for c in range(10)]))
    sub = full.subset(keep)
    noisy = inject_symmetric(sub.labels, 10, 0.3, seed=1)
    return sub, x[keep], noisy, noisy != sub.labels


def test_full_finetuning_runs_through_the_engine_and_improves(small_imagenette, mini_clip, tmp_path):
    """Two TURN epochs of full fine-tuning at 96 px: the tower trains on the selected subsamples only, the
    encoder is untouched, and the fine-tuned model detects the noise no worse than the step-1 model seen
    at the same image size (the margins below; the numbers in the comments were measured)."""
    sub, xs, noisy, truth = small_imagenette
    ctx = dataclasses.replace(make_context(sub, xs, mini_clip, noisy), cache_dir=tmp_path)
    before = {k: v.clone() for k, v in mini_clip.model.visual.state_dict().items()}
    det = create_detector("turn", fft_epochs=2, image_size=96, batch_size=16)
    res = det.detect(ctx)
    info = res.info
    json.dumps(info)
    assert len(info["history"]) == 2 and info["model"]["tower"] == "open_clip visual"
    assert info["augment"]["view"] == "resize_crop" and "photos" in info["augment"]["reason"]  # A.2.2, photos
    for h in info["history"]:
        assert 0 < h["n_subsample"] <= h["n_clean"] + h["n_borrowed"]
        assert h["n"] in (h["n_subsample"], h["n_subsample"] - 1)  # a last batch of one is dropped
        assert h["n_subsample"] % 10 == 0 and h["images_per_s"] > 0 and h["seconds"] > 0
    assert info["history"][0]["loss_source"].startswith("cached features")
    assert info["fft_train_images"] < 2 * len(sub)  # trained on subsamples, not on everything
    assert np.isfinite(res.p_clean).all() and res.probs.shape == (200, 10)
    for k, v in mini_clip.model.visual.state_dict().items():
        assert torch.equal(before[k], v), k

    # the step-1 model (GCE probe on the frozen tower) evaluated at the same 96 px
    probe = fit_linear_probe(xs, noisy, 10, loss="gce", epochs=20, weight_decay=1e-6, batch_size=128)  # TURN's
    setup = prepare_finetune(ctx, image_size=96, batch_size=16, num_workers=0)
    start = TowerClassifier.from_probe(copy.deepcopy(image_tower(mini_clip)), probe)
    trainer = finetune_trainer(start, lr=1e-3, head_lr=1e-2, momentum=0.9, weight_decay=5e-4, epochs=1,
                               device=torch.device("cpu"), amp="off", progress=False, desc="start")
    losses0, logits0, _ = evaluate_losses(trainer, setup)
    final_losses = ce_losses(np.log(res.probs), noisy)
    auc0, auc1 = roc_auc_score(truth, losses0), roc_auc_score(truth, final_losses)
    acc0, acc1 = (logits0.argmax(1) == sub.labels).mean(), (res.suggested == sub.labels).mean()
    assert auc1 >= auc0 - 0.02 and acc1 >= acc0 - 0.02, (auc0, auc1, acc0, acc1)
    f1, auroc = scores(res, truth)
    # measured: .686 / .788 with the paper's probe (Table 8) and A.2.2's view for photos (issue 21); .77 / .86 before,
    # with labelsieve's earlier probe (weight decay 1e-4, batch 256) and random resized crops
    assert f1 > 0.62 and auroc > 0.74, (f1, auroc)

    again = create_detector("turn", fft_epochs=2, image_size=96, batch_size=16).detect(ctx)
    np.testing.assert_allclose(res.p_clean, again.p_clean, atol=1e-6)



def test_image_only_timm_encoder(imagenette_small, lite0_file, tmp_path):
    """TURN needs no text tower: on a timm encoder the fine-tuned tower is the timm model itself."""
    from labelsieve.features import extract_features
    from labelsieve.models.encoders import create_encoder

    enc = create_encoder("tf_efficientnet_lite0", pretrained=str(lite0_file), device="cpu")
    full = load_images(*imagenette_small)
    images = full.subset(np.concatenate([np.flatnonzero(full.labels == c)[:5] for c in range(10)]))
    feats = extract_features(images, enc, cache_dir=tmp_path, progress=False, num_workers=0)
    ctx = dataclasses.replace(make_context(images, np.asarray(feats.vectors, np.float32), enc), cache_dir=tmp_path)
    res = create_detector("turn", fft_epochs=1, image_size=64, batch_size=8).detect(ctx)
    assert res.info["model"]["tower"] == "timm" and len(res.info["history"]) == 1
    assert np.isfinite(res.p_clean).all() and res.probs.shape == (50, 10)
    # 5 samples per class (< gmm_min_samples = 8): every class is scored by the pooled GMM
    assert sorted(sum(res.info["final"]["gmm_fallbacks"].values(), [])) == list(range(10))
