"""Near-duplicates from cached features: how well does a cosine threshold find altered copies, and how often does
it join distinct pictures?

Data: 1,000 Imagenette train images (a seeded random subset of the 2,500 the detection benchmark uses) and 200
altered copies of 200 of them (seeded), 50 of each kind:

* ``resize``: shorter side scaled to 50 % (bicubic), saved as JPEG quality 90;
* ``jpeg``: re-encoded as JPEG quality 15;
* ``crop``: 6–10 % cut from each side (random per side), saved as JPEG quality 90;
* ``all``: crop, then resize to 60 %, then JPEG quality 30.

The features are the audit's own (``labelsieve.features.extract_features`` with the model named); the
groups come from :func:`labelsieve.detectors.common.duplicates.near_duplicate_groups` — exactly what
``labelsieve audit`` runs: each image's 8 nearest feature neighbours are candidates, verified on 16 px colour
thumbnails. Two methods are measured at each threshold: ``thumbnail`` (that rule, threshold on the thumbnail
correlation) and ``features only`` (the same candidates, threshold on the feature cosine similarity):

* **recall**: share of the 200 copies put in the same group as their original (and per kind);
* **precision**: among all pairs of rows that share a group, the share that are an (original, its copy) pair;
* **false-positive rate**: share of the 1,000 distinct originals grouped with another distinct original, of
  any class and of the same class (Imagenette may hold real near-duplicates, which count as false here;
  the pairs found are listed in the results so a person can look).

The default threshold (``labelsieve.core.defaults.DEFAULT_DUPLICATE_THRESHOLD``) is chosen from this table:
the highest recall whose pair precision is at least 0.99.

    python benchmarks/near_duplicates.py --out benchmarks/results --cache .cache/bench-features

Rows are appended to ``OUT/near_duplicates.jsonl`` and rendered to ``OUT/near_duplicates.md``.
"""

from __future__ import annotations

import argparse
import io
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import append_jsonl, default_threads, host_info, read_jsonl  # noqa: E402
from PIL import Image  # noqa: E402

from labelsieve import testing  # noqa: E402
from labelsieve.core.defaults import DEFAULT_DUPLICATE_THRESHOLD  # noqa: E402
from labelsieve.data import LabeledImages, load_images  # noqa: E402
from labelsieve.detectors.common.duplicates import (  # noqa: E402
    candidate_pairs,
    connected_groups,
    pair_similarity,
    thumbnails,
)
from labelsieve.features import extract_features  # noqa: E402
from labelsieve.models.encoders import create_encoder  # noqa: E402

KINDS = ("resize", "jpeg", "crop", "all")
THRESHOLDS = (0.80, 0.85, 0.88, 0.90, 0.92, 0.93, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99)
METHODS = ("thumbnail", "features only")


def _jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _crop(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    w, h = img.size
    left, top, right, bottom = (rng.uniform(0.06, 0.10, size=4) * [w, h, w, h]).astype(int)
    return img.crop((left, top, w - right, h - bottom))


def _resize(img: Image.Image, f: float) -> Image.Image:
    w, h = img.size
    return img.resize((max(8, round(w * f)), max(8, round(h * f))), Image.BICUBIC)


def alter(img: Image.Image, kind: str, rng: np.random.Generator) -> bytes:
    """JPEG bytes of an altered copy of ``img``."""
    img = img.convert("RGB")
    if kind == "resize":
        return _jpeg(_resize(img, 0.5), 90)
    if kind == "jpeg":
        return _jpeg(img, 15)
    if kind == "crop":
        return _jpeg(_crop(img, rng), 90)
    return _jpeg(_resize(_crop(img, rng), 0.6), 30)


def make_set(work: Path, n: int, n_copies: int, seed: int) -> tuple[LabeledImages, np.ndarray, list[str]]:
    """Originals plus altered copies under ``work``; returns (images, source row of each row or -1, kind)."""
    root, csv = testing.extract_subset("imagenette")
    full = load_images(root, csv)
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(full), size=n, replace=False))
    src_of_copy = rng.choice(n, size=n_copies, replace=False)
    paths = [str(Path(root) / full.paths[i]) for i in pick]
    labels = full.labels[pick].tolist()
    source = [-1] * n
    kinds = [""] * n
    copies = work / "copies"
    for j, s in enumerate(src_of_copy):
        kind = KINDS[j % len(KINDS)]
        target = copies / kind / f"{j:03d}.jpg"
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            with Image.open(paths[s]) as img:
                target.write_bytes(alter(img, kind, np.random.default_rng([seed, j])))
        paths.append(str(target.resolve()))
        labels.append(labels[s])
        source.append(int(s))
        kinds.append(kind)
    images = LabeledImages(root=Path("/"), paths=[p.lstrip("/") for p in paths], labels=np.array(labels),
                           classes=full.classes, classnames=full.classnames, source="near-duplicates benchmark")
    return images, np.array(source), kinds


def measure(groups: np.ndarray, source: np.ndarray, kinds: list[str], labels: np.ndarray) -> dict:
    n_orig = int((source < 0).sum())
    copy_rows = np.nonzero(source >= 0)[0]
    found = np.array([groups[c] >= 0 and groups[c] == groups[source[c]] for c in copy_rows])
    true_pairs = predicted = 0
    fp_any = np.zeros(n_orig, dtype=bool)
    fp_same = np.zeros(n_orig, dtype=bool)
    for g in np.unique(groups[groups >= 0]):
        members = np.nonzero(groups == g)[0]
        for a_i, a in enumerate(members):
            for b in members[a_i + 1:]:
                predicted += 1
                if source[b] == a or source[a] == b:
                    true_pairs += 1
                elif source[a] < 0 and source[b] < 0:
                    fp_any[a] = fp_any[b] = True
                    if labels[a] == labels[b]:
                        fp_same[a] = fp_same[b] = True
    by_kind = {k: float(found[[kinds[c] == k for c in copy_rows]].mean()) for k in KINDS}
    return {"recall": float(found.mean()), "recall_by_kind": by_kind,
            "precision": true_pairs / predicted if predicted else 1.0, "pairs_predicted": predicted,
            "fp_rate_distinct": float(fp_any.mean()), "fp_rate_distinct_same_class": float(fp_same.mean()),
            "n_groups": int(len(np.unique(groups[groups >= 0])))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--cache", default=".cache/bench-features")
    ap.add_argument("--work", default="benchmarks/work/near_duplicates")
    ap.add_argument("--model", default="mini-clip")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--copies", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=default_threads())
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "near_duplicates.jsonl"
    images, source, kinds = make_set(Path(args.work), args.n, args.copies, args.seed)
    shared = testing.shared_dir() / "models"
    models = {"mini-clip": (str(shared / "mini-clip"), None),
              "lite0": ("tf_efficientnet_lite0", str(shared / "tf_efficientnet_lite0.safetensors"))}
    enc = create_encoder(models[args.model][0], pretrained=models[args.model][1])
    feats = extract_features(images, enc, cache_dir=Path(args.cache) / args.model / "imagenette", progress=False)
    x = np.asarray(feats.vectors, dtype=np.float32)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    # similarity of each copy to its original, and of each original to its nearest distinct original
    copy_rows = np.nonzero(source >= 0)[0]
    pair_sim = np.einsum("ij,ij->i", x[copy_rows], x[source[copy_rows]])
    orig = x[source < 0]
    s = orig @ orig.T
    np.fill_diagonal(s, -1)
    nearest = s.max(axis=1)
    host = host_info(args.threads)
    base = {"model": args.model, "n_originals": args.n, "n_copies": args.copies, "seed": args.seed, "host": host}
    append_jsonl(jsonl, {**base, "kind": "similarities",
                         "copy_similarity_min_by_kind": {k: float(pair_sim[[kinds[c] == k for c in copy_rows]].min())
                                                         for k in KINDS},
                         "copy_similarity_median": float(np.median(pair_sim)),
                         "distinct_nearest_quantiles": {q: float(np.quantile(nearest, float(q)))
                                                        for q in ("0.5", "0.9", "0.99", "0.999", "1.0")},
                         "distinct_pairs_above_0.9": [[images.paths[i], images.paths[j], float(s[i, j])]
                                                      for i, j in zip(*np.nonzero(np.triu(s) >= 0.9), strict=True)]})
    t0 = time.perf_counter()
    pairs, feat_sim = candidate_pairs(x, 8, seed=args.seed)
    t_candidates = time.perf_counter() - t0
    t0 = time.perf_counter()
    thumbs, ok = thumbnails(images, np.arange(len(images)), progress=False)
    thumb_sim = pair_similarity(thumbs, pairs)
    t_thumbs = time.perf_counter() - t0
    found = {tuple(p) for p in pairs.tolist()}
    in_candidates = float(np.mean([(min(c, source[c]), max(c, source[c])) in found for c in copy_rows]))
    append_jsonl(jsonl, {**base, "kind": "timing", "candidates_seconds": t_candidates,
                         "thumbnail_seconds": t_thumbs, "n_images": len(images), "all_decoded": bool(ok.all()),
                         "load_avg_1min": os.getloadavg()[0],
                         "copies_among_candidates": in_candidates})
    for method, score in zip(METHODS, (thumb_sim, feat_sim), strict=True):
        for t in THRESHOLDS:
            groups = connected_groups(len(images), pairs[score >= t])
            rec = {**base, "kind": "threshold", "method": method, "threshold": t,
                   **measure(groups, source, kinds, images.labels)}
            append_jsonl(jsonl, rec)
            print(f"{method:14s} t={t:.2f} recall {rec['recall']:.3f} precision {rec['precision']:.3f} "
                  f"fp distinct {rec['fp_rate_distinct']:.4f} same class {rec['fp_rate_distinct_same_class']:.4f}",
                  flush=True)
    render(jsonl, out / "near_duplicates.md")
    return 0


def render(jsonl: Path, md: Path) -> None:
    """Markdown tables from the latest run of each model."""
    rows = read_jsonl(jsonl)
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        sim = [r for r in mine if r["kind"] == "similarities"][-1]
        timing = [r for r in mine if r["kind"] == "timing"][-1]
        lines += [f"### {model} features: {sim['n_originals']} Imagenette images + {sim['n_copies']} altered copies",
                  "", f"Host: {sim['host']}. Copies among the feature candidates (8 nearest neighbours): "
                  f"{timing['copies_among_candidates']:.3f}. Candidate search {timing['candidates_seconds']:.2f} s, "
                  f"thumbnails of all {timing['n_images']} images and pair scores {timing['thumbnail_seconds']:.1f} s "
                  f"(load average {timing.get('load_avg_1min', float('nan')):.1f} on the machine while measured).",
                  ""]
        for method in METHODS:
            th = {r["threshold"]: r for r in mine if r["kind"] == "threshold" and r.get("method") == method}
            lines += [f"Method: {method}" + (" (what `labelsieve audit` runs)" if method == "thumbnail" else ""), "",
                      "| threshold | recall | resize | jpeg q15 | crop 6-10 % | crop+resize+q30 | precision (pairs) "
                      "| FP rate, distinct images | FP rate, same class | groups |", "|---|" + "---|" * 9]
            for t in sorted(th):
                r = th[t]
                k = r["recall_by_kind"]
                mark = " (default)" if method == "thumbnail" and abs(t - DEFAULT_DUPLICATE_THRESHOLD) < 1e-9 else ""
                lines.append(f"| {t:.2f}{mark} | {r['recall']:.3f} | {k['resize']:.2f} | {k['jpeg']:.2f} | "
                             f"{k['crop']:.2f} | {k['all']:.2f} | {r['precision']:.3f} ({r['pairs_predicted']}) | "
                             f"{r['fp_rate_distinct']:.4f} | {r['fp_rate_distinct_same_class']:.4f} | "
                             f"{r['n_groups']} |")
            lines.append("")
        q = sim["distinct_nearest_quantiles"]
        lines += ["", "Cosine similarity of each copy to its original, lowest per kind: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in sim["copy_similarity_min_by_kind"].items())
                  + f"; median {sim['copy_similarity_median']:.3f}. Each distinct original's most similar other "
                  "original: median " + f"{q['0.5']:.3f}, 90th percentile {q['0.9']:.3f}, 99th {q['0.99']:.3f}, "
                  f"max {q['1.0']:.3f}. (Feature cosine similarities.)", ""]
        if sim["distinct_pairs_above_0.9"]:
            lines += ["Distinct originals with similarity >= 0.90 (look at them: real duplicates in Imagenette "
                      "count as false positives above):", ""]
            lines += [f"* {a} — {b}: {v:.3f}" for a, b, v in sim["distinct_pairs_above_0.9"]]
            lines.append("")
    md.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
