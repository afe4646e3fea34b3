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
from pathlib import Path
from typing import Any

import numpy as np

from labelsieve import __version__
from labelsieve.audit.evaluate import evaluate_audit, format_metrics
from labelsieve.audit.html import write_html
from labelsieve.audit.review import apply_review
from labelsieve.audit.table import Audit, build_table, summarise
from labelsieve.audit.writers import print_summary, write_csv, write_json
from labelsieve.core.defaults import DEFAULT_METHOD, DEFAULT_MODEL, DEFAULT_OUTLIER_PROB, default_cache_dir
from labelsieve.core.errors import check_param
from labelsieve.core.runtime import peak_memory_mb, resolve_device, seed_everything, versions
from labelsieve.data import LabeledImages, load_images
from labelsieve.data.noise import make_noisy_labels, parse_mapping, write_noisy_csv
from labelsieve.detectors import DetectionContext, create_detector, get_detector_class, list_detectors
from labelsieve.features import extract_features
from labelsieve.models.encoders import Encoder, create_encoder
from labelsieve.train import predict, train_from_audit

#: The API mirrors the CLI: ``audit``, ``apply_review`` (``apply``), ``train_from_audit`` (``train``),
#: ``predict``, ``add_noise`` (``noise``), ``evaluate_audit`` (``evaluate``), ``describe_detectors``
#: (``detectors``), ``describe_detector`` (``detectors --show``); ``run_detector`` is :func:`audit` on images
#: and a model already loaded.
__all__ = ["add_noise", "apply_review", "audit", "describe_detector", "describe_detectors", "evaluate_audit",
           "format_metrics", "predict", "run_detector", "train_from_audit"]


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
) -> Audit:
    """Extract (or read cached) features, run one detector, and build the audit table and summary.

    This is :func:`audit` without reading the input or writing files, for callers that already hold
    the images and the model (benchmarks, notebooks).
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
    result = detector.detect(ctx)
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
        "timings": timings,
        "images_per_second": {k: (len(images) / v if v > 0 else None) for k, v in timings.items()},
        "peak_memory_mb": peak_memory_mb(encoder.device),
        "device": str(encoder.device),
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
) -> Audit:
    """Audit a labelled image collection and write ``audit.csv``, ``audit.json`` (and ``audit.html``).

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
    """
    t0 = time.perf_counter()
    images = load_images(root, labels_csv, path_column=path_column, label_column=label_column,
                         classnames=classnames)
    t_load = time.perf_counter() - t0
    t = time.perf_counter()
    encoder = create_encoder(model, pretrained=pretrained, device=resolve_device(device))
    t_model = time.perf_counter() - t
    result = run_detector(images, encoder, method=method, params=params, seed=seed, cache_dir=cache_dir,
                          batch_size=batch_size, num_workers=num_workers, progress=progress,
                          outlier_prob=outlier_prob, threshold=threshold)
    result.summary["timings"] = {"load": t_load, "model": t_model, **result.summary["timings"]}
    result.summary.update({
        "version": __version__,
        "versions": versions(),
        "input": {"root": str(images.root), "labels": images.source, "input_hash": images.content_hash(),
                  "images_hash": result.summary.pop("images_hash")},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })
    if out_dir is not None:
        out = Path(out_dir)
        t = time.perf_counter()
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
    for the others their parameters and defaults."""
    cls = get_detector_class(name)
    recipe = getattr(cls, "recipe", None)
    head = f"{name}: {cls.summary}"
    if recipe is not None:
        return f"{head}\n{recipe.format()}"
    sig = inspect.signature(cls.__init__)
    params = [f"  {p.name} = {p.default!r}" for p in sig.parameters.values()
              if p.name != "self" and p.kind is inspect.Parameter.KEYWORD_ONLY]
    return "\n".join([head, "", "parameters (labelsieve's defaults):", *params])
