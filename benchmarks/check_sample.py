"""How right the audit is: the check sample's estimates against the truth, and the written scores' ranks.

For each data set: one audit (the default detector unless ``--method``, mini CLIP, seed 0), written to
audit.csv / audit.xlsx / audit.html with the real writers and read back. Then ``--draws`` check samples are drawn
from it (as ``labelsieve audit`` draws one, with seeds 1000, 1001, …), a reviewer who knows the truth decides
each sample's rows (keep when the given label is right, relabel otherwise), and
:func:`labelsieve.audit.estimate.estimate_from_reviews` estimates the share of wrong labels, the precision and
the recall of the flags; :func:`labelsieve.audit.estimate.fit_recalibration` recalibrates ``p_clean`` on the
sample. Recorded per set:

* coverage (share of draws whose 95 % interval holds the truth) and mean width of the error-rate, precision and
  recall intervals; the mean and spread of the estimate;
* ECE (10 bins) of ``p_clean`` on the rows the sample did not review, before and after recalibration;
* the model's own estimate and interval (no review) and whether it holds the truth;
* the competence record of the audit (audit.json's ``competence``);
* AUROC of 1 − p_clean by the detector's raw score, and by p_clean read back from audit.csv, audit.xlsx and
  audit.html (and each ``p_clean_<member>`` column against its own raw score), with the number of distinct values.

Data sets: the six grid sets of benchmarks/detection.py, the held-out CIFAR-10 pair-noise set, and Imagenette val
and CIFAR-10 test with their original labels (truth = the given labels).

    python benchmarks/check_sample.py --cache /work/bench-cache --threads 1            # all sets, 200 draws
    python benchmarks/check_sample.py --cache ... --datasets imagenette-val --draws 50

The feature cache must hold mini-CLIP features (``<cache>/mini-clip/<cifar10n|cifar10|imagenette>``; extracted on
first use otherwise). Results are appended to ``OUT/check_sample.jsonl`` (rows keyed by dataset, method, seed,
draws, size) and rendered to ``OUT/check_sample.md``, which docs/benchmarks.md quotes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from common import append_jsonl, default_threads, host_info, mini_clip_cache, mini_clip_encoder, read_jsonl  # noqa: E402
from detection import HELD_OUT, load_dataset  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

import labelsieve.api  # noqa: E402
import labelsieve.audit.checksample as checksample  # noqa: E402
import labelsieve.audit.estimate as est_mod  # noqa: E402
from labelsieve.api import run_detector  # noqa: E402
from labelsieve.audit.checksample import design_columns, draw_check_sample  # noqa: E402
from labelsieve.audit.estimate import ReviewedSample, estimate_from_reviews, fit_recalibration  # noqa: E402
from labelsieve.audit.evaluate import calibration_error  # noqa: E402
from labelsieve.audit.html import page_data, write_html  # noqa: E402
from labelsieve.audit.schema import read_audit  # noqa: E402
from labelsieve.audit.writers import write_csv, write_json, write_xlsx  # noqa: E402
from labelsieve.core.defaults import DEFAULT_METHOD  # noqa: E402

GRID = ["cifar10n-aggre", "cifar10n-worst", "imagenette-sym20", "imagenette-sym40", "imagenette-pair30",
        "imagenette-inst30"]
DATASETS = GRID + HELD_OUT


def _auroc(noisy: np.ndarray, p: np.ndarray) -> float | None:
    """AUROC of the flag-worthiness −p (not 1 − p: that rounds scores a few ulps apart to one value)."""
    return float(roc_auc_score(noisy, -p)) if 0 < noisy.sum() < len(noisy) else None


def load_or_run(dname: str, images, enc, args, d: Path) -> tuple[pd.DataFrame, dict, dict[str, np.ndarray], float]:
    """The audit of a data set (table, summary, raw scores by column, seconds): read back from ``d`` when a
    previous run wrote it there (``--reuse``), else run and keep it there (audit.csv, audit.json, raw.npz)."""
    csv, js, raw = d / "audit.csv", d / "audit.json", d / "raw.npz"
    if args.reuse and csv.is_file() and js.is_file() and raw.is_file():
        t = pd.read_csv(csv, keep_default_na=False, na_values={c: [""] for c in ("p_clean", "suggested_prob",
                                                                              "p_clean_raw")})
        for c in t.columns:
            if c == "p_clean" or c.startswith("p_clean_") or c in ("suggested_prob", "agreement"):
                t[c] = pd.to_numeric(t[c], errors="coerce")
        t["is_noisy"] = t["is_noisy"].astype(str).str.lower().eq("true")
        t["issue"] = t["issue"].astype(str)
        t["review"] = ""
        summary = json.loads(js.read_text())
        with np.load(raw, allow_pickle=False) as z:
            raws = {k: z[k] for k in z.files}
        return t, summary, raws, float(summary.get("benchmark_seconds", 0.0))
    t0 = time.perf_counter()
    audit = run_detector(images, enc, method=args.method, seed=args.seed,
                         cache_dir=mini_clip_cache(args.cache, dname), progress=False)
    secs = time.perf_counter() - t0
    d.mkdir(parents=True, exist_ok=True)
    write_csv(audit.table, csv)
    audit.summary["benchmark_seconds"] = secs
    write_json(audit.summary, js)
    np.savez(raw, **RAW)
    return audit.table, audit.summary, dict(RAW), secs


#: The detector's raw scores of the last run (p_clean and each p_clean_<member> column), caught before calibration.
RAW: dict[str, np.ndarray] = {}


def _catch_raw(result, labels=None):
    RAW.clear()
    RAW["p_clean"] = np.asarray(result.p_clean, dtype=np.float64)
    RAW.update({k: np.asarray(v, dtype=np.float64) for k, v in result.columns.items() if k.startswith("p_clean_")})
    return _calibrate(result, labels=labels)


_calibrate = labelsieve.api.calibrate
labelsieve.api.calibrate = _catch_raw


def written_ranks(table: pd.DataFrame, noisy_by_path: dict[str, bool], work: Path, paths: list[str],
                  raws: dict[str, np.ndarray]) -> dict:
    """AUROC and distinct values of every p_clean column: by the detector's raw score (``raws``, in the order
    of ``paths``, the readable input rows), and read back from the files written into ``work``."""
    readable = table["issue"] != "unreadable"
    t = table[readable]
    noisy = np.array([noisy_by_path[p] for p in t["path"]])
    out: dict = {}
    csv, xlsx, html = work / "written.csv", work / "written.xlsx", work / "written.html"
    write_csv(table, csv)
    write_xlsx(table, xlsx)
    write_html(table, {"method": "benchmark"}, image_root=work, out_path=html, max_gallery=0)
    cols = [c for c in table.columns if c == "p_clean" or (c.startswith("p_clean_") and c != "p_clean_raw")]
    back_csv = read_audit(csv, required=("path",), optional=cols)
    back_xlsx = read_audit(xlsx, required=("path",), optional=cols)
    page = page_data(html.read_text(encoding="utf-8"))
    page_p = dict(zip(page["rows"]["path"], page["rows"]["p"], strict=True))
    pos = {p: i for i, p in enumerate(paths)}
    at = np.array([pos[p] for p in t["path"]])
    for c in cols:
        raw = raws[c][at]
        rec = {"raw_auroc": _auroc(noisy, raw), "raw_distinct": int(len(np.unique(raw)))}
        for name, back in (("csv", back_csv), ("xlsx", back_xlsx)):
            v = pd.to_numeric(back.set_index("path").loc[t["path"], c], errors="coerce").to_numpy(dtype=np.float64)
            rec[f"{name}_auroc"] = _auroc(noisy, v)
            rec[f"{name}_distinct"] = int(len(np.unique(v)))
        if c == "p_clean":
            v = np.array([page_p[p] for p in t["path"]], dtype=np.float64)
            rec["html_auroc"] = _auroc(noisy, v)
            rec["html_distinct"] = int(len(np.unique(v)))
        out[c] = rec
    return out


def mc_interval(design, sample: ReviewedSample, *, seed: int, draws: int = 4000) -> list[float]:
    """The alternative measured against labelsieve's closed-form interval: 95 % of joint Monte Carlo draws of the
    total, each band's wrong share from its Jeffreys posterior Beta(x + ½, m − x + ½) with the ends modified
    (share 0 for the lower end when x = 0, 1 for the upper end when x = m; Brown, Cai & DasGupta 2001), the rows
    nobody saw drawn binomially (labelsieve's interval before it was replaced; benchmark-only code)."""
    rng = np.random.default_rng(seed)
    cells, _ = est_mod._bands(design, sample)
    low, high = np.zeros(draws), np.zeros(draws)
    for g in est_mod._collapse(cells):
        left, m, x = sum(c.left for c in g), sum(c.m for c in g), sum(c.x for c in g)
        exact = sum(c.exact_wrong for c in g)
        for side, acc in (("low", low), ("high", high)):
            if m == 0:
                continue
            share = (np.zeros(draws) if side == "low" and x == 0 else np.ones(draws) if side == "high" and x == m
                     else rng.beta(x + 0.5, m - x + 0.5, draws))
            acc += exact + x + rng.binomial(max(left - m, 0), share)
    rows = sum(c.rows for c in cells)
    return [float(np.quantile(low, 0.025)) / rows, float(np.quantile(high, 0.975)) / rows]


def simulate(table: pd.DataFrame, noisy_by_path: dict[str, bool], *, draws: int, size: int) -> dict:
    """Draw ``draws`` check samples, review each with the truth, and score the estimates."""
    noisy = np.array([noisy_by_path[p] for p in table["path"]], dtype=np.float64)
    member = table["issue"].to_numpy() != "unreadable"
    truth_rate = float(noisy[member].mean())
    flagged = table["is_noisy"].to_numpy(dtype=bool)
    truth_prec = float(noisy[member & flagged].mean()) if (member & flagged).any() else None
    truth_rec = float(noisy[member & flagged].sum() / noisy[member].sum()) if noisy[member].sum() else None
    p = table["p_clean"].to_numpy(dtype=np.float64)
    recs = []
    for d in range(draws):
        check, design = draw_check_sample(table, size=size, seed=1000 + d)
        c = check.fillna(0).to_numpy(dtype=np.int64)
        cols = design_columns(table, design)
        stratum = cols["stratum"].fillna(-1).to_numpy(dtype=np.int64)
        position = cols["stratum_pos"].fillna(0).to_numpy(dtype=np.int64)
        wrong = np.where(c > 0, noisy, np.nan)
        est = estimate_from_reviews(design, ReviewedSample(stratum=stratum, position=position, check=c, wrong=wrong))
        weight = np.array([design.strata[h].rows / design.strata[h].sampled for h in stratum[c > 0]])
        recal = fit_recalibration(p[c > 0], noisy[c > 0], weight)
        rest = member & (c == 0)
        ece_before = calibration_error(noisy[rest].astype(bool), p[rest])
        ece_after = calibration_error(noisy[rest].astype(bool), recal(p[rest])) if recal else None
        sample = ReviewedSample(stratum=stratum, position=position, check=c, wrong=wrong)
        r = {"rate": est["rate"], "iv": est["interval"], "mc_iv": mc_interval(design, sample, seed=d),
             "ece_before": ece_before, "ece_after": ece_after,
             "prec": est["precision"], "prec_iv": est["precision_interval"], "rec": est["recall"],
             "rec_iv": est["recall_interval"], "collapsed": est["collapsed"]}
        recs.append(r)

    def cover(key: str, truth: float | None) -> tuple[float | None, float | None]:
        ivs = [r[key] for r in recs if r[key] is not None]
        if truth is None or not ivs:
            return None, None
        return (float(np.mean([lo - 1e-12 <= truth <= hi + 1e-12 for lo, hi in ivs])),
                float(np.mean([hi - lo for lo, hi in ivs])))

    cov, width = cover("iv", truth_rate)
    mc_cov, mc_width = cover("mc_iv", truth_rate)
    pcov, pwidth = cover("prec_iv", truth_prec)
    rcov, rwidth = cover("rec_iv", truth_rec)
    rates = np.array([r["rate"] for r in recs])
    after = [r["ece_after"] for r in recs if r["ece_after"] is not None]
    return {"truth_rate": truth_rate, "truth_precision": truth_prec, "truth_recall": truth_rec,
            "estimate_mean": float(rates.mean()), "estimate_sd": float(rates.std()),
            "estimate_max": float(rates.max()), "coverage": cov, "width": width,
            "mc_coverage": mc_cov, "mc_width": mc_width,
            "precision_coverage": pcov, "precision_width": pwidth, "recall_coverage": rcov, "recall_width": rwidth,
            "ece_before": float(np.mean([r["ece_before"] for r in recs])),
            "ece_after": float(np.mean(after)) if after else None,
            "ece_after_max": float(np.max(after)) if after else None,
            "collapsed_draws": int(sum(r["collapsed"] > 0 for r in recs))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default=",".join(DATASETS))
    ap.add_argument("--method", default=DEFAULT_METHOD)
    ap.add_argument("--cache", required=True, help="feature cache root (holds mini-clip/<family>)")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--work", default="benchmarks/work/check_sample")
    ap.add_argument("--draws", type=int, default=200)
    ap.add_argument("--size", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--reuse", action="store_true", help="read the audits a previous run kept in --work")
    ap.add_argument("--redo", action="store_true", help="simulate again the sets OUT already holds (the table keeps "
                    "the latest row of each)")
    ap.add_argument("--rows-per-band", type=int, default=checksample.ROWS_PER_STRATUM,
                    help="the design's sampled rows per band (labelsieve's is ROWS_PER_STRATUM; others to compare)")
    args = ap.parse_args(argv)
    checksample.ROWS_PER_STRATUM = args.rows_per_band
    torch.set_num_threads(args.threads)
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    jsonl = out / "check_sample.jsonl"
    done = {(r["dataset"], r["method"], r["seed"], r["draws"], r["size"], r.get("rows_per_band"))
            for r in read_jsonl(jsonl)}
    enc = mini_clip_encoder()
    host = host_info(args.threads)
    for dname in args.datasets.split(","):
        if not args.redo and (dname, args.method, args.seed, args.draws, args.size, args.rows_per_band) in done:
            continue
        images, true = load_dataset(dname)
        noisy_by_path = dict(zip(images.paths, (images.labels != true).tolist(), strict=True))
        d = work / f"{dname}-{args.method.replace(',', '+')}-s{args.seed}"
        table, summary, raws, secs = load_or_run(dname, images, enc, args, d)
        readable = set(table.loc[table["issue"] != "unreadable", "path"])
        ranks = written_ranks(table, noisy_by_path, d, [p for p in images.paths if p in readable], raws)
        t = time.perf_counter()
        sim = simulate(table, noisy_by_path, draws=args.draws, size=args.size)
        sim_secs = time.perf_counter() - t
        member = table["issue"] != "unreadable"
        model_iv = summary.get("noise_rate_interval") or [None, None]
        rec = {"dataset": dname, "method": args.method, "seed": args.seed, "draws": args.draws, "size": args.size,
               "rows_per_band": args.rows_per_band, "bands": len(draw_check_sample(table, size=args.size)[1].strata),
               "n": len(images), "noise_rate": float((images.labels != true).mean()),
               "model_rate": summary["noise_rate"], "model_interval": model_iv,
               "model_covers": bool(model_iv[0] is not None and model_iv[0] <= sim["truth_rate"] <= model_iv[1]),
               "flag_rate": summary["flag_rate"], "n_flagged": int(table.loc[member, "is_noisy"].sum()),
               "competence": summary.get("competence"), "written": ranks, **sim, "seconds_audit": secs,
               "seconds_simulation": sim_secs, "host": host, "load": os.getloadavg()}
        append_jsonl(jsonl, rec)
        print(f"{dname:18s} truth {sim['truth_rate']:.3f} model {summary['noise_rate']:.3f} "
              f"[{model_iv[0]:.3f}, {model_iv[1]:.3f}] | check {sim['estimate_mean']:.3f} ± {sim['estimate_sd']:.3f} "
              f"coverage {sim['coverage']:.2f} width {sim['width']:.3f} | ECE {sim['ece_before']:.3f} -> "
              f"{sim['ece_after']:.3f} | AUROC raw {ranks['p_clean']['raw_auroc']} csv {ranks['p_clean']['csv_auroc']}",
              flush=True)
    render(jsonl, out / "check_sample.md")
    return 0


def _f(v: float | None, fmt: str = ".3f") -> str:
    return "–" if v is None else format(v, fmt)


def render(jsonl: Path, md: Path) -> None:
    """The Markdown tables docs/benchmarks.md quotes (the latest row per dataset, method, size and draws)."""
    latest: dict = {}
    for r in read_jsonl(jsonl):
        latest[(r["dataset"], r["method"], r["size"], r["draws"], r["seed"], r.get("rows_per_band"))] = r
    every = list(latest.values())
    rows = [r for r in every if r.get("rows_per_band") in (None, checksample.ROWS_PER_STRATUM)]
    lines = ["| data set (n, true error rate) | method | model alone: estimate [95 % interval] | check sample of "
             "K: mean estimate ± sd | coverage of the 95 % interval | mean width | precision of the flags: truth, "
             "coverage, width | recall: truth, coverage, width | ECE of p_clean on unreviewed rows: before → after "
             "(worst draw) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['dataset']} ({r['n']:,}, {r['truth_rate']:.1%}) | {r['method']} | {r['model_rate']:.1%} "
            f"[{r['model_interval'][0]:.1%}, {r['model_interval'][1]:.1%}]{'' if r['model_covers'] else ' ✗'} | "
            f"K = {r['size']}: {r['estimate_mean']:.1%} ± {r['estimate_sd']:.1%} | {_f(r['coverage'], '.1%')} | "
            f"{_f(r['width'])} | {_f(r['truth_precision'])}, {_f(r['precision_coverage'], '.0%')}, "
            f"{_f(r['precision_width'])} | {_f(r['truth_recall'])}, {_f(r['recall_coverage'], '.0%')}, "
            f"{_f(r['recall_width'])} | {r['ece_before']:.3f} → {_f(r['ece_after'])} ({_f(r['ece_after_max'])}) |")
    lines += ["", "Design and interval alternatives (same audits, same draws): bands, then coverage / mean width of "
              "labelsieve's closed-form interval and of the Monte Carlo interval from the bands' Jeffreys posteriors "
              "with modified ends.", "",
              "| data set | K | sampled rows per band | bands | closed form: coverage / width | Monte Carlo: "
              "coverage / width |", "|---|---|---|---|---|---|"]
    for r in sorted(every, key=lambda r: (r["dataset"], r["size"], r.get("rows_per_band") or 0)):
        if r.get("mc_coverage") is None:
            continue
        lines.append(f"| {r['dataset']} | {r['size']} | {r.get('rows_per_band')} | {r.get('bands')} | "
                     f"{_f(r['coverage'], '.1%')} / "
                     f"{_f(r['width'])} | {_f(r['mc_coverage'], '.1%')} / {_f(r['mc_width'])} |")
    lines += ["", "Written scores: AUROC of 1 − p_clean by the detector's raw score and by the value read back from "
              "each file (distinct values in brackets).", "",
              "| data set | column | raw | audit.csv | audit.xlsx | audit.html |", "|---|---|---|---|---|---|"]
    written = {r["dataset"]: r for r in rows}  # one audit per data set: its files do not depend on K
    for r in written.values():
        for c, w in r["written"].items():
            lines.append(f"| {r['dataset']} | {c} | {_f(w['raw_auroc'], '.4f')} ({w['raw_distinct']:,}) | "
                         f"{_f(w['csv_auroc'], '.4f')} ({w['csv_distinct']:,}) | {_f(w['xlsx_auroc'], '.4f')} "
                         f"({w['xlsx_distinct']:,}) | "
                         + (f"{_f(w.get('html_auroc'), '.4f')} ({w['html_distinct']:,})" if "html_auroc" in w
                            else "–") + " |")
    hosts = {str(r["host"]) for r in rows}
    loads = [r["load"][0] for r in rows]
    lines += ["", f"Host: {'; '.join(sorted(hosts))}; load average while running {min(loads):.1f}–{max(loads):.1f}."
              if loads else ""]
    md.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
