"""The one protocol every detector follows, and the one result type they all return.

A detector is built by name (:func:`labelsieve.detectors.create_detector`), stores its keyword
parameters in ``__init__`` (validated there, scikit-learn style), and does its work in
:meth:`Detector.detect`, which takes a :class:`DetectionContext` and returns a
:class:`DetectionResult`. Detectors see only the readable images; the audit maps results back to
the input rows.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from labelsieve.data import LabeledImages
from labelsieve.detectors.common.recipe import Recipe
from labelsieve.models.encoders import Encoder


@dataclass
class DetectionResult:
    """What a detector says about each sample.

    Attributes
    ----------
    p_clean : ndarray of shape (n,), float64 in [0, 1]
        Probability that the given label is right.
    probs : ndarray of shape (n, n_classes), float32, rows sum to 1
        Class probabilities; ``argmax`` is the suggested label, ``max`` its probability.
    threshold : float
        The decision: a sample is flagged noisy iff ``p_clean < threshold``.
    rule : str
        One sentence saying how ``p_clean`` is computed and why the threshold is what it is; it is
        written to audit.json.
    info : dict
        Anything else worth recording in audit.json (resolved parameters, per-epoch losses, which PEFT
        was used, …). Must be JSON-serialisable.
    columns : dict of str to ndarray of shape (n,)
        Extra per-sample columns for audit.csv (for example each member's p_clean in an ensemble).
    flags : ndarray of shape (n,), bool, optional
        For detectors whose published decision is not a threshold on a score (confident learning's
        prune-by-noise-rate): the decision itself. ``rule`` must say so. Default: ``p_clean < threshold``.
    """

    p_clean: np.ndarray
    probs: np.ndarray
    threshold: float = 0.5
    rule: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    columns: dict[str, np.ndarray] = field(default_factory=dict)
    flags: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.p_clean = np.asarray(self.p_clean, dtype=np.float64).reshape(-1)
        self.probs = np.asarray(self.probs, dtype=np.float32)  # 4 GB for 10M rows x 100 classes, not 8
        if self.probs.ndim != 2 or self.probs.shape[0] != self.p_clean.shape[0]:
            raise ValueError(
                f"probs must have shape (n, n_classes) with n = {self.p_clean.shape[0]}; "
                f"got {self.probs.shape}"
            )
        if not np.isfinite(self.p_clean).all() or not np.isfinite(self.probs.sum(axis=1)).all():
            raise ValueError("a detector produced NaN or infinite scores")
        self.p_clean = np.clip(self.p_clean, 0.0, 1.0)

    @property
    def is_noisy(self) -> np.ndarray:
        """Boolean array of shape (n,): the flag, ``p_clean < threshold`` unless ``flags`` is given."""
        if self.flags is not None:
            return np.asarray(self.flags, dtype=bool)
        return self.p_clean < self.threshold

    @property
    def suggested(self) -> np.ndarray:
        """Int array of shape (n,): the most likely class."""
        return self.probs.argmax(axis=1)

    @property
    def suggested_prob(self) -> np.ndarray:
        """Float array of shape (n,): the probability of the most likely class."""
        return self.probs.max(axis=1)


#: Largest float32 feature matrix a detector holds in memory (1 GiB: 500k x 512); larger collections are read
#: from the (memory-mapped, float16) store a block at a time.
FEATURES_IN_MEMORY_BYTES = 1 << 30


@dataclass
class DetectionContext:
    """Everything a detector may use, computed lazily so that cheap detectors stay cheap.

    Parameters
    ----------
    labels : ndarray of shape (n,), int64
        Given labels of the readable images, as class indices.
    classnames : list of str
        The text the model reads for each class index.
    images : LabeledImages
        The readable images (same order as ``labels``), for detectors that train the image tower.
    encoder : Encoder
        The loaded model (``encoder.has_text`` says whether it can encode text).
    features_fn : callable returning an array-like of shape (n, d)
        Produces the image features of the readable images, e.g. the feature store's float16 memory-mapped
        view (not necessarily normalised, any float dtype, only read). Called at most once; see
        :meth:`features` for the whole matrix and :meth:`feature_batches` / :meth:`feature_rows` for
        bounded-memory access (what detectors use so that 10M rows need no float32 copy).
    device : torch.device
    seed : int
    cache_dir : path-like
        Where detectors may cache their own intermediate artefacts (decoded-image caches, …).
    progress : bool
        Whether to show progress bars.
    trusted : ndarray of shape (n,), bool, optional
        Rows whose label a person confirmed or corrected (``labelsieve audit --reviewed``): ``labels``
        already holds their corrected label, and rows a reviewer dropped are not in the context at
        all. Every detector fits on ``labels``; those that can weigh evidence use the trusted rows as
        ground truth (the ensemble's stacking). None when nothing was reviewed; see
        :meth:`trusted_mask`.
    """

    labels: np.ndarray
    classnames: list[str]
    images: LabeledImages
    encoder: Encoder
    features_fn: Callable[[], np.ndarray]
    device: torch.device
    seed: int = 0
    cache_dir: Any = None
    progress: bool = True
    trusted: np.ndarray | None = None
    _features: np.ndarray | None = field(default=None, init=False, repr=False)
    _raw: Any = field(default=None, init=False, repr=False)
    _raw_read: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.trusted is not None:
            self.trusted = np.asarray(self.trusted, dtype=bool).reshape(-1)
            if len(self.trusted) != len(self.labels):
                raise ValueError(f"trusted must have one entry per label ({len(self.labels)}); "
                                 f"got {len(self.trusted)}")

    @property
    def n_classes(self) -> int:
        return len(self.classnames)

    def trusted_mask(self) -> np.ndarray:
        """Boolean array of shape (n,): the rows a reviewer confirmed (all False when none were)."""
        return np.zeros(len(self.labels), dtype=bool) if self.trusted is None else self.trusted
    @property
    def n_samples(self) -> int:
        return len(self.labels)

    def raw_features(self) -> Any:
        """The features as ``features_fn`` gives them (array-like (n, d), e.g. float16 memory-mapped), or None."""
        if not self._raw_read:
            self._raw, self._raw_read = self.features_fn(), True
        return self._raw

    def features(self) -> np.ndarray:
        """L2-normalised image features, float32, shape (n, d), in memory; read once.

        This is ``4 n d`` bytes (20 GB for 10M x 512): detectors that must run on collections of any size
        read :meth:`feature_batches` or :meth:`feature_rows` instead.
        """
        feats = self.optional_features()
        if feats is None:
            raise ValueError("This DetectionContext has no image features (its features_fn returned None).")
        return feats

    def optional_features(self) -> np.ndarray | None:
        """:meth:`features`, or None when ``features_fn`` gives none (a context built for image-level
        training only)."""
        if self._features is None:
            raw = self.raw_features()
            if raw is None:
                return None
            self._features = normalize_rows(raw)
        return self._features

    def feature_rows(self, index: np.ndarray | slice) -> np.ndarray:
        """L2-normalised float32 features of the rows ``index``, read from the source (no full copy)."""
        if self._features is not None:
            return self._features[index]
        raw = self.raw_features()
        if raw is None:
            raise ValueError("This DetectionContext has no image features (its features_fn returned None).")
        if isinstance(index, np.ndarray) and index.dtype != bool and len(index) > 1:
            order = np.argsort(index, kind="stable")  # sorted reads are sequential on a memory map
            out = np.empty((len(index), raw.shape[1]), dtype=np.float32)
            out[order] = normalize_rows(raw[index[order]])
            return out
        return normalize_rows(raw[index])

    def fits_in_memory(self) -> bool:
        """Whether a float32 copy of the features stays under :data:`FEATURES_IN_MEMORY_BYTES`; above it,
        detectors read the features a block at a time."""
        raw = self.raw_features()
        return raw is None or self._features is not None or (
            self.n_samples * int(raw.shape[1]) * 4 <= FEATURES_IN_MEMORY_BYTES)

    def feature_batches(self, batch_size: int = 1 << 16) -> Iterator[tuple[int, np.ndarray]]:
        """``(start, rows)`` blocks of L2-normalised float32 features in row order, ``batch_size`` rows each."""
        for start in range(0, self.n_samples, batch_size):
            yield start, self.feature_rows(slice(start, min(start + batch_size, self.n_samples)))


class FeatureRowsDataset(torch.utils.data.Dataset):
    """``(feature, label, row, ok)`` per row of a context's features, like ``TensorDataset(features, labels,
    arange(n), ones(n))`` but read from the source a batch at a time (``__getitems__``: one sorted read of a
    float16 memory map per batch), so prompt training on 10M rows needs no float32 copy of them. Use
    :func:`feature_dataset`, which keeps the in-memory dataset for collections that fit."""

    def __init__(self, ctx: DetectionContext, labels: torch.Tensor) -> None:
        self.ctx, self.labels = ctx, labels

    def __len__(self) -> int:
        return self.ctx.n_samples

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int, bool]:
        return self.__getitems__([i])[0]

    def __getitems__(self, idx: list[int]) -> list[tuple[torch.Tensor, torch.Tensor, int, bool]]:
        rows = torch.from_numpy(self.ctx.feature_rows(np.asarray(idx, dtype=np.int64)))
        return [(rows[j], self.labels[i], int(i), True) for j, i in enumerate(idx)]


def feature_dataset(ctx: DetectionContext, labels: torch.Tensor) -> torch.utils.data.Dataset:
    """The features of ``ctx`` as a dataset of ``(feature, label, row, ok)``: in memory when a float32 copy fits
    (:meth:`DetectionContext.fits_in_memory`), else :class:`FeatureRowsDataset` (same items, same batches)."""
    if ctx.fits_in_memory():
        n = ctx.n_samples
        return torch.utils.data.TensorDataset(torch.as_tensor(ctx.features()), labels, torch.arange(n),
                                              torch.ones(n, dtype=torch.bool))
    return FeatureRowsDataset(ctx, labels)


def feature_cosines(ctx: DetectionContext, text: np.ndarray, *, batch_size: int = 1 << 16) -> np.ndarray:
    """Cosines (n, C) float32 between the L2-normalised image features and the rows of ``text`` (C, d, unit
    rows), computed a block of rows at a time (no (n, d) float32 copy)."""
    text = np.asarray(text, dtype=np.float32)
    out = np.empty((ctx.n_samples, len(text)), dtype=np.float32)
    for start, rows in ctx.feature_batches(batch_size):
        out[start : start + len(rows)] = rows @ text.T
    return out


def normalize_rows(x: Any) -> np.ndarray:
    """Rows of ``x`` (any float array-like) as float32, each scaled to unit L2 norm (zero rows stay zero)."""
    feats = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(feats, axis=1, keepdims=True)
    return feats / np.maximum(norms, 1e-12)


class RowSubset:
    """Rows ``index`` of an array-like (e.g. a memory-mapped view), indexed lazily: ``RowSubset(a, idx)[i]`` is
    ``a[idx[i]]`` without copying ``a``; what :func:`labelsieve.api.run_detector` hands detectors when some
    images were unreadable."""

    def __init__(self, array: Any, index: np.ndarray) -> None:
        self.array, self.index = array, np.asarray(index, dtype=np.int64)
        self.shape = (len(self.index), *array.shape[1:])
        self.dtype = array.dtype

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key: Any) -> np.ndarray:
        return np.asarray(self.array[self.index[key]])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = np.asarray(self.array[self.index])
        return out.astype(dtype) if dtype is not None else out


class Detector(ABC):
    """Base class of every detector.

    Subclasses set ``name`` (the registry key), ``summary`` (one line for ``list_detectors``),
    ``needs_text`` (True when the encoder must have a text tower), and implement :meth:`detect`.
    ``__init__`` takes keyword-only parameters, validates them with
    :func:`labelsieve.core.errors.check_param` and stores them; learned state ends in ``_``.

    A detector that declares a :class:`~labelsieve.detectors.common.recipe.Recipe` as ``recipe`` (and no
    ``__init__``) gets its ``__init__`` from it (:meth:`Recipe.init_method`): the recipe is then the one
    place its parameters, defaults, checks and provenance are written; cross-parameter checks go in
    :meth:`_check_params`.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    needs_text: ClassVar[bool] = False
    recipe: ClassVar[Recipe | None] = None
    #: Parameter values with which the detector runs on features alone (no image read, no image tower trained):
    #: what ``labelsieve.detect`` and ``audit --features`` use when the user did not set those parameters.
    features_only: ClassVar[dict[str, Any]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        recipe = cls.__dict__.get("recipe")
        if recipe is not None and "__init__" not in cls.__dict__:
            cls.__init__ = recipe.init_method()  # type: ignore[method-assign]

    def _check_params(self) -> None:  # noqa: B027 - a hook: most detectors have no cross-parameter check
        """Checks that involve several parameters, after a recipe bound them (none by default)."""

    def trains_on_every_rank(self, ctx: DetectionContext) -> bool:
        """True when :meth:`detect` trains through the image tower under DDP and so runs on every rank under
        torchrun (docs/architecture.md, "Several processes"); False (the default): it runs on rank 0 alone,
        exactly as in one process."""
        return False

    def needs_images(self, ctx: DetectionContext) -> str | None:
        """Why :meth:`detect` on ``ctx`` would read the images or train through the image tower, or None when the
        features (and, for ``needs_text``, the model's text side) are enough. Entries that have features only
        (``labelsieve.detect``, ``audit --features``) ask before any work; so does an audit before it extracts
        features, where resolving the path refuses a combination that cannot run (a ViT-only method on a CNN).
        Default: a detector that trains through the image tower (:meth:`trains_on_every_rank`) needs images."""
        if not self.trains_on_every_rank(ctx):
            return None
        fix = ", ".join(f"{k}={v!r}" for k, v in self.features_only.items())
        return f"it trains through the image tower with these parameters{f' (on features alone: {fix})' if fix else ''}"

    @abstractmethod
    def detect(self, ctx: DetectionContext) -> DetectionResult:
        """Score every sample of ``ctx``; see :class:`DetectionResult`."""

    def get_params(self) -> dict[str, Any]:
        """The detector's parameters as given to ``__init__`` (JSON-serialisable)."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_") and not k.endswith("_")}

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({params})"


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax in float64."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def softmax_blocks(logits: np.ndarray, *, block: int = 1 << 16, inplace: bool = False) -> np.ndarray:
    """:func:`softmax` over axis 1, computed in float64 a block of rows at a time and returned in float32 (what
    :class:`DetectionResult` stores): 10M x 100 logits need 4 GB out, not three 8 GB float64 temporaries.
    ``inplace`` (float32 ``logits`` only) writes the probabilities over the logits: no second (n, C) array."""
    out = logits if inplace and isinstance(logits, np.ndarray) and logits.dtype == np.float32 \
        else np.empty(np.shape(logits), dtype=np.float32)
    for i in range(0, len(out), block):
        out[i : i + block] = softmax(logits[i : i + block], axis=1)
    return out


def given_label_prob(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``probs[i, labels[i]]`` for every i."""
    return np.asarray(probs)[np.arange(len(labels)), np.asarray(labels)]


def noise_rate_per_class(is_noisy: np.ndarray, labels: np.ndarray, n_classes: int) -> Mapping[int, float]:
    """Fraction flagged among the samples given each label (NaN-free: 0.0 for a class with none)."""
    out: dict[int, float] = {}
    for c in range(n_classes):
        m = labels == c
        out[c] = float(is_noisy[m].mean()) if m.any() else 0.0
    return out
