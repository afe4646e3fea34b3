"""Synthetic label noise, for benchmarks and for users who want to measure a detector on their data.

Three kinds, each taking the true labels and returning new labels (the inputs are never modified):

- :func:`symmetric_noise`: exactly ``round(rate * n)`` samples, chosen uniformly, each flipped to a
  uniformly chosen *different* class.
- :func:`pair_noise`: exactly ``round(rate * n_eligible)`` of the samples whose class has a target
  are flipped to it: class ``i -> (i + 1) % C`` by default, or a user mapping.
- :func:`instance_noise`: instance-dependent ("part-dependent") noise of Xia et al. 2020, where the
  flip rate and the wrong class depend on the image.

:func:`make_noisy_labels` dispatches on the kind for a :class:`~labelsieve.data.LabeledImages`, and
:func:`write_noisy_csv` writes ``path,label,true_label`` for the audit and for
:func:`labelsieve.audit.evaluate.evaluate_audit`.
"""

from __future__ import annotations

import csv
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image

from labelsieve.core.errors import DataError, ParameterError, check_param
from labelsieve.core.io import neutralise_cell
from labelsieve.data.decode import UnreadableImage, load_image
from labelsieve.data.images import LabeledImages

__all__ = [
    "NOISE_KINDS",
    "image_pixel_features",
    "instance_noise",
    "make_noisy_labels",
    "pair_noise",
    "parse_mapping",
    "symmetric_noise",
    "write_noisy_csv",
]

NOISE_KINDS = ("symmetric", "pair", "instance")


# --------------------------------------------------------------------------- validation helpers


def _check_common(owner: str, labels: object, n_classes: int, rate: float,
                  rng: object) -> tuple[np.ndarray, np.random.Generator]:
    is_int = isinstance(n_classes, (int, np.integer)) and not isinstance(n_classes, bool)
    check_param(owner, "n_classes", n_classes, is_int and n_classes >= 2, "an int >= 2")
    lab = np.asarray(labels)
    check_param(owner, "labels", f"array of shape {lab.shape} and dtype {lab.dtype}",
                lab.ndim == 1 and (lab.size == 0 or np.issubdtype(lab.dtype, np.integer)),
                "a 1-D int array of class indices")
    lab = lab.astype(np.int64)
    if lab.size:
        check_param(owner, "labels", f"values in [{lab.min()}, {lab.max()}]",
                    lab.min() >= 0 and lab.max() < n_classes, f"class indices in [0, {n_classes - 1}]")
    check_param(owner, "rate", rate,
                isinstance(rate, (int, float, np.floating)) and not isinstance(rate, bool) and 0.0 <= rate <= 1.0,
                "a float in [0, 1]")
    check_param(owner, "rng", type(rng).__name__, isinstance(rng, np.random.Generator),
                "a numpy Generator (np.random.default_rng(seed))")
    assert isinstance(rng, np.random.Generator)
    return lab, rng


# --------------------------------------------------------------------------- noise kinds


def symmetric_noise(labels: np.ndarray, n_classes: int, *, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Flip exactly ``round(rate * n)`` labels, each to a uniformly chosen different class.

    Parameters
    ----------
    labels : int array-like of shape (n,)
        True class indices in ``[0, n_classes)``.
    n_classes : int >= 2
    rate : float in [0, 1]
        Fraction of samples flipped (every flipped label is wrong, so this is the realised noise rate).
    rng : numpy Generator

    Returns
    -------
    ndarray of shape (n,), int64
        The new labels.
    """
    lab, gen = _check_common("symmetric_noise", labels, n_classes, rate, rng)
    out = lab.copy()
    k = int(round(rate * lab.size))
    idx = gen.choice(lab.size, size=k, replace=False)
    out[idx] = (lab[idx] + gen.integers(1, n_classes, size=k)) % n_classes
    return out


def pair_noise(
    labels: np.ndarray,
    n_classes: int,
    *,
    rate: float,
    rng: np.random.Generator,
    mapping: Mapping[int, int] | None = None,
) -> np.ndarray:
    """Pair (asymmetric) noise: flip samples of class ``i`` to its target class.

    The targets are ``i -> (i + 1) % n_classes`` by default, or ``mapping`` (class index -> class
    index; classes it does not name keep their labels). Exactly ``round(rate * n_eligible)`` samples
    are flipped, chosen uniformly among the ``n_eligible`` samples whose class has a target.

    Parameters
    ----------
    labels : int array-like of shape (n,)
    n_classes : int >= 2
    rate : float in [0, 1]
        Fraction of the eligible samples flipped.
    rng : numpy Generator
    mapping : dict of int to int, optional
        Source class -> target class, both in ``[0, n_classes)`` and different.

    Returns
    -------
    ndarray of shape (n,), int64
    """
    owner = "pair_noise"
    lab, gen = _check_common(owner, labels, n_classes, rate, rng)
    if mapping is None:
        target = (np.arange(n_classes) + 1) % n_classes
    else:
        check_param(owner, "mapping", type(mapping).__name__, isinstance(mapping, Mapping) and len(mapping) > 0,
                    "a non-empty dict of class index to class index")
        target = np.full(n_classes, -1, dtype=np.int64)
        for a, b in mapping.items():
            ok = all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and 0 <= v < n_classes
                     for v in (a, b)) and a != b
            check_param(owner, "mapping", {a: b}, ok,
                        f"pairs of different class indices in [0, {n_classes - 1}]")
            target[int(a)] = int(b)
    eligible = np.flatnonzero(target[lab] >= 0)
    k = int(round(rate * eligible.size))
    idx = gen.choice(eligible, size=k, replace=False)
    out = lab.copy()
    out[idx] = target[lab[idx]]
    return out


def instance_noise(
    labels: np.ndarray,
    features: np.ndarray,
    n_classes: int,
    *,
    rate: float,
    rng: np.random.Generator,
    norm_std: float = 0.1,
) -> np.ndarray:
    """Instance-dependent noise of Xia et al. 2020 ("Part-dependent label noise", NeurIPS), as in
    their public code (``get_instance_noisy_label``).

    For each sample ``i`` with L2-normalised features ``x_i`` and true label ``y_i``: a flip rate
    ``q_i`` is drawn from ``N(rate, norm_std^2)`` truncated to [0, 1]; with a random projection ``W``
    of shape (C, d, C), entries ``N(0, 1)``, the scores ``s = x_i @ W[y_i]`` get ``s[y_i] = -inf``;
    the new label is drawn from ``p = q_i * softmax(s)`` with ``p[y_i] = 1 - q_i``. Which wrong class
    a sample gets depends on its features, and the expected noise rate is the mean of the truncated
    normal, ``rate + norm_std * (phi(a) - phi(b)) / (Phi(b) - Phi(a))`` with ``a = -rate / norm_std``,
    ``b = (1 - rate) / norm_std``: about ``rate`` for 0.3-0.7, but 0.129 for 0.1 and 0.2055 for 0.2,
    as in the reference code (kept for comparability with published results). ``rate = 0`` is the
    one exception: no label changes (the reference would still flip about 8 %).

    Differences from the reference code: the features are L2-normalised rows (the reference uses the
    raw normalised image tensor), and ``W[c]`` is drawn class by class from ``rng`` so that memory
    stays O(d * C) for many classes.

    Parameters
    ----------
    labels : int array-like of shape (n,)
    features : array-like of shape (n, d)
        Per-sample features, e.g. :func:`image_pixel_features` or image-encoder features; all-zero
        rows (unreadable images) give a uniform choice among the wrong classes.
    n_classes : int >= 2
    rate : float in [0, 1]
    rng : numpy Generator
    norm_std : float > 0, default 0.1
        Standard deviation of the per-sample flip rate.

    Returns
    -------
    ndarray of shape (n,), int64
    """
    owner = "instance_noise"
    lab, gen = _check_common(owner, labels, n_classes, rate, rng)
    x = np.asarray(features, dtype=np.float64)
    check_param(owner, "features", f"array of shape {x.shape}", x.ndim == 2 and x.shape[0] == lab.size,
                f"an array of shape ({lab.size}, d)")
    check_param(owner, "features", "an array with NaN or infinite values", bool(np.all(np.isfinite(x))),
                "finite")
    check_param(owner, "norm_std", norm_std, isinstance(norm_std, (int, float)) and norm_std > 0, "a float > 0")
    n = lab.size
    if n == 0:
        return lab.copy()
    from scipy import stats

    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    if rate == 0:
        return lab.copy()
    q = stats.truncnorm.rvs((0.0 - rate) / norm_std, (1.0 - rate) / norm_std, loc=rate, scale=norm_std,
                            size=n, random_state=gen)
    q = np.clip(np.asarray(q, dtype=np.float64), 0.0, 1.0)
    probs = np.empty((n, n_classes), dtype=np.float64)
    d = x.shape[1]
    for c in range(n_classes):
        w_c = gen.standard_normal((d, n_classes))  # W[c], drawn for every class in order
        m = lab == c
        if not m.any():
            continue
        s = x[m] @ w_c
        s[:, c] = -np.inf
        s -= s.max(axis=1, keepdims=True)
        e = np.exp(s)
        p = q[m, None] * e / e.sum(axis=1, keepdims=True)
        p[:, c] = 1.0 - q[m]
        probs[m] = p
    cdf = np.cumsum(probs, axis=1)
    u = gen.random(n)[:, None] * cdf[:, -1:]
    return np.minimum((u >= cdf).sum(axis=1), n_classes - 1).astype(np.int64)


# --------------------------------------------------------------------------- images


def image_pixel_features(images: LabeledImages, size: int = 16) -> np.ndarray:
    """Downsampled RGB pixels of every image, flattened: the features Xia et al. use (raw images).

    Parameters
    ----------
    images : LabeledImages
    size : int >= 1, default 16
        Each image is resized to ``size x size`` (box filter, aspect ratio not kept).

    Returns
    -------
    ndarray of shape (n, 3 * size * size), float32 in [0, 1]
        Unreadable images give all-zero rows.
    """
    check_param("image_pixel_features", "size", size, isinstance(size, int) and size >= 1, "an int >= 1")
    out = np.zeros((len(images), 3 * size * size), dtype=np.float32)
    for i in range(len(images)):
        try:
            img = load_image(images.locate(i))
        except UnreadableImage:
            continue
        small = img.resize((size, size), Image.Resampling.BOX)
        out[i] = np.asarray(small, dtype=np.float32).reshape(-1) / 255.0
    return out


def make_noisy_labels(
    images: LabeledImages,
    *,
    kind: str,
    rate: float,
    seed: int,
    mapping: Mapping[str, str] | None = None,
    features: np.ndarray | None = None,
) -> np.ndarray:
    """New labels for ``images`` with synthetic noise of one kind; the given labels are the truth.

    Parameters
    ----------
    images : LabeledImages
    kind : {"symmetric", "pair", "instance"}
    rate : float in [0, 1]
    seed : int >= 0
        Seeds ``np.random.default_rng``; the same seed gives the same labels.
    mapping : dict of str to str, optional
        For ``kind="pair"`` only: raw class label -> raw class label (as from :func:`parse_mapping`);
        default ``classes[i] -> classes[(i + 1) % C]`` in sorted class order.
    features : array-like of shape (n, d), optional
        For ``kind="instance"`` only: per-sample features; default :func:`image_pixel_features`
        (16 x 16 pixels, as Xia et al. use raw images).

    Returns
    -------
    ndarray of shape (n,), int64
        Indices into ``images.classes``.
    """
    owner = "make_noisy_labels"
    check_param(owner, "kind", kind, kind in NOISE_KINDS, f"one of {', '.join(NOISE_KINDS)}")
    check_param(owner, "seed", seed, isinstance(seed, (int, np.integer)) and seed >= 0, "an int >= 0")
    if mapping is not None and kind != "pair":
        raise ParameterError(f"A class mapping applies to pair noise only; got kind={kind!r} with a mapping.")
    if features is not None and kind != "instance":
        raise ParameterError(f"Features apply to instance noise only; got kind={kind!r} with features.")
    rng = np.random.default_rng(int(seed))
    c = images.n_classes
    if kind == "symmetric":
        return symmetric_noise(images.labels, c, rate=rate, rng=rng)
    if kind == "pair":
        index_map = None
        if mapping is not None:
            unknown = sorted({k for kv in mapping.items() for k in kv} - set(images.classes))
            if unknown:
                raise ParameterError(
                    f"The class mapping names label(s) {unknown[:5]} that are not among the classes "
                    f"{images.classes[:10]}{' …' if c > 10 else ''}. Use the raw labels of the CSV or folders."
                )
            pos = {name: i for i, name in enumerate(images.classes)}
            index_map = {pos[a]: pos[b] for a, b in mapping.items()}
        return pair_noise(images.labels, c, rate=rate, rng=rng, mapping=index_map)
    feats = image_pixel_features(images) if features is None else features
    return instance_noise(images.labels, feats, c, rate=rate, rng=rng)


# --------------------------------------------------------------------------- files


def write_noisy_csv(images: LabeledImages, new_labels: np.ndarray, out_path: str | os.PathLike[str]) -> Path:
    """Write ``path,label,true_label`` (raw label strings) atomically (temp file + ``os.replace``).

    ``label`` is the noisy label, ``true_label`` the label ``images`` was loaded with.

    Parameters
    ----------
    images : LabeledImages
    new_labels : int array-like of shape (n,)
        Indices into ``images.classes``, e.g. from :func:`make_noisy_labels`.
    out_path : path
        The CSV to write; its folder is created if needed.

    Returns
    -------
    Path
        ``out_path``.
    """
    lab = np.asarray(new_labels)
    check_param("write_noisy_csv", "new_labels", f"array of shape {lab.shape}",
                lab.shape == (len(images),) and (lab.size == 0 or np.issubdtype(lab.dtype, np.integer))
                and (lab.size == 0 or (lab.min() >= 0 and lab.max() < images.n_classes)),
                f"an int array of shape ({len(images)},) with class indices in [0, {images.n_classes - 1}]")
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent)
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["path", "label", "true_label"])
            for p, y, t in zip(images.paths, lab.tolist(), images.labels.tolist(), strict=True):
                w.writerow([neutralise_cell(v) for v in (p, images.classes[y], images.classes[t])])
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def parse_mapping(text_or_path: str | os.PathLike[str]) -> dict[str, str]:
    """Read a class mapping for pair noise.

    Parameters
    ----------
    text_or_path : str or path
        Either text ``"a:b,c:d"`` (source:target pairs, comma-separated) or the path of a CSV with
        rows ``from,to`` (a header row ``from,to`` is optional). A string naming an existing file, or
        ending in ``.csv``, is read as a file.

    Returns
    -------
    dict of str to str
        Raw source label -> raw target label.

    Raises
    ------
    DataError
        The mapping file is missing or malformed.
    ParameterError
        The text is malformed, a source is mapped twice, or a class maps to itself.
    """
    is_path = isinstance(text_or_path, os.PathLike) or (
        isinstance(text_or_path, str) and (Path(text_or_path).is_file() or text_or_path.lower().endswith(".csv"))
    )
    pairs: list[tuple[str, str, str]] = []  # (source, target, where)
    if is_path:
        p = Path(text_or_path)
        if not p.is_file():
            raise DataError(f"Class-mapping file not found: {p}. Give a CSV with rows 'from,to', "
                            "or the mapping itself as 'a:b,c:d'.")
        text = p.read_text(encoding="utf-8-sig")
        for line_no, row in enumerate(csv.reader(text.splitlines()), start=1):
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != 2 or not row[0].strip() or not row[1].strip():
                raise DataError(f"{p}, line {line_no}: expected 'from,to', got {row!r}.")
            a, b = row[0].strip(), row[1].strip()
            if line_no == 1 and (a.lower(), b.lower()) in (("from", "to"), ("source", "target")):
                continue
            pairs.append((a, b, f"{p}, line {line_no}"))
        if not pairs:
            raise DataError(f"{p}: no 'from,to' rows found.")
    else:
        text = str(text_or_path).strip()
        if not text:
            raise ParameterError("The class mapping is empty. Give it as 'a:b,c:d' or as a CSV file of 'from,to'.")
        for item in text.split(","):
            parts = item.split(":")
            if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
                raise ParameterError(
                    f"Cannot read {item.strip()!r} in the class mapping {text!r}: expected 'source:target' "
                    "pairs separated by commas. For labels containing ':' or ',' use a CSV file of 'from,to'."
                )
            pairs.append((parts[0].strip(), parts[1].strip(), repr(item.strip())))
    out: dict[str, str] = {}
    for a, b, where in pairs:
        if a == b:
            raise ParameterError(f"{where}: class {a!r} is mapped to itself; pair noise needs a different class.")
        if a in out and out[a] != b:
            raise ParameterError(f"{where}: class {a!r} is mapped twice ({out[a]!r} and {b!r}); give one target.")
        out[a] = b
    return out
