"""Re-audit benchmark: do reviewed rows make the next audit better (``labelsieve audit --reviewed``)?

On a noisy set with known truth: audit it (default ensemble, mini CLIP), let a simulated reviewer
decide the top ``--top`` rows with the truth (keep if the given label is right, else relabel to the
true class), re-audit with those decisions, and count the true label errors in the next ``--top``
ranks (the re-audit's first ``--top`` rows nobody reviewed) against the first audit's ranks
``top+1 … 2·top``. Also reported: precision of the flag, AUROC of 1 − p_clean and the flagged count
over the rows nobody reviewed, for both audits.

Variants of the re-audit (``--variants``):

* ``reviewed`` — what ``labelsieve audit --reviewed`` does: corrected labels for every detector, the reviewed
  rows ranked last; the ensemble's stacking leaves them out (``trusted_weight`` 0, the default since issue 18);
* ``trusted_weight 5`` — the reviewed rows also join the stacking fit as clean, each weighing 5 unanimous rows
  (the default before issue 18); ``trusted_weight 1`` and ``trusted_weight 20`` likewise.

    python benchmarks/reaudit.py --cache /path/to/a/copy/of/bench-before --threads 1 \
        --datasets cifar10n-aggre,cifar10n-worst,imagenette-pair30,imagenette-sym40   # what docs/benchmarks.md quotes
    python benchmarks/reaudit.py --cache ... --threads 1 --datasets cifar10n-worst --first 2500 --variants reviewed

Each audit is one default-ensemble run (about 30 s for 2,500 cached images on 2 idle cores; 5 min
with the machine shared by four other jobs). ``--first N`` keeps the first N images of a dataset.

The feature cache must hold mini-CLIP features of the datasets (``<cache>/mini-clip/<cifar10n|imagenette>``,
as ``benchmarks/detection.py`` writes them). Results are appended to ``OUT/reaudit.jsonl`` (a rerun
skips finished rows) and rendered to ``OUT/reaudit.md``, which docs/benchmarks.md quotes.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import append_jsonl, default_threads, host_info, mini_clip_cache, mini_clip_encoder, read_jsonl  # noqa: E402
from detection import load_dataset  # noqa: E402

from labelsieve.api import run_detector  # noqa: E402
from labelsieve.audit.decisions import reviews_frame  # noqa: E402
from labelsieve.audit.evaluate import detection_metrics  # noqa: E402

DATASETS = ["cifar10n-worst", "imagenette-sym40", "imagenette-pair30"]
VARIANTS = {"reviewed": {}, "trusted_weight 5": {"trusted_weight": 5.0}, "trusted_weight 1": {"trusted_weight": 1.0},
            "trusted_weight 20": {"trusted_weight": 20.0}}


def simulate_review(table, images, true: np.ndarray, top: int):
    """The decisions of a reviewer who knows the truth, on the ``top`` first-ranked rows."""
    pos = {p: i for i, p in enumerate(images.paths)}
    rows = table.iloc[:top]
    idx = np.array([pos[p] for p in rows["path"]])
    truth = np.asarray(images.classes, dtype=object)[true[idx]]
    given = rows["given_label"].to_numpy(dtype=object)
    reviews = np.where(given == truth, "keep", "relabel:" + truth.astype(str))
    return reviews_frame(rows["path"].tolist(), reviews.tolist(), source="simulated reviewer", given=given.tolist(),
                         suggested=rows["suggested_label"].tolist())


def unreviewed_stats(table, noisy_by_path: dict[str, bool], ranks: slice) -> dict:
    """Counts over the rows nobody reviewed (``review`` empty), in rank order; ``ranks`` picks the window."""
    rest = table[table["review"] == ""]
    noisy = np.array([noisy_by_path[p] for p in rest["path"]])
    window = noisy[ranks]
    m = detection_metrics(noisy, rest["p_clean"].to_numpy(dtype=float), rest["is_noisy"].to_numpy(dtype=bool))
    return {"errors_in_window": int(window.sum()), "window": len(window), "unreviewed": len(rest),
            "unreviewed_noisy": int(noisy.sum()), "auroc": m["auroc"], "precision": m["precision"],
            "recall": m["recall"], "f1": m["f1"], "n_flagged": m["n_flagged"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default=",".join(DATASETS))
    ap.add_argument("--variants", default="reviewed,trusted_weight 5")
    ap.add_argument("--cache", required=True, help="feature cache (a copy of bench-before; never a shared one)")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--top", type=int, default=200)
    ap.add_argument("--first", type=int, default=0, help="use only the first N images of each dataset (0: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--save", help="also write each audit table here (first-<set>.csv, reaudit-<set>-<variant>.csv)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "reaudit.jsonl"
    done = {(r["dataset"], r["variant"], r["seed"], r["top"]) for r in read_jsonl(jsonl)}
    suffix = f"-first{args.first}" if args.first else ""
    enc = mini_clip_encoder()
    host = host_info(args.threads)
    k = args.top
    for dname in args.datasets.split(","):
        variants = [v for v in args.variants.split(",") if (dname + suffix, v, args.seed, k) not in done]
        if not variants:
            continue
        images, true = load_dataset(dname)
        if args.first:
            images, true = images.subset(np.arange(args.first)), true[: args.first]
        cache = mini_clip_cache(args.cache, dname)
        noisy_by_path = dict(zip(images.paths, (images.labels != true).tolist(), strict=True))
        t = time.perf_counter()
        first = run_detector(images, enc, seed=args.seed, cache_dir=cache, progress=False)
        secs_first = time.perf_counter() - t
        if args.save:
            Path(args.save).mkdir(parents=True, exist_ok=True)
            first.table.to_csv(Path(args.save) / f"first-{dname}{suffix}.csv", index=False)
        before = unreviewed_stats(first.table, noisy_by_path, slice(k, 2 * k))
        # the first audit's rows k+1 .. 2k are its next window; its unreviewed stats exclude the top k
        rest_first = first.table.iloc[k:].copy()
        before_rest = unreviewed_stats(rest_first, noisy_by_path, slice(0, k))
        reviews = simulate_review(first.table, images, true, k)
        n_relabel = int(reviews["review"].str.startswith("relabel").sum())
        for variant in variants:
            t = time.perf_counter()
            second = run_detector(images, enc, seed=args.seed, cache_dir=cache, progress=False, reviewed=[reviews],
                                  params=VARIANTS[variant] or None)
            secs = time.perf_counter() - t
            if args.save:
                second.table.to_csv(Path(args.save) / f"reaudit-{dname}{suffix}-{variant.replace(' ', '_')}.csv",
                                    index=False)
            after = unreviewed_stats(second.table, noisy_by_path, slice(0, k))
            rec = {"dataset": dname + suffix, "variant": variant, "seed": args.seed, "top": k, "n": len(images),
                   "noise_rate": float((images.labels != true).mean()), "reviewed_relabelled": n_relabel,
                   "reviewed_kept": k - n_relabel,
                   "errors_first_audit_ranks": before["errors_in_window"],
                   "errors_reaudit_next": after["errors_in_window"],
                   "first_unreviewed": before_rest, "reaudit_unreviewed": after, "seconds_first": secs_first,
                   "seconds_reaudit": secs, "host": host, "load": os.getloadavg()}
            assert before["errors_in_window"] == before_rest["errors_in_window"]
            append_jsonl(jsonl, rec)
            print(f"{dname + suffix:18s} {variant:18s} errors in next {k}: first audit {before['errors_in_window']} -> "
                  f"re-audit {after['errors_in_window']}; AUROC (unreviewed) {before_rest['auroc']:.4f} -> "
                  f"{after['auroc']:.4f}; {secs:.0f}s", flush=True)
    render(jsonl, out / "reaudit.md")
    return 0


def render(jsonl: Path, md: Path) -> None:
    """The Markdown table docs/benchmarks.md quotes."""
    rows = read_jsonl(jsonl)
    lines = ["| dataset | re-audit | reviewed top (kept / relabelled) | true errors in ranks 201–400 of the first "
             "audit | true errors in the re-audit's next 200 | gain | AUROC unreviewed (first → re-audit) | "
             "precision of the flag, unreviewed (first → re-audit) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        a, b = r["first_unreviewed"], r["reaudit_unreviewed"]
        gain = r["errors_reaudit_next"] - r["errors_first_audit_ranks"]
        lines.append(f"| {r['dataset']} (n={r['n']:,}, noise {r['noise_rate']:.0%}, seed {r['seed']}) | "
                     f"{r['variant']} | {r['top']} ({r['reviewed_kept']} / {r['reviewed_relabelled']}) | "
                     f"{r['errors_first_audit_ranks']} | {r['errors_reaudit_next']} | {gain:+d} | "
                     f"{a['auroc']:.4f} → {b['auroc']:.4f} | "
                     f"{a['precision']:.3f} → {b['precision']:.3f} |")
    hosts = {str(r["host"]) for r in rows}
    loads = [r["load"][0] for r in rows if "load" in r]
    lines += ["", f"Host: {'; '.join(sorted(hosts))}. Load average while running: "
              f"{min(loads):.1f}–{max(loads):.1f} (timings in reaudit.jsonl are contaminated by it)." if loads else ""]
    md.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
