"""Calibration benchmark: is p_clean a probability, and does the noise estimate land on the true rate?

For every detector on the detection benchmark's six noisy sets (``benchmarks/detection.py``) and two nearly
clean real sets with their original labels —

* ``imagenette-val``: the 1,000 Imagenette validation images;
* ``cifar10-test``: the first 2,000 CIFAR-10 test images

— the raw result of ``detector.detect`` is scored, then calibrated exactly as ``labelsieve audit`` does
(:func:`labelsieve.detectors.common.calibration.calibrate`), and scored again. Each row records, before and
after calibration: the expected calibration error of p_clean against the truth (10 bins), the mean of
1 − p_clean, AUROC; and the noise estimate with its 95 % bootstrap interval, whether the interval holds the
true rate, the flag rate (the detector's decision, unchanged by calibration), F1 of that decision and F1 of
the alternative rule "flag if calibrated p_clean < 0.5".

Raw results are kept as ``RAW/<dataset>__<detector>.npz`` (p_clean, the decision, threshold, probs, labels,
truth, per-member columns) and reused by a rerun, so calibration can be re-measured without re-running the
detectors (DEFT, co-divide and the ensemble take minutes each on a CPU).

    python benchmarks/calibration.py --out benchmarks/results --cache .cache/bench-features --raw benchmarks/work/raw

Rows are appended to ``OUT/calibration.jsonl`` (a rerun skips finished rows) and rendered to
``OUT/calibration.md``, which docs/benchmarks.md quotes.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import append_jsonl, default_threads, host_info, read_jsonl  # noqa: E402
from detection import DATASETS as NOISY_DATASETS  # noqa: E402
from detection import load_dataset as load_noisy  # noqa: E402

from labelsieve import testing  # noqa: E402
from labelsieve.audit.evaluate import detection_metrics  # noqa: E402
from labelsieve.core.runtime import seed_everything  # noqa: E402
from labelsieve.data import load_images  # noqa: E402
from labelsieve.detectors import DetectionResult, create_detector  # noqa: E402
from labelsieve.detectors.common.base import DetectionContext  # noqa: E402
from labelsieve.detectors.common.calibration import calibrate, fit_calibration  # noqa: E402
from labelsieve.features import extract_features  # noqa: E402
from labelsieve.models.encoders import create_encoder  # noqa: E402

CLEAN_DATASETS = ["imagenette-val", "cifar10-test"]
DATASETS = NOISY_DATASETS + CLEAN_DATASETS
# (row name, registry name, params)
DETECTORS = [
    ("label_match", "label_match", {}),
    ("knn", "knn", {}),
    ("confident_learning", "confident_learning", {}),
    ("small_loss", "small_loss", {}),
    ("gmm", "gmm", {}),
    ("turn (no fine-tune)", "turn", {"finetune": False}),
    ("deft frozen (paper recipe)", "deft", {"peft": "none"}),
    ("codivide frozen", "codivide", {"frozen": True}),
    ("ensemble (default)", "ensemble", {}),
]
assert not any("," in d[0] for d in DETECTORS)


def load_dataset(name: str) -> tuple:
    """(images with given labels, true label indices); the clean sets' given labels are their own."""
    if name == "imagenette-val":
        images = load_images(*testing.extract_subset("imagenette-val"))
        return images, images.labels.copy()
    if name == "cifar10-test":
        images = load_images(*testing.extract_subset("cifar10-test", 2000, first=True))
        return images, images.labels.copy()
    return load_noisy(name)


def raw_file(raw_dir: Path, dataset: str, row: str) -> Path:
    return raw_dir / f"{dataset}__{row.replace(' ', '_').replace('/', '')}.npz"


def save_raw(path: Path, res: DetectionResult, labels: np.ndarray, true: np.ndarray, seconds: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = {f"col_{k}": np.asarray(v, dtype=np.float64) for k, v in res.columns.items()}
    tmp = path.with_suffix(".part.npz")
    np.savez(tmp, p_clean=res.p_clean, flags=res.is_noisy, threshold=res.threshold,
             probs=res.probs.astype(np.float32), labels=labels, true=true, seconds=seconds, **cols)
    tmp.replace(path)


def load_raw(path: Path) -> tuple[DetectionResult, np.ndarray, np.ndarray, float]:
    d = np.load(path)
    cols = {k[4:]: d[k] for k in d.files if k.startswith("col_")}
    res = DetectionResult(p_clean=d["p_clean"], probs=d["probs"], threshold=float(d["threshold"]),
                          flags=d["flags"].astype(bool), columns=cols)
    return res, d["labels"], d["true"], float(d["seconds"])


def score(raw: DetectionResult, labels: np.ndarray, true: np.ndarray) -> dict:
    """Metrics of the raw and the calibrated result against the truth."""
    noisy = labels != true
    t = time.perf_counter()
    cal = calibrate(raw, labels=labels)
    secs = time.perf_counter() - t
    before = detection_metrics(noisy, raw.p_clean, raw.is_noisy)
    after = detection_metrics(noisy, cal.p_clean, cal.is_noisy)
    half = detection_metrics(noisy, cal.p_clean, cal.p_clean < 0.5)
    c = cal.info["calibration"]
    est = c["noise_estimate"]
    logit_only = fit_calibration(raw.p_clean, raw.is_noisy, scales=("logit",))  # ablation: one scale
    p_logit = logit_only(raw.p_clean)
    lo, hi = est["interval"]
    return {"noise_rate": float(noisy.mean()), "n": int(len(labels)),
            "ece_raw": before["ece"], "ece": after["ece"],
            "mean_noise_raw": before["expected_noise_rate"], "estimate": est["rate"], "interval": [lo, hi],
            "covered": bool(lo <= noisy.mean() <= hi), "estimate_error": est["rate"] - float(noisy.mean()),
            "flag_rate": float(raw.is_noisy.mean()), "f1": before["f1"], "precision": before["precision"],
            "recall": before["recall"], "auroc_raw": before["auroc"], "auroc": after["auroc"],
            "flag_rate_half": float((cal.p_clean < 0.5).mean()), "f1_half": half["f1"],
            "scale": c["scale"], "status": c["status"], "calibrate_seconds": secs, "load_avg_1min": os.getloadavg()[0],
            "ece_logit_only": detection_metrics(noisy, p_logit, raw.is_noisy)["ece"],
            "estimate_logit_only": float(1.0 - p_logit.mean()),
            "per_class_error_max": max(abs(est["per_class"][k] - float(noisy[labels == k].mean()))
                                       for k in est["per_class"] if (labels == k).any())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default=",".join(DATASETS))
    ap.add_argument("--detectors", default=",".join(d[0] for d in DETECTORS))
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--cache", default=".cache/bench-features")
    ap.add_argument("--raw", default="benchmarks/work/raw", help="folder of raw detector results (kept, reused)")
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "calibration.jsonl"
    done = {(r["dataset"], r["detector"], r.get("seed", 0)) for r in read_jsonl(jsonl)}
    wanted = set(args.detectors.split(","))
    dets = [d for d in DETECTORS if d[0] in wanted]
    raw_dir = Path(args.raw)
    host = host_info(args.threads)
    enc = None
    for dname in args.datasets.split(","):
        todo = [d for d in dets if (dname, d[0], args.seed) not in done]
        if not todo:
            continue
        ctx = None
        for row, reg, params in todo:
            f = raw_file(raw_dir, dname, row)
            if f.is_file():
                raw, labels, true, secs = load_raw(f)
            else:
                if ctx is None:
                    enc = enc or create_encoder(str(testing.shared_dir() / "models" / "mini-clip"))
                    images, true = load_dataset(dname)
                    feats = extract_features(images, enc, cache_dir=Path(args.cache) / "mini-clip" /
                                             dname.split("-")[0], progress=False)
                    x = np.asarray(feats.vectors, dtype=np.float32)
                    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
                    ctx = DetectionContext(labels=images.labels, classnames=images.classnames, images=images,
                                           encoder=enc, features_fn=lambda x=x: x, device=enc.device,
                                           seed=args.seed, cache_dir=Path(args.cache) / "work", progress=False)
                seed_everything(args.seed)
                t = time.perf_counter()
                raw = create_detector(reg, **params).detect(ctx)
                secs = time.perf_counter() - t
                labels = ctx.labels
                save_raw(f, raw, labels, true, secs)
            rec = {"dataset": dname, "model": "mini-clip", "detector": row, "seed": args.seed, "params": params,
                   "detector_seconds": secs, "host": host, **score(raw, labels, true)}
            append_jsonl(jsonl, rec)
            print(f"{dname:18s} {row:28s} ECE {rec['ece_raw']:.3f} -> {rec['ece']:.3f}  estimate "
                  f"{rec['estimate']:.3f} [{rec['interval'][0]:.3f}, {rec['interval'][1]:.3f}] true "
                  f"{rec['noise_rate']:.3f}  flagged {rec['flag_rate']:.3f}", flush=True)
    render(jsonl, out / "calibration.md")
    return 0


def _table(rows: list[dict], datasets: list[str], names: list[str], cell) -> list[str]:
    lines = ["| detector | " + " | ".join(datasets) + " |", "|---|" + "---|" * len(datasets)]
    for name in names:
        cells = []
        for d in datasets:
            hit = [r for r in rows if r["dataset"] == d and r["detector"] == name]
            cells.append(cell(hit[-1]) if hit else "–")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + [""]


def render(jsonl: Path, md: Path) -> None:
    """Markdown tables from the JSONL results (the latest row of each dataset and detector)."""
    rows = read_jsonl(jsonl)
    datasets = [d for d in DATASETS if any(r["dataset"] == d for r in rows)]
    order = {name: i for i, (name, *_) in enumerate(DETECTORS)}
    names = sorted({r["detector"] for r in rows}, key=lambda n: order.get(n, 99))
    truth = {d: next(r["noise_rate"] for r in rows if r["dataset"] == d) for d in datasets}
    noisy = [d for d in datasets if d in NOISY_DATASETS]
    clean = [d for d in datasets if d in CLEAN_DATASETS]
    hosts = list({str(r["host"]): r["host"] for r in rows}.values())
    lines = ["Host: " + "; ".join(map(str, hosts)) + ". Mini CLIP features, seed 0.", "",
             "### Expected calibration error of p_clean (10 bins), raw → calibrated", ""]
    lines += _table(rows, datasets, names, lambda r: f"{r['ece_raw']:.3f} → {r['ece']:.3f}")
    lines += ["### Noise estimate (mean of 1 − calibrated p_clean) [95 % interval] against the true rate", "",
              "True rate: " + ", ".join(f"{d} {truth[d]:.3f}" for d in datasets) + ". A * marks an interval "
              "that holds the true rate.", ""]
    lines += _table(rows, datasets, names, lambda r: f"{r['estimate']:.3f} [{r['interval'][0]:.3f}, "
                                                     f"{r['interval'][1]:.3f}]" + ("*" if r["covered"] else ""))
    lines += ["### Before calibration: mean of 1 − raw p_clean, and the share flagged", ""]
    lines += _table(rows, datasets, names, lambda r: f"{r['mean_noise_raw']:.3f} / {r['flag_rate']:.3f}")
    if clean:
        lines += ["### Nearly clean sets: share flagged (the detector's decision) and the estimate", ""]
        lines += _table(rows, clean, names, lambda r: f"flags {r['flag_rate']:.1%}, estimate {r['estimate']:.1%}")
    lines += ["### Ablation: the mixture on the logit scale only (no choice of scale): ECE / estimate", ""]
    lines += _table(rows, datasets, names, lambda r: f"{r['ece_logit_only']:.3f} / {r['estimate_logit_only']:.3f}")
    lines += ["### Summary over the sets each detector ran on", "",
              "| detector | sets | mean ECE raw | mean ECE calibrated | mean abs. estimate error | intervals holding "
              "the truth | mean abs. error of mean(1 − raw p_clean) | mean F1, decision kept | mean F1, calibrated "
              "p_clean < 0.5 | max AUROC change |", "|---|" + "---|" * 9]
    for name in names:
        sub = [r for r in rows if r["detector"] == name and r["dataset"] in datasets]
        sub = list({r["dataset"]: r for r in sub}.values())
        on_noisy = [r for r in sub if r["dataset"] in noisy]
        d_auc = [abs(r["auroc"] - r["auroc_raw"]) for r in on_noisy if r["auroc"] is not None]
        f1 = [r["f1"] for r in on_noisy if r["f1"] is not None]
        f1h = [r["f1_half"] for r in on_noisy if r["f1_half"] is not None]
        lines.append(f"| {name} | {len(sub)} | {np.mean([r['ece_raw'] for r in sub]):.3f} | "
                     f"{np.mean([r['ece'] for r in sub]):.3f} | "
                     f"{np.mean([abs(r['estimate_error']) for r in sub]):.3f} | "
                     f"{sum(r['covered'] for r in sub)} of {len(sub)} | "
                     f"{np.mean([abs(r['mean_noise_raw'] - r['noise_rate']) for r in sub]):.3f} | "
                     f"{np.mean(f1):.3f} | {np.mean(f1h):.3f} | {max(d_auc) if d_auc else 0:.1e} |")
    lines.append("")
    md.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
