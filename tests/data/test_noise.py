"""Synthetic label noise: exact counts on the real CIFAR-10 labels, Xia et al.'s instance-dependent
noise (rate and feature dependence), pixel features of real images, CSV writing, mapping parsing."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from labelsieve import testing
from labelsieve.core.errors import DataError, ParameterError
from labelsieve.data import load_images
from labelsieve.data.noise import (
    image_pixel_features,
    instance_noise,
    make_noisy_labels,
    pair_noise,
    parse_mapping,
    symmetric_noise,
    write_noisy_csv,
)


@pytest.fixture(scope="module")
def cifar_labels(shared):
    """The 50,000 CIFAR-10 train labels as indices (sorted class names)."""
    rows = testing.read_csv_rows(shared / "data" / "cifar10" / "train.csv")
    classes = sorted({r["label"] for r in rows})
    return np.array([classes.index(r["label"]) for r in rows]), classes


@pytest.fixture(scope="module")
def cifar_images(cifar_small):
    return load_images(*cifar_small)


@pytest.mark.parametrize("rate", [0.0, 0.2, 0.5, 1.0])
def test_symmetric_noise_exact_count_and_uniform_targets(cifar_labels, rate):
    labels, _ = cifar_labels
    before = labels.copy()
    new = symmetric_noise(labels, 10, rate=rate, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(labels, before)  # input untouched
    flipped = new != labels
    assert flipped.sum() == round(rate * labels.size)
    assert new.dtype == np.int64 and new.min() >= 0 and new.max() <= 9
    if rate >= 0.2:
        # each flip goes to one of the 9 other classes uniformly: offset (new - old) % 10 in 1..9
        offsets = np.bincount((new[flipped] - labels[flipped]) % 10, minlength=10)
        assert offsets[0] == 0
        share = offsets[1:] / flipped.sum()
        assert np.abs(share - 1 / 9).max() < 0.01
        # and which samples flip does not depend on the class
        per_class = np.array([flipped[labels == c].mean() for c in range(10)])
        assert np.abs(per_class - rate).max() < 0.03


def test_symmetric_noise_is_seeded():
    labels = np.arange(1000) % 7
    a = symmetric_noise(labels, 7, rate=0.3, rng=np.random.default_rng(5))
    b = symmetric_noise(labels, 7, rate=0.3, rng=np.random.default_rng(5))
    c = symmetric_noise(labels, 7, rate=0.3, rng=np.random.default_rng(6))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_pair_noise_default_and_mapping(cifar_labels):
    labels, _ = cifar_labels
    new = pair_noise(labels, 10, rate=0.35, rng=np.random.default_rng(0))
    flipped = new != labels
    assert flipped.sum() == round(0.35 * labels.size)
    np.testing.assert_array_equal(new[flipped], (labels[flipped] + 1) % 10)
    # a user mapping: only classes 3 -> 5 and 5 -> 3 flip; 35 % of those 10,000 samples
    new2 = pair_noise(labels, 10, rate=0.35, rng=np.random.default_rng(0), mapping={3: 5, 5: 3})
    flipped2 = new2 != labels
    assert flipped2.sum() == round(0.35 * 10_000)
    assert set(np.unique(labels[flipped2])) == {3, 5}
    np.testing.assert_array_equal(new2[flipped2], np.where(labels[flipped2] == 3, 5, 3))
    with pytest.raises(ParameterError, match="mapping"):
        pair_noise(labels, 10, rate=0.1, rng=np.random.default_rng(0), mapping={3: 3})
    with pytest.raises(ParameterError, match="mapping"):
        pair_noise(labels, 10, rate=0.1, rng=np.random.default_rng(0), mapping={3: 10})


def test_noise_parameter_validation():
    labels = np.array([0, 1, 2])
    with pytest.raises(ParameterError, match="The 'rate' parameter of symmetric_noise must be a float in"):
        symmetric_noise(labels, 3, rate=1.5, rng=np.random.default_rng(0))
    with pytest.raises(ParameterError, match="rng"):
        symmetric_noise(labels, 3, rate=0.5, rng=0)
    with pytest.raises(ParameterError, match="n_classes"):
        symmetric_noise(labels, 1, rate=0.5, rng=np.random.default_rng(0))
    with pytest.raises(ParameterError, match=r"class indices in \[0, 1\]"):
        pair_noise(labels, 2, rate=0.5, rng=np.random.default_rng(0))
    with pytest.raises(ParameterError, match="features"):
        instance_noise(labels, np.zeros((2, 4)), 3, rate=0.2, rng=np.random.default_rng(0))


@pytest.mark.parametrize(("rate", "expected"), [(0.2, 0.2055), (0.4, 0.4)])
def test_instance_noise_rate(cifar_labels, rate, expected):
    """Realised rate = mean of N(rate, 0.1^2) truncated to [0, 1] (0.2055 for 0.2), within ±0.03 of rate."""
    labels, _ = cifar_labels
    labels = labels[:4000]
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(4000, 64)) + 2.0 * np.eye(10, 64)[labels]
    new = instance_noise(labels, feats, 10, rate=rate, rng=np.random.default_rng(1))
    realised = (new != labels).mean()
    assert abs(realised - rate) < 0.03
    assert abs(realised - expected) < 0.02
    assert new.min() >= 0 and new.max() <= 9
    assert instance_noise(labels, feats, 10, rate=0.0, rng=np.random.default_rng(1)).tolist() == labels.tolist()


def test_instance_noise_depends_on_the_features():
    """Identical features pick wrong classes from one fixed softmax (concentrated); diverse features
    spread over all wrong classes; the same seed gives the same labels."""
    labels = np.zeros(3000, dtype=np.int64)
    same = np.tile(np.random.default_rng(0).normal(size=(1, 32)), (3000, 1))
    diverse = np.random.default_rng(1).normal(size=(3000, 32))
    a = instance_noise(labels, same, 10, rate=0.5, rng=np.random.default_rng(2))
    b = instance_noise(labels, diverse, 10, rate=0.5, rng=np.random.default_rng(2))
    share_same = np.bincount(a[a != 0], minlength=10)[1:] / (a != 0).sum()
    share_div = np.bincount(b[b != 0], minlength=10)[1:] / (b != 0).sum()
    assert share_same.max() > 0.3  # one softmax over 9 N(0,1) scores is peaked
    assert share_div.max() < 0.16  # averaged over many projections: near uniform (1/9 = 0.111)
    np.testing.assert_array_equal(a, instance_noise(labels, same, 10, rate=0.5, rng=np.random.default_rng(2)))
    # feature scale does not matter (rows are L2-normalised); zero rows give uniform wrong classes
    np.testing.assert_array_equal(a, instance_noise(labels, same * 7.0, 10, rate=0.5,
                                                    rng=np.random.default_rng(2)))
    z = instance_noise(labels, np.zeros((3000, 32)), 10, rate=0.5, rng=np.random.default_rng(2))
    share_zero = np.bincount(z[z != 0], minlength=10)[1:] / (z != 0).sum()
    assert np.abs(share_zero - 1 / 9).max() < 0.03


def test_image_pixel_features_real_images(cifar_images, tmp_path):
    from PIL import Image

    imgs = cifar_images.subset(range(40))
    feats = image_pixel_features(imgs, size=8)
    assert feats.shape == (40, 192) and feats.dtype == np.float32
    assert feats.min() >= 0.0 and feats.max() <= 1.0 and feats.std() > 0.05
    with Image.open(imgs.abspath(3)) as im:
        ref = np.asarray(im.convert("RGB").resize((8, 8), Image.Resampling.BOX), dtype=np.float32) / 255
    np.testing.assert_allclose(feats[3], ref.reshape(-1), atol=1e-6)
    # an unreadable file gives a zero row
    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    (root / "a" / "bad.jpg").write_bytes(b"not an image")
    Image.new("RGB", (20, 10), (255, 0, 0)).save(root / "b" / "red.png")
    f2 = image_pixel_features(load_images(root), size=4)
    assert f2.shape == (2, 48)
    assert np.all(f2[0] == 0)
    np.testing.assert_allclose(f2[1].reshape(4, 4, 3)[..., 0], 1.0)


@pytest.mark.parametrize("kind", ["symmetric", "pair", "instance"])
def test_make_noisy_labels_on_real_images(cifar_images, kind):
    new = make_noisy_labels(cifar_images, kind=kind, rate=0.4, seed=3)
    assert new.shape == (600,) and new.dtype == np.int64
    rate = (new != cifar_images.labels).mean()
    if kind == "instance":
        assert abs(rate - 0.4) < 0.05
    else:
        assert rate == pytest.approx(0.4)
    np.testing.assert_array_equal(new, make_noisy_labels(cifar_images, kind=kind, rate=0.4, seed=3))


def test_make_noisy_labels_mapping_by_class_name(cifar_images):
    new = make_noisy_labels(cifar_images, kind="pair", rate=0.5, seed=0, mapping={"cat": "dog"})
    classes = cifar_images.classes
    old_names = np.array(cifar_images.label_names())
    new_names = np.array(cifar_images.label_names(new))
    changed = old_names != new_names
    assert changed.sum() == 30  # half of the 60 cats
    assert set(old_names[changed]) == {"cat"} and set(new_names[changed]) == {"dog"}
    with pytest.raises(ParameterError, match="'kat'"):
        make_noisy_labels(cifar_images, kind="pair", rate=0.5, seed=0, mapping={"kat": "dog"})
    with pytest.raises(ParameterError, match="pair noise only"):
        make_noisy_labels(cifar_images, kind="symmetric", rate=0.5, seed=0, mapping={"cat": "dog"})
    with pytest.raises(ParameterError, match="'kind' parameter of make_noisy_labels"):
        make_noisy_labels(cifar_images, kind="asym", rate=0.5, seed=0)
    # model features can replace pixels for instance noise
    feats = np.random.default_rng(0).normal(size=(600, 16))
    inst = make_noisy_labels(cifar_images, kind="instance", rate=0.3, seed=0, features=feats)
    assert abs((inst != cifar_images.labels).mean() - 0.3) < 0.05
    assert len(classes) == 10


def test_write_noisy_csv_round_trip(cifar_images, tmp_path):
    new = make_noisy_labels(cifar_images, kind="symmetric", rate=0.25, seed=1)
    out = tmp_path / "sub" / "noisy.csv"
    out.parent.mkdir()
    out.write_text("stale\n")
    assert write_noisy_csv(cifar_images, new, out) == out
    rows = testing.read_csv_rows(out)
    assert list(rows[0]) == ["path", "label", "true_label"]
    assert [r["path"] for r in rows] == cifar_images.paths
    assert [r["true_label"] for r in rows] == cifar_images.label_names()
    assert [r["label"] for r in rows] == cifar_images.label_names(new)
    assert sum(r["label"] != r["true_label"] for r in rows) == 150
    assert sorted(p.name for p in out.parent.iterdir()) == ["noisy.csv"]  # no temp file left
    # the written file loads back as a labelled collection with the noisy labels
    back = load_images(cifar_images.root, out)
    np.testing.assert_array_equal(back.labels, new)
    with pytest.raises(ParameterError, match="new_labels"):
        write_noisy_csv(cifar_images, new[:5], out)


def test_parse_mapping(tmp_path):
    assert parse_mapping("cat:dog, truck : automobile") == {"cat": "dog", "truck": "automobile"}
    f = tmp_path / "map.csv"
    f.write_text("from,to\ncat,dog\n\nbird,airplane\n")
    assert parse_mapping(f) == {"cat": "dog", "bird": "airplane"}
    assert parse_mapping(str(f)) == {"cat": "dog", "bird": "airplane"}
    g = tmp_path / "nohead.csv"
    with open(g, "w", newline="") as fh:
        csv.writer(fh).writerows([["a, b", "c"]])
    assert parse_mapping(g) == {"a, b": "c"}
    with pytest.raises(ParameterError, match="'cat-dog'"):
        parse_mapping("cat-dog")
    with pytest.raises(ParameterError, match="mapped to itself"):
        parse_mapping("cat:cat")
    with pytest.raises(ParameterError, match="mapped twice"):
        parse_mapping("cat:dog,cat:bird")
    with pytest.raises(ParameterError, match="empty"):
        parse_mapping("  ")
    with pytest.raises(DataError, match="not found"):
        parse_mapping(tmp_path / "missing.csv")
    (tmp_path / "bad.csv").write_text("cat,dog,bird\n")
    with pytest.raises(DataError, match="line 1"):
        parse_mapping(tmp_path / "bad.csv")
