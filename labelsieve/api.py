"""The Python API; the CLI is a thin layer over these functions.

>>> import labelsieve
>>> a = labelsieve.audit("images/", "labels.csv", method="knn", model="path/to/open_clip_dir", out_dir="out")
>>> a.flagged.head()
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from labelsieve import __version__
from labelsieve.audit.evaluate import evaluate_audit, format_metrics
from labelsieve.audit.html import write_html
from labelsieve.audit.review import apply_review, check_audit_output, keep_reviewed_copy
from labelsieve.audit.schema import paths_hash
from labelsieve.audit.table import Audit, build_table, summarise
from labelsieve.audit.writers import print_summary, write_csv, write_json
from labelsieve.core import distributed
from labelsieve.core.defaults import DEFAULT_METHOD, DEFAULT_MODEL, DEFAULT_OUTLIER_PROB, default_cache_dir
from labelsieve.core.errors import check_param
from labelsieve.core.paths import check_output_dir, check_output_file
from labelsieve.core.runtime import peak_memory_mb, resolve_device, seed_everything, versions
from labelsieve.data import LabeledImages, load_images
from labelsieve.data.noise import make_noisy_labels, parse_mapping, write_noisy_csv
from labelsieve.detectors import DetectionContext, create_detector, get_detector_class, list_detectors
from labelsieve.features import extract_features
from labelsieve.models.encoders import Encoder, create_encoder
from labelsieve.train import predict, train_from_audit

#: The API mirrors the CLI: ``audit``, ``apply_review`` (``apply``), ``train_from_audit`` (``train``),
#: ``predict``, ``add_noise`` (``noise``), ``evaluate_audit`` (``evaluate``), ``describe_detectors``
#: (``detectors``); ``run_detector`` is :func:`audit` on images and a model already loaded.
__all__ = ["add_noise", "apply_review", "audit", "describe_detectors", "evaluate_audit", "format_metrics", "predict",
           "run_detector", "train_from_audit"]


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
) -> Audit | None:
    """Extract (or read cached) features, run one detector, and build the audit table and summary.

    This is :func:`audit` without reading the input or writing files, for callers that already hold
    the images and the model (benchmarks, notebooks). Under torchrun every rank extracts its share of
    the features and rank 0 alone runs the detector (:func:`labelsieve.core.distributed.run_on_main`; the
    other ranks wait); it returns the audit on rank 0 and None on the others.
    """
    timings: dict[str, float] = {}
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    detector = create_detector(method, **(params or {}))
    if detector.needs_text:
        encoder.require_text(f"The {method!r} detector")
    t = time.perf_counter()
    feats = extract_features(images, encoder, cache_dir=cache, batch_size=batch_size, num_workers=num_workers,
                             progress=progress)
    timings["features"] = time.perf_counter() - t
    readable = feats.ok
    ridx = np.nonzero(readable)[0]
    sub = images.subset(ridx)
    ctx = DetectionContext(labels=sub.labels, classnames=images.classnames, images=sub, encoder=encoder,
                           features_fn=lambda: np.asarray(feats.vectors[ridx], dtype=np.float32),
                           device=encoder.device, seed=seed, cache_dir=cache, progress=progress)
    seed_everything(seed)
    t = time.perf_counter()
    result = distributed.run_on_main(detector.detect, ctx)
    if not distributed.is_main():
        return None
    assert result is not None
    timings["detect"] = time.perf_counter() - t
    if threshold is not None:
        check_param("audit", "threshold", threshold, 0.0 < threshold < 1.0, "a float in (0, 1)")
        result.threshold = threshold
        result.flags = None
        result.rule += f" Threshold overridden by the user: {threshold}."
    t = time.perf_counter()
    table = build_table(images, readable, result, digests=feats.digests, outlier_prob=outlier_prob)
    summary = summarise(table, images, result)
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
    progress: bool = True,
    quiet: bool = False,
    force: bool = False,
) -> Audit | None:
    """Audit a labelled image collection and write ``audit.csv``, ``audit.json`` (and ``audit.html``).

    Under ``torchrun --nproc-per-node=N -m labelsieve audit …`` (or a script torchrun starts) the N
    processes share the feature extraction and rank 0 writes the audit; on the other ranks this returns
    None (see :func:`run_detector`).

    Parameters
    ----------
    root : path
        Image folder (an ImageFolder tree when ``labels_csv`` is None).
    labels_csv : path, optional
        ``path,label`` CSV (column names: ``path_column``, ``label_column``).
    method : str, default="ensemble"
        A registered detector (``labelsieve.list_detectors()``) or a comma-separated list (ensemble).
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
    force : bool, default False
        Replace an ``out_dir/audit.csv`` that holds review decisions (a timestamped copy is kept beside
        it). Without it such an audit is refused before any work starts.

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
    images = load_images(root, labels_csv, path_column=path_column, label_column=label_column,
                         classnames=classnames)
    t_load = time.perf_counter() - t0
    t = time.perf_counter()
    encoder = create_encoder(model, pretrained=pretrained, device=dev)
    t_model = time.perf_counter() - t
    result = run_detector(images, encoder, method=method, params=params, seed=seed, cache_dir=cache_dir,
                          batch_size=batch_size, num_workers=num_workers, progress=progress,
                          outlier_prob=outlier_prob, threshold=threshold)
    if result is None:  # a rank other than 0 under torchrun: rank 0 writes
        return None
    result.summary["timings"] = {"load": t_load, "model": t_model, **result.summary["timings"]}
    result.summary.update({
        "version": __version__,
        "versions": versions(),
        "input": {"root": str(images.root), "labels": images.source, "input_hash": images.content_hash(),
                  "paths_hash": paths_hash(images.paths), "images_hash": result.summary.pop("images_hash")},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })
    if out_dir is not None:
        out = Path(out_dir)
        t = time.perf_counter()
        keep_reviewed_copy(out / "audit.csv")  # reviews typed while this audit ran, or replaced with force
        files = {"audit.csv": write_csv(result.table, out / "audit.csv")}
        if html:
            files["audit.html"] = write_html(result.table, result.summary, image_root=images.root,
                                             out_path=out / "audit.html")
        result.summary["timings"]["write"] = time.perf_counter() - t
        result.summary["timings"]["total"] = time.perf_counter() - t0
        files["audit.json"] = write_json(result.summary, out / "audit.json")
        result.out_dir, result.files = out, files
    if not quiet:
        print_summary(result.summary, result.files)
    return result



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
