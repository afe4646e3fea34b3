"""Scale: every detector that works on cached features, on synthetic class-clustered features of growing size.

The features are made to look like cached CLIP image features of a labelled collection: ``--classes``
class centres (by default the mini CLIP's text embeddings of ``"a photo of a <name>."`` for 100 CIFAR-100
class names, so the text-guided detectors have a text side that reads them), each feature
``normalize(centre_y + spread * gaussian)``, stored as a float16 memory-mapped array like the feature
store's views; then ``--noise`` of the labels flipped to another class at random (the truth is known,
so AUROC shows a fast but useless path). Each (size, detector) runs in its own process, so its peak
RSS is its own; a run that would exceed ``--budget`` seconds (extrapolated from the previous size with
the growth measured so far) is skipped and the skip is recorded.

    python benchmarks/scale.py --sizes 10000,100000,1000000 --out benchmarks/results

Rows go to ``OUT/scale.jsonl`` (a rerun skips finished rows) and ``OUT/scale.md`` (seconds, peak RSS
in GB and AUROC per detector and size, and the growth exponent between consecutive sizes).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from common import append_jsonl, default_threads, host_info, read_jsonl  # noqa: E402

from labelsieve.detectors.ensemble import CODIVIDE_FAST  # noqa: E402

CIFAR100 = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle", "bowl",
    "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle", "chair",
    "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur", "dolphin",
    "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard", "lamp",
    "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck",
    "pine_tree", "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
    "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider", "squirrel",
    "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger", "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)

#: (row name, registry name, params): the detectors that work on cached features, and the default ensemble.
#: co-divide runs with the ensemble's settings (``CODIVIDE_FAST``, its step cap included) and without the cap,
#: to show what the cap saves and costs; its paper recipe (60 epochs) is the cap-less row times six.
DETECTORS = [
    ("knn", "knn", {}),
    ("confident_learning", "confident_learning", {}),
    ("small_loss", "small_loss", {}),
    ("gmm", "gmm", {}),
    ("turn (no fine-tune)", "turn", {"finetune": False}),
    ("label_match", "label_match", {}),
    ("deft frozen", "deft", {"peft": "none"}),
    ("deft frozen + budgets", "deft", {"peft": "none", "logit_scale": "calibrated", "max_steps": 3200,
                                       "text_budget": 32_000}),
    ("codivide fast (ensemble member)", "codivide", CODIVIDE_FAST),
    ("codivide fast without step cap", "codivide", {**CODIVIDE_FAST, "max_steps": None}),
    ("ensemble (default)", "ensemble", {}),
]
# --detectors is a comma-separated list of these names, so they hold no comma
assert not any("," in d[0] for d in DETECTORS)


def make_dataset(work: Path, n: int, *, n_classes: int, spread: float, noise: float, seed: int,
                 model_dir: str) -> Path:
    """Write ``features.npy`` (float16 memmap, n × d), ``labels.npy``, ``truth.npy`` and ``classes.json`` under
    ``work/n<n>``, once (chunked, so 10M rows never sit in memory as float32)."""
    d = work / f"n{n}-c{n_classes}-spread{spread:g}-noise{noise:g}-s{seed}"
    if (d / "done").exists():
        return d
    d.mkdir(parents=True, exist_ok=True)
    from labelsieve.models.encoders import create_encoder

    names = [c.replace("_", " ") for c in CIFAR100[:n_classes]]
    enc = create_encoder(model_dir, device="cpu")
    centres = enc.class_text_embeddings(names, ["a photo of a {}."]).astype(np.float32)
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, n_classes, size=n)
    flip = rng.random(n) < noise
    other = rng.integers(0, n_classes - 1, size=n)
    labels = np.where(flip, other + (other >= truth), truth)
    feats = np.lib.format.open_memmap(d / "features.npy", mode="w+", dtype=np.float16, shape=(n, centres.shape[1]))
    step = 1 << 18
    for i in range(0, n, step):
        c = centres[truth[i:i + step]]
        x = c + spread * rng.standard_normal(c.shape, dtype=np.float32) / math.sqrt(c.shape[1])
        feats[i:i + step] = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
    feats.flush()
    del feats
    np.save(d / "labels.npy", labels.astype(np.int64))
    np.save(d / "truth.npy", truth.astype(np.int64))
    (d / "classes.json").write_text(json.dumps(names))
    (d / "done").write_text("ok")
    return d


def run_one(data: str, registry: str, params: str, model_dir: str, threads: int) -> None:
    """Child process: one detector on one dataset; prints one JSON line."""
    import resource

    import torch

    from labelsieve.api import detect
    from labelsieve.audit.evaluate import detection_metrics
    from labelsieve.models.encoders import create_encoder

    torch.set_num_threads(threads)
    d = Path(data)
    feats = np.load(d / "features.npy", mmap_mode="r")
    labels, truth = np.load(d / "labels.npy"), np.load(d / "truth.npy")
    classnames = json.loads((d / "classes.json").read_text())
    enc = create_encoder(model_dir, device="cpu")
    t, cpu = time.perf_counter(), time.process_time()
    res = detect(feats, labels, classnames=classnames, method=registry, params=json.loads(params), encoder=enc,
                 progress=False)
    secs, cpu = time.perf_counter() - t, time.process_time() - cpu  # CPU seconds: what a shared machine took
    m = detection_metrics(labels != truth, res.p_clean, res.is_noisy)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    members = {mi["member"]: round(mi["seconds"], 1) for mi in (res.info or {}).get("members", [])}
    print(json.dumps({"seconds": secs, "cpu_seconds": cpu, "peak_rss_gb": rss, "auroc": m["auroc"], "f1": m["f1"],
                      "n_flagged": m["n_flagged"], **({"member_seconds": members} if members else {})}))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--spread", type=float, default=4.0,
                    help="noise norm relative to the unit class centre (4: kNN and TURN reach AUROC ~0.9 at 10k)")
    ap.add_argument("--noise", type=float, default=0.2)
    ap.add_argument("--detectors", default=",".join(d[0] for d in DETECTORS))
    ap.add_argument("--budget", type=float, default=3600.0, help="skip a run expected to take longer (seconds)")
    ap.add_argument("--work", default=".cache/bench-scale")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child", nargs=3, metavar=("DATA", "REGISTRY", "PARAMS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    from labelsieve import testing

    model_dir = str(testing.shared_dir() / "models" / "mini-clip")
    if args.child:
        run_one(*args.child, model_dir=model_dir, threads=args.threads)
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "scale.jsonl"
    rows = read_jsonl(jsonl)
    done = {(r["detector"], r["n"]) for r in rows}
    host = host_info(args.threads)
    wanted = set(args.detectors.split(","))
    sizes = sorted(int(s) for s in args.sizes.split(","))
    for n in sizes:
        data = make_dataset(Path(args.work), n, n_classes=args.classes, spread=args.spread, noise=args.noise,
                            seed=args.seed, model_dir=model_dir)
        for row, reg, params in DETECTORS:
            if row not in wanted or (row, n) in done:
                continue
            prev = sorted((r for r in rows if r["detector"] == row and r.get("seconds")), key=lambda r: r["n"])
            if prev:
                last = prev[-1]
                k = _exponent(prev) or 1.0
                expected = last["seconds"] * (n / last["n"]) ** k
                if expected > args.budget:
                    why = (f"expected {expected:.0f} s > budget {args.budget:.0f} s "
                           f"(growth exponent {k:.2f} from the measured sizes)")
                    rec = {"detector": row, "n": n, "skipped": why, "host": host}
                    append_jsonl(jsonl, rec)
                    rows.append(rec)
                    print(f"{row:24s} n={n:>9,}: skipped ({rec['skipped']})", flush=True)
                    continue
            cmd = [sys.executable, __file__, "--child", str(data), reg, json.dumps(params), "--threads",
                   str(args.threads)]
            t = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            wall = time.perf_counter() - t
            if proc.returncode != 0:
                why = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1][:300]
                rec = {"detector": row, "n": n, "failed": why, "wall": wall,
                       "host": host}
            else:
                rec = {"detector": row, "registry": reg, "params": params, "n": n, "classes": args.classes,
                       "noise": args.noise, "spread": args.spread, **json.loads(proc.stdout.strip().splitlines()[-1]),
                       "wall": wall, "host": host, "load": os.getloadavg()[0]}
            append_jsonl(jsonl, rec)
            rows.append(rec)
            print(f"{row:24s} n={n:>9,}: " + (f"{rec['seconds']:.1f} s, {rec['peak_rss_gb']:.2f} GB, AUROC "
                                              f"{rec['auroc']:.3f}" if "seconds" in rec else rec["failed"]), flush=True)
    render(jsonl, out / "scale.md")
    return 0


def _exponent(rows: list[dict]) -> float | None:
    """Growth exponent of seconds in n between the last two measured sizes (seconds ~ n^k)."""
    if len(rows) < 2:
        return None
    a, b = rows[-2], rows[-1]
    if a["n"] == b["n"] or a["seconds"] <= 0:
        return None
    return math.log(b["seconds"] / a["seconds"]) / math.log(b["n"] / a["n"])


def render(jsonl: Path, md: Path) -> None:
    """Markdown table: per detector and size, wall seconds (and CPU seconds where recorded) / peak GB / AUROC,
    and the growth exponents of the wall seconds."""
    rows = [r for r in read_jsonl(jsonl)]
    sizes = sorted({r["n"] for r in rows})
    lines = ["| detector | " + " | ".join(f"n = {n:,}" for n in sizes) + " | growth exponent |",
             "|---|" + "---|" * (len(sizes) + 1)]
    names = [d[0] for d in DETECTORS]
    names += sorted({r["detector"] for r in rows} - set(names))  # rows of earlier code, renamed to say so
    for name in names:
        rs = {r["n"]: r for r in rows if r["detector"] == name}
        if not rs:
            continue
        cells = []
        for n in sizes:
            r = rs.get(n)
            if r is None:
                cells.append("–")
            elif "seconds" in r:
                cpu = f" (CPU {r['cpu_seconds']:.0f} s)" if "cpu_seconds" in r else ""
                cells.append(f"{r['seconds']:.1f} s{cpu}, {r['peak_rss_gb']:.2f} GB, AUROC {r['auroc']:.3f}")
            elif "skipped" in r:
                cells.append("skipped")
            else:  # a run that failed or was stopped: say what happened
                cells.append(("stopped: " if r["failed"].startswith("stopped") else "failed: ")
                             + f"{r.get('wall', 0) / 60:.0f} min")
        measured = sorted((r for r in rs.values() if "seconds" in r), key=lambda r: r["n"])
        exps = [f"{_exponent(measured[i:i + 2]):.2f}" for i in range(len(measured) - 1)]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {', '.join(exps) or '–'} |")
    md.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
