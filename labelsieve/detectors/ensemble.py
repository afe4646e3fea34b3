"""``ensemble``: several detectors on the same images, one combined ``p_clean``.

Every member runs on the same :class:`~labelsieve.detectors.common.base.DetectionContext` (so the image
features are extracted or read once and shared) with the global RNGs re-seeded from ``ctx.seed``
before each member, so a member's result does not depend on its position in the list.

Combination rules (``combine``):

``"mean_logit"``
    ``z_m = logit(p_m) − logit(t_m)`` for member m with score ``p_m`` (clipped to
    ``[clip, 1 − clip]``, default 1e-4) and threshold ``t_m``, so that ``z_m < 0`` exactly when the
    member's score is below its own threshold; ``p_clean = σ(Σ w_m z_m / Σ w_m)`` (equal weights by
    default) and a sample is flagged iff ``p_clean < 0.5``. With all thresholds at 0.5 this is the
    plain mean of logits: a confident member outweighs several unsure ones, and a sample is flagged
    when the members' evidence is net against its label. A member whose decision is not a threshold
    on its score (confident learning's prune-by-noise-rate) contributes its score against its
    nominal threshold, not its set decision.

``"stack"`` (default)
    A stacked logistic calibration fitted **without ground truth**: a logistic regression from the
    members' ``z_m`` to their majority decision, fitted on the rows where all members agree, then
    applied to every row; ``p_clean`` is its probability of "clean". It learns how much each
    member's score is worth and where the boundary lies from the unanimous rows, and uses that on
    the contested ones. It is self-training, not calibration against true labels: it inherits any
    error the members share (a wrong label all members accept stays accepted), and its intercept
    reflects the clean/noisy mix of the unanimous rows. When the unanimous rows hold fewer than two
    samples of either decision it falls back to ``mean_logit`` and says so in ``info``.

    Rows a reviewer confirmed (``ctx.trusted``, from ``labelsieve audit --reviewed``; their labels
    already corrected) reach every member as corrected labels. With ``trusted_weight`` > 0 they also
    join the stacking fit as "clean" whatever the members say, each with that weight. That is off by
    default (0): the reviewed rows are the top of the last audit with their labels corrected, so they
    are clean *because* they were chosen and fixed, not because of their scores. Fitted as clean, they
    taught the stacker that rows the members flag are clean: on CIFAR-10N *aggre* a re-audit found 56
    true errors in its next 200 rows instead of the first audit's 139 (AUROC over the unreviewed rows
    .884 -> .771; docs/benchmarks.md §5).

``probs`` is the (weighted) mean of the members' class probabilities. The audit table gets, per
member, ``p_clean_<member>`` and ``is_noisy_<member>`` (a repeated member name gets ``_2``, ``_3``
…), and ``agreement``: the fraction of members flagging the sample.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression

from labelsieve.core.errors import ParameterError, check_param
from labelsieve.core.methodspec import format_method, format_value, parse_method
from labelsieve.core.runtime import seed_everything
from labelsieve.detectors.common.base import DetectionContext, DetectionResult, Detector
from labelsieve.detectors.common.recipe import UNKNOWN
from labelsieve.detectors.registry import create_detector, get_detector_class, register_detector

__all__ = ["CODIVIDE_FAST", "CODIVIDE_MEMBER", "DEFAULT_MEMBERS", "TURN_PROBE", "EnsembleDetector", "combine_logits"]

#: labelsieve's fast co-divide: text-side prompts on cached features, 10 epochs (1 warm-up) at lr 0.002,
#: batch 32, monotone GMM tails (the settings the default ensemble was chosen with; the paper's recipe is
#: codivide's default), and at most 3,200 optimisation steps per network (issue 13): every row trains in
#: every epoch up to 10,240 rows (so every benchmark set of docs/benchmarks.md §1 runs exactly as before),
#: above that each epoch trains on a fresh random 10,240 rows while the GMM split still scores every row, so
#: the prompt training costs the same at 100k or 10M rows (docs/benchmarks.md §11 measures what it costs in
#: AUROC). Each step runs every class's prompt through the text tower, so a step costs in proportion to the
#: classes: the text budget (steps × classes ≤ 32,000, i.e. 3,200 steps at 10 classes, so every benchmark set
#: still runs exactly as before) grows the batch and the learning rate tenfold and cuts the steps tenfold at 100
#: classes (docs/benchmarks.md §11: 10,000 rows of 100 classes went from over 26 minutes to a few).
CODIVIDE_FAST: dict[str, Any] = {"frozen": True, "epochs": 10, "warmup_epochs": 1, "lr": 0.002, "batch_size": 32,
                                 "monotone": True, "max_steps": 3200, "text_budget": 32_000,
                                 # FixMatch's weight at full strength from the start, each batch split: the settings
                                 # these were measured with before co-divide's recipe took DivideMix's (issue 21)
                                 "lambda_u": 1.0, "lambda_u_rampup": 0, "batch_mode": "split"}
#: The default ensemble's co-divide (issue 21): the fast settings on a text budget of 3,200 steps × classes per
#: network, i.e. 320 steps at 10 classes whatever the number of rows: the batch and the learning rate grow k-fold
#: instead (k = 10 on 10,000 rows, 3 on 2,500), so every row is still seen every epoch. On the grid it matched the
#: fast settings' ensemble (mean F1 .868 ± .001 against .869 ± .001, seeds 0-2); on the 10,000-row sets the
#: member takes a quarter of the fast settings' time at load 1-3 and a seventh at load 7-10 (docs/benchmarks.md
#: §1), so that a 10,000-image audit on a CPU spends less in detection than in extraction.
CODIVIDE_MEMBER: dict[str, Any] = {**CODIVIDE_FAST, "text_budget": 3_200}
#: TURN's step 1 only: the GCE probe and one per-class GMM selection on cached features, monotone tails.
TURN_PROBE: dict[str, Any] = {"finetune": False, "monotone": True}
#: Members used when none are given, each with its parameters spelled out so that the ensemble does not
#: change when a member's own defaults (the paper recipes) do. Chosen on the grid of docs/benchmarks.md §1 (six
#: noisy datasets, the re-tempered mini CLIP): the prompt-based co-divide (budgeted) with TURN's probe + GMM (no
#: fine-tuning) and the kNN vote, stacked; ``labelsieve detectors --show ensemble`` prints each member's settings
#: that are not its paper's.
DEFAULT_MEMBERS = (("codivide", CODIVIDE_MEMBER), ("turn", TURN_PROBE), "knn")
COMBINE_RULES = ("mean_logit", "stack")
#: At most this many unanimous rows (a seeded sample) fit the stacking regression.
STACK_FIT_ROWS = 1_000_000


def _logit(p: np.ndarray, clip: float) -> np.ndarray:
    q = np.clip(np.asarray(p, dtype=np.float64), clip, 1.0 - clip)
    return np.log(q) - np.log1p(-q)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, dtype=np.float64)))


def combine_logits(p_clean: np.ndarray, thresholds: Sequence[float], *, weights: Sequence[float] | None = None,
                   clip: float = 1e-4) -> tuple[np.ndarray, np.ndarray]:
    """The ``mean_logit`` rule.

    Parameters
    ----------
    p_clean : ndarray of shape (n, M)
        Member scores.
    thresholds : sequence of M floats
        Member thresholds.
    weights : sequence of M positive floats, optional
        Equal when omitted.
    clip : float
        Scores and thresholds are clipped to ``[clip, 1 - clip]`` before the logit.

    Returns
    -------
    p : ndarray of shape (n,)
        ``σ(Σ w_m z_m / Σ w_m)``.
    z : ndarray of shape (n, M)
        The centred member logits ``logit(p_m) - logit(t_m)``.
    """
    P = np.asarray(p_clean, dtype=np.float64)
    z = _logit(P, clip) - _logit(np.asarray(thresholds, dtype=np.float64), clip)[None, :]
    w = np.ones(P.shape[1]) if weights is None else np.asarray(weights, dtype=np.float64)
    return _sigmoid(z @ w / w.sum()), z


def _normalise_members(members: Sequence[Any] | None) -> list[tuple[str, dict[str, Any]]]:
    own = "EnsembleDetector"
    raw = list(DEFAULT_MEMBERS) if members is None else members
    check_param(own, "members", members, isinstance(raw, (list, tuple)) and len(raw) >= 1,
                "a non-empty list of detector names or (name, params) pairs")
    out: list[tuple[str, dict[str, Any]]] = []
    for m in raw:
        if isinstance(m, str):
            parsed = parse_method(m)
            check_param(own, "members", m, len(parsed) == 1, "a list with one detector per entry")
            name, params = parsed[0]
        elif isinstance(m, (list, tuple)) and len(m) == 2 and isinstance(m[0], str) and isinstance(m[1], dict):
            name, params = m[0], dict(m[1])
        else:
            raise ParameterError(f"The 'members' parameter of {own} must be a list of detector names or "
                                 f"(name, params) pairs. Got the member {m!r} instead.")
        check_param(own, "members", name, name != "ensemble", "detectors other than 'ensemble' (no nesting)")
        get_detector_class(name)  # unknown names raise with the list of known ones
        out.append((name, params))
    return out


def _column_names(names: Sequence[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}_{seen[n]}")
    return out


@register_detector
class EnsembleDetector(Detector):
    """Several detectors combined into one calibrated ``p_clean``.

    Parameters
    ----------
    members : list of str or (str, dict), default=None
        Detector names or method strings (``"knn(k=5)"``), or ``(name, params)`` pairs; None:
        :data:`DEFAULT_MEMBERS`, i.e. ``[("codivide", CODIVIDE_MEMBER), ("turn", TURN_PROBE), "knn"]``.
        ``create_detector("deft,knn")`` builds an ensemble of those.
    combine : {"mean_logit", "stack"}, default="stack"
        See the module docstring.
    weights : list of float, optional
        One positive weight per member for ``mean_logit`` and for the mean of ``probs``.
    clip : float, default=1e-4
        Member scores are clipped to ``[clip, 1 - clip]`` before the logit.
    trusted_weight : float, default=0.0
        Weight of each reviewer-confirmed row in the stacking fit (``stack`` only; unanimous rows weigh 1); 0
        leaves them out of it (see the module docstring).
    """

    name = "ensemble"
    summary = "several detectors, p_clean = stacked logistic calibration of their logits (or their mean)"

    def __init__(self, *, members: Sequence[str | tuple[str, dict[str, Any]]] | None = None,
                 combine: str = "stack", weights: Sequence[float] | None = None, clip: float = 1e-4,
                 trusted_weight: float = 0.0) -> None:
        own = type(self).__name__
        pairs = _normalise_members(members)
        check_param(own, "combine", combine, combine in COMBINE_RULES, f"one of {', '.join(map(repr, COMBINE_RULES))}")
        check_param(own, "weights", weights, weights is None or (
            isinstance(weights, (list, tuple)) and len(weights) == len(pairs)
            and all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w > 0
                    for w in weights)), f"None or a list of {len(pairs)} positive floats (one per member)")
        check_param(own, "clip", clip, isinstance(clip, float) and 0.0 < clip < 0.5, "a float in (0, 0.5)")
        check_param(own, "trusted_weight", trusted_weight, isinstance(trusted_weight, (int, float))
                    and not isinstance(trusted_weight, bool) and 0 <= trusted_weight < math.inf, "a float >= 0")
        self._members = [create_detector(name, **params) for name, params in pairs]
        self.members = [[name, det.get_params()] for (name, _), det in zip(pairs, self._members, strict=True)]
        self.combine = combine
        self.weights = None if weights is None else [float(w) for w in weights]
        self.clip = clip
        self.trusted_weight = float(trusted_weight)

    def method_string(self) -> str:
        """The members in the ``--method`` syntax (each member's parameters that differ from its own defaults)."""
        out = []
        for (name, params), det in zip(self.members, self._members, strict=True):
            defaults = type(det)().get_params()
            out.append((name, {k: v for k, v in params.items() if k not in defaults or defaults[k] != v}))
        return format_method(out)

    def describe(self) -> str:
        """What ``labelsieve detectors --show ensemble`` prints: the members, each member's settings that are not
        its paper's recipe (or, for a detector without one, its parameters), and the combination."""
        lines = [f"members: --method \"{self.method_string()}\"", ""]
        for (name, params), det in zip(self.members, self._members, strict=True):
            recipe = getattr(det, "recipe", None)
            if recipe is None:
                shown = ", ".join(f"{k}={format_value(v)}" for k, v in params.items())
                lines.append(f"  {name}: no paper recipe (labelsieve's baseline); parameters: {shown or 'none'}")
                continue
            rows = recipe.departures(params)
            lines.append(f"  {name}: {len(rows)} setting(s) that are not its paper's recipe ({recipe.reference}):")
            for r in rows:
                paper = "paper: ?" if r["paper"] == UNKNOWN else (
                    "no paper value" if r["paper"] is None else f"paper: {format_value(r['paper'])}")
                why = r["note"] or r["source"]
                lines.append(f"      {r['name']} = {format_value(r['value'])}  ({r['origin']}; {paper})"
                             + (f" - {why}" if why else ""))
        lines += ["", f"combine = {self.combine!r}, weights = {self.weights}, clip = {self.clip:g}, "
                      f"trusted_weight = {self.trusted_weight:g} (the ensemble's own parameters: -p KEY=VALUE)"]
        return "\n".join(lines)

    @property
    def needs_text(self) -> bool:  # type: ignore[override]
        """True when any member needs a text tower."""
        return any(m.needs_text for m in self._members)

    def needs_images(self, ctx: DetectionContext) -> str | None:
        """The first member that would read the images, and why (give it its ``features_only`` parameters)."""
        for (name, _), det in zip(self.members, self._members, strict=True):
            why = det.needs_images(ctx)
            if why is not None:
                return f"its member {name!r}: {why}"
        return None

    def detect(self, ctx: DetectionContext) -> DetectionResult:
        names = _column_names([name for name, _ in self.members])
        results: list[DetectionResult] = []
        member_info: list[dict[str, Any]] = []
        w = np.ones(len(self._members)) if self.weights is None else np.asarray(self.weights)
        probs: np.ndarray | None = None
        for j, (col, det) in enumerate(zip(names, self._members, strict=True)):
            seed_everything(ctx.seed)
            t = time.perf_counter()
            r = det.detect(ctx)
            # the weighted mean of the members' class probabilities, accumulated so that only one (n, C) array
            # is held whatever the number of members (4 GB at 10M rows x 100 classes)
            if probs is None:
                probs = np.zeros_like(r.probs, dtype=np.float32)
            probs += np.float32(w[j] / w.sum()) * r.probs
            r.probs = r.probs[:, :0]
            results.append(r)
            member_info.append({"member": col, "method": det.name, "params": det.get_params(), "rule": r.rule,
                                "threshold": r.threshold, "n_flagged": int(r.is_noisy.sum()),
                                "seconds": time.perf_counter() - t, "info": r.info})
        P = np.stack([r.p_clean for r in results], axis=1)
        flags = np.stack([r.is_noisy for r in results], axis=1)
        thresholds = [r.threshold for r in results]
        p_mean, z = combine_logits(P, thresholds, weights=w, clip=self.clip)
        info: dict[str, Any] = {"combine": self.combine, "weights": w.tolist(), "clip": self.clip,
                                "members": member_info,
                                "warnings": [f"{col}: {msg}" for col, r in zip(names, results, strict=True)
                                             for msg in (r.info or {}).get("warnings", [])]}
        p_clean, rule = p_mean, ("p_clean = sigmoid of the " + ("weighted " if self.weights else "")
                                 + "mean over members (" + ", ".join(names) + ") of logit(p_clean_m) - "
                                 "logit(threshold_m); flagged if p_clean < 0.5.")
        if self.combine == "stack":
            stacked, stack_info = self._stack(z, flags, ctx.seed, ctx.trusted_mask(), self.trusted_weight)
            info["stack"] = stack_info
            if stacked is not None:
                p_clean = stacked
                rule = ("p_clean = a logistic regression from the members' (" + ", ".join(names) + ") threshold-"
                        "centred logits to their majority decision, fitted on the rows where all members agree "
                        "(no ground truth), applied to every row; flagged if p_clean < 0.5.")
            else:
                rule += f" (stacking fell back to the mean: {stack_info['fallback']})"
        assert probs is not None
        probs /= probs.sum(axis=1, keepdims=True)
        columns: dict[str, np.ndarray] = {}
        for j, col in enumerate(names):
            columns[f"p_clean_{col}"] = P[:, j]
            columns[f"is_noisy_{col}"] = flags[:, j]
        columns["agreement"] = flags.mean(axis=1)
        info["n_unanimous"] = int((flags.all(axis=1) | (~flags).all(axis=1)).sum())
        return DetectionResult(p_clean=p_clean, probs=probs, threshold=0.5, rule=rule, info=info, columns=columns)

    @staticmethod
    def _stack(z: np.ndarray, flags: np.ndarray, seed: int, trusted: np.ndarray | None = None,
               trusted_weight: float = 1.0) -> tuple[np.ndarray | None, dict[str, Any]]:
        """Logistic regression fitted on the unanimous rows (and the trusted rows, as clean); None (and the
        reason) when it cannot be."""
        trusted = np.zeros(len(z), dtype=bool) if trusted is None else trusted
        agree = flags.all(axis=1) | (~flags).all(axis=1) | trusted
        clean = ~flags[agree, 0] | trusted[agree]
        weight = np.where(trusted[agree], trusted_weight, 1.0)
        n_clean, n_noisy = int(clean.sum()), int((~clean).sum())
        info: dict[str, Any] = {"n_fit": int(agree.sum()), "n_fit_clean": n_clean, "n_fit_noisy": n_noisy,
                                "n_fit_trusted": int(trusted.sum())}
        if n_clean < 2 or n_noisy < 2:
            info["fallback"] = (f"the unanimous rows hold {n_clean} clean and {n_noisy} noisy decision(s); "
                                "a logistic fit needs at least 2 of each")
            return None, info
        lr = LogisticRegression(C=1.0, max_iter=1000, random_state=seed)
        fit = np.arange(int(agree.sum()))  # positions among the rows of agree
        if len(fit) > STACK_FIT_ROWS:  # three coefficients do not need more rows; keeps 10M-row audits fast
            sampled = np.random.default_rng(seed).choice(fit, STACK_FIT_ROWS, replace=False)
            fit = np.union1d(sampled, np.flatnonzero(trusted[agree]))  # every reviewer-confirmed row stays
            info["n_fit_sampled"] = int(len(fit))
        lr.fit(z[agree][fit], clean[fit].astype(np.int64), sample_weight=weight[fit])
        info.update(coef=lr.coef_.ravel().tolist(), intercept=float(lr.intercept_[0]))
        return lr.predict_proba(z)[:, 1], info
