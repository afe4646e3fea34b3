"""Input validation and content hashing of many files (issue 13: "hashing of 1M paths: measure and make fast").

Writes ``--n`` small files (``--size`` random bytes each, in folders of 1,000) and a labels CSV, then times,
each in a fresh process state:

* ``load_images`` on the CSV (reading it, the path rule: each folder resolved once, one ``lstat`` per file);
* the content digests with an empty memo (``ContentHasher.digests``: stat, blake2b of every file on
  ``threads`` threads, one batched SQLite transaction);
* the same call again (every digest from the memo: stat + one indexed lookup per 900 paths).

Rows go to ``OUT/hashing.jsonl`` and ``OUT/hashing.md`` with the 1-minute load average::

    PYTHONPATH=$PWD python benchmarks/hashing.py --n 100000 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_jsonl, host_info, read_jsonl  # noqa: E402

from labelsieve.data import load_images  # noqa: E402
from labelsieve.data.hashing import ContentHasher  # noqa: E402


def make_files(root: Path, n: int, size: int) -> Path:
    """``n`` files of ``size`` random bytes under ``root`` (1,000 per folder) and their labels CSV."""
    csv_path = root / "labels.csv"
    if csv_path.exists():
        return csv_path
    rng = os.urandom
    with open(root / "labels.part", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        for i in range(n):
            rel = f"d{i // 1000:05d}/f{i:07d}.jpg"
            if i % 1000 == 0:
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(rng(size))
            w.writerow([rel, f"class{i % 10}"])
    (root / "labels.part").replace(csv_path)
    return csv_path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--size", type=int, default=2048, help="bytes per file")
    ap.add_argument("--threads", type=int, default=8, help="hashing threads (labelsieve's default)")
    ap.add_argument("--work", default=".cache/bench-hashing")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--keep", action="store_true", help="keep the files for another run")
    ap.add_argument("--tag", default="after", help="a name for this code version (before/after)")
    args = ap.parse_args(argv)
    work = Path(args.work) / f"n{args.n}-b{args.size}"
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "hashing.jsonl"
    t = time.perf_counter()
    csv_path = make_files(work, args.n, args.size)
    print(f"files ready in {time.perf_counter() - t:.1f} s")
    base = {"tag": args.tag, "n": args.n, "bytes_per_file": args.size, "threads": args.threads, "host": host_info(1)}

    def record(step: str, seconds: float) -> None:
        rec = {**base, "step": step, "seconds": seconds, "us_per_file": seconds / args.n * 1e6,
               "load": os.getloadavg()[0]}
        append_jsonl(jsonl, rec)
        print(f"{step}: {seconds:.2f} s ({rec['us_per_file']:.1f} us/file)")

    t = time.perf_counter()
    images = load_images(work, csv_path)
    record("load_images (CSV + path rule)", time.perf_counter() - t)
    paths = [images.abspath(i) for i in range(len(images))]
    memo = work / "hashes.sqlite"
    for suffix in ("", "-journal", "-wal", "-shm"):
        Path(f"{memo}{suffix}").unlink(missing_ok=True)
    hasher = ContentHasher(memo)
    t = time.perf_counter()
    cold = hasher.digests(paths, threads=args.threads)
    record("digests, empty memo (read + blake2b + one transaction)", time.perf_counter() - t)
    t = time.perf_counter()
    warm = hasher.digests(paths, threads=args.threads)
    record("digests, every file memoised (stat + lookups)", time.perf_counter() - t)
    assert warm == cold
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    rows = read_jsonl(jsonl)
    lines = ["# Validation and content hashing of many files", "",
             "Written by `benchmarks/hashing.py`: synthetic files in folders of 1,000, labels CSV, fresh memo.", "",
             "| tag | files | bytes/file | step | seconds | µs/file | load |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r.get('tag', '')} | {r['n']:,} | {r['bytes_per_file']} | {r['step']} | {r['seconds']:.2f} | "
              f"{r['us_per_file']:.1f} | {r['load']:.1f} |" for r in rows]
    (out / "hashing.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
