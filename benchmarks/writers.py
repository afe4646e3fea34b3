"""The audit's last steps at scale: calibration, the audit table, audit.csv, audit.json and audit.html.

For each size a synthetic detector result over ``--classes`` classes (p_clean uniform, 20 % flagged, class
probabilities drawn per row; paths ``class042/00001234.jpg``; one content digest per row) goes through what
``labelsieve audit`` runs after the detector (``labelsieve.api``): :func:`calibrate` (isotonic fit and the
noise-rate bootstrap), :func:`build_table`, :func:`summarise`, :func:`write_csv`, :func:`write_json` and
:func:`write_html` (the page embeds at most 50,000 rows and 1,000 thumbnails; the images do not exist, so
the gallery shows placeholders, as for unreadable images). Each size runs in its own process, so its peak
RSS is its own.

    python benchmarks/writers.py --sizes 100000,1000000,10000000 --out benchmarks/results

Rows go to ``OUT/writers.jsonl`` (a rerun skips finished sizes) and ``OUT/writers.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import append_jsonl, host_info, read_jsonl

STEPS = ("calibrate", "table", "summary", "audit.csv", "audit.json", "audit.html")


def run_one(n: int, n_classes: int, seed: int) -> dict:
    """Child process: the steps on ``n`` synthetic rows; seconds per step, file sizes, peak RSS."""
    import resource

    from labelsieve.audit.html import write_html
    from labelsieve.audit.table import build_table, summarise
    from labelsieve.audit.writers import write_csv, write_json
    from labelsieve.data import LabeledImages
    from labelsieve.detectors import DetectionResult
    from labelsieve.detectors.common.calibration import calibrate

    rng = np.random.default_rng(seed)
    classes = [f"class{c:03d}" for c in range(n_classes)]
    labels = rng.integers(0, n_classes, n)
    paths = [f"{classes[c]}/{i:08d}.jpg" for i, c in enumerate(labels.tolist())]
    tmp = Path(tempfile.mkdtemp(prefix="ls-writers-"))
    images = LabeledImages(root=tmp, paths=paths, labels=labels, classes=classes, classnames=classes,
                           source="synthetic")
    probs = np.empty((n, n_classes), dtype=np.float32)
    for i in range(0, n, 1_000_000):  # a block at a time: no (n, C) float64 draw
        g = rng.gamma(0.3, size=(min(n, i + 1_000_000) - i, n_classes)).astype(np.float32) + 1e-6
        probs[i : i + len(g)] = g / g.sum(1, keepdims=True)
    p_clean = np.clip(rng.beta(4, 1, n) * (rng.random(n) > 0.2) + 0.01 * rng.random(n), 0, 1)
    result = DetectionResult(p_clean=p_clean, probs=probs, threshold=0.5, rule="synthetic")
    digests = [rng.bytes(16) for _ in range(n)]
    seconds: dict[str, float] = {}

    def timed(step: str, fn, *a, **kw):
        t = time.perf_counter()
        out = fn(*a, **kw)
        seconds[step] = time.perf_counter() - t
        return out

    result = timed("calibrate", calibrate, result, labels=labels)
    table = timed("table", build_table, images, np.ones(n, dtype=bool), result, digests=digests)
    summary = timed("summary", summarise, table, images, result)
    summary.update(method="synthetic", model={"name": "none"}, created="2026-11-30T00:00:00+0000",
                   input={"input_hash": f"synthetic-{n}"})
    files = {"audit.csv": timed("audit.csv", write_csv, table, tmp / "audit.csv"),
             "audit.json": timed("audit.json", write_json, summary, tmp / "audit.json"),
             "audit.html": timed("audit.html", write_html, table, summary, image_root=tmp,
                                 out_path=tmp / "audit.html")}
    sizes = {k: p.stat().st_size / 2**20 for k, p in files.items()}
    for p in files.values():
        p.unlink()
    tmp.rmdir()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"seconds": seconds, "total_seconds": sum(seconds.values()), "file_mb": sizes, "peak_rss_gb": rss}


def render(jsonl: Path, out: Path) -> None:
    rows = sorted((r for r in read_jsonl(jsonl) if "seconds" in r), key=lambda r: r["n"])
    lines = ["| rows | classes | code | " + " | ".join(STEPS) + " | total | peak RSS | audit.csv | audit.html | load |",
             "|---|---|---|" + "---|" * (len(STEPS) + 5)]
    for r in rows:
        lines.append(f"| {r['n']:,} | {r['classes']} | {r.get('code', 'current')} | "
                     + " | ".join(f"{r['seconds'][s]:.1f} s" for s in STEPS)
                     + f" | {r['total_seconds']:.1f} s | {r['peak_rss_gb']:.2f} GB | {r['file_mb']['audit.csv']:.0f} MB"
                     f" | {r['file_mb']['audit.html']:.1f} MB | {r.get('load', float('nan')):.1f} |")
    out.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000,1000000,10000000")
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(run_one(args.child, args.classes, args.seed)))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "writers.jsonl"
    done = {(r["n"], r.get("classes")) for r in read_jsonl(jsonl)}
    for n in sorted(int(s) for s in args.sizes.split(",")):
        if (n, args.classes) in done:
            continue
        proc = subprocess.run([sys.executable, __file__, "--child", str(n), "--classes", str(args.classes),
                               "--seed", str(args.seed)], capture_output=True, text=True)
        if proc.returncode != 0:
            rec = {"n": n, "classes": args.classes, "failed": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
        else:
            rec = {"n": n, "classes": args.classes, **json.loads(proc.stdout.strip().splitlines()[-1]),
                   "host": host_info(1), "load": os.getloadavg()[0]}
        append_jsonl(jsonl, rec)
        print(n, rec.get("total_seconds", rec.get("failed")), flush=True)
    render(jsonl, out / "writers.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
