"""Work tests/test_distributed.py runs under torchrun (2 CPU processes, gloo), and in one process for
the reference it is compared with.

    python -m torch.distributed.run --standalone --nproc-per-node=2 tests/dist_job.py train OUT [AUDIT_CSV]
    python -m torch.distributed.run --standalone --nproc-per-node=2 tests/dist_job.py extract CACHE K
    python -m torch.distributed.run --standalone --nproc-per-node=2 tests/dist_job.py tower OUT
    python -m torch.distributed.run --standalone --nproc-per-node=2 tests/dist_job.py audit LOG AUDIT_ARGS…

``train`` trains a linear model through the Trainer (the default step, and a ``step_fn`` that calls a
method of the model other than ``forward``; ordered and shuffled) and writes each rank's weights and
predictions to ``OUT/train-<rank>.npz``; given AUDIT_CSV, it then trains EfficientNet-Lite0 for one epoch on
the audit's kept rows (:func:`labelsieve.train.train_from_audit`) into ``OUT/model``. ``extract`` extracts
mini-CLIP features of :data:`SUBSET` into CACHE, committing every 8 images; rank 1 dies after K images of
its share. ``tower`` runs the detectors that train through the image tower (image-level co-divide, DEFT with
VPT-deep with both selections, TURN's fine-tuning) through a tiny random ViT on :data:`SUBSET` with 40 %
injected noise, on every rank as ``labelsieve audit`` does under torchrun; rank 0's results go to
``OUT/<detector>.json`` and each rank's trained parameters (per-tensor sums) to
``OUT/<detector>-params-<rank>.json``. ``audit`` runs ``labelsieve audit AUDIT_ARGS…`` and logs every shard or
Parquet file each rank opens, and why (to index it, or to read its images), to ``LOG-<rank>``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from labelsieve import testing
from labelsieve.cli import main
from labelsieve.core import distributed
from labelsieve.core.engine import Trainer, make_loader
from labelsieve.data import load_images
from labelsieve.detectors import create_detector
from labelsieve.features import extract_features
from labelsieve.models.encoders import create_encoder
from labelsieve.train import train_from_audit

N, DIM, CLASSES, BATCH, EPOCHS = 40, 6, 3, 8, 3
#: The images of the audit tests: 5 Imagenette training images per class (50).
SUBSET = {"name": "imagenette", "per_class": 5, "seed": 0}


class Points(torch.utils.data.Dataset):
    """A fixed labelled point cloud as ``(x, label, index, ok)`` (not a TensorDataset, so it is sharded)."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.y = torch.arange(N) % CLASSES
        self.x = torch.randn(N, DIM, generator=g) + 2.0 * nn.functional.one_hot(self.y, DIM).float()

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int):
        return self.x[i], int(self.y[i]), i, True


class Scorer(nn.Module):
    """A linear classifier whose training step calls :meth:`scores`; ``unused`` never gets a gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(DIM, CLASSES)
        self.unused = nn.Linear(DIM, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * self.linear(x)


def method_step(tr: Trainer, batch):
    x, y, _idx, _ok = batch
    logits = tr.model.scores(x)
    return nn.functional.cross_entropy(logits, y), int((logits.argmax(1) == y).sum()), len(y)


def train(step: str, shuffle: bool) -> dict[str, np.ndarray]:
    """Weights and dataset-order logits after training (same on every rank, and in one process)."""
    torch.manual_seed(distributed.rank())  # a different start on each rank: DDP must broadcast rank 0's
    model = Scorer()
    opt = torch.optim.SGD([p for p in model.parameters()], lr=0.3, momentum=0.9)
    trainer = Trainer(model, optimizer=opt, device="cpu", progress=False)
    ds = Points()
    history = trainer.fit(lambda epoch: make_loader(ds, batch_size=BATCH, shuffle=shuffle, seed=epoch),
                          epochs=EPOCHS, step_fn=method_step if step == "method" else None)
    logits, ok = trainer.predict(make_loader(ds, batch_size=7))
    return {"weight": model.linear.weight.detach().numpy().copy(), "bias": model.linear.bias.detach().numpy().copy(),
            "logits": logits, "ok": ok, "n": np.array([h["n"] for h in history]),
            "loss": np.array([h["loss"] for h in history])}


def run_train(out: Path, audit_csv: Path | None) -> None:
    distributed.init("cpu")
    res = {f"{step}_{'shuffled' if shuffle else 'ordered'}_{k}": v
           for step in ("default", "method") for shuffle in (False, True)
           for k, v in train(step, shuffle).items()}
    np.savez(out / f"train-{distributed.rank()}.npz", **res)
    if audit_csv is not None:
        train_from_audit(audit_csv, backbone="lite0", pretrained=str(testing.shared_dir() / "models" /
                                                                     "tf_efficientnet_lite0.safetensors"),
                         out_dir=out / "model", epochs=1, image_size=32, val_fraction=0.2, num_workers=0,
                         drop_unreviewed_flagged=False, cache_dir=out / "cache", progress=False)


def run_extract(cache: Path, die_after: int) -> None:
    distributed.init("cpu")
    images = load_images(*testing.extract_subset(SUBSET["name"], per_class=SUBSET["per_class"], seed=SUBSET["seed"]))
    encoder = create_encoder(str(testing.mini_clip_dir()), device="cpu")

    def on_batch(done: int) -> None:
        if distributed.rank() == 1 and done >= die_after:
            raise SystemExit(3)  # rank 1 dies; torchrun stops rank 0

    extract_features(images, encoder, cache_dir=cache, batch_size=4, num_workers=0, chunk_images=8,
                     progress=False, on_batch=on_batch)


#: The detectors that train through the image tower, as the tower job runs them (tiny ViT, 2 epochs).
TOWER_DETECTORS = {
    # the paper's encoder fine-tuning at a gentler encoder lr: at lr 0.05 the tiny random ViT's encoders diverge
    # and both GMMs call every row clean (the networks' split would then be untestable)
    "codivide": ("codivide", {"frozen": False, "epochs": 2, "warmup_epochs": 1, "batch_size": 10, "lr": 0.05,
                              "encoder_lr": 1e-3}),
    "deft": ("deft", {"peft": "vpt_deep", "epochs": 2, "batch_size": 10}),
    "deft-batch": ("deft", {"peft": "vpt_deep", "epochs": 2, "batch_size": 10, "selection": "batch"}),
    "turn": ("turn", {"fft_epochs": 2, "batch_size": 10}),
}


def tower_detector(key: str, cache_dir: Path) -> dict | None:
    """Detector ``key`` of :data:`TOWER_DETECTORS` on :data:`SUBSET` (40 % symmetric noise) with a tiny random
    ViT, run as the audit runs it (on every rank when it trains through the tower); rank 0's result, None on
    the others. Every rank writes its trained parameters' sums to ``cache_dir.parent / <key>-params-<rank>``."""
    from helpers import inject_symmetric, make_context, tiny_vit_encoder

    images = load_images(*testing.extract_subset(SUBSET["name"], per_class=SUBSET["per_class"], seed=SUBSET["seed"]))
    noisy = inject_symmetric(images.labels, images.n_classes, 0.4, seed=0)
    # as in an audit, only rank 0 holds cached features (DEFT's scale reads them; random ones do here)
    feats = np.random.default_rng(0).standard_normal((len(images), 64)).astype(np.float32)
    ctx = make_context(images, feats if distributed.is_main() else None, tiny_vit_encoder(), noisy)
    ctx.cache_dir = cache_dir
    name, params = TOWER_DETECTORS[key]
    det = create_detector(name, num_workers=0, **params)
    runner = distributed.run_on_all if det.trains_on_every_rank(ctx) else distributed.run_on_main
    trained: dict[str, list[float]] = {}
    if name != "codivide":  # DEFT and TURN do not keep their trained model: read it off the Trainer
        from labelsieve.core import engine

        fit = engine.Trainer.train_epoch

        def spy(self, *a, **kw):
            out = fit(self, *a, **kw)
            trained.update({n: [float(p.detach().sum()), float(p.detach().abs().sum())]
                            for n, p in self.model.named_parameters() if p.requires_grad})
            return out

        engine.Trainer.train_epoch = spy
        try:
            res = runner(det.detect, ctx)
        finally:
            engine.Trainer.train_epoch = fit
    else:
        res = runner(det.detect, ctx)
        trained = {f"net{k + 1}.{n}": [float(p.detach().sum()), float(p.detach().abs().sum())]
                   for k, net in enumerate(det.networks_) for n, p in net.named_parameters()}
    (cache_dir.parent / f"{key}-params-{distributed.rank()}.json").write_text(json.dumps(trained))
    if res is None:
        return None
    hist = res.info["history"]
    ranks = res.info["model"]["ranks"] if name == "turn" else res.info["ranks"]
    out = {"ranks": ranks, "path": res.info.get("path", "tower fine-tuning"),
           "noisy": (noisy != images.labels).tolist(), "p_clean": res.p_clean.tolist(),
           "probs_sum": res.probs.sum(1).tolist()}
    if name == "codivide":
        out.update(n=[[h[k]["n"] for k in ("net1", "net2")] for h in hist],
                   steps=[[h[k]["steps"] for k in ("net1", "net2")] for h in hist],
                   n_labelled=[h[k].get("n_labelled") for h in hist for k in ("net1", "net2")],
                   p_net1=res.columns["p_clean_net1"].tolist(), p_net2=res.columns["p_clean_net2"].tolist())
    elif name == "turn":
        out.update(n=[h["n"] for h in hist], n_subsample=[h["n_subsample"] for h in hist])
    else:
        out.update(n=[h["n"] for h in hist], n_clean_selected=[h.get("n_clean_selected") for h in hist])
    return out


def run_tower(out: Path) -> None:
    distributed.init("cpu")
    for key in TOWER_DETECTORS:
        res = tower_detector(key, out / "cache")
        if res is not None:
            (out / f"{key}.json").write_text(json.dumps(res))


def run_audit_logging_opens(log: Path, args: list[str]) -> None:
    """``labelsieve audit ARGS`` on this rank, appending ``<rank> <phase> <file>`` to ``log``-<rank> for every
    ``.tar`` or ``.parquet`` file opened (phase ``index`` when opened to index it, else ``read``)."""
    def hook(event: str, hook_args: tuple) -> None:
        if event != "open" or not isinstance(hook_args[0], (str, bytes, os.PathLike)):
            return
        name = os.fsdecode(hook_args[0])
        if not name.endswith((".tar", ".parquet")):
            return
        frame, phase = sys._getframe(1), "read"
        while frame is not None:
            if frame.f_code.co_name in ("index_shard", "index_table"):
                phase = "index"
                break
            frame = frame.f_back
        with open(f"{log}-{os.environ.get('RANK', '0')}", "a") as f:
            f.write(f"{os.environ.get('RANK', '0')} {phase} {Path(name).name}\n")

    sys.addaudithook(hook)
    sys.exit(main(["audit", *args]))


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[1] == "audit":
        run_audit_logging_opens(Path(sys.argv[2]), sys.argv[3:])
    elif sys.argv[1] == "train":
        run_train(Path(sys.argv[2]), Path(sys.argv[3]) if len(sys.argv) > 3 else None)
    elif sys.argv[1] == "tower":
        run_tower(Path(sys.argv[2]))
    else:
        run_extract(Path(sys.argv[2]), int(sys.argv[3]))
