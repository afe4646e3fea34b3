"""Recall of the approximate kNN search labelsieve uses above 200,000 rows (faiss IVF, 8-bit codes).

On the scale benchmark's synthetic class-clustered features (``benchmarks/scale.py``: mini-CLIP text
embeddings of 100 CIFAR-100 names as class centres, noise norm ``--spread``), for each size: the time of
:func:`labelsieve.detectors.common.neighbors.knn_search` with the approximate index, and its recall@10
(self excluded) against exact brute-force neighbours of ``--queries`` random rows.

    python benchmarks/knn_recall.py --sizes 300000,1000000 --out benchmarks/results

Rows go to ``OUT/knn_recall.jsonl`` (a rerun skips finished sizes) and ``OUT/knn_recall.md``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import faiss  # noqa: E402
import numpy as np  # noqa: E402
from common import append_jsonl, default_threads, host_info, read_jsonl  # noqa: E402
from scale import make_dataset  # noqa: E402

from labelsieve import testing  # noqa: E402
from labelsieve.detectors.common.neighbors import NPROBE, exact_neighbours, knn_search  # noqa: E402

K = 10


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="300000,1000000")
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--spread", type=float, default=4.0)
    ap.add_argument("--work", default=".cache/bench-scale")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--threads", type=int, default=default_threads())
    args = ap.parse_args(argv)
    faiss.omp_set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "knn_recall.jsonl"
    done = {r["n"] for r in read_jsonl(jsonl)}
    model_dir = str(testing.shared_dir() / "models" / "mini-clip")
    for n in sorted(int(s) for s in args.sizes.split(",")):
        if n in done:
            continue
        d = make_dataset(Path(args.work), n, n_classes=100, spread=args.spread, noise=0.2, seed=0, model_dir=model_dir)
        x = np.load(d / "features.npy", mmap_mode="r")
        t = time.perf_counter()
        _, idx = knn_search(x, K, exact_limit=0, seed=0)
        secs = time.perf_counter() - t
        q = np.sort(np.random.default_rng(1).choice(n, size=min(n, args.queries), replace=False))
        t = time.perf_counter()
        exact = exact_neighbours(x, q, K)
        secs_exact = time.perf_counter() - t
        hits = []
        for row, qi in enumerate(q):
            truth = [j for j in exact[row] if j != qi][:K]
            got = [j for j in idx[qi] if j != qi][:K]
            hits.append(len(set(truth) & set(got)) / K)
        rec = {"n": n, "k": K, "nprobe": NPROBE, "nlist": int(4 * np.sqrt(n)), "recall_at_10": float(np.mean(hits)),
               "seconds_approximate_all_rows": secs, "seconds_exact_per_query": secs_exact / len(q),
               "queries": int(len(q)), "spread": args.spread, "host": host_info(args.threads),
               "load": os.getloadavg()[0]}
        append_jsonl(jsonl, rec)
        print(f"n={n:>9,}: recall@10 {rec['recall_at_10']:.3f}, approximate search of all rows {secs:.1f} s, "
              f"exact {rec['seconds_exact_per_query'] * 1e3:.1f} ms per query", flush=True)
    rows = sorted(read_jsonl(jsonl), key=lambda r: r["n"])
    lines = ["| rows | lists (nlist) | probed | recall@10 | approximate search, all rows (s) | "
             "exact search, per query (ms) | load |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['n']:,} | {r['nlist']} | {r['nprobe']} | {r['recall_at_10']:.3f} | "
              f"{r['seconds_approximate_all_rows']:.1f} | {r['seconds_exact_per_query'] * 1e3:.1f} | {r['load']:.1f} |"
              for r in rows]
    (out / "knn_recall.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
