"""Step and text budgets for prompt training on many rows and many classes (labelsieve's options, issue 13).

A prompt method's training step costs one forward and backward of the text tower over every class prompt
(whatever the batch) plus the batch's image side. Two budgets bound the run:

* ``max_steps`` caps each network's optimisation steps over the run: each epoch trains on a random subset of
  :func:`rows_per_epoch` rows (:func:`epoch_subset`) instead of all of them, so the training costs the same at
  100k or 10M rows (the evaluation passes still score every row);
* ``text_budget`` caps steps × classes: :func:`text_budget_scale` gives the factor ``k`` by which the batch and
  the learning rate grow and the steps shrink (the same rows seen, in k times fewer steps; the linear scaling
  rule of Goyal et al. 2017), so the text tower's work does not grow with the number of classes.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

__all__ = ["derived_seed", "epoch_subset", "rows_per_epoch", "text_budget_scale"]


def derived_seed(*parts: int) -> int:
    """A 32-bit seed derived from ``parts`` (distinct streams for each network, epoch and purpose)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def rows_per_epoch(n: int, *, max_steps: int | None, epochs: int, batch_size: int) -> int:
    """Rows one network trains on per epoch: all ``n``, or ``ceil(max_steps / epochs) · batch_size``."""
    if max_steps is None:
        return n
    return min(n, math.ceil(max_steps / epochs) * batch_size)


def epoch_subset(dataset: Any, n: int, per_epoch: int, *, seed: int) -> Any:
    """``dataset``, or a seeded random ``per_epoch`` of its ``n`` rows (in row order) when that is fewer."""
    if per_epoch >= n:
        return dataset
    rows = np.random.default_rng(seed).choice(n, per_epoch, replace=False)
    return torch.utils.data.Subset(dataset, np.sort(rows).tolist())


def text_budget_scale(*, steps_per_epoch: int, epochs: int, n_classes: int, budget: int | None) -> int:
    """The factor ``k`` by which ``text_budget`` grows the batch and the learning rate and shrinks the steps.

    Parameters
    ----------
    steps_per_epoch : int
        Optimisation steps of one epoch at the requested batch size.
    epochs, n_classes : int
    budget : int or None
        Cap on steps × classes over the run; None: no cap (``k = 1``).

    Returns
    -------
    int
        ``ceil(epochs · steps_per_epoch · n_classes / budget)``, at least 1 and at most ``steps_per_epoch``
        (an epoch is never less than one step).
    """
    steps_per_epoch = max(1, int(steps_per_epoch))
    if budget is None:
        return 1
    k = math.ceil(epochs * steps_per_epoch * n_classes / budget)
    return int(min(max(1, k), steps_per_epoch))
