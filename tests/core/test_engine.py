"""The training engine on real Imagenette images (small and few)."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest
import torch
from helpers import tiny_cnn
from torch import nn

from labelsieve.core.checkpoint import read_state, write_state
from labelsieve.core.engine import Trainer, freeze_batchnorm, make_loader
from labelsieve.core.errors import ParameterError
from labelsieve.core.optim import cosine_schedule, make_optimizer
from labelsieve.core.runtime import resolve_device, seed_everything
from labelsieve.data import load_images
from labelsieve.data.datasets import ImageDataset
from labelsieve.data.imagecache import CachedImageDataset, CachedTwoViewDataset, DecodedImageCache
from labelsieve.data.transforms import eval_transform, strong_transform, train_transform

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


class Interrupted(Exception):
    pass


def split_rows(labels: np.ndarray, per_class_val: int) -> tuple[np.ndarray, np.ndarray]:
    val = np.concatenate([np.nonzero(labels == c)[0][:per_class_val] for c in np.unique(labels)])
    return np.setdiff1d(np.arange(len(labels)), val), np.sort(val)


def test_engine_learns_real_images(nette, cache40, lite0_file):
    """Pretrained EfficientNet-Lite0, full fine-tuning at 32 px (where its ImageNet features are weak): the
    loss falls every epoch and held-out accuracy is far above chance (0.10)."""
    from labelsieve.models.classifiers import create_classifier

    seed_everything(0)
    model, data = create_classifier("tf_efficientnet_lite0", num_classes=10, pretrained=str(lite0_file),
                                    image_size=32)
    tr_rows, va_rows = split_rows(nette.labels, 10)  # 300 train, 100 held out
    kw = {"mean": data.mean, "std": data.std}
    train_ds = CachedImageDataset(cache40, tr_rows, nette.labels, train_transform(32, scale=(0.35, 1), **kw))
    val_loader = make_loader(CachedImageDataset(cache40, va_rows, nette.labels, eval_transform(32, **kw)),
                             batch_size=100)
    epochs = 3
    opt = make_optimizer(model, name="adamw", lr=1e-3, weight_decay=1e-5)
    sched = cosine_schedule(opt, epochs=epochs, steps_per_epoch=10)
    trainer = Trainer(model, optimizer=opt, scheduler=sched, device="cpu", progress=False)
    hist = trainer.fit(lambda e: make_loader(train_ds, batch_size=30, shuffle=True, seed=e), epochs=epochs,
                       val_loader=val_loader)
    losses = [h["loss"] for h in hist]
    print("losses", losses, "val acc", [h["val_acc"] for h in hist], "img/s", [h["images_per_s"] for h in hist])
    # Measured: losses 2.25, 2.00, 1.86; held-out accuracy 0.27, 0.37, 0.38 (chance 0.10), ~70 img/s.
    assert losses[0] > losses[1] > losses[2] and losses[-1] < 0.9 * losses[0]
    assert hist[-1]["n"] == 300 and hist[-1]["images_per_s"] > 0
    assert trainer.best_val_acc >= 0.3
    assert trainer.global_step == 30 and trainer.lr == pytest.approx(0.0, abs=1e-9)
    ev = trainer.evaluate(val_loader)
    assert ev["logits"].shape == (100, 10) and ev["losses"].shape == (100,) and np.isfinite(ev["losses"]).all()
    assert ev["acc"] == pytest.approx(hist[-1]["val_acc"])


def test_freeze_bn_keeps_running_statistics_and_trains_affine_weights(nette, cache40):
    ds = CachedImageDataset(cache40, np.arange(0, 400, 8), nette.labels, train_transform(24, mean=MEAN, std=STD))
    runs = {}
    for freeze in (False, True):
        seed_everything(0)
        model = tiny_cnn()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        opt = make_optimizer(model, name="sgd", lr=0.05, weight_decay=0.0)
        trainer = Trainer(model, optimizer=opt, device="cpu", progress=False, freeze_bn=freeze)
        trainer.fit(lambda e, ds=ds: make_loader(ds, batch_size=25, shuffle=True, seed=e), epochs=1)
        after = model.state_dict()
        runs[freeze] = {k: not torch.equal(before[k], after[k]) for k in before}
    assert runs[False]["1.running_mean"] and runs[False]["1.num_batches_tracked"]
    assert not runs[True]["1.running_mean"] and not runs[True]["4.running_var"]
    assert not runs[True]["1.num_batches_tracked"]
    assert runs[True]["1.weight"] and runs[True]["0.weight"]  # BN affine and conv weights still train
    assert freeze_batchnorm(tiny_cnn().train()) == 2


def _resume_run(cache40, labels, ckpt, *, stop_at: int | None, key: str = "k"):
    seed_everything(1)
    model = tiny_cnn()
    ds = CachedImageDataset(cache40, np.arange(0, 400, 4), labels, train_transform(24, mean=MEAN, std=STD))
    loader = torch.utils.data.DataLoader(ds, batch_size=25, shuffle=True)  # shuffling from the global RNG
    val = make_loader(CachedImageDataset(cache40, np.arange(1, 400, 8), labels, eval_transform(24, mean=MEAN, std=STD)),
                      batch_size=50)
    opt = make_optimizer(model, name="sgd", lr=0.05, weight_decay=5e-4)
    sched = cosine_schedule(opt, epochs=3, steps_per_epoch=len(loader), warmup_epochs=1)
    trainer = Trainer(model, optimizer=opt, scheduler=sched, device="cpu", progress=False)

    def on_end(tr, epoch, record):
        tr.state["seen"] = tr.state.get("seen", 0) + record["n"]
        if stop_at is not None and epoch == stop_at:
            raise Interrupted

    hist = trainer.fit(loader, epochs=3, val_loader=val, checkpoint_path=ckpt, checkpoint_key=key,
                       on_epoch_end=on_end)
    return trainer, hist


def test_checkpoint_resume_equals_uninterrupted_run(nette, cache40, tmp_path):
    full, hist_full = _resume_run(cache40, nette.labels, None, stop_at=None)
    ckpt = tmp_path / "ckpt.pt"
    with pytest.raises(Interrupted):
        _resume_run(cache40, nette.labels, ckpt, stop_at=1)  # epoch 0 checkpointed, epoch 1 lost
    assert ckpt.exists()
    resumed, hist_res = _resume_run(cache40, nette.labels, ckpt, stop_at=None)
    assert [h["epoch"] for h in hist_res] == [0, 1, 2]
    for a, b in zip(hist_full, hist_res, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["val_acc"] == b["val_acc"]
    for (k, v), w in zip(full.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.allclose(v.float(), w.float(), atol=1e-5), k
    assert resumed.state["seen"] == full.state["seen"] == 300
    assert resumed.best_epoch == full.best_epoch and resumed.global_step == full.global_step == 12
    # A finished checkpoint resumes to "nothing left to do" and returns its history ...
    done, hist_done = _resume_run(cache40, nette.labels, ckpt, stop_at=None)
    assert [h["loss"] for h in hist_done] == [h["loss"] for h in hist_res]
    # ... while a checkpoint of another configuration (key) is ignored: the run starts over.
    fresh, hist_fresh = _resume_run(cache40, nette.labels, ckpt, stop_at=None, key="other")
    assert [h["loss"] for h in hist_fresh] == pytest.approx([h["loss"] for h in hist_full], rel=1e-5)
    assert read_state(ckpt)["key"] == "other"


def test_checkpoint_state_round_trips_without_pickle(tmp_path):
    """Everything a checkpoint holds (AdamW's tensors, tuples, int dict keys, NaN, numpy RNG state) comes back
    equal from the safetensors + JSON file, which holds no pickle."""
    import random

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    obj = {"opt": opt.state_dict(), "rng": (random.getstate(), np.random.get_state()), "nan": float("nan"),
           "inf": -float("inf"), 3: "int key", "arr": np.arange(6, dtype=np.uint32).reshape(2, 3), "none": None,
           "tied": [model.weight, model.weight]}
    write_state(obj, tmp_path / "s.safetensors")
    assert (tmp_path / "s.safetensors").read_bytes()[8:9] == b"{"  # a safetensors header, not a pickle
    back = read_state(tmp_path / "s.safetensors")
    assert back[3] == "int key" and back["none"] is None and np.isnan(back["nan"]) and back["inf"] == -float("inf")
    assert back["rng"][0] == obj["rng"][0]
    assert back["rng"][1][0] == "MT19937" and np.array_equal(back["rng"][1][1], obj["rng"][1][1])
    assert back["arr"].dtype == np.uint32 and back["arr"].tolist() == [[0, 1, 2], [3, 4, 5]]
    st = back["opt"]["state"][0]
    assert torch.equal(st["exp_avg"], obj["opt"]["state"][0]["exp_avg"]) and back["opt"]["param_groups"][0]["betas"] \
        == obj["opt"]["param_groups"][0]["betas"]
    opt2 = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=0.1)
    opt2.load_state_dict(back["opt"])  # what a resume does
    with pytest.raises(TypeError, match="cannot hold"):
        write_state({"f": lambda: 0}, tmp_path / "x.safetensors")


def test_custom_step_fn_fixmatch_style(nette, cache40):
    seed_everything(0)
    model = tiny_cnn()
    ds = CachedTwoViewDataset(cache40, np.arange(0, 400, 10), nette.labels, train_transform(24, mean=MEAN, std=STD),
                              strong=strong_transform(24, mean=MEAN, std=STD))
    calls = []

    def step(trainer: Trainer, batch):
        weak, strong, y, idx, ok = batch
        calls.append(len(y))
        logits_w = trainer.model(weak[ok])
        with torch.no_grad():
            pseudo = logits_w.softmax(1)
            conf, guess = pseudo.max(1)
        logits_s = trainer.model(strong[ok])
        mask = (conf >= 0.0).float()  # threshold 0 so the unsupervised term is active on a fresh model
        loss = nn.functional.cross_entropy(logits_w, y[ok]) + (
            nn.functional.cross_entropy(logits_s, guess, reduction="none") * mask).mean()
        return loss, int((logits_w.argmax(1) == y[ok]).sum()), int(ok.sum())

    before = [p.detach().clone() for p in model.parameters()]
    opt = make_optimizer(model, name="sgd", lr=0.05)
    trainer = Trainer(model, optimizer=opt, device="cpu", progress=True, grad_clip=1.0)  # progress bar renders
    rec = trainer.train_epoch(make_loader(ds, batch_size=16, shuffle=True), epoch=0, step_fn=step)
    assert calls == [16, 16, 8] and rec["n"] == 40 and np.isfinite(rec["loss"]) and 0 <= rec["acc"] <= 1
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_bad_images_are_masked(nette, tmp_path):
    """A zero-byte and a corrupt file are left out of training, prediction and evaluation."""
    root = tmp_path / "imgs"
    root.mkdir()
    rows = []
    for i in range(0, 400, 20):  # 20 good images, 2 per class
        name = f"img{i}.jpg"
        shutil.copy(nette.abspath(i), root / name)
        rows.append((name, nette.classes[nette.labels[i]]))
    (root / "zero.jpg").write_bytes(b"")
    (root / "trunc.jpg").write_bytes(nette.abspath(0).read_bytes()[:300])
    rows.insert(3, ("zero.jpg", rows[0][1]))
    rows.insert(10, ("trunc.jpg", rows[1][1]))
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "label"), *rows])
    imgs = load_images(root, tmp_path / "labels.csv")
    bad = {3, 10}
    cache = DecodedImageCache.from_images(imgs, size=28, cache_dir=tmp_path / "cache", num_workers=0, progress=False)
    assert set(np.nonzero(~cache.ok)[0]) == bad
    seed_everything(0)
    model = tiny_cnn()
    trainer = Trainer(model, optimizer=make_optimizer(model, name="sgd", lr=0.01), device="cpu", progress=False)
    ds = CachedImageDataset(cache, None, imgs.labels, train_transform(24, mean=MEAN, std=STD))
    rec = trainer.train_epoch(make_loader(ds, batch_size=8, shuffle=True), epoch=0)
    assert rec["n"] == 20 and np.isfinite(rec["loss"])
    # All-bad batch: skipped, no crash.
    only_bad = CachedImageDataset(cache, sorted(bad), imgs.labels, train_transform(24, mean=MEAN, std=STD))
    assert trainer.train_epoch(make_loader(only_bad, batch_size=2), epoch=1)["n"] == 0
    # The PIL-decoding dataset of labelsieve.data works with the same engine, in a shuffled order.
    from torchvision import transforms as T

    tf = T.Compose([T.Resize(24), T.CenterCrop(24), T.ToTensor()])
    pil_ds = ImageDataset(imgs, tf, image_shape=(3, 24, 24), index=np.arange(len(imgs))[::-1])
    logits, ok = trainer.predict(make_loader(pil_ds, batch_size=5, shuffle=True, seed=3))
    assert set(np.nonzero(~ok)[0]) == {len(imgs) - 1 - b for b in bad}
    assert not logits[~ok].any() and np.isfinite(logits).all()
    model.eval()
    with torch.no_grad():
        direct = model(torch.stack([pil_ds[k][0] for k in range(len(pil_ds)) if ok[k]])).numpy()
    assert np.allclose(logits[ok], direct, atol=1e-5)
    ev = trainer.evaluate(make_loader(pil_ds, batch_size=5))
    assert np.isnan(ev["losses"][~ev["ok"]]).all() and np.isfinite(ev["losses"][ev["ok"]]).all()
    assert ev["n"] == 20 and 0 <= ev["acc"] <= 1


def test_predict_returns_dataset_order_and_evaluate_targets(nette, cache40):
    seed_everything(0)
    model = tiny_cnn()
    rows = np.array([399, 5, 17, 250, 3, 120])
    ds = CachedImageDataset(cache40, rows, nette.labels, eval_transform(32, mean=MEAN, std=STD))
    trainer = Trainer(model, device="cpu", progress=False)
    logits, ok = trainer.predict(make_loader(ds, batch_size=4, shuffle=True, seed=1))
    model.eval()
    with torch.no_grad():
        direct = model(torch.stack([ds[k][0] for k in range(len(ds))])).numpy()
    assert ok.all() and np.allclose(logits, direct, atol=1e-5)
    targets = np.zeros(len(rows), dtype=np.int64)
    ev = trainer.evaluate(make_loader(ds, batch_size=4), targets=targets)
    assert ev["acc"] == pytest.approx(float((direct.argmax(1) == 0).mean()))
    expected = nn.functional.cross_entropy(torch.from_numpy(direct), torch.from_numpy(targets), reduction="none")
    assert np.allclose(ev["losses"], expected.numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="every item once"):
        trainer.predict(make_loader(ds, batch_size=4, drop_last=True))


def test_optimizer_schedule_and_device_helpers():
    model = tiny_cnn()
    model[0].weight.requires_grad_(False)
    opt = make_optimizer(model, name="AdamW", lr=1e-3, weight_decay=0.05)
    assert isinstance(opt, torch.optim.AdamW)
    assert all(p is not model[0].weight for g in opt.param_groups for p in g["params"])
    sgd = make_optimizer(model.parameters(), name="sgd", lr=0.1, momentum=0.9)
    sched = cosine_schedule(sgd, epochs=4, steps_per_epoch=5, warmup_epochs=1)
    lrs = []
    for _ in range(20):
        lrs.append(sgd.param_groups[0]["lr"])
        sgd.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.02) and lrs[4] == pytest.approx(0.1)
    assert lrs[5] == pytest.approx(0.1) and lrs[-1] < 0.002
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:], strict=False))
    with pytest.raises(ParameterError, match="'name' parameter of make_optimizer"):
        make_optimizer(model, name="lamb", lr=0.1)
    with pytest.raises(ParameterError, match="'lr'"):
        make_optimizer(model, name="sgd", lr=0)
    with pytest.raises(ParameterError, match="'amp' parameter of Trainer"):
        Trainer(model, device="cpu", amp="fp8")
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ParameterError, match="CUDA is not available"):
            resolve_device("cuda")
        assert resolve_device(None) == torch.device("cpu")
        trainer = Trainer(model, device="cpu", amp="fp16")
        assert trainer.amp_dtype is None and not trainer.scaler.is_enabled()
    with pytest.raises(ParameterError):
        resolve_device("tpu:0")
    half = tiny_cnn().half()
    Trainer(half, device="cpu")
    assert all(p.dtype == torch.float32 for p in half.parameters())  # fp32 master weights


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_amp_paths(nette, cache40):
    for amp, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        seed_everything(0)
        model = tiny_cnn()
        trainer = Trainer(model, optimizer=make_optimizer(model, name="sgd", lr=0.05), device="cuda", amp=amp,
                          progress=False)
        assert trainer.amp_dtype == dtype and trainer.scaler.is_enabled() == (dtype == torch.float16)
        ds = CachedImageDataset(cache40, np.arange(0, 400, 4), nette.labels, train_transform(24, mean=MEAN, std=STD))
        rec = trainer.train_epoch(make_loader(ds, batch_size=25, shuffle=True), epoch=0)
        assert np.isfinite(rec["loss"]) and rec["n"] == 100
        assert all(p.dtype == torch.float32 for p in model.parameters())
        logits, ok = trainer.predict(make_loader(ds, batch_size=25))
        assert logits.dtype == np.float32 and np.isfinite(logits).all()


def test_inference_fills_one_array_and_joins_batches_when_it_cannot():
    """infer writes the logits into one preallocated array when the loader's sampler gives the count, and joins
    the batches otherwise (no length, or more items than the sampler said); unreadable rows are zeros either
    way, and an evaluation loader already in dataset order is not copied again."""
    from labelsieve.core.inference import in_dataset_order, infer

    class Rows(torch.utils.data.Dataset):
        def __init__(self):
            self.x = torch.randn(23, 5, generator=torch.Generator().manual_seed(0))

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i], i % 3, i, i not in (4, 5, 6, 7, 17)

    ds, model = Rows(), nn.Linear(5, 3)
    loader = make_loader(ds, batch_size=4)
    args = {"device": torch.device("cpu"), "autocast": lambda: torch.autocast("cpu", enabled=False)}
    buffered = infer(model, loader, **args)
    joined = infer(model, list(loader), **args)  # a list has no sampler: the batches are joined

    class Short(torch.utils.data.Sampler):  # says 8 items, yields all 23
        def __iter__(self):
            return iter(range(23))

        def __len__(self):
            return 8

    overflow = infer(model, torch.utils.data.DataLoader(ds, batch_size=4, sampler=Short()), **args)
    expected = model(ds.x).detach().numpy()
    expected[[4, 5, 6, 7, 17]] = 0.0
    for out in (buffered, joined, overflow):
        np.testing.assert_allclose(out[0], expected, atol=1e-6)
        assert out[0].dtype == np.float32 and list(out[2]) == list(range(23))
    logits, ok = in_dataset_order(loader, buffered[2], buffered[0], buffered[3])
    assert logits is buffered[0] and ok is buffered[3]
