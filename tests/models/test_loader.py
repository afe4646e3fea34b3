"""labelsieve.models.loader: one parser for every model name, one meaning of ``pretrained``."""

from __future__ import annotations

import json

import open_clip
import pytest
import timm

from labelsieve.core.errors import ModelError
from labelsieve.models.classifiers import FALLBACK_DEFAULTS, TRAIN_DEFAULTS, train_defaults
from labelsieve.models.encoders import create_encoder
from labelsieve.models.loader import MODEL_ALIASES, ModelSpec, parse_model


def test_names_resolve_to_one_family_and_pretrained_has_one_meaning(tmp_path, mini_clip_dir, lite0_file):
    # the user's default model: open_clip ViT-B-16 with its default openai weights (nothing downloaded to parse)
    assert parse_model("ViT-B-16") == ModelSpec("open_clip", "ViT-B-16", "ViT-B-16", "tag", "openai")
    assert parse_model("ViT-B-16", "laion2b_s34b_b88k").tag == "laion2b_s34b_b88k"
    assert parse_model("ViT-B-16", "none").weights == "none"
    local = parse_model(str(mini_clip_dir))
    assert (local.family, local.weights, local.local_dir) == ("open_clip", "folder", mini_clip_dir.resolve())
    assert parse_model(str(mini_clip_dir), "none").weights == "none"
    with pytest.raises(ModelError, match="holds its own weights"):
        parse_model(str(mini_clip_dir), str(lite0_file))
    # timm: default weights unless 'none'; a tag in the name or in pretrained; a file
    assert parse_model("tf_efficientnet_lite0") == ModelSpec("timm", "tf_efficientnet_lite0", "tf_efficientnet_lite0",
                                                              "default")
    assert parse_model("resnet50.a1_in1k").timm_name == "resnet50.a1_in1k"
    assert parse_model("resnet50", "a1_in1k").timm_name == "resnet50.a1_in1k"
    assert parse_model("lite0", "none").weights == "none"
    assert parse_model("timm:convnext_tiny").family == "timm"
    f = parse_model("lite0", str(lite0_file))
    assert (f.weights, f.file) == ("file", str(lite0_file.resolve()))
    with pytest.raises(ModelError, match="Weight file not found"):
        parse_model("lite0", str(tmp_path / "nope.safetensors"))
    with pytest.raises(ModelError, match="Did you mean: convnext_tiny"):
        parse_model("convnext_tinny")
    with pytest.raises(ModelError, match="not an open_clip model folder"):
        parse_model(str(tmp_path))


def test_aliases_and_paper_defaults():
    assert MODEL_ALIASES["convnext_t"] == "convnext_tiny" and MODEL_ALIASES["vit_b16"] == "vit_base_patch16_224"
    assert MODEL_ALIASES["mae_vit_base"] == "vit_base_patch16_224.mae" and MODEL_ALIASES["resnet50"] == "resnet50"
    for alias, name in MODEL_ALIASES.items():
        assert parse_model(alias).timm_name == name and timm.is_model(name.split(".")[0])
    # DEFT's phase-2 settings per backbone (authors' main_phase2.py / config/FFT).
    want = {"resnet50": ("adamw", 1e-3, 1e-5), "convnext_t": ("adamw", 1e-4, 1e-4), "vit_b16": ("sgd", 1e-2, 1e-5),
            "mae_vit_base": ("adamw", 1e-4, 1e-3), "ViT-B-16": ("sgd", 5e-4, 5e-4)}
    for name, (opt, lr, wd) in want.items():
        d = train_defaults(parse_model(name))
        assert (d["optimizer"], d["lr"], d["weight_decay"], d["batch_size"], d["epochs"]) == (opt, lr, wd, 64, 10)
    assert train_defaults(parse_model("vit"))["key"] == "vit_base_patch16_224"
    assert TRAIN_DEFAULTS["clip"]["momentum"] == 0.9
    assert train_defaults(parse_model("mae"))["key"] == "vit_base_patch16_224.mae"
    assert train_defaults(parse_model("tf_efficientnet_lite0"))["source"] == FALLBACK_DEFAULTS["source"]


def test_open_clip_name_with_local_weight_file(tmp_path, mini_clip_dir):
    """The normal open_clip path (architecture name + --pretrained FILE) — how ViT-B-16/openai loads —
    tested with local weights registered under an architecture name."""
    cfg = json.loads((mini_clip_dir / "open_clip_config.json").read_text())
    (tmp_path / "MiniCLIP-test.json").write_text(json.dumps(cfg["model_cfg"]))
    open_clip.add_model_config(tmp_path / "MiniCLIP-test.json")
    enc = create_encoder("MiniCLIP-test", pretrained=str(mini_clip_dir / "open_clip_model.safetensors"))
    ref = create_encoder(str(mini_clip_dir), pretrained=None)
    t1 = enc.encode_text(["a photo of a church."])
    t2 = ref.encode_text(["a photo of a church."])
    assert float((t1 - t2).abs().max()) < 1e-4
    with pytest.raises(ModelError, match="Weight file not found"):
        create_encoder("MiniCLIP-test", pretrained=str(tmp_path / "nope.safetensors"))


def test_swap_the_model_loader_recipe(nette, tmp_path):
    """docs/architecture.md, "Swap the model loader": a model labelsieve cannot name, wrapped in an Encoder, runs
    through the whole audit path (feature store, detector, audit table) without touching the loader."""
    import numpy as np
    import torch
    from helpers import tiny_clip

    from labelsieve.api import run_detector
    from labelsieve.models.encoders import Encoder

    model = tiny_clip(0)
    enc = Encoder(kind="open_clip", name="my-own-clip", pretrained=None, model=model,
                  preprocess=open_clip.image_transform(64, is_train=False),
                  tokenizer=open_clip.get_tokenizer("ViT-B-32"), mean=open_clip.OPENAI_DATASET_MEAN,
                  std=open_clip.OPENAI_DATASET_STD, image_size=64, embed_dim=64, device=torch.device("cpu"),
                  identity={"kind": "custom", "name": "my-own-clip"})
    sub = nette.subset(np.arange(0, 400, 20))
    audit = run_detector(sub, enc, method="label_match", cache_dir=tmp_path, progress=False, num_workers=0)
    assert len(audit.table) == 20 and audit.table["p_clean"].between(0, 1).all()
    assert audit.summary["model"]["name"] == "my-own-clip" and audit.summary["n_extracted"] == 20
