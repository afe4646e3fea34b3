"""Feature extraction against the encoder's own speed (issue 13, "Extraction at the model's speed").

On the same images and batch size it measures

* **pure forward**: the image tower on tensors decoded and preprocessed beforehand (no I/O, no decoding),
  in float32, float32 ``channels_last`` and bfloat16 autocast, with the smallest cosine of each variant's
  embeddings to float32's (the embedding tolerance);
* **decode + preprocess** per image (one thread, the model's own transform);
* **labelsieve's extraction**: ``extract_features`` into a fresh feature store (hashing, decoding in loader
  workers, forward, commits), for each worker count asked, in the extraction precision labelsieve uses;

and writes each run's throughput and its ratio to the pure forward of the same precision into
``benchmarks/results/extraction.{jsonl,md}``. Every row records the 1-minute load average before and after::

    PYTHONPATH=$PWD nice -n 10 python benchmarks/extraction.py --n 2500 --tag after
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_jsonl, default_threads, host_info, read_jsonl  # noqa: E402

from labelsieve import testing  # noqa: E402
from labelsieve.data import load_images  # noqa: E402
from labelsieve.data.decode import load_image  # noqa: E402
from labelsieve.features import extract_features  # noqa: E402
from labelsieve.models.encoders import create_encoder  # noqa: E402


def _load() -> float:
    return os.getloadavg()[0]


def forward_speed(model: torch.nn.Module, xs: torch.Tensor, batch: int, *, channels_last: bool = False,
                  bf16: bool = False) -> tuple[float, np.ndarray]:
    """Images per second of ``model.encode_image`` over ``xs`` (one warm-up batch first), and the embeddings."""
    outs = []

    def run(x: torch.Tensor) -> torch.Tensor:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return model.encode_image(x).float()

    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    was_cl = bool(convs) and convs[0].is_contiguous(memory_format=torch.channels_last)
    model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    run(xs[:batch])
    t = time.perf_counter()
    for i in range(0, len(xs), batch):
        outs.append(run(xs[i : i + batch]))
    seconds = time.perf_counter() - t
    model.to(memory_format=torch.channels_last if was_cl else torch.contiguous_format)
    return len(xs) / seconds, torch.cat(outs).numpy()


def _min_cos(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((a * b).sum(1).min())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2500, help="Imagenette training images (random, seed 0)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--workers", default="0,1,2", help="loader worker counts for labelsieve's extraction")
    ap.add_argument("--tag", default="after", help="a name for this code version (before/after)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--bf16-n", type=int, default=256, help="images for the bfloat16 forward rows (0: none)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "extraction.jsonl"
    host = host_info(args.threads)
    root, csv = testing.extract_subset("imagenette", args.n)
    images = load_images(root, csv)
    enc = create_encoder(str(testing.mini_clip_dir()), pretrained="default", device="cpu")
    base = {"tag": args.tag, "model": "mini-clip", "data": f"imagenette:{args.n}", "n": len(images),
            "batch": args.batch, "host": host}

    base["invocation"] = uuid.uuid4().hex[:8]
    load0 = _load()
    t = time.perf_counter()
    xs = torch.stack([enc.preprocess(load_image(images.abspath(i))) for i in range(len(images))])
    dec_ms = (time.perf_counter() - t) / len(images) * 1e3
    append_jsonl(jsonl, {**base, "run": "decode + preprocess (1 thread of Python)", "repeat": 0,
                         "ms_per_image": dec_ms, "img_s": 1e3 / dec_ms, "load": [load0, _load()]})
    print(f"decode + preprocess {dec_ms:.2f} ms/image")
    variants = [("forward fp32", {}), ("forward fp32 channels_last", {"channels_last": True})]
    if args.bf16_n:  # bfloat16 is emulated (slow) on CPUs without native support: timed on the first --bf16-n
        variants += [("forward bf16 autocast", {"bf16": True}),
                     ("forward bf16 autocast channels_last", {"bf16": True, "channels_last": True})]
    # forward and extraction alternate, so that a machine whose speed drifts (a shared VM) drifts for both
    for rep in range(args.repeats):
        fp32 = None
        for name, kw in variants:
            sub = xs[: args.bf16_n] if kw.get("bf16") else xs
            load0 = _load()
            speed, emb = forward_speed(enc.model, sub, args.batch, **kw)
            fp32 = emb if fp32 is None else fp32
            rec = {**base, "run": name, "repeat": rep, "img_s": speed, "images_timed": len(sub),
                   "min_cosine_to_fp32": _min_cos(emb, fp32[: len(emb)]), "load": [load0, _load()]}
            append_jsonl(jsonl, rec)
            print(f"{name}: {speed:.1f} img/s, min cosine to fp32 {rec['min_cosine_to_fp32']:.5f}")
        for w in (int(s) for s in args.workers.split(",") if s.strip()):
            cache = Path(tempfile.mkdtemp(prefix="ls-extract-"))
            try:
                load0 = _load()
                how = enc.describe().get("extraction", {})  # absent before issue 13: float32, contiguous
                feats = extract_features(images, enc, cache_dir=cache, num_workers=w, batch_size=args.batch,
                                         progress=False)
                rec = {**base, "run": f"labelsieve extraction, {w} workers", "repeat": rep, "workers": w,
                       "seconds": feats.seconds, "img_s": len(images) / feats.seconds,
                       "precision": how.get("precision", "float32"),
                       "memory_format": how.get("memory_format", "contiguous"), "load": [load0, _load()]}
            finally:
                shutil.rmtree(cache, ignore_errors=True)
            append_jsonl(jsonl, rec)
            print(f"{rec['run']}: {rec['img_s']:.1f} img/s ({feats.seconds:.1f} s)")
    render(jsonl, out / "extraction.md")


def render(jsonl: Path, md: Path) -> None:
    """The table: per tag and run, the median img/s over repeats; for extraction rows, the median over repeats of
    the ratio to the pure forward timed just before it (same invocation and repeat) in the extraction's
    precision and memory format."""
    rows = read_jsonl(jsonl)
    lines = ["# Feature extraction against pure forward", "",
             "Written by `benchmarks/extraction.py`. Pure forward: the image tower on tensors decoded beforehand; "
             "labelsieve extraction: `extract_features` into a fresh store (hashing, decoding, forward, commits). "
             "Forward and extraction alternate in each repeat; img/s is the median over repeats, and the ratio "
             "the median of each repeat's extraction over the forward timed just before it in the same precision "
             "and memory format. Load: 1-minute load average, lowest-highest over the rows.", "",
             "| tag | data | threads | run | repeats | img/s (median) | ratio to pure forward | min cosine to fp32 "
             "| load |", "|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["tag"], r["data"], r["host"]["threads"], r["run"]), []).append(r)
    for (tag, data, threads, run), rs in groups.items():
        ratio = ""
        if run.startswith("labelsieve"):
            want = "forward fp32" if rs[0].get("precision", "float32") == "float32" else "forward bf16 autocast"
            if rs[0].get("memory_format") == "channels_last":
                want += " channels_last"
            ratios = [r["img_s"] / f["img_s"] for r in rs for f in rows
                      if f["run"] == want and f.get("invocation") == r.get("invocation")
                      and f.get("repeat") == r.get("repeat")]
            ratio = f"{np.median(ratios):.2f} (vs {want})" if ratios else "–"
        cos = f"{min(r['min_cosine_to_fp32'] for r in rs):.4f}" if "min_cosine_to_fp32" in rs[0] else ""
        loads = [x for r in rs for x in r["load"]]
        lines.append(f"| {tag} | {data} | {threads} | {run} | {len(rs)} | "
                     f"{np.median([r['img_s'] for r in rs]):.1f} | {ratio} | {cos} | "
                     f"{min(loads):.1f}-{max(loads):.1f} |")
    md.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
