"""ensemble: members on one context, mean-logit and stacked combination, per-member audit columns."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import inject_symmetric, make_context, scores

from labelsieve.audit.table import build_table
from labelsieve.core.errors import ParameterError
from labelsieve.detectors import create_detector
from labelsieve.detectors.ensemble import DEFAULT_MEMBERS, EnsembleDetector, combine_logits

MEMBERS = ["knn", "confident_learning", "gmm"]


@pytest.fixture(scope="module")
def cifar_ctx(cifar_feats, mini_clip):
    images, x = cifar_feats
    noisy = inject_symmetric(images.labels, images.n_classes, 0.3, seed=2)
    return images, make_context(images, x, mini_clip, noisy), noisy != images.labels


@pytest.fixture(scope="module")
def member_scores(cifar_ctx):
    _, ctx, truth = cifar_ctx
    return {m: scores(create_detector(m).detect(ctx), truth) for m in MEMBERS}


@pytest.mark.parametrize("combine", ["mean_logit", "stack"])
def test_ensemble_beats_its_weakest_member_on_cifar(cifar_ctx, member_scores, combine):
    """Measured (F1, AUROC): knn .50/.89, confident_learning .67/.88, gmm .78/.93;
    mean_logit .71/.93, stack .77/.93."""
    images, ctx, truth = cifar_ctx
    res = create_detector("ensemble", members=MEMBERS, combine=combine).detect(ctx)
    f1, auroc = scores(res, truth)
    worst_f1 = min(s[0] for s in member_scores.values())
    worst_auc = min(s[1] for s in member_scores.values())
    mean_f1 = np.mean([s[0] for s in member_scores.values()])
    assert f1 >= worst_f1 and auroc >= worst_auc, (f1, auroc, member_scores)
    assert auroc > 0.9 and f1 >= mean_f1 - 0.02, (f1, auroc, member_scores)
    n = len(images)
    assert res.probs.shape == (n, 10) and np.allclose(res.probs.sum(1), 1.0)
    for m in MEMBERS:
        assert res.columns[f"p_clean_{m}"].shape == (n,) and res.columns[f"is_noisy_{m}"].dtype == bool
    flags = np.stack([res.columns[f"is_noisy_{m}"] for m in MEMBERS], axis=1)
    np.testing.assert_allclose(res.columns["agreement"], flags.mean(1))
    # unanimous rows keep the unanimous decision
    assert (res.is_noisy[flags.all(1)]).mean() > 0.95 and (~res.is_noisy[(~flags).all(1)]).mean() > 0.95
    info = json.loads(json.dumps(res.info))
    assert [m["method"] for m in info["members"]] == MEMBERS and all(m["rule"] for m in info["members"])
    if combine == "stack":
        assert "coef" in info["stack"] and info["stack"]["n_fit"] == info["n_unanimous"]
        assert "logistic regression" in res.rule
    # the columns reach the audit table
    table = build_table(images, np.ones(n, dtype=bool), res)
    assert {"p_clean_knn", "is_noisy_gmm", "agreement"} <= set(table.columns)


def test_mean_logit_rule_and_determinism(cifar_ctx):
    _, ctx, _ = cifar_ctx
    kw = {"members": ["knn", ["knn", {"k": 5}], "small_loss"], "weights": [1, 1, 2], "combine": "mean_logit"}
    a = create_detector("ensemble", **kw).detect(ctx)
    b = create_detector("ensemble", **kw).detect(ctx)
    np.testing.assert_array_equal(a.p_clean, b.p_clean)
    assert {"p_clean_knn", "p_clean_knn_2", "p_clean_small_loss"} <= set(a.columns)
    P = np.stack([a.columns["p_clean_knn"], a.columns["p_clean_knn_2"], a.columns["p_clean_small_loss"]], 1)
    p, _ = combine_logits(P, [0.5, 0.5, 0.5], weights=[1, 1, 2])
    np.testing.assert_allclose(a.p_clean, p)
    z = np.log(P.clip(1e-4, 1 - 1e-4) / (1 - P.clip(1e-4, 1 - 1e-4)))
    np.testing.assert_allclose(a.p_clean, 1 / (1 + np.exp(-(z @ [1, 1, 2]) / 4)))
    # a member's threshold is its own decision boundary: z = 0 there
    p, z = combine_logits(np.array([[0.6, 0.5]]), [0.6, 0.5])
    np.testing.assert_allclose(z, 0.0, atol=1e-12)
    np.testing.assert_allclose(p, 0.5)


def test_stack_falls_back_when_the_unanimous_rows_hold_one_decision():
    z = np.array([[1.0, 2.0], [0.5, 1.0], [-1.0, 2.0], [3.0, 1.0]])
    flags = np.array([[False, False], [False, False], [True, False], [False, False]])
    p, info = EnsembleDetector._stack(z, flags, seed=0)
    assert p is None and "fallback" in info and info["n_fit_noisy"] == 0


def test_members_are_built_and_validated():
    ens = create_detector("deft,knn")
    assert isinstance(ens, EnsembleDetector) and [m[0] for m in ens.members] == ["deft", "knn"]
    assert ens.needs_text and not create_detector("ensemble", members=["knn", "turn"]).needs_text
    default = create_detector("ensemble")
    assert [m[0] for m in default.members] == ["codivide", "turn", "knn"]
    assert default.members[1][1]["finetune"] is False and len(DEFAULT_MEMBERS) == 3
    # the members' parameters are spelled out: the paper recipes (the members' own defaults) do not leak in
    assert default.members[0][1]["epochs"] == 10 and default.members[0][1]["frozen"] is True
    assert default.members[0][1]["monotone"] is True and default.members[1][1]["monotone"] is True
    assert default.combine == "stack" and default.needs_text
    json.dumps(create_detector("ensemble").get_params())
    with pytest.raises(ParameterError, match="Unknown detector 'nope'"):
        create_detector("knn,nope")
    with pytest.raises(ParameterError, match="no nesting"):
        create_detector("ensemble", members=["knn", "ensemble"])
    with pytest.raises(ParameterError, match="'k' parameter of KNNDetector"):
        create_detector("ensemble", members=[["knn", {"k": 0}]])
    with pytest.raises(ParameterError, match="'weights' parameter of EnsembleDetector"):
        create_detector("ensemble", members=["knn", "gmm"], weights=[1.0])
    with pytest.raises(ParameterError, match="'combine'"):
        create_detector("ensemble", combine="vote")
    with pytest.raises(ParameterError, match="'members'"):
        create_detector("ensemble", members=[42])


def test_members_take_their_own_parameters_in_the_method_string():
    """One syntax for the CLI's --method and the API's method=: NAME(KEY=VALUE, ...) per member; the ensemble's own
    parameters stay keywords; a member's parameter given to the ensemble is refused with the string that sets it."""
    ens = create_detector("turn(finetune=false, monotone=true),knn(k=5)", combine="mean_logit")
    assert isinstance(ens, EnsembleDetector) and ens.combine == "mean_logit"
    (t_name, t_params), (k_name, k_params) = ens.members
    assert (t_name, t_params["finetune"], t_params["monotone"]) == ("turn", False, True)
    assert (k_name, k_params["k"]) == ("knn", 5)
    assert ens.method_string() == "turn(finetune=false,monotone=true),knn(k=5)"
    # the default is expressible: its own method string builds the same members
    default = create_detector("ensemble")
    again = create_detector(default.method_string())
    assert again.members == default.members and len(default.members) == len(DEFAULT_MEMBERS)
    assert "codivide(frozen=true," in default.method_string() and "turn(finetune=false,monotone=true)" in \
        default.method_string()
    # one detector with parameters in place, and the API's members list takes the same strings
    assert create_detector("knn(k=7)").k == 7
    assert create_detector("ensemble", members=["knn(k=3)", "turn"]).members[0][1]["k"] == 3
    # a member's parameter given to the ensemble: refused, with the method string that means it
    with pytest.raises(ParameterError, match=r'--method "turn\(finetune=false\),knn"'):
        create_detector("turn,knn", finetune=False)
    with pytest.raises(ParameterError, match="No member takes 'nope'"):
        create_detector("turn,knn", nope=1)
    with pytest.raises(ParameterError, match="given twice"):
        create_detector("knn(k=3)", k=4)
    with pytest.raises(ParameterError, match="'k' parameter of KNNDetector"):
        create_detector("turn,knn(k=0)")


def test_show_ensemble_lists_members_and_their_departures():
    text = create_detector("ensemble").describe()
    assert text.startswith('members: --method "codivide(')
    assert "turn: 2 setting(s) that are not its paper's recipe" in text
    assert "finetune = false  (user; paper: true)" in text and "monotone = true  (user; paper: false)" in text
    assert "lambda_u = 1.0  (user; paper: 25.0)" in text and "epochs = 10  (user; paper: 60)" in text
    assert "knn: no paper recipe" in text and "combine = 'stack'" in text


def test_default_ensemble_is_near_its_best_member_and_ahead_of_the_others_on_cifar(cifar_ctx):
    """The default (co-divide budgeted + TURN's probe + kNN, stacked) on 600 CIFAR images with 30 % noise. Measured on
    the re-tempered stand-in (issue 21): F1 .790 / AUROC .940; co-divide .796 / .946, TURN .768 / .886, kNN .664 /
    .886. On this small set co-divide alone is slightly ahead (on 600 rows the text budget does not bind, so it runs
    the fast settings); the default is chosen on the grid (docs/benchmarks.md §1). Bounds: within .02 of the best
    member on both, and at least .015 F1 and .03 AUROC above every other member."""
    _, ctx, truth = cifar_ctx
    res = create_detector("ensemble").detect(ctx)
    f1, auroc = scores(res, truth)
    members = {m["member"]: m for m in res.info["members"]}
    assert set(members) == {"codivide", "turn", "knn"}
    member = {name: scores(type(res)(p_clean=res.columns[f"p_clean_{name}"], probs=res.probs, threshold=0.5,
                                     rule="", flags=res.columns[f"is_noisy_{name}"]), truth) for name in members}
    print("default ensemble", f1, auroc, member)
    best = max(member, key=lambda m: member[m][0])
    assert f1 > member[best][0] - 0.02 and auroc > max(s[1] for s in member.values()) - 0.02, (f1, auroc, member)
    others = [s for m, s in member.items() if m != best]
    assert f1 > max(s[0] for s in others) + 0.015 and auroc > max(s[1] for s in others) + 0.03, (f1, auroc, member)
    assert any("codivide" in w for w in res.info["warnings"])  # its text-side warning is passed on


def test_stacking_takes_reviewer_confirmed_rows_as_ground_truth():
    """Rows a reviewer kept although every member flagged them join the stacking fit as clean: the same
    member evidence then scores higher, and only with the trusted rows' weight."""
    rng = np.random.default_rng(0)
    clean = rng.normal(1.5, 0.5, (300, 3))
    noisy = rng.normal(-1.5, 0.5, (100, 3))
    fooled = rng.normal([-1.0, -1.0, 0.5], 0.2, (40, 3))  # members 0 and 1 cry wolf; member 2 is right
    z = np.vstack([clean, noisy, fooled])
    flags = z < 0
    trusted = np.zeros(len(z), dtype=bool)
    trusted[400:420] = True  # the reviewer kept half of the fooled rows
    plain, info0 = EnsembleDetector._stack(z, flags, 0)
    taught, info = EnsembleDetector._stack(z, flags, 0, trusted, 5.0)
    ignored, _ = EnsembleDetector._stack(z, flags, 0, trusted, 0.0)
    assert info0["n_fit_trusted"] == 0 and info["n_fit_trusted"] == 20
    # the other fooled rows (not reviewed) now look cleaner; clean and noisy rows keep their side
    assert taught[420:].mean() > plain[420:].mean() + 0.2
    assert (taught[:300] > 0.5).mean() > 0.95 and (taught[300:400] < 0.5).mean() > 0.95
    assert np.allclose(ignored[420:], plain[420:], atol=0.05)


def test_reviewed_rows_stay_out_of_the_stacking_by_default():
    """The re-audit's trusted rows are clean because a reviewer chose and fixed them, not because of their scores:
    fitted as clean (trusted_weight 5, the default before issue 18) they sank the re-audit of CIFAR-10N aggre from
    139 to 56 true errors in the next 200 rows (docs/benchmarks.md §5). The default keeps them out of the fit; the
    weight stays an option."""
    assert EnsembleDetector().trusted_weight == 0.0
    assert create_detector("ensemble", trusted_weight=5).trusted_weight == 5.0
