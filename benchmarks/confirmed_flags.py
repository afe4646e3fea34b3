"""The flags the pictures confirm (``competence.confirmed_precision``) against the flags' true precision.

For each data set of benchmarks/check_sample.py: its kept audit (``--work``, written by that script; the default
detector, mini CLIP, seed 0) gives the flags; :func:`labelsieve.detectors.common.competence.measure_competence`
then measures, on the cached mini-CLIP features, the share of the flagged rows that the kept-row probe and the
zero-shot classifier both read as another class than the given label, as every audit now does. Recorded beside
it: the flags' true precision and recall, and whether the audit would raise its caution.

    python benchmarks/confirmed_flags.py --cache /work/bench-cache --work benchmarks/work/check_sample

Results: ``OUT/confirmed_flags.jsonl`` and ``OUT/confirmed_flags.md`` (docs/benchmarks.md §14).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from check_sample import DATASETS  # noqa: E402
from common import append_jsonl, default_threads, host_info, mini_clip_cache, mini_clip_encoder, read_jsonl  # noqa: E402
from detection import load_dataset  # noqa: E402

from labelsieve.core.defaults import DEFAULT_METHOD  # noqa: E402
from labelsieve.detectors.common.base import DetectionContext, DetectionResult  # noqa: E402
from labelsieve.detectors.common.competence import measure_competence  # noqa: E402
from labelsieve.features import extract_features  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default=",".join(DATASETS))
    ap.add_argument("--cache", required=True, help="feature cache root (holds mini-clip/<family>)")
    ap.add_argument("--work", default="benchmarks/work/check_sample", help="check_sample.py's --work")
    ap.add_argument("--method", default=DEFAULT_METHOD)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--threads", type=int, default=default_threads())
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "confirmed_flags.jsonl"
    enc = mini_clip_encoder()
    for dname in args.datasets.split(","):
        images, true = load_dataset(dname)
        audit_csv = Path(args.work) / f"{dname}-{args.method.replace(',', '+')}-s0" / "audit.csv"
        if not audit_csv.is_file():
            print(f"{dname}: no audit at {audit_csv} (run benchmarks/check_sample.py first)", file=sys.stderr)
            continue
        feats = extract_features(images, enc, cache_dir=mini_clip_cache(args.cache, dname),
                                 progress=False)
        x = np.asarray(feats.vectors, dtype=np.float32)
        table = pd.read_csv(audit_csv, keep_default_na=False).set_index("path").loc[images.paths]
        flags = table["is_noisy"].astype(str).str.lower().eq("true").to_numpy()
        p = pd.to_numeric(table["p_clean"]).to_numpy(dtype=np.float64)
        ctx = DetectionContext(labels=images.labels, classnames=images.classnames, images=images, encoder=enc,
                               features_fn=lambda x=x: x, device=torch.device("cpu"), seed=0, progress=False)
        res = DetectionResult(p_clean=p, probs=np.full((len(p), images.n_classes), 1.0 / images.n_classes),
                              threshold=0.5, rule="the kept audit's flags", flags=flags)
        comp = measure_competence(ctx, res)
        noisy = images.labels != true
        rec = {"dataset": dname, "method": args.method, "n": len(images), "n_flagged": int(flags.sum()),
               "confirmed_precision": comp["confirmed_precision"], "confirmed_recall": comp["confirmed_recall"],
               "caution": comp["flags_caution"], "reader_agreement": comp.get("reader_agreement"),
               "true_precision": float(noisy[flags].mean()) if flags.any() else None,
               "true_recall": float(noisy[flags].sum() / noisy.sum()) if noisy.any() else None,
               "host": host_info(args.threads), "load": os.getloadavg()}
        append_jsonl(jsonl, rec)
        print(f"{dname:18s} confirmed {rec['confirmed_precision']:.3f} true {rec['true_precision']:.3f} "
              f"caution {bool(rec['caution'])}", flush=True)
    render(jsonl, out / "confirmed_flags.md")
    return 0


def _f(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}"


def render(jsonl: Path, md: Path) -> None:
    latest = {(r["dataset"], r["method"]): r for r in read_jsonl(jsonl)}
    lines = ["| data set | flagged | reader agreement | confirmed by the pictures: precision / recall | caution | true "
             "precision / recall |", "|---|---|---|---|---|---|"]
    for r in latest.values():
        caution = "yes" if r["caution"] else "no"
        lines.append(f"| {r['dataset']} | {r['n_flagged']:,} | {_f(r['reader_agreement'])} | "
                     f"{_f(r['confirmed_precision'])} / {_f(r['confirmed_recall'])} | {caution} | "
                     f"{_f(r['true_precision'])} / {_f(r['true_recall'])} |")
    md.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
