"""What the feature cache's checks cost: warm ``extract_features`` on cached features, timed.

A warm run (every vector already cached) still hashes nothing new but must look up every file's
content digest, load the chunk index and read the request's view. The checks this measures (issue 9):
the content-digest memo keyed on inode and ctime as well as size and mtime, and the per-chunk and
per-view content digests verified on read. Run it once with ``PYTHONPATH`` pointing at each version of
the code (e.g. main and a branch), each on its own copy of the same cache, and compare the rows::

    PYTHONPATH=/path/to/main python benchmarks/feature_cache.py --cache /tmp/cache-main --label main
    PYTHONPATH=$PWD python benchmarks/feature_cache.py --cache /tmp/cache-branch --label branch

Data: the first 10,000 CIFAR-10 train images (``labelsieve.testing.extract_subset``), mini CLIP features.
The first call fills whatever the cache lacks (and, for a cache written by an older version, upgrades
it); it is timed and recorded as ``first_seconds`` but is not a warm run. Every row records the 1-minute
load average before and after, because timings on a shared machine are contaminated by other work.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import labelsieve
from labelsieve import testing
from labelsieve.data import load_images
from labelsieve.data.hashing import ContentHasher
from labelsieve.features import FeatureStore, extract_features
from labelsieve.models.encoders import create_encoder

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_jsonl, default_threads, host_info, read_jsonl  # noqa: E402


def _code_version() -> str:
    pkg = Path(labelsieve.__file__).resolve().parent
    try:
        return subprocess.run(["git", "-C", str(pkg), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


#: The parts of a warm call timed separately (both before and after issue 9 have them; before, ``_view``
#: loads the chunk index a second time, inside it).
PARTS = [(ContentHasher, "digests"), (FeatureStore, "_index"), (FeatureStore, "_view")]


def _time_parts(acc: dict[str, list[float]]) -> None:
    """Wrap the parts of a warm call so each call's seconds are appended to ``acc[name]``."""
    for owner, name in PARTS:
        real = getattr(owner, name)

        def timed(*a, _real=real, _name=name, **k):
            t = time.perf_counter()
            try:
                return _real(*a, **k)
            finally:
                acc.setdefault(_name, []).append(time.perf_counter() - t)

        setattr(owner, name, timed)


def render(rows: list[dict]) -> str:
    """The results as a markdown table, one row per run."""
    lines = ["| code | n | first call (s) | images extracted | warm median (s) | warm min (s) | of which: digest "
             "memo / chunk index / view (s per call) | load 1 min before → after |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        parts = " / ".join(f"{r['parts'][n]:.3f}" for _, n in PARTS)
        lines.append(f"| {r['label']} ({r['code']}) | {r['n']:,} | {r['first_seconds']:.2f} | {r['first_extracted']} | "
                     f"{r['warm_median']:.3f} | {r['warm_min']:.3f} | {parts} | {r['load_before']:.1f} → "
                     f"{r['load_after']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", required=True, help="feature cache folder (a copy: the first call may write to it)")
    ap.add_argument("--label", required=True, help="name of the code version in the result row")
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--threads", type=int, default=default_threads())
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    root, csv = testing.extract_subset("cifar10", args.n, first=True)
    images = load_images(root, csv)
    enc = create_encoder(str(testing.mini_clip_dir()), pretrained=None, device="cpu")
    load_before = os.getloadavg()[0]
    t = time.perf_counter()
    first = extract_features(images, enc, cache_dir=args.cache, progress=False)
    first_s = time.perf_counter() - t
    warm = []
    acc: dict[str, list[float]] = {}
    _time_parts(acc)
    for _ in range(args.repeats):
        t = time.perf_counter()
        f = extract_features(images, enc, cache_dir=args.cache, progress=False)
        warm.append(time.perf_counter() - t)
        assert f.n_extracted == 0
    rec = {"run": f"{args.label}-{time.strftime('%Y%m%dT%H%M%S')}", "label": args.label, "code": _code_version(),
           "n": len(images), "first_seconds": round(first_s, 3), "first_extracted": first.n_extracted,
           "warm_seconds": [round(w, 4) for w in warm], "warm_median": round(statistics.median(warm), 4),
           "warm_min": round(min(warm), 4),
           "parts": {n: round(sum(acc[n]) / args.repeats, 4) for _, n in PARTS}, "load_before": round(load_before, 2),
           "load_after": round(os.getloadavg()[0], 2), "host": host_info(args.threads)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    append_jsonl(out / "feature_cache.jsonl", rec)
    (out / "feature_cache.md").write_text(render(read_jsonl(out / "feature_cache.jsonl")))
    print(f"{args.label}: first {first_s:.2f}s ({first.n_extracted} extracted), warm median "
          f"{rec['warm_median']:.3f}s min {rec['warm_min']:.3f}s, parts {rec['parts']}, load {load_before:.2f} -> "
          f"{rec['load_after']:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
