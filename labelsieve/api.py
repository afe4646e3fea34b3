"""The Python API; the CLI is a thin layer over these functions.

>>> import labelsieve
>>> a = labelsieve.audit("images/", "labels.csv", method="knn", model="path/to/open_clip_dir", out_dir="out")
>>> a.flagged.head()
"""

from __future__ import annotations

import hashlib
import inspect
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from labelsieve import __version__
from labelsieve.audit.auditset import check_audit_output, format_digest, new_audit_id, open_audit, write_audit_set
from labelsieve.audit.checksample import CHECK_COLUMN, DEFAULT_CHECK_SIZE, draw_check_sample
from labelsieve.audit.decisions import read_reviews
from labelsieve.audit.evaluate import evaluate_audit, format_metrics
from labelsieve.audit.handoff.common import export_rows
from labelsieve.audit.handoff.fiftyone import read_fiftyone, write_fiftyone
from labelsieve.audit.handoff.labelstudio import export_paths, read_export, write_labelstudio
from labelsieve.audit.review import apply_review as _apply_review
from labelsieve.audit.reviewed import (
    check_reviewed_frames,
    mark_reviewed,
    recalibrated,
    resolve_reviewed,
    reviewed_estimate,
    reviewed_warning,
    widen_result,
)
from labelsieve.audit.schema import COLUMNS, DIGEST_COLUMN, REVIEW_REQUIRED, audit_record, paths_hash
from labelsieve.audit.table import Audit, build_table, summarise, use_estimate
from labelsieve.audit.writers import print_summary
from labelsieve.core import distributed
from labelsieve.core.defaults import (
    DEFAULT_DUPLICATE_THRESHOLD,
    DEFAULT_FEATURES_METHOD,
    DEFAULT_FEATURES_PARAMS,
    DEFAULT_METHOD,
    DEFAULT_MODEL,
    DEFAULT_OUTLIER_PROB,
    default_cache_dir,
)
from labelsieve.core.errors import DataError, ParameterError, check_param
from labelsieve.core.methodspec import parse_method
from labelsieve.core.paths import check_output_dir, check_output_file, listed
from labelsieve.core.progress import warn
from labelsieve.core.runtime import peak_memory_mb, resolve_device, seed_everything, versions
from labelsieve.data import LabeledImages, load_images, read_labels_csv
from labelsieve.data.containers import materialise, open_samples, write_cleaned_copy
from labelsieve.data.noise import make_noisy_labels, parse_mapping, write_noisy_csv
from labelsieve.detectors import DetectionContext, DetectionResult, create_detector, get_detector_class, list_detectors
from labelsieve.detectors.common.base import RowSubset
from labelsieve.detectors.common.calibration import calibrate
from labelsieve.detectors.common.competence import measure_competence
from labelsieve.detectors.common.duplicates import near_duplicate_groups
from labelsieve.detectors.confident_learning import from_probs
from labelsieve.features import extract_features
from labelsieve.models.encoders import Encoder, create_encoder
from labelsieve.train import predict, train_from_audit
from labelsieve.train.finetune import audit_image_root

#: The API mirrors the CLI: ``audit``, ``apply_review`` (``apply``), ``train_from_audit`` (``train``),
#: ``predict``, ``add_noise`` (``noise``), ``evaluate_audit`` (``evaluate``), ``export_audit`` (``export``),
#: ``describe_detectors`` (``detectors``), ``describe_detector`` (``detectors --show``), ``audit_features``
#: (``audit --features``), ``audit_pred_probs`` (``audit --pred-probs``); ``detect`` is the "bring your own features
#: or predicted probabilities" entry in Python; ``run_detector`` is
#: :func:`audit` on images and a model already loaded.
__all__ = ["add_noise", "apply_review", "audit", "audit_features", "audit_pred_probs", "describe_detector",
           "describe_detectors", "detect", "evaluate_audit", "export_audit", "format_metrics", "load_pred_probs",
           "predict", "run_detector", "train_from_audit"]

#: What ``labelsieve export --to`` accepts.
EXPORT_TARGETS = ("fiftyone", "labelstudio")


def detect(
    features: Any = None,
    labels: Sequence[Any] = (),
    *,
    pred_probs: Any = None,
    classnames: Sequence[str] | dict[str, str] | None = None,
    method: str | None = None,
    params: dict[str, Any] | None = None,
    encoder: Encoder | None = None,
    model: str | None = None,
    pretrained: str | None = None,
    seed: int = 0,
    device: str | None = None,
    progress: bool = False,
) -> DetectionResult:
    """Find label issues from features you already have (the "bring your own embeddings" entry).

    Like cleanlab's ``find_label_issues(labels, pred_probs)``, but from image features:

    >>> res = labelsieve.detect(feats, labels)                       # doctest: +SKIP
    >>> res.is_noisy, res.p_clean, res.suggested                     # doctest: +SKIP

    Or, like cleanlab exactly, from your own model's out-of-sample class probabilities:

    >>> res = labelsieve.detect(labels=labels, pred_probs=probs)      # doctest: +SKIP

    Parameters
    ----------
    features : array-like of shape (n, d), or a path to a ``.npy`` file
        Image features of any float dtype (a float16 memory map is read a block at a time, never copied
        whole); normalised here. Not with ``pred_probs``.
    labels : sequence of shape (n,)
        Given labels: class indices, or class names (sorted to give the class order).
    pred_probs : array-like of shape (n, C), or a path to a ``.npy`` file
        Out-of-sample predicted probabilities (from cross-validation, or a model that never trained on these
        rows): row i is row i of ``labels``; column j is class j (class indices, or the sorted class names). Each
        row must sum to 1. Confident learning (prune by noise rate) runs on them, and its ``p_clean`` (the
        probability of the given label) is calibrated as in an audit; ``method`` and ``params`` do not apply.
    classnames : sequence of str or dict, optional
        The text a vision-language model reads per class (index order), or raw label -> text. Needed only
        by text-guided detectors; default the label values.
    method : str, optional
        A registered detector (``labelsieve.list_detectors()``), with its parameters in place if wanted
        (``"deft(logit_scale=calibrated)"``), or several separated by commas for an ensemble, each with its own
        (``"turn(finetune=false),knn(k=10)"``; :mod:`labelsieve.core.methodspec`). Default: the audit's
        default (:data:`~labelsieve.core.defaults.DEFAULT_METHOD`) when a vision-language ``encoder``/``model``
        is given (its text side must be the one the features came from), else
        :data:`~labelsieve.core.defaults.DEFAULT_FEATURES_METHOD` (TURN's linear probe and GMM, which needs
        no text).
    params : dict, optional
        Keyword parameters of the detector.
    encoder, model, pretrained
        The model the features came from, for detectors that read class names through its text side: a
        loaded :class:`~labelsieve.models.encoders.Encoder`, or a name to load (see ``labelsieve audit``).

    Returns
    -------
    DetectionResult
        ``p_clean`` (calibrated as in an audit; the detector's raw score in ``columns["p_clean_raw"]``),
        ``is_noisy``, ``suggested``, ``suggested_prob`` per row, ``rule`` and ``info``.
    """
    raw = list(labels) if not isinstance(labels, np.ndarray) else labels
    values = np.asarray(raw)
    if np.issubdtype(values.dtype, np.integer):
        n_classes = int(values.max()) + 1 if len(values) else 0
        classes = [str(i) for i in range(n_classes)]
        ids = values.astype(np.int64)
    else:
        classes = sorted({str(v) for v in values})
        index = {c: i for i, c in enumerate(classes)}
        ids = np.array([index[str(v)] for v in values], dtype=np.int64)
    if pred_probs is not None:
        check_param("detect", "features", "features and pred_probs", features is None, "one of features or pred_probs")
        integer = np.issubdtype(values.dtype, np.integer)
        probs = load_pred_probs(pred_probs, n=len(ids), classes=None if integer else classes, where="pred_probs",
                                rows="labels")
        if integer and probs.shape[1] < n_classes:
            raise DataError(f"pred_probs has {probs.shape[1]} columns but the labels go up to class {n_classes - 1}: "
                            "column j must be class j.")
        return calibrate(from_probs(ids, probs, where="the given out-of-sample (pred_probs)"), labels=ids)
    x = _load_features_file(features) if isinstance(features, (str, os.PathLike)) else features
    check_param("detect", "features", getattr(x, "shape", None), getattr(x, "ndim", 0) == 2,
                "an array of shape (n, d) or a .npy file holding one")
    check_param("detect", "labels", f"{len(raw)} labels for {x.shape[0]} rows", len(raw) == x.shape[0],
                "one label per row of features")
    if isinstance(classnames, dict):
        names = [str(classnames.get(c, c)) for c in classes]
    elif classnames is not None:
        names = [str(c) for c in classnames]
        check_param("detect", "classnames", f"{len(names)} names for {len(classes)} classes",
                    len(names) >= len(classes), "one name per class")
    else:
        names = [c.replace("_", " ") for c in classes]
    if encoder is None and model is not None:
        encoder = create_encoder(model, pretrained=pretrained, device=resolve_device(device))
    ctx = DetectionContext(labels=ids, classnames=names, images=None, encoder=encoder, features_fn=lambda: x,
                           device=encoder.device if encoder is not None else resolve_device(device), seed=seed,
                           progress=progress)
    method, detector = _features_detector(method, params, encoder, ctx, how="encoder=… or model=…")
    seed_everything(seed)
    return calibrate(detector.detect(ctx), labels=ids)  # p_clean a probability, as in an audit


def _features_detector(method: str | None, params: dict[str, Any] | None, encoder: Encoder | None,
                       ctx: DetectionContext, *, how: str) -> tuple[str, Any]:
    """The detector for features given by the user: ``method`` or the default (the audit's with a
    vision-language ``encoder``, else TURN's probe), checked, before any work, to have the text side it needs and
    to need no image: a detector that would read the images (TURN's fine-tuning, DEFT's or co-divide's image
    paths, gmm's fine-tuned losses) runs with its ``features_only`` parameters when the user did not set them
    (with a warning saying so: what can run on features), and is refused otherwise."""
    if method is None:
        method = DEFAULT_METHOD if encoder is not None and encoder.has_text else DEFAULT_FEATURES_METHOD
        params = {**DEFAULT_FEATURES_PARAMS, **(params or {})} if method == DEFAULT_FEATURES_METHOD else params
    detector = create_detector(method, **(params or {}))
    if detector.needs_text:
        if encoder is None:
            raise ParameterError(f"The {method!r} detector reads class names through a vision-language model's text "
                                 f"side: pass the model the features came from ({how}), or choose an image-feature "
                                 "detector (turn, knn, confident_learning, small_loss, gmm).")
        encoder.require_text(f"The {method!r} detector")
    why = detector.needs_images(ctx)
    if why is None:
        return method, detector
    fix = {k: v for k, v in detector.features_only.items() if k not in (params or {})}
    if fix:
        adjusted = create_detector(method, **{**(params or {}), **fix})
        if adjusted.needs_images(ctx) is None:
            shown = ", ".join(f"{k}={v!r}" for k, v in fix.items())
            warn(f"The {method!r} detector: {why}; there are features only, so it runs with {shown} (what runs on "
                 "features). Audit the images (labelsieve audit ROOT LABELS) for the rest.")
            return method, adjusted
    raise ParameterError(f"The {method!r} detector cannot run on features alone: {why}. There are no images here: "
                         "change those parameters, or audit the images (labelsieve audit ROOT LABELS).")


def run_detector(
    images: LabeledImages,
    encoder: Encoder,
    *,
    method: str = DEFAULT_METHOD,
    params: dict[str, Any] | None = None,
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    batch_size: int = 64,
    num_workers: int | None = None,
    progress: bool = True,
    outlier_prob: float = DEFAULT_OUTLIER_PROB,
    threshold: float | None = None,
    duplicate_threshold: float | None = DEFAULT_DUPLICATE_THRESHOLD,
    reviewed: Sequence[pd.DataFrame] = (),
    check_size: int = DEFAULT_CHECK_SIZE,
) -> Audit | None:
    """Extract (or read cached) features, run one detector, find near-duplicates, and build the audit table
    and summary (with the competence record and the check sample: :func:`finish_table`).

    This is :func:`audit` without reading the input or writing files, for callers that already hold
    the images and the model (benchmarks, notebooks). ``duplicate_threshold=None`` skips the
    near-duplicate search. ``reviewed`` holds earlier decisions (tables from
    :func:`labelsieve.audit.decisions.read_reviews`); see :mod:`labelsieve.audit.reviewed`.
    Under torchrun every rank extracts its share of the features and rank 0 alone runs the detector
    (:func:`labelsieve.core.distributed.run_on_main`; the other ranks wait); it returns the audit on rank 0
    and None on the others.
    """
    timings: dict[str, float] = {}
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    detector = create_detector(method, **(params or {}))
    if detector.needs_text:
        encoder.require_text(f"The {method!r} detector")
    # before any work: resolving the detector's path refuses what cannot run (a ViT-only method on a CNN tower)
    detector.needs_images(DetectionContext(labels=images.labels, classnames=images.classnames, images=images,
                                           encoder=encoder, features_fn=lambda: None, device=encoder.device, seed=seed,
                                           cache_dir=cache, progress=progress))
    t = time.perf_counter()
    feats = extract_features(images, encoder, cache_dir=cache, batch_size=batch_size, num_workers=num_workers,
                             progress=progress)
    timings["features"] = time.perf_counter() - t
    readable = feats.ok
    rev = resolve_reviewed(images, reviewed, digests=feats.digests) if reviewed else None
    fit = readable & ~rev.dropped if rev is not None else readable
    ridx = np.nonzero(fit)[0]
    sub = images.subset(ridx)
    if rev is not None:
        sub.labels = rev.labels[ridx]
    ctx = DetectionContext(labels=sub.labels, classnames=images.classnames, images=sub, encoder=encoder,
                           features_fn=lambda: feats.vectors if len(ridx) == len(readable)
                           else RowSubset(feats.vectors, ridx),
                           device=encoder.device, seed=seed, cache_dir=cache, progress=progress,
                           trusted=rev.trusted[ridx] if rev is not None else None)
    seed_everything(seed)
    t = time.perf_counter()
    # rank 0 alone, exactly as in one process; a detector that trains through the image tower under DDP on all
    runner = distributed.run_on_all if detector.trains_on_every_rank(ctx) else distributed.run_on_main
    result = runner(detector.detect, ctx)
    if not distributed.is_main():
        return None
    assert result is not None
    timings["detect"] = time.perf_counter() - t
    t = time.perf_counter()
    result = calibrate(result, labels=ctx.labels)  # fitted on the rows the detector saw
    timings["calibrate"] = time.perf_counter() - t
    _override_threshold(result, threshold)
    t = time.perf_counter()
    competence = measure_competence(ctx, result)
    timings["competence"] = time.perf_counter() - t
    estimate = None
    if rev is not None:
        estimate, recal = reviewed_estimate(rev, result.p_clean, np.nonzero(fit)[0])
        if recal is not None:  # on the held-out check rows, whose scores the reviews did not touch
            result = recalibrated(result, recal)
        result = widen_result(result, fit[readable])  # rows a reviewer dropped come back, reported as dropped
    groups = None
    if duplicate_threshold is not None:
        check_param("audit", "duplicate_threshold", duplicate_threshold, 0.0 < duplicate_threshold <= 1.0,
                    "a float in (0, 1], or None to skip the near-duplicate search")
        t = time.perf_counter()
        if (fit == readable).all():
            dup_images, dup_features = sub, ctx  # read a block at a time, no float32 copy
        else:  # every readable row, the ones a reviewer dropped included
            ok = np.nonzero(readable)[0]
            dup_images, dup_features = images.subset(ok), np.asarray(feats.vectors[ok], dtype=np.float32)
        groups = near_duplicate_groups(dup_images, dup_features, threshold=duplicate_threshold, seed=seed,
                                       progress=progress, work_dir=cache)
        timings["near_duplicates"] = time.perf_counter() - t
    t = time.perf_counter()
    table = build_table(images, readable, result, digests=feats.digests, outlier_prob=outlier_prob,
                        duplicate_groups=groups)
    # each row's image content, so a decision made on it is checked to be about the same picture where applied
    digest_of = dict(zip(images.paths, (format_digest(d) for d in feats.digests), strict=True))
    table[DIGEST_COLUMN] = [digest_of[p] for p in table["path"]]
    if rev is not None:
        table = mark_reviewed(table, images, rev)
    table, summary = finish_table(table, images, result, competence=competence, check_size=check_size, seed=seed,
                                  estimate=estimate)
    summary["near_duplicates"]["threshold"] = duplicate_threshold
    if rev is not None:
        summary["reviewed"] = rev.describe()
        warning = reviewed_warning(rev)
        if warning:
            summary["warnings"].append(warning)
    timings["table"] = time.perf_counter() - t
    summary.update({
        "method": method,
        "parameters": detector.get_params(),
        "detector_info": result.info,
        "model": encoder.describe(),
        "seed": seed,
        "outlier_prob": outlier_prob,
        "n_extracted": feats.n_extracted,
        "images_hash": hashlib.blake2b(b"".join(feats.digests), digest_size=16).hexdigest(),
        "unreadable": {images.paths[i]: e for i, e in sorted(feats.errors.items())},
        "cache_warnings": list(feats.warnings),
        "timings": timings,
        "images_per_second": {k: (len(images) / v if v > 0 else None) for k, v in timings.items()},
        "peak_memory_mb": peak_memory_mb(encoder.device),
        "device": str(encoder.device),
        "processes": distributed.world_size(),
    })
    return Audit(table=table, summary=summary)


def finish_table(table: pd.DataFrame, images: LabeledImages, result: DetectionResult, *,
                 competence: dict[str, Any] | None, check_size: int, seed: int,
                 estimate: dict[str, Any] | None = None) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The audit table with its check sample (column ``check``, after ``review``) and its summary, with the
    competence record, the check sample's design (``check_sample``) and, when reviewed rows gave one, the
    design-based estimate as the noise estimate (``noise_rate_basis`` "reviewed sample";
    :func:`labelsieve.audit.table.use_estimate`)."""
    check_param("audit", "check_size", check_size, isinstance(check_size, int) and check_size >= 0,
                "an int >= 0 (0: no check sample)")
    check, design = draw_check_sample(table, size=check_size, seed=seed)
    table[CHECK_COLUMN] = check
    summary = summarise(table, images, result)
    summary["competence"] = competence
    summary["check_sample"] = design.to_dict() if design is not None else None
    if estimate is not None:
        use_estimate(summary, estimate)
    return table, summary


def audit(
    root: str | os.PathLike[str],
    labels_csv: str | os.PathLike[str] | None = None,
    *,
    method: str = DEFAULT_METHOD,
    model: str = DEFAULT_MODEL,
    pretrained: str | None = None,
    out_dir: str | os.PathLike[str] | None = "audit",
    params: dict[str, Any] | None = None,
    classnames: str | os.PathLike[str] | dict[str, str] | None = None,
    path_column: str = "path",
    label_column: str = "label",
    threshold: float | None = None,
    outlier_prob: float = DEFAULT_OUTLIER_PROB,
    seed: int = 0,
    device: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    batch_size: int = 64,
    num_workers: int | None = None,
    html: bool = True,
    xlsx: bool = False,
    duplicate_threshold: float | None = DEFAULT_DUPLICATE_THRESHOLD,
    normalize_labels: bool = False,
    progress: bool = True,
    quiet: bool = False,
    force: bool = False,
    reviewed: Sequence[str | os.PathLike[str]] = (),
    check_size: int = DEFAULT_CHECK_SIZE,
    image_column: str = "image",
) -> Audit | None:
    """Audit a labelled image collection and write ``audit.csv``, ``audit.json`` (and ``audit.html``).

    Under ``torchrun --nproc-per-node=N -m labelsieve audit …`` (or a script torchrun starts) the N
    processes share the feature extraction and rank 0 writes the audit; on the other ranks this returns
    None (see :func:`run_detector`).

    Parameters
    ----------
    root : path
        Image folder (an ImageFolder tree when ``labels_csv`` is None), or images stored in containers: WebDataset
        shards (a ``.tar``, a folder of them, a pattern such as ``shards/{000000..000099}.tar``), Parquet files
        (a file, a folder, ``data/train-*.parquet``) or a Hugging Face ``save_to_disk`` folder
        (:func:`labelsieve.data.load_images`). Their samples are named ``shard-000003.tar/KEY.jpg`` and
        ``train-00001.parquet#1234`` in the audit.
    labels_csv : path, optional
        ``path,label`` CSV (column names: ``path_column``, ``label_column``); with containers, optional (their
        labels are read from them otherwise) and keyed by sample name, or by WebDataset KEY.
    method : str, default="ensemble"
        A registered detector (``labelsieve.list_detectors()``), ``NAME(KEY=VALUE, ...)``, or several separated
        by commas for an ensemble whose members carry their own parameters (``"turn(finetune=false),knn"``;
        :mod:`labelsieve.core.methodspec`); ``params`` then holds the ensemble's own (``combine``, ``weights``).
    model, pretrained : str
        open_clip architecture and weight tag/file, a local open_clip folder, or a timm model name
        (:mod:`labelsieve.models.loader`; ``pretrained=None`` is the model's default weights).
    out_dir : path or None
        Where to write the files; None writes nothing.
    params : dict, optional
        Keyword parameters of the detector.
    classnames : path or dict, optional
        Raw label -> text the model reads.
    threshold : float, optional
        Override the detector's decision threshold on p_clean.
    outlier_prob : float, default=0.4
        Flagged rows whose best class has a lower probability are marked ``outlier``.
    seed : int
    device : str, optional
        ``cpu``, ``cuda``, ``cuda:1`` … (default: CUDA if available).
    cache_dir : path, optional
        Feature store and other caches (default ``$LABELSIEVE_CACHE`` or ``~/.cache/labelsieve``).
    html : bool, default=True
        Write audit.html.
    xlsx : bool, default=False
        Also write audit.xlsx (same rows and columns; header frozen, filters on, worst rows first).
    duplicate_threshold : float or None, default=0.94
        Thumbnail correlation at which two images count as near-duplicates
        (:mod:`labelsieve.detectors.common.duplicates`); None skips the search.
    force : bool, default False
        Replace an ``out_dir/audit.csv`` that holds review decisions (a timestamped copy is kept beside
        it). Without it such an audit is refused before any work starts.
    normalize_labels : bool, default False
        Merge labels that differ only by Unicode form, case or surrounding spaces into their most frequent
        spelling (without it they are separate classes, with a warning; :func:`labelsieve.data.load_images`).
    reviewed : sequence of paths
        Earlier decisions (a reviewed audit.csv, or reviews CSVs downloaded from audit.html): the rows
        they decide are trusted labels for the detector and keep their decision in the new audit
        (:mod:`labelsieve.audit.reviewed`).
    check_size : int, default=100
        Rows in the audit's check sample (:mod:`labelsieve.audit.checksample`; column ``check``), whose review
        gives the error rate with an interval that holds whatever the model (0: none).
    image_column : str, default "image"
        Parquet/Arrow: the column of image bytes (``label_column`` is its label column).

    Raises
    ------
    OutputError
        Before any work: ``out_dir`` or ``cache_dir`` cannot be written, or ``out_dir/audit.csv`` holds
        review decisions and ``force`` is False.
    """
    if out_dir is not None:
        check_audit_output(out_dir, force=force)
    check_output_dir(cache_dir or default_cache_dir(), what="the cache folder (--cache-dir)")
    dev = resolve_device(device)
    distributed.init(dev)
    t0 = time.perf_counter()
    frames = [read_reviews(f) for f in reviewed]
    check_reviewed_frames(frames)
    images = load_images(root, labels_csv, path_column=path_column, label_column=label_column,
                         classnames=classnames, normalize_labels=normalize_labels, image_column=image_column,
                         cache_dir=cache_dir, progress=progress)
    t_load = time.perf_counter() - t0
    t = time.perf_counter()
    encoder = create_encoder(model, pretrained=pretrained, device=dev)
    t_model = time.perf_counter() - t
    result = run_detector(images, encoder, method=method, params=params, seed=seed, cache_dir=cache_dir,
                          batch_size=batch_size, num_workers=num_workers, progress=progress,
                          outlier_prob=outlier_prob, threshold=threshold, duplicate_threshold=duplicate_threshold,
                          reviewed=frames, check_size=check_size)
    if result is None:  # a rank other than 0 under torchrun: rank 0 writes
        return None
    result.summary["timings"] = {"load": t_load, "model": t_model, **result.summary["timings"]}
    _finish_audit(result, images, out_dir=out_dir, html=html, xlsx=xlsx, quiet=quiet, t0=t0)
    return result


def _finish_audit(result: Audit, images: LabeledImages, *, out_dir: str | os.PathLike[str] | None, html: bool,
                  xlsx: bool, quiet: bool, t0: float) -> None:
    """The run record (versions, input hashes) and the files of an audit, then the printed summary."""
    input_hash = images.content_hash()
    created = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    result.summary.update({
        "version": __version__,
        "versions": versions(),
        "audit_id": new_audit_id(input_hash, created),
        "input": {"root": str(images.root), "labels": images.source, "input_hash": input_hash,
                  "paths_hash": paths_hash(images.paths), "images_hash": result.summary.pop("images_hash", None),
                  **({"label_merges": images.label_merges} if images.label_merges else {}),
                  **_storage_record(images)},
        "created": created,
    })
    if out_dir is not None:
        # all files of the audit replace the previous ones as one unit (labelsieve.audit.auditset)
        out = Path(out_dir)
        result.files = write_audit_set(result, out, image_root=images.root, html=html, xlsx=xlsx, t0=t0,
                                       locate=_by_path(images))
        result.out_dir = out
    if not quiet:
        print_summary(result.summary, result.files)


def _storage_record(images: LabeledImages) -> dict[str, Any]:
    """How the audit's images are stored, for audit.json's ``input`` (``apply``, ``train --clean``, ``export``
    open containers again from it)."""
    if images.members is None:
        return {"kind": "files"}
    return {"kind": images.members.kind, "containers": images.members.spec, "n_containers": len(images.members.files),
            "image_column": images.members.image_column, "label_column": images.members.label_column}


def _by_path(images: LabeledImages) -> Any:
    """path -> where its image is (None for files: they are ``root / path``)."""
    if images.members is None:
        return None
    row: dict[str, int] = {}

    def locate(path: str) -> Any:
        if not row:
            row.update((p, i) for i, p in enumerate(images.paths))
        return images.locate(row[path]) if path in row else None

    return locate


def audit_features(
    features: str | os.PathLike[str],
    labels_csv: str | os.PathLike[str],
    *,
    method: str | None = None,
    params: dict[str, Any] | None = None,
    model: str | None = None,
    pretrained: str | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    classnames: str | os.PathLike[str] | dict[str, str] | None = None,
    path_column: str = "path",
    label_column: str = "label",
    threshold: float | None = None,
    outlier_prob: float = DEFAULT_OUTLIER_PROB,
    seed: int = 0,
    device: str | None = None,
    html: bool = True,
    xlsx: bool = False,
    progress: bool = True,
    quiet: bool = False,
    force: bool = False,
    check_size: int = DEFAULT_CHECK_SIZE,
    normalize_labels: bool = False,
) -> Audit:
    """Audit labels from features you already have (``labelsieve audit --features FEATS.npy LABELS.csv``).

    The same audit files as :func:`audit`, without reading any image: row ``i`` of ``features`` (an
    ``(n, d)`` ``.npy`` array of any float dtype, memory-mapped, read a block at a time) is the image on
    line ``i`` of ``labels_csv`` (``path,label``; the paths, relative to the CSV's folder, name the rows
    and are shown in the audit, and need not exist; audit.html shows thumbnails of those that do). No
    near-duplicate search (it needs the images). The detector defaults as in :func:`detect`: the audit's
    default with a vision-language ``model`` (the one the features came from), else TURN's probe.
    """
    if out_dir is not None:
        check_audit_output(out_dir, force=force)
    t0 = time.perf_counter()
    csv = Path(labels_csv).expanduser()
    if not csv.is_file():
        raise DataError(f"Labels file not found: {csv}. Give the path,label CSV whose rows match the features.")
    x = _load_features_file(features)
    images = load_images(csv.parent, csv, path_column=path_column, label_column=label_column,
                         classnames=classnames, must_exist=False, normalize_labels=normalize_labels)
    if x.shape[0] != len(images):
        raise DataError(f"{features}: {x.shape[0]} rows of features for the {len(images)} rows of {csv}. Row i of "
                        "the features must be the image on row i of the labels CSV.")
    timings = {"load": time.perf_counter() - t0}
    encoder = create_encoder(model, pretrained=pretrained, device=resolve_device(device)) if model else None
    dev = encoder.device if encoder is not None else resolve_device(device)
    ctx = DetectionContext(labels=images.labels, classnames=images.classnames, images=None, encoder=encoder,
                           features_fn=lambda: x, device=dev, seed=seed, progress=progress)
    method, detector = _features_detector(method, params, encoder, ctx, how="--model")
    seed_everything(seed)
    t = time.perf_counter()
    result = detector.detect(ctx)
    timings["detect"] = time.perf_counter() - t
    result = calibrate(result, labels=ctx.labels)
    _override_threshold(result, threshold)
    competence = measure_competence(ctx, result)
    readable = np.ones(len(images), dtype=bool)
    table = build_table(images, readable, result, outlier_prob=outlier_prob)
    table, summary = finish_table(table, images, result, competence=competence, check_size=check_size, seed=seed)
    summary.update({
        "method": method,
        "parameters": detector.get_params(),
        "detector_info": result.info,
        "model": encoder.describe() if encoder is not None else None,
        "features": {"file": str(Path(features).resolve()), "shape": list(x.shape), "dtype": str(x.dtype)},
        "seed": seed,
        "outlier_prob": outlier_prob,
        "unreadable": {},
        "timings": timings,
        "device": str(dev),
    })
    out = Audit(table=table, summary=summary)
    _finish_audit(out, images, out_dir=out_dir, html=html, xlsx=xlsx, quiet=quiet, t0=t0)
    return out


#: Rows of ``--pred-probs`` must sum to 1 within this (float16 probabilities are off by up to ~1e-3).
PRED_PROBS_SUM_TOLERANCE = 1e-3


def load_pred_probs(source: Any, *, n: int, classes: Sequence[str] | None, where: str, rows: str) -> np.ndarray:
    """Out-of-sample predicted probabilities, checked: an (n, C) array (or ``.npy`` file) of finite, non-negative
    floats whose rows sum to 1 (within :data:`PRED_PROBS_SUM_TOLERANCE`), C = ``len(classes)`` when given.

    Parameters
    ----------
    source : array-like or path
    n : int
        Rows expected (one per row of the labels).
    classes : sequence of str, optional
        The class order the columns must follow (sorted class names), for the check and the message.
    where : str
        The probabilities' name in messages (the file).
    rows : str
        What row i must match, for messages (e.g. "the data rows of labels.csv").

    Returns
    -------
    ndarray of shape (n, C), float32

    Raises
    ------
    DataError
        Naming the file and the first offending rows: wrong shape, a class count that does not match, values
        that are not probabilities, rows not summing to 1.
    """
    if isinstance(source, (str, os.PathLike)):
        f = Path(source).expanduser()
        if not f.is_file():
            raise DataError(f"Predicted-probabilities file not found: {f}. Give a .npy array of shape (n, C).")
        try:
            arr = np.load(f, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"{f}: not a .npy array ({exc}). Save the probabilities with numpy.save.") from None
        where = str(f)
    else:
        arr = np.asarray(source)
    if arr.ndim != 2 or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise DataError(f"{where}: predicted probabilities must be a float array of shape (n, C), one row per row of "
                        f"{rows} and one column per class; this one is {arr.dtype} of shape {arr.shape}.")
    if arr.shape[0] != n:
        raise DataError(f"{where}: {arr.shape[0]} rows of probabilities for the {n} rows of {rows}. Row i must be the "
                        f"probabilities of row i of {rows}.")
    order = ""
    if classes is not None:
        order = (f" Columns are the classes in sorted order: {', '.join(list(classes)[:10])}"
                 f"{' …' if len(classes) > 10 else ''}.")
        if arr.shape[1] != len(classes):
            raise DataError(f"{where}: {arr.shape[1]} columns of probabilities for the {len(classes)} classes of "
                            f"{rows}.{order}")
    probs = np.asarray(arr, dtype=np.float32)
    bad = np.flatnonzero(~np.isfinite(probs).all(axis=1) | (probs < -1e-6).any(axis=1))
    if len(bad):
        raise DataError(f"{where}: {len(bad)} row(s) hold values that are not probabilities (negative, NaN or "
                        f"infinite): row {listed([int(i) for i in bad])} (0-based). Give probabilities, e.g. the "
                        "softmax of your model's logits.")
    sums = probs.sum(axis=1, dtype=np.float64)
    off = np.flatnonzero(np.abs(sums - 1.0) > PRED_PROBS_SUM_TOLERANCE)
    if len(off):
        shown = listed([f"row {int(i)} sums to {sums[i]:.6g}" for i in off])
        raise DataError(f"{where}: {len(off)} row(s) do not sum to 1 ({shown}; rows are 0-based). Give probabilities "
                        f"(the softmax of your model's logits, not the logits), one column per class.{order}")
    return np.clip(probs, 0.0, 1.0)


def audit_pred_probs(
    pred_probs: str | os.PathLike[str],
    labels_csv: str | os.PathLike[str],
    root: str | os.PathLike[str] | None = None,
    *,
    out_dir: str | os.PathLike[str] | None = None,
    classnames: str | os.PathLike[str] | dict[str, str] | None = None,
    path_column: str = "path",
    label_column: str = "label",
    image_column: str = "image",
    threshold: float | None = None,
    outlier_prob: float = DEFAULT_OUTLIER_PROB,
    cache_dir: str | os.PathLike[str] | None = None,
    html: bool = True,
    xlsx: bool = False,
    progress: bool = True,
    quiet: bool = False,
    force: bool = False,
    check_size: int = DEFAULT_CHECK_SIZE,
    normalize_labels: bool = False,
    seed: int = 0,
) -> Audit:
    """Audit labels from your own model's out-of-sample predicted probabilities
    (``labelsieve audit --pred-probs PROBS.npy LABELS.csv [ROOT]``).

    Row i of ``pred_probs`` (an (n, C) ``.npy`` array, :func:`load_pred_probs`) holds the probabilities of the
    image on data row i of ``labels_csv``; column j is class j of the labels' class names in sorted order.
    Confident learning (prune by noise rate, :mod:`labelsieve.detectors.confident_learning`) decides the flags, and
    ``p_clean`` (the probability of the given label) is calibrated as in every audit. The same audit files as
    :func:`audit`; with ``root`` (the image folder, or containers, the CSV's paths are relative to) the images must
    exist and audit.html shows their thumbnails; without it the paths only name the rows (relative to the CSV's
    folder; thumbnails of those that exist there). No model is loaded and no near-duplicate search runs (it needs
    features).
    """
    if out_dir is not None:
        check_audit_output(out_dir, force=force)
    t0 = time.perf_counter()
    csv = Path(labels_csv).expanduser()
    if not csv.is_file():
        raise DataError(f"Labels file not found: {csv}. Give the path,label CSV whose rows match the probabilities.")
    images = load_images(root if root is not None else csv.parent, csv, path_column=path_column,
                         label_column=label_column, classnames=classnames, must_exist=root is not None,
                         normalize_labels=normalize_labels, image_column=image_column, cache_dir=cache_dir,
                         progress=progress)
    probs = load_pred_probs(pred_probs, n=len(images), classes=images.classes, where=str(pred_probs),
                            rows=f"the labels CSV {csv}")
    timings = {"load": time.perf_counter() - t0}
    t = time.perf_counter()
    result = calibrate(from_probs(images.labels, probs, where="the given out-of-sample (--pred-probs)"),
                       labels=images.labels)
    timings["detect"] = time.perf_counter() - t
    _override_threshold(result, threshold)
    ctx = DetectionContext(labels=images.labels, classnames=images.classnames, images=None, encoder=None,
                           features_fn=lambda: None, device=resolve_device("cpu"), seed=seed, progress=progress)
    competence = measure_competence(ctx, result, oof_probs=probs)
    table = build_table(images, np.ones(len(images), dtype=bool), result, outlier_prob=outlier_prob)
    table, summary = finish_table(table, images, result, competence=competence, check_size=check_size, seed=seed)
    summary.update({
        "method": "confident_learning",
        "parameters": {"pred_probs": str(Path(pred_probs).resolve())},
        "detector_info": result.info,
        "model": None,
        "pred_probs": {"file": str(Path(pred_probs).resolve()), "shape": list(probs.shape),
                       "class_order": "sorted class names", "classes": list(images.classes)},
        "seed": seed,
        "outlier_prob": outlier_prob,
        "unreadable": {},
        "timings": timings,
        "device": None,
    })
    out = Audit(table=table, summary=summary)
    _finish_audit(out, images, out_dir=out_dir, html=html, xlsx=xlsx, quiet=quiet, t0=t0)
    return out


def _load_features_file(features: str | os.PathLike[str]) -> np.ndarray:
    """``features`` memory-mapped, checked to be an (n, d) float array (DataError naming the file otherwise)."""
    f = Path(features).expanduser()
    if not f.is_file():
        raise DataError(f"Features file not found: {f}. Give a .npy file of shape (n, d), one row per image.")
    try:
        x = np.load(f, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"{f}: not a .npy array ({exc}). Save the features with numpy.save.") from exc
    if x.ndim != 2 or x.shape[0] == 0 or not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"{f}: features must be a non-empty float array of shape (n, d); this one is "
                        f"{x.dtype} of shape {x.shape}.")
    return x


def _override_threshold(result: DetectionResult, threshold: float | None) -> None:
    """The user's threshold on the calibrated p_clean replaces the detector's decision."""
    if threshold is None:
        return
    check_param("audit", "threshold", threshold, 0.0 < threshold < 1.0, "a float in (0, 1)")
    result.threshold = threshold
    result.flags = None
    result.info = {**(result.info or {}), "decision": "threshold"}
    result.rule += f" Threshold overridden by the user: flagged if the calibrated p_clean < {threshold}."


def apply_review(
    audit_csv: str | os.PathLike[str],
    *,
    out_csv: str | os.PathLike[str],
    reviews: Sequence[str | os.PathLike[str]] = (),
    from_labelstudio: str | os.PathLike[str] | None = None,
    from_fiftyone: str | None = None,
    classes: list[str] | None = None,
    drop_unreviewed_flagged: bool = False,
    accept_suggestions: bool = False,
    write_shards: str | os.PathLike[str] | None = None,
    write_parquet: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Write corrected labels from a reviewed audit (``labelsieve apply``).

    The decisions are the audit's ``review`` column plus those of ``reviews`` (reviews CSVs downloaded
    from audit.html, or other reviewed audit.csv files), a Label Studio JSON export and a FiftyOne
    dataset; each source is merged onto the audit and checked against it
    (:func:`labelsieve.audit.decisions.merge_reviews`), then the one review rule applies
    (:func:`labelsieve.audit.review.apply_review`). Returns its counts, plus ``decisions_merged`` when
    decisions came from elsewhere.

    For an audit of images in containers, ``out_csv`` names the samples as the audit does
    (``shard-000003.tar/KEY.jpg``, ``train-00001.parquet#1234``), and ``write_shards`` (WebDataset input) or
    ``write_parquet`` (Parquet or Arrow input) also writes a cleaned copy of the containers into that folder, in the
    input's format and streaming, with dropped samples left out and relabels applied
    (:func:`labelsieve.data.containers.write_cleaned_copy`); its counts are returned as ``copy_files`` and
    ``copy_samples``.
    """
    if write_shards is not None and write_parquet is not None:
        raise ParameterError("Give write_shards (--write-shards) or write_parquet (--write-parquet), not both.")
    copy_to, fmt = (write_shards, "webdataset") if write_shards is not None else (write_parquet, "parquet")
    record: dict[str, Any] = {}
    if copy_to is not None:
        check_output_dir(copy_to, what="the cleaned copy's folder")
        record = audit_record(Path(audit_csv)).get("input") or {}
        if record.get("kind", "files") == "files" or not record.get("containers"):
            flag = "--write-shards" if fmt == "webdataset" else "--write-parquet"
            raise DataError(f"{audit_csv}: {flag} copies the WebDataset shards or Parquet files an audit read, and "
                            "this audit (its audit.json) read image files. Use the labels file -o writes.")
    frames = [read_reviews(f) for f in reviews]
    if from_labelstudio is not None:
        frames.append(read_export(from_labelstudio))
    if from_fiftyone is not None:
        frames.append(read_fiftyone(from_fiftyone))
    counts: dict[str, Any] = _apply_review(Path(audit_csv), out_csv=Path(out_csv), classes=classes, reviews=frames,
                                           drop_unreviewed_flagged=drop_unreviewed_flagged,
                                           accept_suggestions=accept_suggestions)
    if frames:
        counts["decisions_merged"] = sum(len(f) for f in frames) - counts.get("stale_decisions", 0)
    if copy_to is not None:
        paths, labels, _ = read_labels_csv(out_csv)
        done = write_cleaned_copy(record["containers"], paths, labels, copy_to, fmt=fmt,
                                  image_column=record.get("image_column") or "image",
                                  label_column=record.get("label_column"), cache_dir=cache_dir, where=str(audit_csv))
        counts.update(copy_files=done["files"], copy_samples=done["samples"])
    return counts


def export_audit(
    audit_csv: str | os.PathLike[str],
    *,
    to: str,
    out_dir: str | os.PathLike[str] | None = None,
    name: str | None = None,
    images_root: str | os.PathLike[str] | None = None,
    all_rows: bool = False,
    overwrite: bool = False,
    document_root: str | os.PathLike[str] | None = None,
    url_prefix: str | None = None,
) -> dict[str, Any]:
    """Hand an audit to a review tool (``labelsieve export``): ``to="labelstudio"`` writes
    ``labeling_config.xml`` and ``tasks.json`` into the folder ``out_dir`` (or the tasks into ``out_dir`` when it
    names a ``.json`` file, the config beside it; :mod:`labelsieve.audit.handoff.labelstudio`);
    ``to="fiftyone"`` creates the persistent dataset ``name`` (default ``labelsieve-<audit folder>``;
    :mod:`labelsieve.audit.handoff.fiftyone`). Flagged rows only unless ``all_rows``. The image root is
    ``images_root`` or the one recorded in the audit.json beside the audit. For an audit of images in containers
    (WebDataset shards, Parquet files), the exported rows' images are copied out as files, into ``out_dir/images``
    (Label Studio) or ``fiftyone/images`` beside the audit (:func:`labelsieve.data.containers.materialise`), and
    the tasks or samples keep the audit's sample names."""
    check_param("export_audit", "to", to, to in EXPORT_TARGETS, f"one of {', '.join(EXPORT_TARGETS)}")
    path = Path(audit_csv)
    out = Path(out_dir) if out_dir is not None else path.parent / "labelstudio"
    if to == "labelstudio":
        export_paths(out)  # checked before any work: a folder, or a .json file for the tasks
    table, record = open_audit(path, required=REVIEW_REQUIRED, optional=(*COLUMNS, "agreement"))
    stored = record.get("input") or {}
    files = None
    if stored.get("kind", "files") != "files":  # images in containers: the exported rows' images copied out as files
        rows = export_rows(table, all_rows=all_rows, where=str(path))
        names = rows["path"].astype(str).tolist()
        samples = open_samples(str(images_root) if images_root is not None else str(stored.get("containers", "")),
                               names, image_column=stored.get("image_column") or "image", where=str(path))
        folder = out if to == "labelstudio" and out.suffix.lower() != ".json" else (
            out.parent if to == "labelstudio" else path.parent / "fiftyone")
        root = folder / "images"
        files = materialise(samples, root)
    else:
        root = audit_image_root(path, images_root, record)
    if to == "fiftyone":
        ds_name = name or f"labelsieve-{path.resolve().parent.name}"
        return write_fiftyone(table, image_root=root, name=ds_name, all_rows=all_rows, overwrite=overwrite,
                              where=str(path), files=files)
    classes = [str(c) for c in record.get("classes") or []]
    if not classes:
        both = set(table["given_label"]) | set(table.get("suggested_label", pd.Series(dtype=object)))
        classes = sorted(c for c in both if c)
    return write_labelstudio(table, out, image_root=root, classes=classes, all_rows=all_rows,
                             document_root=document_root, url_prefix=url_prefix, where=str(path), files=files)


def add_noise(labels_csv: str | os.PathLike[str], out_csv: str | os.PathLike[str], *, kind: str = "symmetric",
              rate: float, seed: int = 0, root: str | os.PathLike[str] | None = None,
              mapping: str | None = None) -> tuple[int, int]:
    """Write a copy of ``labels_csv`` with synthetic label noise (``labelsieve noise``); the original label is
    kept in ``true_label``. Returns (labels changed, rows)."""
    src = Path(labels_csv)
    check_output_file(out_csv, what="the noisy labels file (-o)")
    images = load_images(root or src.parent, src)
    pairs = parse_mapping(mapping) if mapping else None
    new = make_noisy_labels(images, kind=kind, rate=rate, seed=seed, mapping=pairs)
    write_noisy_csv(images, new, out_csv)
    return int((new != images.labels).sum()), len(images)


def describe_detectors() -> dict[str, str]:
    """Registered detector names and their one-line summaries (``labelsieve detectors``)."""
    return {name: get_detector_class(name).summary for name in list_detectors()}


def describe_detector(name: str) -> str:
    """One detector's parameters as text (``labelsieve detectors --show NAME``): for the paper-based detectors
    their recipe (value, ``paper`` or ``labelsieve``, and the section, table or authors' file each comes from),
    for an ensemble (``"ensemble"`` or a method string with several members) its members in the ``--method``
    syntax and each member's settings that are not its paper's recipe, for the others their parameters and
    defaults. A method string with parameters (``"deft(logit_scale=calibrated)"``) shows the recipe with them."""
    members = parse_method(name)
    detector = create_detector(name)
    cls = type(detector)
    head = f"{cls.name}: {cls.summary}"
    if hasattr(detector, "describe"):
        return f"{head}\n\n{detector.describe()}"
    recipe = getattr(cls, "recipe", None)
    if recipe is not None:
        return f"{head}\n{recipe.format(detector.get_params() if members[0][1] else None)}"
    sig = inspect.signature(cls.__init__)
    params = [f"  {p.name} = {p.default!r}" for p in sig.parameters.values()
              if p.name != "self" and p.kind is inspect.Parameter.KEYWORD_ONLY]
    return "\n".join([head, "", "parameters (labelsieve's defaults):", *params])
