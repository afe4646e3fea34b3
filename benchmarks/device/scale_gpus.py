"""Scaling over processes (GPUs): feature extraction and one DEFT VPT-deep epoch at 1, 2, 4, 8 processes.

Run it as a plain script; for each process count it starts ``torchrun --standalone --nproc-per-node=N`` on
itself (torchrun is the launcher; this script only loops over N) and renders a table::

    python benchmarks/device/scale_gpus.py                      # GPU machine: ViT-B/16, 1/2/4/8 GPUs
    python benchmarks/device/scale_gpus.py --device cpu --procs 1,2 --model /work/shared/models/mini-clip \\
        --images 32 --deft-images 16 --out /tmp/scale                 # quick CPU check that it runs

The model is open_clip ``ViT-B-16`` with ``pretrained='none'`` (random weights: speed needs no real weights).
Each run, on every rank:

* **extract** — ``labelsieve.features.extract_features`` on ``--images`` synthetic JPEGs (random noise,
  written once, ``--image-px`` pixels square) into a fresh feature store: content hashing, decoding in
  ``--workers`` loader workers, the forward pass, committing chunks; the ranks share the images as
  ``labelsieve audit`` does under torchrun. Timed from a barrier to a barrier.
* **deft epoch** — one training epoch of DEFT's VPT-deep model (the dual prompt learner over the image
  tower with deep visual prompts, :func:`labelsieve.detectors.deft.deft_step`, SGD) through
  :class:`labelsieve.core.engine.Trainer` on ``--deft-images`` preprocessed random tensors, with a global
  batch of ``--deft-batch`` split over the ranks by :func:`labelsieve.core.engine.make_loader` and
  gradients averaged by DDP. It times the engine's DDP on DEFT's model and step, which is what
  ``labelsieve audit --method deft -p peft=vpt_deep`` runs on every rank under torchrun (docs/architecture.md,
  "Several processes"), without the evaluation passes.

Rank 0 appends one row per run to ``OUT/NAME.jsonl`` (seconds, the host, the load average) and the driver
writes ``OUT/NAME.md`` (``--name``, default ``scale_gpus``). ``benchmarks/distributed.py`` runs the same
measurement of extraction on this CPU machine (real Imagenette images, mini CLIP, 1 vs 2 processes).
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from labelsieve import testing
from labelsieve.core import distributed
from labelsieve.core.engine import Trainer, make_loader
from labelsieve.core.optim import make_optimizer
from labelsieve.core.runtime import resolve_device
from labelsieve.data import load_images
from labelsieve.detectors.deft import DeftModel, _Encoded, _State, complementary_labels, deft_step
from labelsieve.features import extract_features
from labelsieve.models.encoders import create_encoder
from labelsieve.models.peft import apply_peft
from labelsieve.models.prompts import DualPromptLearner

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import append_jsonl, host_info, read_jsonl  # noqa: E402

N_CLASSES = 10


def synthetic_images(folder: Path, n: int, px: int) -> tuple[Path, Path]:
    """``n`` random-noise JPEGs of ``px`` × ``px`` in ``folder`` with a ``path,label`` CSV (written once)."""
    csv = folder / f"labels-{n}-{px}.csv"
    if csv.exists():
        return folder, csv
    rng = np.random.default_rng(0)
    rows = ["path,label"]
    for i in range(n):
        name = f"img-{px}-{i:07d}.jpg"
        if not (folder / name).exists():
            Image.fromarray(rng.integers(0, 256, (px, px, 3), dtype=np.uint8)).save(folder / name, quality=90)
        rows.append(f"{name},class{i % N_CLASSES}")
    tmp = csv.with_suffix(".part")
    tmp.write_text("\n".join(rows) + "\n")
    tmp.replace(csv)
    return folder, csv


class RandomImages(torch.utils.data.Dataset):
    """Preprocessed random images as ``(x, label, index, ok)``, as DEFT's image datasets yield them."""

    def __init__(self, n: int, size: int) -> None:
        self.n, self.size = n, size
        self.labels = np.arange(n) % N_CLASSES

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(i)
        return torch.randn(3, self.size, self.size, generator=g), int(self.labels[i]), i, True


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    distributed.barrier()


def image_set(args) -> tuple[Path, Path]:
    """(root, labels CSV) of the images to extract: synthetic, or ``NAME:N`` from the shared data sets."""
    if args.data == "synthetic":
        return synthetic_images(Path(args.work) / "images", args.images, args.image_px)
    name, n = args.data.split(":")
    return testing.extract_subset(name, int(n), seed=0)


def time_extract(args, device: torch.device, encoder) -> dict:
    root, csv = distributed.broadcast_object(image_set(args) if distributed.is_main() else None)
    images = load_images(root, csv)
    cache = Path(args.work) / f"cache-{args.tag}"
    sync(device)
    t = time.perf_counter()
    feats = extract_features(images, encoder, cache_dir=cache, batch_size=args.batch, num_workers=args.workers,
                             progress=False)
    sync(device)
    seconds = time.perf_counter() - t
    assert feats.n_extracted == len(images) and np.asarray(feats.vectors).shape[0] == len(images)
    return {"images": len(images), "extract_seconds": seconds, "extract_images_per_s": len(images) / seconds}


def time_deft_epoch(args, device: torch.device, encoder) -> dict:
    torch.manual_seed(0)
    clip_model = copy.deepcopy(encoder.model)
    for p in clip_model.parameters():
        p.requires_grad_(False)
    classnames = [f"class {c}" for c in range(N_CLASSES)]
    learner = DualPromptLearner(clip_model, encoder.tokenizer, classnames, n_ctx=16).to(device)
    info = apply_peft(clip_model, "vpt_deep")
    model = DeftModel(learner, _Encoded(clip_model), scale=30.0).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer([{"params": params}], name="sgd", lr=0.03, weight_decay=5e-4, momentum=0.9)
    trainer = Trainer(model, optimizer=opt, device=device, amp="auto", progress=False, desc="deft vpt_deep")
    ds = RandomImages(args.deft_images, encoder.image_size)
    state = _State(clean=torch.ones(len(ds), dtype=torch.bool, device=device),
                   comp=torch.as_tensor(complementary_labels(ds.labels, N_CLASSES, np.random.default_rng(0)),
                                        device=device), warmup=True)

    def step(tr: Trainer, batch):
        x, y, idx, ok = tr.to_device(batch)
        return deft_step(model, x, y, idx, state)

    loader = make_loader(ds, batch_size=args.deft_batch, shuffle=True, seed=0, num_workers=args.workers)
    sync(device)
    t = time.perf_counter()
    rec = trainer.train_epoch(loader, epoch=0, step_fn=step)
    sync(device)
    seconds = time.perf_counter() - t
    assert rec["n"] >= len(ds) - distributed.world_size(), rec  # the ranks together saw every image
    return {"deft_epoch_seconds": seconds, "deft_images_per_s": len(ds) / seconds, "deft_trainable": info.n_trainable,
            "deft_loss": rec["loss"], "amp": str(trainer.amp_dtype)}


def threads(args) -> int:
    """Torch threads per process: ``--threads``, or (0) the machine's cores shared by this machine's ranks."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return args.threads or max(1, (os.cpu_count() or 1) // local)


def worker(args) -> None:
    device = resolve_device(args.device)
    distributed.init(device)
    torch.set_num_threads(threads(args))
    load_before = os.getloadavg()[0]
    encoder = create_encoder(args.model, pretrained=None if args.pretrained == "default" else args.pretrained,
                             device=device)
    row = {"run": args.tag, "processes": distributed.world_size(), "model": args.model, "pretrained": args.pretrained,
           "device": str(device.type), "data": args.data, "images": args.images, "image_px": args.image_px,
           "batch": args.batch, "workers": args.workers, "deft_images": args.deft_images,
           "deft_batch": args.deft_batch}
    row.update(time_extract(args, device, encoder))
    if args.deft_images:
        row.update(time_deft_epoch(args, device, encoder))
    if distributed.is_main():
        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
        row.update(host=host_info(threads(args)), gpu=gpu, load_before=load_before, load=os.getloadavg()[0],
                   created=time.strftime("%Y-%m-%dT%H:%M:%S"))
        append_jsonl(Path(args.out) / f"{args.name}.jsonl", row)


SETUP = ("model", "device", "data", "images", "batch", "workers", "deft_images", "deft_batch")


def _cell(v: float | None, fmt: str = ".1f") -> str:
    return "-" if v is None else format(v, fmt)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def render(out: Path, name: str) -> None:
    """The table: per setup and process count, the median over repeats, and speed-up over 1 process."""
    groups: dict[tuple, list[dict]] = {}
    for r in read_jsonl(out / f"{name}.jsonl"):
        groups.setdefault((*[r.get(k) for k in SETUP], r["processes"], r["host"]["threads"]), []).append(r)
    med = {k: {m: float(np.median([r[m] for r in g])) if all(r.get(m) for r in g) else None
               for m in ("extract_seconds", "deft_epoch_seconds")} for k, g in groups.items()}
    # the base of a speed-up: 1 process of the same setup, with the most threads (all the cores)
    bases = sorted((k for k in groups if k[-2] == 1), key=lambda k: k[-1])
    base_of = {k[:-2]: med[k] for k in bases}
    title = "feature extraction" + (" and one DEFT VPT-deep epoch" if name == "scale_gpus" else "")
    lines = [f"# Scaling over processes: {title}", "",
             "Written by `benchmarks/device/scale_gpus.py`: medians over repeats; speed-up over 1 process of the "
             "same setup with all the cores' threads; load: 1-minute load average before and after the runs "
             "(min-max).", "",
             "| model | device | data | images | workers | processes | threads each | repeats | extract s | img/s "
             "| speed-up | DEFT images | DEFT epoch s | DEFT img/s | speed-up | load |", "|" + "---|" * 16]
    for k, g in groups.items():
        r, m, base = g[0], med[k], base_of.get(k[:-2], {})
        loads = [x["load_before"] for x in g] + [x["load"] for x in g]
        lines.append(
            f"| {Path(r['model']).name} | {r['gpu'] or r['device']} | {r['data']} | {r['images']} | {r['workers']} "
            f"| {r['processes']} | {r['host']['threads']} | {len(g)} | {_cell(m['extract_seconds'])} "
            f"| {_cell(_ratio(r['images'], m['extract_seconds']))} "
            f"| {_cell(_ratio(base.get('extract_seconds'), m['extract_seconds']), '.2f')} "
            f"| {r['deft_images'] or '-'} | {_cell(m['deft_epoch_seconds'])} "
            f"| {_cell(_ratio(r['deft_images'], m['deft_epoch_seconds']))} "
            f"| {_cell(_ratio(base.get('deft_epoch_seconds'), m['deft_epoch_seconds']), '.2f')} "
            f"| {min(loads):.2f}-{max(loads):.2f} |")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None, **defaults) -> None:
    """Parse ``argv`` (``defaults`` override the parser's defaults); as the driver, run torchrun per process
    count (``--repeats`` rounds, the counts interleaved) and render; as a worker, time one run."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--procs", default="1,2,4,8", help="Process counts (at most the GPUs on a GPU machine).")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--model", default="ViT-B-16")
    ap.add_argument("--pretrained", default="none", help="'none' (random weights), 'default', a tag or a file.")
    ap.add_argument("--data", default="synthetic", help="'synthetic', or NAME:N (labelsieve.testing.extract_subset).")
    ap.add_argument("--images", type=int, default=4096, help="Synthetic images.")
    ap.add_argument("--image-px", type=int, default=320)
    ap.add_argument("--batch", type=int, default=256, help="Extraction batch per process.")
    ap.add_argument("--workers", type=int, default=4, help="Loader workers per process.")
    ap.add_argument("--deft-images", type=int, default=2048, help="0: time extraction only.")
    ap.add_argument("--deft-batch", type=int, default=64, help="Global DEFT batch (DEFT's default), split over ranks.")
    ap.add_argument("--threads", type=int, default=0, help="Torch threads per process (0: cores / local ranks).")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--name", default="scale_gpus", help="Results file stem in --out.")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--work", default="/tmp/labelsieve-scale")
    ap.add_argument("--tag", help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.set_defaults(**defaults)
    argv = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    Path(args.work, "images").mkdir(parents=True, exist_ok=True)
    procs = [int(p) for p in args.procs.split(",")]
    if resolve_device(args.device).type == "cuda":
        procs = [p for p in procs if p <= torch.cuda.device_count()]
    stamp = time.strftime("%Y%m%d%H%M%S")
    given = {k: getattr(args, k) for k in ("device", "model", "pretrained", "data", "images", "image_px", "batch",
                                           "workers", "deft_images", "deft_batch", "threads", "name", "out",
                                           "work")}
    passed = [x for k, v in given.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    for rep in range(args.repeats):
        for n in procs:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
                   str(Path(__file__).resolve()), *passed, "--worker", "--tag", f"{stamp}-{rep}-{n}"]
            print(" ".join(cmd), flush=True)
            subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads or 1)})
    render(out, args.name)
    print((out / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
