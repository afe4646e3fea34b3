"""Loss functions: values against hand computations and identities, stability, gradients, registry."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from labelsieve.core.errors import ParameterError
from labelsieve.detectors.common.losses import (
    LOSSES,
    ELRLoss,
    NamedLoss,
    complementary_nll,
    cross_entropy,
    deft_dual_loss,
    gce_loss,
    get_loss,
    sce_loss,
)


def _batch(seed: int = 0, n: int = 16, c: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g, dtype=torch.float64) * 3, torch.randint(0, c, (n,), generator=g)


def _p(logits: torch.Tensor) -> np.ndarray:
    z = logits.detach().double().numpy()
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


EXTREME = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, -1e4], [0.0, 0.0, 0.0], [-1e4, -1e4, -1e4]])
EXTREME_T = torch.tensor([1, 1, 2, 0])


def test_cross_entropy_matches_hand_computation():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    y = torch.tensor([0, 2])
    hand = [-math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(-1))), math.log(3)]
    got = cross_entropy(logits, y, reduction="none")
    assert got.tolist() == pytest.approx(hand, rel=1e-6)
    assert cross_entropy(logits, y).item() == pytest.approx(sum(hand) / 2, rel=1e-6)
    assert cross_entropy(logits, y, reduction="sum").item() == pytest.approx(sum(hand), rel=1e-6)


def test_gce_hand_values_and_limits():
    logits, y = _batch()
    py = _p(logits)[np.arange(len(y)), y.numpy()]
    got = gce_loss(logits, y, q=0.7, reduction="none").numpy()
    np.testing.assert_allclose(got, (1 - py**0.7) / 0.7, rtol=1e-10)
    # q -> 0 approaches CE; q = 1 is MAE 1 - p_y.
    ce = cross_entropy(logits, y, reduction="none").numpy()
    np.testing.assert_allclose(gce_loss(logits, y, q=1e-6, reduction="none").numpy(), ce, rtol=1e-4)
    np.testing.assert_allclose(gce_loss(logits, y, q=1.0, reduction="none").numpy(), 1 - py, rtol=1e-10)
    # bounded by 1/q
    assert gce_loss(EXTREME, EXTREME_T, q=0.7, reduction="none")[0].item() == pytest.approx(1 / 0.7)


def test_sce_identities_and_rce_value():
    logits, y = _batch(1)
    py = _p(logits)[np.arange(len(y)), y.numpy()]
    ce = cross_entropy(logits, y, reduction="none")
    # alpha=1, beta=0 is CE
    torch.testing.assert_close(sce_loss(logits, y, alpha=1.0, beta=0.0, reduction="none"), ce)
    # alpha=0, beta=1 is RCE = -A (1 - p_y); with the authors' clamp 1e-4 it is -log(1e-4) (1 - p_y)
    rce = sce_loss(logits, y, alpha=0.0, beta=1.0, reduction="none").numpy()
    np.testing.assert_allclose(rce, 4.0 * (1 - py), rtol=1e-10)
    rce_code = sce_loss(logits, y, alpha=0.0, beta=1.0, log_clip=math.log(1e-4), reduction="none").numpy()
    onehot = np.clip(np.eye(5)[y.numpy()], 1e-4, 1.0)
    np.testing.assert_allclose(rce_code, -(_p(logits) * np.log(onehot)).sum(1), rtol=1e-10)
    # defaults 0.1 CE + 1.0 RCE
    np.testing.assert_allclose(sce_loss(logits, y).item(), float(np.mean(0.1 * ce.numpy() + 4.0 * (1 - py))),
                               rtol=1e-10)


def test_complementary_nll_value():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    comp = torch.tensor([2, 0])
    p = _p(logits)
    hand = [-math.log(1 - p[0, 2]), -math.log(2 / 3)]
    assert complementary_nll(logits, comp, reduction="none").tolist() == pytest.approx(hand, rel=1e-6)
    # a confidently wrong complementary class gives a large but finite loss, equal to the logit gap
    big = complementary_nll(torch.tensor([[1e4, -1e4]]), torch.tensor([0]), reduction="none")
    assert big.item() == pytest.approx(2e4, rel=1e-6)


def test_deft_dual_loss_equals_the_authors_formula_by_hand():
    """L_dp = mean_i -log clamp(p_no[i, comp_i]) + w · mean_i -log clamp(p_yes[i, t_i]), with
    p_yes = softmax([pos, neg])[0] per class and p clamped to >= 1e-5 (HotanLee/DeFT main_phase1.py L53-L74):
    two batch means added, not one mean over the 2N terms."""
    pos = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
    neg = torch.tensor([[0.0, 1.0, 0.5], [1.0, -1.0, 30.0]])
    target, comp = torch.tensor([0, 1]), torch.tensor([2, 0])
    p_yes = 1.0 / (1.0 + np.exp(-(pos.numpy() - neg.numpy())))
    p_no = 1.0 - p_yes
    no_term = np.mean([-np.log(max(p_no[0, 2], 1e-5)), -np.log(max(p_no[1, 0], 1e-5))])
    yes_term = np.mean([-np.log(max(p_yes[0, 0], 1e-5)), -np.log(max(p_yes[1, 1], 1e-5))])
    got = deft_dual_loss(pos, neg, target, comp)
    assert float(got) == pytest.approx(no_term + yes_term, rel=1e-6)
    # the severe-noise weight scales the "yes" term only
    assert float(deft_dual_loss(pos, neg, target, comp, positive_weight=0.25)) == pytest.approx(
        no_term + 0.25 * yes_term, rel=1e-6)
    # the clamp: a "yes" probability of e^-32 counts as 1e-5 (the loss stops at ln 1e5 and has no gradient)
    far = deft_dual_loss(torch.tensor([[0.0, 0.0]]), torch.tensor([[32.0, 0.0]]), torch.tensor([0]),
                         torch.tensor([1]))
    assert float(far) == pytest.approx(-math.log(1e-5) + math.log(2.0), rel=1e-6)
    # an empty batch gives 0, not NaN
    assert float(deft_dual_loss(pos[:0], neg[:0], target[:0], comp[:0])) == 0.0


def test_deft_dual_loss_trains_only_the_negative_logits():
    pos = torch.randn(4, 3, requires_grad=True)
    neg = torch.randn(4, 3, requires_grad=True)
    deft_dual_loss(pos, neg, torch.tensor([0, 1, 2, 0]), torch.tensor([1, 2, 0, 2])).backward()
    assert pos.grad is None  # the positive logits are detached (the authors' pos_outputs.detach())
    assert neg.grad is not None and float(neg.grad.abs().sum()) > 0
    # only the target and complementary columns receive gradient
    assert float(neg.grad[0, 2].abs()) == 0.0 and float(neg.grad[0, 0].abs()) > 0


@pytest.mark.parametrize("name", ["ce", "gce", "sce", "comp", "dual", "elr"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_finite_and_differentiable_for_extreme_logits(name, dtype):
    logits = EXTREME.to(dtype).clone().requires_grad_(True)
    if name == "dual":
        loss = deft_dual_loss(logits[:, :1].detach(), logits[:, 1:2], torch.zeros(4, dtype=torch.long),
                              torch.zeros(4, dtype=torch.long))
    elif name == "elr":
        elr = ELRLoss(4, 3)
        elr(logits.detach(), EXTREME_T, torch.arange(4))  # targets now one-hot-like
        loss = elr(logits, EXTREME_T, torch.arange(4))
    else:
        fn = {"ce": cross_entropy, "gce": gce_loss, "sce": sce_loss, "comp": complementary_nll}[name]
        loss = fn(logits, EXTREME_T, reduction="none")
    assert torch.isfinite(loss).all(), loss
    loss.sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("fn", [cross_entropy, gce_loss, sce_loss, complementary_nll])
def test_empty_batch_mean_is_zero_not_nan(fn):
    logits = torch.zeros(0, 4, requires_grad=True)
    out = fn(logits, torch.zeros(0, dtype=torch.long))
    assert out.item() == 0.0
    out.backward()


def test_losses_decrease_under_gradient_descent():
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    for name in ["ce", "gce", "sce"]:
        w = torch.zeros(8, 4, requires_grad=True)
        loss_fn = get_loss(name)
        opt = torch.optim.SGD([w], lr=0.5)
        first = loss_fn(x @ w, y).item()
        for _ in range(50):
            opt.zero_grad()
            loss = loss_fn(x @ w, y)
            loss.backward()
            opt.step()
        assert loss.item() < 0.6 * first, name


def test_elr_matches_reference_formula_and_updates_targets():
    logits, y = _batch(2, n=6, c=4)
    idx = torch.tensor([5, 3, 0, 1, 2, 4])
    elr = ELRLoss(6, 4, beta=0.7, lam=3.0, reduction="none")
    p = np.clip(_p(logits), 1e-4, 1 - 1e-4)
    # first call: t = 0.3 * p / sum(p)
    t1 = 0.3 * p / p.sum(1, keepdims=True)
    ce = cross_entropy(logits, y, reduction="none").numpy()
    got = elr(logits, y, idx).detach().numpy()
    np.testing.assert_allclose(got, ce + 3.0 * np.log(1 - (t1 * p).sum(1)), rtol=1e-5)
    np.testing.assert_allclose(elr.target[idx].numpy(), t1, rtol=1e-5)
    # second call: EMA
    t2 = 0.7 * t1 + 0.3 * p / p.sum(1, keepdims=True)
    elr(logits, y, idx)
    np.testing.assert_allclose(elr.target[idx].numpy(), t2, rtol=1e-5)
    # eval mode does not update
    elr.eval()
    elr(logits * 0, y, idx)
    np.testing.assert_allclose(elr.target[idx].numpy(), t2, rtol=1e-5)
    assert "target" in elr.state_dict()


def test_elr_regulariser_pulls_towards_the_running_target():
    """The ELR gradient pushes the prediction towards the remembered target, against a noisy label."""
    elr = ELRLoss(1, 3, lam=3.0)
    elr.target[0] = torch.tensor([0.9, 0.05, 0.05])
    logits = torch.tensor([[2.0, 0.0, 0.0]], requires_grad=True)
    elr.eval()
    loss = elr(logits, torch.tensor([1]), torch.tensor([0]))
    ce = cross_entropy(logits.detach(), torch.tensor([1]))
    assert loss.item() < ce.item()  # log(1 - <t, p>) < 0
    loss.backward()
    assert logits.grad is not None and logits.grad[0, 0] < 0  # increases class 0 despite label 1


def test_get_loss_registry():
    assert set(LOSSES) == {"ce", "gce", "sce", "elr"}
    logits, y = _batch()
    gce = get_loss("gce", q=0.5, reduction="none")
    assert isinstance(gce, NamedLoss)
    torch.testing.assert_close(gce(logits, y, torch.arange(16)), gce_loss(logits, y, q=0.5, reduction="none"))
    elr = get_loss("elr", num_samples=16, num_classes=5)
    assert isinstance(elr, ELRLoss) and elr.reduction == "mean"
    assert elr(logits, y, torch.arange(16)).ndim == 0
    with pytest.raises(ParameterError, match="'ce', 'gce', 'sce', 'elr'"):
        get_loss("focal")
    with pytest.raises(ParameterError, match="unknown option"):
        get_loss("ce", q=0.7)
    with pytest.raises(ParameterError, match="num_samples"):
        get_loss("elr", num_classes=3)
    with pytest.raises(ParameterError, match="The 'q' parameter of gce_loss"):
        get_loss("gce", q=0.0)
    with pytest.raises(ParameterError, match="index"):
        elr(logits, y)


def test_validation_messages():
    logits, y = _batch()
    with pytest.raises(ParameterError, match="reduction"):
        cross_entropy(logits, y, reduction="avg")
    with pytest.raises(ParameterError, match=r"class indices in \[0, 4\]"):
        cross_entropy(logits, y + 5)
    with pytest.raises(ParameterError, match="targets"):
        cross_entropy(logits, y[:3])
    with pytest.raises(ParameterError, match="log_clip"):
        sce_loss(logits, y, log_clip=0.0)
    with pytest.raises(ParameterError, match="pos_logits"):
        deft_dual_loss(logits, logits[:, :2], y, y)
    with pytest.raises(ParameterError, match="positive_weight"):
        deft_dual_loss(logits, logits, y, y, positive_weight=-1.0)
    with pytest.raises(ParameterError, match="num_classes"):
        ELRLoss(10, 1)
