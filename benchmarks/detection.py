"""Detection benchmark: every detector on the same cached features, real and synthetic noise.

Datasets (from ../shared/data):

* ``cifar10n-aggre`` / ``cifar10n-worst``: the first 10,000 CIFAR-10 train images with the CIFAR-10N
  human label sets (truth: the clean labels);
* ``imagenette-sym20`` / ``-sym40`` / ``-pair30`` / ``-inst30``: the 2,500 Imagenette train images
  with synthetic symmetric, pair and instance-dependent noise (labelsieve.data.noise, seed 0).

Models: the mini CLIP (every detector) and EfficientNet-Lite0 ImageNet features (the detectors that
need no text). Each result row records F1/precision/recall of the flag (noisy = positive), AUROC
and AUPRC of 1 − p_clean, the DEFT paper's clean-selection precision/recall, detector seconds,
and the process's peak RSS so far. Feature extraction is timed cold (empty cache) and warm.

    python benchmarks/detection.py --out benchmarks/results            # everything (about an hour on 2 CPU cores)
    python benchmarks/detection.py --datasets imagenette-sym40 --detectors knn,deft

Results are appended to ``OUT/detection.jsonl`` as they finish (a rerun skips finished rows) and
rendered to ``OUT/detection.md``, which docs/benchmarks.md quotes.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import append_jsonl, default_threads, host_info, read_jsonl  # noqa: E402

from labelsieve import testing  # noqa: E402
from labelsieve.audit.evaluate import detection_metrics  # noqa: E402
from labelsieve.core.runtime import peak_memory_mb, seed_everything  # noqa: E402
from labelsieve.data import load_images  # noqa: E402
from labelsieve.data.noise import make_noisy_labels  # noqa: E402
from labelsieve.detectors import create_detector  # noqa: E402
from labelsieve.detectors.common.base import DetectionContext  # noqa: E402
from labelsieve.detectors.ensemble import CODIVIDE_FAST, CODIVIDE_MEMBER, DEFAULT_MEMBERS, TURN_PROBE  # noqa: E402
from labelsieve.detectors.turn import EARLIER_SGD  # noqa: E402
from labelsieve.features import extract_features  # noqa: E402
from labelsieve.models.encoders import create_encoder  # noqa: E402

DATASETS = ["cifar10n-aggre", "cifar10n-worst", "imagenette-sym20", "imagenette-sym40", "imagenette-pair30",
            "imagenette-inst30"]
_CIFAR, _NETTE = ("cifar10n",), ("imagenette",)


def _text_budget_for(k: int, *, rows: int, epochs: int, batch: int = 64, classes: int = 10) -> int:
    """The ``text_budget`` that makes a detector scale by ``k`` (budget.text_budget_scale): the run's steps × classes
    at the requested batch, divided by ``k``."""
    return math.ceil(rows / batch) * epochs * classes // k


#: labelsieve's budgeted co-divide member (issue 21): the fast settings with a text budget of 3,200 steps x classes
#: per network, i.e. 320 steps at 10 classes whatever the number of rows (the batch and the learning rate grow k-fold
#: instead: k = 10 on the 10,000-row CIFAR-10N sets, 3 on the 2,500-row Imagenette sets).
CODIVIDE_BUDGET = {**CODIVIDE_FAST, "text_budget": 3200}
assert CODIVIDE_BUDGET == CODIVIDE_MEMBER
_ENS_FAST = [["codivide", CODIVIDE_FAST], ["turn", TURN_PROBE], "knn"]
#: TURN's probe as labelsieve ran it before issue 21 (weight decay 1e-4, batch 256; Table 8 gives 1e-6 and 128).
TURN_PROBE_EARLIER = {**TURN_PROBE, "lp_weight_decay": 1e-4, "lp_batch_size": 256}
# (row name, registry name, params, needs text[, dataset prefixes the row runs on])
# Issue 21: every row runs on the re-tempered stand-in (logit scale 35); the paper recipes (the detectors' defaults;
# on this CPU and the mini CLIP's CNN tower DEFT and co-divide fall back to their frozen-tower paths, TURN runs its
# probe only) and each labelsieve option on top of a paper recipe, one at a time.
DETECTORS = [
    ("label_match", "label_match", {}, True),
    ("knn", "knn", {}, False),
    ("confident_learning", "confident_learning", {}, False),
    ("small_loss", "small_loss", {}, False),
    ("gmm", "gmm", {}, False),
    ("turn paper recipe (no fine-tune)", "turn", {"finetune": False}, False),
    ("turn probe + monotone (labelsieve)", "turn", TURN_PROBE, False),
    ("turn probe + monotone + LP wd 1e-4 batch 256 (labelsieve)", "turn", TURN_PROBE_EARLIER, False),
    ("deft paper recipe", "deft", {}, True),
    ("deft + severe noise", "deft", {"severe_noise": True}, True),
    # co-divide's batch make-up is not in the paper; the grid chose DivideMix's (batch_mode "dividemix", the recipe's
    # value since this grid). The rows measured with "split" while it was the recipe's value carry its name below
    # (RENAMED_ROWS renamed them in detection.jsonl).
    ("codivide paper recipe", "codivide", {}, True),
    ("codivide paper + batch split", "codivide", {"batch_mode": "split"}, True),
    ("codivide paper + lambda_u 1", "codivide", {"lambda_u": 1.0}, True),
    ("codivide paper + batch split + lambda_u 1", "codivide", {"batch_mode": "split", "lambda_u": 1.0}, True),
    ("codivide fast (labelsieve)", "codivide", CODIVIDE_FAST, True),
    ("codivide fast + text budget 3200 (labelsieve)", "codivide", CODIVIDE_BUDGET, True),
    ("ensemble: codivide fast + turn probe + knn (stacked)", "ensemble", {"members": _ENS_FAST}, True),
    ("ensemble: codivide budget + turn probe + knn (stacked)", "ensemble",
     {"members": [["codivide", CODIVIDE_BUDGET], ["turn", TURN_PROBE], "knn"]}, True),
    ("ensemble: codivide budget + turn probe LP 1e-4 + knn (stacked)", "ensemble",
     {"members": [["codivide", CODIVIDE_BUDGET], ["turn", TURN_PROBE_EARLIER], "knn"]}, True),
    ("ensemble: label_match + turn probe + knn (stacked)", "ensemble",
     {"members": ["label_match", ["turn", TURN_PROBE], "knn"]}, True),
    ("ensemble: deft paper + turn probe + knn (stacked)", "ensemble",
     {"members": ["deft", ["turn", TURN_PROBE], "knn"]}, True),
    ("ensemble: codivide paper (batch split) + turn probe + knn (stacked)", "ensemble",
     {"members": [["codivide", {"batch_mode": "split"}], ["turn", TURN_PROBE], "knn"]}, True),
]
# Option rows (named in --detectors), each one labelsieve option on top of a paper recipe (docs/methods.md), and
# rows that train through the image tower (DEFT with LoRA, TURN's fine-tuning: about 0.05 s per image-epoch at 128 px
# on this 2-core CPU, so Imagenette only).
EXTRA_DETECTORS = [
    ("deft + calibrated scale", "deft", {"logit_scale": "calibrated"}, True),
    ("deft + batch selection", "deft", {"selection": "batch"}, True),
    ("deft + cosine per step", "deft", {"lr_schedule": "cosine_step"}, True),
    ("deft + feature adapter", "deft", {"peft": "feature_adapter"}, True),
    ("deft + constant LR", "deft", {"lr_schedule": "constant"}, True),
    ("deft + phrase init", "deft", {"ctx_init": "a photo of a"}, True),
    # the authors' real-world variant: for real noise (CIFAR-10N)
    ("deft real-world variant", "deft", {"consistency": True}, True, _CIFAR),
    # DEFT's budgets (labelsieve's options, issue 13): max_steps 3,200 leaves these sets' 10 epochs whole; the text
    # budget forces k = 10 (1,570 on CIFAR-10N's 10,000 rows, 400 on Imagenette's 2,500)
    ("deft + text budget k 10", "deft",
     {"max_steps": 3200, "text_budget": _text_budget_for(10, rows=10_000, epochs=10)}, True, _CIFAR),
    ("deft + text budget k 10", "deft",
     {"max_steps": 3200, "text_budget": _text_budget_for(10, rows=2_500, epochs=10)}, True, _NETTE),
    # the text budget at the paper's scale (35 on the re-tempered stand-in) cost much of DEFT's F1 and AUROC; with
    # the calibrated scale (6.5-14.6 on these sets) it did not (issue 21)
    ("deft + calibrated scale + text budget k 10", "deft",
     {"logit_scale": "calibrated", "max_steps": 3200, "text_budget": _text_budget_for(10, rows=10_000, epochs=10)},
     True, _CIFAR),
    ("deft + calibrated scale + text budget k 10", "deft",
     {"logit_scale": "calibrated", "max_steps": 3200, "text_budget": _text_budget_for(10, rows=2_500, epochs=10)},
     True, _NETTE),
    # the text budget on the paper recipe (lr 0.02, 60 epochs), forced to k = 10 (9,420 on CIFAR-10N, 2,400 on
    # Imagenette); DEFT's budget failed at s = 35
    ("codivide paper + text budget k 10", "codivide", {"text_budget": _text_budget_for(10, rows=10_000, epochs=60)},
     True, _CIFAR),
    ("codivide paper + text budget k 10", "codivide", {"text_budget": _text_budget_for(10, rows=2_500, epochs=60)},
     True, _NETTE),
    ("codivide paper + monotone", "codivide", {"monotone": True}, True),
    ("codivide paper + max_steps 1000", "codivide", {"max_steps": 1000}, True),
    ("codivide paper + no lambda_u ramp", "codivide", {"lambda_u_rampup": 0}, True),
    ("deft lora (128 px 5 epochs)", "deft", {"peft": "lora", "image_size": 128, "epochs": 5}, True, _NETTE),
    ("deft lora + rrc (128 px 5 epochs)", "deft", {"peft": "lora", "image_size": 128, "epochs": 5, "augment": "rrc"},
     True, _NETTE),
    ("turn paper recipe fine-tune 128 px", "turn", {"image_size": 128}, False, _NETTE),
    ("turn sgd (labelsieve) fine-tune 128 px", "turn",
     {"image_size": 128, **EARLIER_SGD}, False, _NETTE),
    ("turn paper recipe fine-tune 128 px + rrc", "turn", {"image_size": 128, "augment": "rrc"}, False, _NETTE),
    ("ensemble: codivide fast + turn probe + knn (mean)", "ensemble",
     {"members": _ENS_FAST, "combine": "mean_logit"}, True),
]
#: Rows measured before issue 10 (seeds 0-2 for the trained detectors), kept to compare with the rerun;
#: their names say so. The DEFT loss and gradient routing changed, co-divide's and TURN's defaults became the
#: paper recipes, so none of these is what a current name runs. ``BEFORE_10_NAMES`` maps their old names.
BEFORE_10_NAMES = {
    "turn (no fine-tune)": "turn (no fine-tune) [before #10]",
    "deft frozen (paper recipe)": "deft frozen [before #10]",
    "deft frozen + feature adapter": "deft frozen + feature adapter [before #10]",
    "codivide frozen": "codivide frozen [before #10]",
    "ensemble (deft+gmm+CL stacked)": "ensemble (deft+gmm+CL stacked) [before #10]",
    "deft lora (128 px 5 epochs)": "deft lora (128 px 5 epochs) [before #10]",
    "ensemble (codivide+turn+knn stacked)": "ensemble (codivide+turn+knn stacked) [before #10]",
    "ensemble (codivide+turn+knn mean)": "ensemble (codivide+turn+knn mean) [before #10]",
}
BEFORE_10 = list(BEFORE_10_NAMES.values())
#: Co-divide's batch make-up became DivideMix's ("dividemix") after the issue-21 grid chose it; the rows measured
#: before under the names on the left ran what the names on the right run now (see rename_rows).
RENAMED_ROWS = {old: (new, next(d[2] for d in DETECTORS if d[0] == new)) for old, new in {
    "codivide paper recipe": "codivide paper + batch split",
    "codivide paper + batch dividemix": "codivide paper recipe",
    "codivide paper + lambda_u 1": "codivide paper + batch split + lambda_u 1",
    "ensemble: codivide paper + turn probe + knn (stacked)":
        "ensemble: codivide paper (batch split) + turn probe + knn (stacked)",
}.items()}

#: Issue 21 moved every mini-CLIP row measured before it whose detector reads the text side (the stand-in's logit
#: scale was then ln 100) or whose recipe changed (TURN's probe: weight decay 1e-4, batch 256) out of detection.jsonl
#: into this file, rendered to detection-before21.md: they do not enter the tables that choose the default. The
#: image-feature baselines (knn, confident_learning, small_loss, gmm: features and code unchanged), the Lite0 rows and
#: the extraction timings stay.
BEFORE_21_FILE = "detection-before21.jsonl"
BEFORE_21_NOTE = ("**Rows measured before issue 21, kept for the record; they choose nothing.** Text-side rows "
                  "(label_match, DEFT, co-divide, the ensembles) ran on the stand-in CLIP with its copied logit "
                  "scale ln 100, which saturated every prompt method's softmax; TURN's rows used its earlier probe "
                  "(weight decay 1e-4, batch 256). Row names are those of the code at the time (docs/methods.md says "
                  "what each ran).")

# --detectors is a comma-separated list of these names, so they hold no comma
assert not any("," in d[0] for d in DETECTORS + EXTRA_DETECTORS)
ROW_ORDER = list(dict.fromkeys(d[0] for d in DETECTORS + EXTRA_DETECTORS)) + BEFORE_10
#: Deterministic rows (no seed changes their result): they run once.
ONCE = {"label_match", "knn", "confident_learning", "small_loss", "gmm"}
#: The grid's row that runs the default ensemble's members (``ensemble.DEFAULT_MEMBERS``; checked below).
DEFAULT_ROW = "ensemble: codivide budget + turn probe + knn (stacked)"
assert [m if isinstance(m, str) else list(m) for m in DEFAULT_MEMBERS] == next(
    d[2]["members"] for d in DETECTORS if d[0] == DEFAULT_ROW), "DEFAULT_ROW must run the default members"


# A run's seconds are comparable with another's only at a like load: the lanes run two or three one-thread processes on
# the two cores (1-minute load average 1-3); a run that started or ended above this shared them with more (CI, tests).
QUIET_LOAD = 3.2
#: Sets outside the grid, for held-out checks (issues 18 and 21): CIFAR-10 with 30 % pair noise on 3,000 train
#: images that share none with the CIFAR-10N sets (a seeded sample of rows 10,000-49,999), and two sets with their
#: original labels (truth = the given labels): Imagenette val (1,000) and CIFAR-10 test (10,000).
HELD_OUT = ["cifar10-pair30", "imagenette-val", "cifar10-test"]


def load_dataset(name: str) -> tuple:
    """(images with given labels, true label indices)."""
    if name == "cifar10-pair30":
        images = load_images(*testing.extract_subset("cifar10", 3_000, seed=0, skip_first=10_000))
        true = images.labels.copy()
        images.labels = make_noisy_labels(images, kind="pair", rate=0.3, seed=0)
        return images, true
    if name in ("imagenette-val", "cifar10-test"):
        images = load_images(*testing.extract_subset(name))
        return images, images.labels.copy()
    if name.startswith("cifar10n"):
        root, csv = testing.extract_subset("cifar10", 10_000, first=True)
        images = load_images(root, csv)
        kind = {"aggre": "aggre_label", "worst": "worse_label"}[name.split("-")[1]]
        n10 = testing.cifar10n_labels(kind)
        index = {c: i for i, c in enumerate(images.classes)}
        given = np.array([index[n10[p][1]] for p in images.paths])
        true = np.array([index[n10[p][0]] for p in images.paths])
        assert (true == images.labels).all()
        images.labels = given
        return images, true
    root, csv = testing.extract_subset("imagenette")
    images = load_images(root, csv)
    spec = name.split("-")[1]
    kind = {"sym": "symmetric", "pair": "pair", "inst": "instance"}[spec.rstrip("0123456789")]
    rate = int(spec.lstrip("symparint")) / 100
    true = images.labels.copy()
    images.labels = make_noisy_labels(images, kind=kind, rate=rate, seed=0)
    return images, true


def _rows_for(dname: str, wanted: set[str]) -> list[tuple]:
    """The (row, registry, params, needs text) of the wanted rows that run on ``dname``."""
    out = []
    for d in DETECTORS + EXTRA_DETECTORS:
        if not (d[0] in wanted or (d in DETECTORS and d[1] in wanted)):
            continue
        if len(d) > 4 and not any(dname.startswith(p) for p in d[4]):
            continue
        out.append(d[:4])
    return out


class MemberMemo:
    """Within one process and dataset, a detector that already ran with the same parameters and seed is not run
    again: a grid row and an ensemble member (or two ensembles) with the same settings share its result. The results
    are the same as a rerun's (every detector seeds itself from ``ctx.seed``); a row's ``seconds`` add the first run's
    seconds of every reused result, and ``seconds_reused`` says how many of them were reused."""

    def __init__(self) -> None:
        self.results: dict[str, tuple[object, float]] = {}
        self.reused = 0.0

    def wrap(self, det) -> None:
        key = json.dumps([det.name, det.get_params()], sort_keys=True, default=str)
        run = det.detect

        def detect(ctx):
            if key in self.results:
                res, secs = self.results[key]
                self.reused += secs
                return copy.copy(res)
            t = time.perf_counter()
            res = run(ctx)
            self.results[key] = (copy.copy(res), time.perf_counter() - t)
            return res

        det.detect = detect


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default=",".join(DATASETS), help=f"comma-separated; held-out sets: {HELD_OUT}")
    ap.add_argument("--detectors", default=",".join(d[0] for d in DETECTORS),
                    help="comma-separated row names (or registry names of the grid's rows)")
    ap.add_argument("--models", default="mini-clip,lite0")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--cache", default=".cache/bench-features")
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cold", action=argparse.BooleanOptionalAction, default=True,
                    help="empty the feature cache first so extraction is timed cold (--no-cold resumes it)")
    ap.add_argument("--render", action="store_true", help="only render the Markdown tables from the JSONL files")
    ap.add_argument("--rename-rows", action="store_true",
                    help="rename the rows measured under co-divide's earlier batch make-up (RENAMED_ROWS), then exit")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.rename_rows:
        print(f"renamed {rename_rows(out / 'detection.jsonl')} rows")
        return 0
    if args.render:
        render(out / "detection.jsonl", out / "detection.md")
        if (out / BEFORE_21_FILE).exists():
            render(out / BEFORE_21_FILE, out / "detection-before21.md", note=BEFORE_21_NOTE)
        return 0
    torch.set_num_threads(args.threads)
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "detection.jsonl"
    done = {(r["dataset"], r["model"], r["detector"], r.get("seed", 0)) for r in read_jsonl(jsonl)}
    wanted = set(args.detectors.split(","))
    known = {d[0] for d in DETECTORS + EXTRA_DETECTORS} | {d[1] for d in DETECTORS}
    if wanted - known:
        ap.error(f"unknown rows: {sorted(wanted - known)}")
    shared = testing.shared_dir() / "models"
    models = {"mini-clip": (str(shared / "mini-clip"), None),
              "lite0": ("tf_efficientnet_lite0", str(shared / "tf_efficientnet_lite0.safetensors"))}
    host = host_info(args.threads)
    for mname in args.models.split(","):
        enc = create_encoder(models[mname][0], pretrained=models[mname][1])
        for dname in args.datasets.split(","):
            images, true = load_dataset(dname)
            key_cache = Path(args.cache) / mname / dname.split("-")[0]
            timing_row = (dname.split("-")[0], mname, "feature extraction", 0)
            if timing_row not in done:
                if args.cold:
                    shutil.rmtree(key_cache, ignore_errors=True)
                t = time.perf_counter()
                extract_features(images, enc, cache_dir=key_cache, progress=False)
                cold = time.perf_counter() - t
                t = time.perf_counter()
                extract_features(images, enc, cache_dir=key_cache, progress=False)
                warm = time.perf_counter() - t
                rec = {"dataset": timing_row[0], "model": mname, "detector": "feature extraction", "n": len(images),
                       "cold_seconds": cold, "cold_is_complete": bool(args.cold),
                       "warm_seconds": warm, "images_per_second_cold": len(images) / cold,
                       "peak_rss_mb": peak_memory_mb(), "host": host, "loadavg": os.getloadavg()}
                append_jsonl(jsonl, rec)
                done.add(timing_row)
                print(f"{mname} {timing_row[0]}: extraction cold {cold:.1f}s warm {warm:.2f}s", flush=True)
            feats = extract_features(images, enc, cache_dir=key_cache, progress=False)
            x = np.asarray(feats.vectors, dtype=np.float32)
            x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
            noisy = images.labels != true
            memo = MemberMemo()
            for row, reg, params, needs_text in _rows_for(dname, wanted):
                if (dname, mname, row, args.seed) in done or (needs_text and not enc.has_text):
                    continue
                ctx = DetectionContext(labels=images.labels, classnames=images.classnames, images=images,
                                       encoder=enc, features_fn=lambda x=x: x, device=enc.device, seed=args.seed,
                                       cache_dir=Path(args.cache) / "work", progress=False)
                seed_everything(args.seed)
                load = os.getloadavg()
                try:
                    det = create_detector(reg, **params)
                    resolved = det.get_params()
                    for member in getattr(det, "_members", [det]):
                        memo.wrap(member)
                    memo.reused = 0.0
                    t = time.perf_counter()
                    res = det.detect(ctx)
                    secs = time.perf_counter() - t + memo.reused
                except Exception as exc:  # a failing detector is a finding, not a crash of the benchmark
                    print(f"{dname} {mname} {row}: FAILED {type(exc).__name__}: {exc}", flush=True)
                    continue
                m = detection_metrics(noisy, res.p_clean, res.is_noisy)
                rec = {"dataset": dname, "model": mname, "detector": row, "seed": args.seed, "registry": reg,
                       "params": params, "resolved_params": resolved, "logit_scale": enc.logit_scale,
                       "n": len(images), "noise_rate": float(noisy.mean()), "seconds": secs,
                       "seconds_reused": memo.reused, "loadavg_start": load, "loadavg_end": os.getloadavg(),
                       "peak_rss_mb": peak_memory_mb(), "host": host, **m,
                       "suggestion_accuracy_on_flagged_noisy": _sugg(res, noisy, true),
                       **_epoch_speed(res)}
                append_jsonl(jsonl, rec)
                print(f"{dname:18s} {mname:9s} {row:30s} F1 {m['f1']:.3f} AUROC {m['auroc']:.3f} "
                      f"AUPRC {m['auprc']:.3f} {secs:.1f}s", flush=True)
    render(jsonl, out / "detection.md")
    return 0


def _mean_over_seeds(rows: list[dict]) -> list[dict]:
    """One row per (dataset, model, detector): float fields averaged over its seeds, with
    ``n_seeds`` and the standard deviation of F1 and AUROC across them."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["model"], r["detector"]), []).append(r)
    out = []
    for grp in groups.values():
        m = dict(grp[-1])
        for k, v in grp[-1].items():
            if isinstance(v, float):
                vals = [g[k] for g in grp if isinstance(g.get(k), (int, float))]
                m[k] = float(np.mean(vals))
        m["n_seeds"] = len(grp)
        m["seeds"] = sorted(g.get("seed", 0) for g in grp)
        m["f1_sd"] = float(np.std([g["f1"] for g in grp]))
        m["auroc_sd"] = float(np.std([g["auroc"] for g in grp]))
        out.append(m)
    return out


def _grid_means(rows: list[dict], model: str, name: str) -> dict | None:
    """Mean over the six grid sets of one detector, per seed, then mean ± sd over the seeds that ran all six (a
    deterministic detector that ran once counts as every seed); None when no seed covers the grid."""
    sub = [r for r in rows if r["model"] == model and r["detector"] == name and r["dataset"] in DATASETS]
    by_seed: dict[int, dict[str, dict]] = {}
    for r in sub:
        by_seed.setdefault(r.get("seed", 0), {})[r["dataset"]] = r
    full = {s: d for s, d in by_seed.items() if len(d) == len(DATASETS)}
    if not full:
        return None
    f1 = [np.mean([d[k]["f1"] for k in DATASETS]) for d in full.values()]
    au = [np.mean([d[k]["auroc"] for k in DATASETS]) for d in full.values()]
    runs = [(k, d[k]) for d in full.values() for k in DATASETS]
    cif = [r["seconds"] for k, r in runs if k.startswith("cifar10n")]
    net = [r["seconds"] for k, r in runs if k.startswith("imagenette")]
    quiet = {kind: [r["seconds"] for k, r in runs if k.startswith(kind) and _quiet(r)] for kind in _CIFAR + _NETTE}
    return {"seeds": sorted(full), "f1": float(np.mean(f1)), "f1_sd": float(np.std(f1)), "auroc": float(np.mean(au)),
            "auroc_sd": float(np.std(au)), "s_cifar": float(np.mean(cif)), "s_nette": float(np.mean(net)),
            "quiet": {kind: (float(np.mean(v)) if v else None, len(v)) for kind, v in quiet.items()},
            "worst": min(((k, np.mean([d[k]["f1"] for d in full.values()])) for k in DATASETS), key=lambda t: t[1])}


def _quiet(row: dict) -> bool:
    """Whether a result row ran at the lanes' own load (the 1-minute load average at its start and end at most
    :data:`QUIET_LOAD`); rows written before the load was recorded count as not."""
    loads = [(row.get(k) or [None])[0] for k in ("loadavg_start", "loadavg_end")]
    return all(v is not None and v <= QUIET_LOAD for v in loads)


def _quiet_cell(q: tuple[float | None, int]) -> str:
    return "–" if q[0] is None else f"{q[0]:.0f} ({q[1]})"


def _epoch_speed(res) -> dict:
    """Mean seconds per training epoch and images per second, for detectors that train in epochs."""
    hist = [h for h in (res.info or {}).get("history", []) if isinstance(h, dict) and "seconds" in h]
    if not hist:
        return {}
    ips = [h["images_per_s"] for h in hist if h.get("images_per_s")]
    return {"epochs": len(hist), "epoch_seconds": float(np.mean([h["seconds"] for h in hist])),
            "images_per_s": float(np.mean(ips)) if ips else None}


def _sugg(res, noisy: np.ndarray, true: np.ndarray) -> float | None:
    hit = res.is_noisy & noisy
    return float((res.suggested[hit] == true[hit]).mean()) if hit.any() else None


def _codivide_batch_mode(row: dict) -> str | None:
    """The batch make-up co-divide ran with in a result row (itself or as an ensemble member), from its resolved
    parameters."""
    rp = row.get("resolved_params") or {}
    if "batch_mode" in rp:
        return rp["batch_mode"]
    for m in rp.get("members", []):
        if isinstance(m, list) and m[0] == "codivide":
            return m[1].get("batch_mode")
    return None


def rename_rows(jsonl: Path) -> int:
    """Rename the rows of :data:`RENAMED_ROWS` in ``jsonl`` (rewritten in place through a temporary file), each only
    if its resolved parameters show the batch make-up its new name says; returns how many were renamed. A row keeps
    its measured values; ``renamed_from`` records its old name and ``params`` become the new name's."""
    rows = read_jsonl(jsonl)
    n = 0
    for r in rows:
        new = RENAMED_ROWS.get(r["detector"])
        if new is None or r.get("model") != "mini-clip":
            continue
        ran = _codivide_batch_mode(r)
        want = "dividemix" if new[0] == "codivide paper recipe" else "split"
        if ran != want:
            continue  # measured under the current names already
        r["renamed_from"], r["detector"], r["params"] = r["detector"], new[0], new[1]
        n += 1
    tmp = jsonl.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(jsonl)
    return n


def render(jsonl: Path, md: Path, *, note: str = "") -> None:
    """Markdown tables from the JSONL results (``note``: a paragraph put first)."""
    rows = read_jsonl(jsonl)
    raw = [r for r in rows if r["detector"] != "feature extraction"]
    det = _mean_over_seeds(raw)
    ext = [r for r in rows if r["detector"] == "feature extraction"]
    f = lambda v: "–" if v is None else f"{v:.3f}"
    f1 = lambda r: f"{r['f1']:.3f}" + (f" ± {r['f1_sd']:.3f}" if r["n_seeds"] > 1 else "")
    hosts = list({json.dumps(r["host"], sort_keys=True): r["host"] for r in rows}.values())
    loads = [v for r in raw for v in (r.get("loadavg_start", [None])[0], r.get("loadavg_end", [None])[0]) if v]
    lines = ([note, ""] if note else []) + [f"Host{'s' if len(hosts) > 1 else ''}: " + "; ".join(map(str, hosts)), ""]
    if loads:
        lines += [f"1-minute load average at the start and end of the rows: {min(loads):.1f}–{max(loads):.1f} "
                  "(2 cores shared with other jobs: seconds are upper bounds).", ""]
    order = {name: i for i, name in enumerate(ROW_ORDER)}
    model_order = {"mini-clip": 0, "lite0": 1}
    datasets = sorted(dict.fromkeys(r["dataset"] for r in det), key=lambda d: DATASETS.index(d) if d in DATASETS
                      else len(DATASETS) + (HELD_OUT.index(d) if d in HELD_OUT else 9))
    grid_sets = [d for d in datasets if d in DATASETS]
    held = [d for d in datasets if d not in DATASETS]
    for model in sorted(dict.fromkeys(r["model"] for r in det), key=lambda m: model_order.get(m, 9)):
        # rows outside ROW_ORDER keep the order they first appear in the file (a set's order changes between runs)
        names = sorted(dict.fromkeys(r["detector"] for r in det if r["model"] == model), key=lambda d: order.get(d, 99))
        means = {n: _grid_means(raw, model, n) for n in names}
        lines += [f"### The grid, {model} features: mean over the six sets (F1 and AUROC: mean ± sd over the seeds "
                  "that ran all six)", "",
                  f"Seconds per set: the mean over every run, and over the runs at the lanes' own load (1-minute load "
                  f"average ≤ {QUIET_LOAD} at start and end: at most three one-thread processes on the two cores; how "
                  "many runs in brackets), the ones to compare between rows.", "",
                  "| detector | seeds | mean F1 | mean AUROC | worst set (F1) | s per CIFAR-10N set (10,000) | "
                  f"s per Imagenette set (2,500) | s per CIFAR-10N set, load ≤ {QUIET_LOAD} | "
                  f"s per Imagenette set, load ≤ {QUIET_LOAD} |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for n in sorted((n for n in names if means[n]), key=lambda n: -means[n]["f1"]):
            g = means[n]
            lines.append(f"| {n} | {','.join(map(str, g['seeds']))} | {g['f1']:.3f} ± {g['f1_sd']:.3f} | "
                         f"{g['auroc']:.3f} ± {g['auroc_sd']:.3f} | {g['worst'][0]} {g['worst'][1]:.3f} | "
                         f"{g['s_cifar']:.0f} | {g['s_nette']:.0f} | {_quiet_cell(g['quiet']['cifar10n'])} | "
                         f"{_quiet_cell(g['quiet']['imagenette'])} |")
        lines.append("")
        for title, sets in (("the grid", grid_sets), ("held-out sets (not used to choose anything)", held)):
            dsets = [d for d in sets if any(r["dataset"] == d and r["model"] == model for r in det)]
            if not dsets:
                continue
            lines += [f"### F1 / AUROC by dataset, {model} features, {title} (F1 mean ± sd over seeds; seeds in "
                      "brackets where fewer than 3)", "",
                      "| detector | " + " | ".join(dsets) + " |", "|---|" + "---|" * len(dsets)]
            for name in names:
                cells = []
                for d in dsets:
                    hit = [r for r in det if r["dataset"] == d and r["model"] == model and r["detector"] == name]
                    if not hit:
                        cells.append("–")
                        continue
                    r = hit[0]
                    seeds = "" if r["n_seeds"] >= 3 or name in ONCE else f" [{','.join(map(str, r['seeds']))}]"
                    cells.append(f"{f1(r)} / {r['auroc']:.3f}{seeds}")
                if any(c != "–" for c in cells):
                    lines.append(f"| {name} | " + " | ".join(cells) + " |")
            lines.append("")
    for ds in datasets:
        sub = sorted((r for r in det if r["dataset"] == ds),
                     key=lambda r: (model_order.get(r["model"], 9), order.get(r["detector"], 99)))
        lines += [f"### {ds} (n = {sub[0]['n']}, true noise {sub[0]['noise_rate']:.1%})", "",
                  "| model | detector | seeds | F1 | precision | recall | AUROC | AUPRC | clean P | clean R | seconds "
                  "| peak RSS MB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sub:
            lines.append(f"| {r['model']} | {r['detector']} | {r['n_seeds']} | {f1(r)} | {f(r['precision'])} | "
                         f"{f(r['recall'])} | "
                         f"{f(r['auroc'])} | {f(r['auprc'])} | {f(r['clean_precision'])} | {f(r['clean_recall'])} | "
                         f"{r['seconds']:.1f} | {r['peak_rss_mb']:.0f} |")
        lines.append("")
    speed = [r for r in det if r.get("epoch_seconds") is not None]
    if speed:
        lines += ["### Training speed of the detectors that train in epochs", "",
                  "| dataset | model | detector | epochs | s / epoch | images / s |", "|---|---|---|---|---|---|"]
        for r in speed:
            ips = f"{r['images_per_s']:.0f}" if r.get("images_per_s") else "–"
            lines.append(f"| {r['dataset']} | {r['model']} | {r['detector']} | {r['epochs']} | "
                         f"{r['epoch_seconds']:.1f} | {ips} |")
        lines.append("")
    if ext:
        lines += ["### Feature extraction", "", "| images | model | n | cold s | img/s cold | warm-cache s |",
                  "|---|---|---|---|---|---|"]
        for r in ext:
            lines.append(f"| {r['dataset']} | {r['model']} | {r['n']} | {r['cold_seconds']:.1f} | "
                         f"{r['images_per_second_cold']:.1f} | {r['warm_seconds']:.2f} |")
    md.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
