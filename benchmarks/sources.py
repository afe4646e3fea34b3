"""Reading images where they live (issue 20): extraction from WebDataset shards, Parquet and a loose folder, each
against the pure forward on the same machine, and what listing a million samples costs.

The same CIFAR-10 training images (the first ``--n``) are written three ways: a folder of files with a
``path,label`` CSV, ``--shards`` WebDataset shards (``KEY.png`` + ``KEY.cls``), and ``--parquet`` Parquet files as
the Hugging Face hub writes them (an ``image`` struct column, ``ClassLabel`` labels, 100 rows per row group). Then:

* **data path**: listing (the folder's CSV and paths; the containers' indexes), content digests, reading, decoding
  and preprocessing at the model's input size, and the store's commits, with the model replaced by a spatial mean
  (what a source costs on its own, which a GPU's forward would expose), ``--repeats`` times, the sources in an
  order that rotates from repeat to repeat;
* **extraction**: ``load_images`` + ``extract_features`` with the mini CLIP into a fresh store, on ``--slices``
  slices of the first ``--extract-n`` images (written as 2 shards and 1 Parquet file per slice; the forward
  dominates, so on a shared 2-core CPU this part runs on fewer images than the data path); in each slice the pure
  forward (the image tower on tensors preprocessed beforehand, the
  same precision and memory format) is timed first, then the three sources in an order that rotates from slice to
  slice, so a shared machine's drift hits each alike;
* **parser**: one synthetic shard walked by Python's ``tarfile`` and by labelsieve's header parser;
* **listing**: ``load_images`` on ``--members`` synthetic samples (64 random bytes each), as shards (labels in
  ``KEY.cls``) and as Parquet, with the container index cold (first listing: headers, labels and content digests
  read) and warm (memoised), counting ``os.stat`` calls.

Rows go to ``benchmarks/results/sources.jsonl`` with the 1-minute load average before and after; the table to
``sources.md``::

    PYTHONPATH=$PWD nice -n 5 python benchmarks/sources.py --n 20000 --extract-n 2000 --threads 1
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import shutil
import sys
import tarfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_jsonl, host_info, read_jsonl  # noqa: E402

from labelsieve import testing  # noqa: E402
from labelsieve.data import load_images  # noqa: E402
from labelsieve.data import webdataset as wds  # noqa: E402
from labelsieve.data.decode import load_image  # noqa: E402
from labelsieve.features import extract_features  # noqa: E402
from labelsieve.features.store import FeatureStore  # noqa: E402
from labelsieve.models.encoders import create_encoder  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _load() -> float:
    return os.getloadavg()[0]


def _cpu() -> float:
    """CPU seconds used so far by this process and its finished children (the DataLoader workers): a measure a
    shared machine's load does not inflate as it does wall time."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _csv_slice(csv: Path, out: Path, lo: int, hi: int) -> Path:
    lines = csv.read_text().splitlines()
    out.write_text("\n".join([lines[0], *lines[1 + lo: 1 + hi]]) + "\n")
    return out


def _pattern(folder: Path, fmt: str, lo: int, hi: int) -> str:
    """A brace pattern for files ``lo`` … ``hi - 1`` of ``fmt`` (``shard-{:06d}.tar``)."""
    head, _, tail = fmt.partition("{")
    tail = tail.partition("}")[2]
    return str(folder / f"{head}{{{lo:06d}..{hi - 1:06d}}}{tail}")


def forward_speed(model: torch.nn.Module, xs: torch.Tensor, batch: int) -> float:
    """Images per second of ``model.encode_image`` on ``xs`` in channels_last float32 (as labelsieve extracts on a
    CPU), one warm-up batch first."""
    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model.encode_image(x.contiguous(memory_format=torch.channels_last)).float()

    run(xs[:batch])
    t = time.perf_counter()
    for i in range(0, len(xs), batch):
        run(xs[i: i + batch])
    return len(xs) / (time.perf_counter() - t)


def _count_stats() -> tuple[dict[str, int], Callable[[], None]]:
    counts = {"stat": 0, "lstat": 0}
    real_stat, real_lstat = os.stat, os.lstat

    def stat(*a: Any, **k: Any) -> Any:
        counts["stat"] += 1
        return real_stat(*a, **k)

    def lstat(*a: Any, **k: Any) -> Any:
        counts["lstat"] += 1
        return real_lstat(*a, **k)

    os.stat, os.lstat = stat, lstat  # type: ignore[assignment]

    def restore() -> None:
        os.stat, os.lstat = real_stat, real_lstat  # type: ignore[assignment]

    return counts, restore


def write_sources(n: int, work: Path, shards: int, parquet: int) -> dict[str, Any]:
    """The first ``n`` CIFAR-10 training images as a folder + CSV, shards and Parquet files (written once)."""
    root, csv = testing.extract_subset("cifar10", n, first=True)
    sh, pqd = work / f"shards-{n}-{shards}", work / f"parquet-{n}-{parquet}"
    if not (sh / "done").exists():
        shutil.rmtree(sh, ignore_errors=True)
        testing.write_shards(root, csv, sh, shards=shards)
        (sh / "done").write_text("")
    if not (pqd / "done").exists():
        shutil.rmtree(pqd, ignore_errors=True)
        testing.write_parquet(root, csv, pqd, files=parquet)
        (pqd / "done").write_text("")
    return {"root": root, "csv": csv, "shards": sh, "parquet": pqd}


def _source_args(src: dict[str, Any], name: str, lo: int, hi: int, n: int, shards: int, parquet: int,
                 tmp: Path) -> tuple[Any, Any]:
    """``load_images`` arguments for images ``lo`` … ``hi - 1`` of one source (slices follow container bounds)."""
    if name == "folder":
        return src["root"], _csv_slice(src["csv"], tmp / f"slice-{lo}-{hi}.csv", lo, hi)
    if name == "shards":
        per = n // shards
        return _pattern(src["shards"], "shard-{:06d}.tar", lo // per, hi // per), None
    per = n // parquet
    files = sorted(src["parquet"].glob("*.parquet"))[lo // per: hi // per]
    if len(files) == 1:
        return files[0], None
    return "{" + ",".join(str(f) for f in files) + "}", None


def data_path(src: dict[str, Any], enc: Any, args: argparse.Namespace, base: dict[str, Any], jsonl: Path,
              work: Path) -> None:
    """Listing, digests, reading, decoding and preprocessing alone (the model replaced by a spatial mean), the
    three sources in an order that rotates from repeat to repeat."""
    size = enc.image_size
    order = ["folder", "shards", "parquet"]
    for rep, name in ((r, x) for r in range(args.repeats) for x in order[r % 3:] + order[: r % 3]):
        cache = work / f"cache-path-{uuid.uuid4().hex[:6]}"
        spec, csv = _source_args(src, name, 0, args.n, args.n, args.shards, args.parquet, work)
        load0, cpu0 = _load(), _cpu()
        t = time.perf_counter()
        images = load_images(spec, csv, cache_dir=cache)
        t_load = time.perf_counter() - t
        store = FeatureStore(cache, "datapath")
        files = images.paths if images.members is not None else [images.locate(i) for i in range(len(images))]
        feats = store.get(files, lambda x: x.mean(dim=(2, 3)), enc.preprocess, image_shape=(3, size, size),
                          batch_size=args.batch, num_workers=args.workers, progress=False, members=images.members)
        seconds = time.perf_counter() - t
        assert feats.ok.all() and feats.n_extracted == len(images)
        rec = {**base, "run": f"data path, {name}", "source": name, "repeat": rep, "n_images": len(images),
               "seconds": seconds, "cpu_ms_per_image": (_cpu() - cpu0) / len(images) * 1e3,
               "load_seconds": t_load, "img_s": len(images) / seconds, "workers": args.workers,
               "load": [load0, _load()]}
        append_jsonl(jsonl, rec)
        print(f"{rec['run']}: {rec['img_s']:.0f} img/s ({seconds:.1f} s, listing {t_load:.2f} s, "
              f"{rec['cpu_ms_per_image']:.2f} CPU ms/image)", flush=True)
        shutil.rmtree(cache, ignore_errors=True)


def extraction(src: dict[str, Any], enc: Any, args: argparse.Namespace, base: dict[str, Any], jsonl: Path,
               work: Path) -> None:
    """Pure forward, then the three sources in rotating order, on each slice of the first ``--extract-n`` images
    (written as 2 shards and 1 Parquet file per slice, so a slice is whole containers)."""
    order = ["folder", "shards", "parquet"]
    n, slices = args.extract_n, args.slices
    src = write_sources(n, work, 2 * slices, slices)
    bounds = np.linspace(0, n, slices + 1).astype(int)
    ref = load_images(src["root"], src["csv"])
    for k in range(slices):
        lo, hi = int(bounds[k]), int(bounds[k + 1])
        xs = torch.stack([enc.preprocess(load_image(ref.locate(i)))
                          for i in range(lo, min(hi, lo + args.forward_n))])
        load0 = _load()
        speed = forward_speed(enc.model, xs, args.batch)
        del xs
        append_jsonl(jsonl, {**base, "run": "pure forward", "slice": k, "img_s": speed, "images_timed":
                             min(hi - lo, args.forward_n), "load": [load0, _load()]})
        print(f"slice {k}: pure forward {speed:.1f} img/s", flush=True)
        for name in order[k % 3:] + order[: k % 3]:
            cache = work / f"cache-x-{uuid.uuid4().hex[:6]}"
            spec, csv = _source_args(src, name, lo, hi, n, 2 * slices, slices, work)
            load0, cpu0 = _load(), _cpu()
            t = time.perf_counter()
            images = load_images(spec, csv, cache_dir=cache)
            t_load = time.perf_counter() - t
            feats = extract_features(images, enc, cache_dir=cache, num_workers=args.workers, batch_size=args.batch,
                                     progress=False)
            seconds = time.perf_counter() - t
            assert feats.ok.all() and feats.n_extracted == len(images) == hi - lo
            rec = {**base, "data": f"cifar10:first{n}", "run": f"extraction, {name}", "source": name, "slice": k,
                   "n_images": len(images), "seconds": seconds, "load_seconds": t_load,
                   "img_s": len(images) / seconds, "cpu_ms_per_image": (_cpu() - cpu0) / len(images) * 1e3,
                   "ratio_to_forward": len(images) / seconds / speed, "workers": args.workers,
                   "load": [load0, _load()]}
            append_jsonl(jsonl, rec)
            print(f"slice {k}: {rec['run']} {rec['img_s']:.1f} img/s, {rec['ratio_to_forward']:.2f} of the forward "
                  f"({seconds:.0f} s)", flush=True)
            shutil.rmtree(cache, ignore_errors=True)


def _synthetic_shards(folder: Path, n: int, per: int) -> None:
    if (folder / "done").exists():
        return
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for k in range(-(-n // per)):
        with tarfile.open(folder / f"s-{k:06d}.tar", "w", format=tarfile.USTAR_FORMAT) as tf:
            for i in range(k * per, min(n, (k + 1) * per)):
                for name, data in ((f"{i:09d}.jpg", rng.bytes(64)), (f"{i:09d}.cls", str(i % 100).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    (folder / "done").write_text("")


def _synthetic_parquet(folder: Path, n: int, per: int) -> None:
    if (folder / "done").exists():
        return
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    for k in range(-(-n // per)):
        lo, hi = k * per, min(n, (k + 1) * per)
        images = pa.array([{"bytes": rng.bytes(64), "path": None} for _ in range(lo, hi)], type=image_type)
        table = pa.table({"image": images, "label": pa.array(np.arange(lo, hi) % 100, pa.int64())})
        pq.write_table(table, folder / f"p-{k:05d}.parquet", row_group_size=1000)
    (folder / "done").write_text("")


def listing(args: argparse.Namespace, base: dict[str, Any], jsonl: Path, work: Path) -> None:
    """``load_images`` on ``--members`` synthetic samples as shards and as Parquet: cold and warm index, stats."""
    n = args.members
    t = time.perf_counter()
    sh, pqd = work / f"synthetic-shards-{n}", work / f"synthetic-parquet-{n}"
    _synthetic_shards(sh, n, 10_000)
    _synthetic_parquet(pqd, n, 100_000)
    print(f"synthetic containers ready ({time.perf_counter() - t:.0f} s)", flush=True)
    for name, spec in (("shards", sh), ("parquet", pqd)):
        cache = work / f"cache-list-{uuid.uuid4().hex[:6]}"
        for state in ("cold", "warm"):
            counts, restore = _count_stats()
            load0 = _load()
            t = time.perf_counter()
            try:
                images = load_images(spec, cache_dir=cache)
            finally:
                restore()
            seconds = time.perf_counter() - t
            n_files = len(images.members.files)
            rec = {**base, "run": f"listing {n:,} samples, {name}, index {state}", "source": name, "state": state,
                   "n_images": len(images), "containers": n_files, "seconds": seconds,
                   "us_per_sample": seconds / len(images) * 1e6, "stat_calls": counts["stat"],
                   "lstat_calls": counts["lstat"], "load": [load0, _load()]}
            append_jsonl(jsonl, rec)
            print(f"{rec['run']}: {seconds:.1f} s ({rec['us_per_sample']:.1f} µs/sample), {counts['stat']} stat and "
                  f"{counts['lstat']} lstat calls for {n_files} containers", flush=True)
        shutil.rmtree(cache, ignore_errors=True)


def parser(args: argparse.Namespace, base: dict[str, Any], jsonl: Path, work: Path) -> None:
    """One synthetic shard of 10,000 samples (20,000 members) walked three ways, alternating, ``--repeats``
    times: Python's ``tarfile`` streaming reader reading every member, labelsieve's header parser reading every
    member, and ``index_shard`` (the parser, labels and content digests: what a cold listing does)."""
    sh = work / f"synthetic-shards-{args.members}"
    _synthetic_shards(sh, args.members, 10_000)
    shard = sh / "s-000000.tar"

    def with_tarfile() -> int:
        n = 0
        with open(shard, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tf:
            for m in tf:
                tf.extractfile(m).read()
                n += 1
        return n

    def with_parser() -> int:
        with open(shard, "rb", buffering=1 << 20) as f:
            return sum(1 for _ in wds.iter_members(f, shard=shard.name, read_data=lambda _n: True))

    def with_index() -> int:
        return 2 * int(wds.index_shard(shard, shard=shard.name)["n"])

    for rep in range(args.repeats):
        for name, fn in (("tarfile (r|, every member read)", with_tarfile),
                         ("labelsieve header parser (every member read)", with_parser),
                         ("labelsieve index_shard (parser, labels, digests)", with_index)):
            load0, t = _load(), time.perf_counter()
            members = fn()
            seconds = time.perf_counter() - t
            rec = {**base, "run": f"tar walk: {name}", "repeat": rep, "members": members, "seconds": seconds,
                   "us_per_member": seconds / members * 1e6, "load": [load0, _load()]}
            append_jsonl(jsonl, rec)
            print(f"{rec['run']}: {rec['us_per_member']:.1f} µs/member", flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20000, help="CIFAR-10 training images (the first n)")
    ap.add_argument("--shards", type=int, default=20)
    ap.add_argument("--parquet", type=int, default=4)
    ap.add_argument("--slices", type=int, default=4)
    ap.add_argument("--extract-n", type=int, default=2000,
                    help="images of the extraction rows (the first ones; model-bound, so fewer than --n on a "
                         "shared CPU)")
    ap.add_argument("--repeats", type=int, default=3, help="data path: runs of each source, in rotating order")
    ap.add_argument("--forward-n", type=int, default=256, help="images the pure forward is timed on, per slice")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--members", type=int, default=1_000_000, help="synthetic samples for the listing rows (0: none)")
    ap.add_argument("--only", choices=["data-path", "extraction", "listing", "parser"], action="append",
                    help="run only these parts (repeatable)")
    ap.add_argument("--tag", default="issue 20")
    ap.add_argument("--out", default=str(RESULTS), help="results folder")
    ap.add_argument("--work", default=str(Path(__file__).resolve().parents[1] / ".cache" / "bench-sources"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "sources.jsonl"
    parts = args.only or ["data-path", "extraction", "listing", "parser"]
    base = {"tag": args.tag, "model": "mini-clip", "data": f"cifar10:first{args.n}", "batch": args.batch,
            "host": host_info(args.threads), "invocation": uuid.uuid4().hex[:8], "nice": os.nice(0)}
    if "data-path" in parts or "extraction" in parts:
        src = write_sources(args.n, work, args.shards, args.parquet)
        enc = create_encoder(str(testing.mini_clip_dir()), device="cpu")
        if "data-path" in parts:
            data_path(src, enc, args, base, jsonl, work)
        if "extraction" in parts:
            extraction(src, enc, args, base, jsonl, work)
    if "listing" in parts and args.members:
        listing(args, base, jsonl, work)
    if "parser" in parts and args.members:
        parser(args, base, jsonl, work)
    render(jsonl, out / "sources.md")


def render(jsonl: Path, md: Path) -> None:
    """The tables: per invocation, data path and extraction img/s per source (median over slices, with the median
    ratio to the pure forward of the same slice), and the listing rows."""
    rows = read_jsonl(jsonl)
    lines = ["# Reading images where they live: shards, Parquet, folder", "",
             "Written by `benchmarks/sources.py` (issue 20). The same CIFAR-10 training images as a folder + CSV, "
             "WebDataset shards and Hugging Face-style Parquet files. *Data path*: listing, digests, reading, decoding "
             "and preprocessing (model replaced by a spatial mean), repeats in rotating order (the slices column "
             "counts them). *Extraction*: `load_images` + `extract_features` "
             "with the mini CLIP into a fresh store, per slice, the three sources in rotating order after the pure "
             "forward of that slice; img/s is the median over slices, the ratio the median over slices of extraction "
             "over that slice's pure forward. Load: 1-minute load average, lowest-highest over the rows (2-core "
             "machine shared with other work).", "",
             "CPU ms/image: CPU time of the process and its loader workers per image (median), which the machine's "
             "load does not inflate as it does wall time.", "",
             "| invocation | data | threads | workers | run | slices | images | img/s (median) | ratio to pure forward "
             "| CPU ms/image | listing s | load |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if not r["run"].startswith(("listing", "tar walk")):
            groups.setdefault((r["invocation"], r["data"], r["host"]["threads"], r["run"]), []).append(r)
    for (inv, data, threads, run), rs in groups.items():
        ratio = f"{np.median([r['ratio_to_forward'] for r in rs]):.2f}" if "ratio_to_forward" in rs[0] else ""
        listing_s = f"{np.median([r['load_seconds'] for r in rs]):.2f}" if "load_seconds" in rs[0] else ""
        cpus = [r["cpu_ms_per_image"] for r in rs if "cpu_ms_per_image" in r]
        cpu = f"{np.median(cpus):.2f}" if cpus else ""
        loads = [x for r in rs for x in r["load"]]
        images = sum(r.get("n_images", r.get("images_timed", 0)) for r in rs)
        lines.append(f"| {inv} | {data} | {threads} | {rs[0].get('workers', '')} | {run} | {len(rs)} | {images:,} | "
                     f"{np.median([r['img_s'] for r in rs]):.1f} | {ratio} | {cpu} | {listing_s} | "
                     f"{min(loads):.1f}-{max(loads):.1f} |")
    listed = [r for r in rows if r["run"].startswith("listing")]
    if listed:
        lines += ["", "## Listing a million samples", "",
                  "`load_images` on synthetic samples (64 random bytes each; labels in `KEY.cls` or a `ClassLabel` "
                  "column). Cold: the containers' indexes are read now (headers, labels, content digests: the whole "
                  "file is read once); warm: the memoised indexes are loaded. `os.stat`/`os.lstat` calls counted in "
                  "the process.", "",
                  "| invocation | run | samples | containers | seconds | µs per sample | stat calls | lstat calls "
                  "| load |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in listed:
            lines.append(f"| {r['invocation']} | {r['run']} | {r['n_images']:,} | {r['containers']} | "
                         f"{r['seconds']:.1f} | {r['us_per_sample']:.1f} | {r['stat_calls']} | {r['lstat_calls']} | "
                         f"{r['load'][0]:.1f}-{r['load'][1]:.1f} |")
    walks = [r for r in rows if r["run"].startswith("tar walk")]
    if walks:
        lines += ["", "## Walking a shard", "",
                  "One synthetic shard of 10,000 samples (20,000 members of 64 bytes and a class number), in page "
                  "cache, walked three ways alternately; µs per member, median over repeats.", "",
                  "| invocation | run | repeats | µs per member (median) | load |", "|---|---|---|---|---|"]
        by: dict[tuple, list[dict]] = {}
        for r in walks:
            by.setdefault((r["invocation"], r["run"]), []).append(r)
        for (inv, run), rs in by.items():
            loads = [x for r in rs for x in r["load"]]
            lines.append(f"| {inv} | {run} | {len(rs)} | {np.median([r['us_per_member'] for r in rs]):.1f} | "
                         f"{min(loads):.1f}-{max(loads):.1f} |")
    md.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
