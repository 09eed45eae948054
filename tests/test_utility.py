"""The downstream-utility harness on planted features (splits, settings, statistics) and the probe's pretrain
setting against closed-form checks; the command end to end and its refusals are in tests/test_utility_cli.py."""
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from medti.downstream import harness, splits, summary
from medti.downstream.transfer import fit_towards


def _planted(n: int, dim: int, seed: int, shift: float = 0.6, per_patient: int = 1, flip: bool = False):
    """Two classes of Gaussian features, the positive ones moved by `shift` along every axis; `per_patient` images
    share a patient (and a class). flip: the labels swapped (a mislabelled synthetic set)."""
    g = np.random.default_rng(seed)
    y = np.repeat(g.random(n // per_patient) < 0.5, per_patient)
    x = g.normal(size=(len(y), dim)) + shift * y[:, None]
    patients = [f"p{seed}-{i // per_patient}" for i in range(len(y))]
    return harness.Data(x, (~y if flip else y)[:, None], patients)


@pytest.mark.parametrize("seed", range(20))
def test_folds_never_share_a_patient_and_are_stratified(seed):
    data = _planted(90, 2, seed, per_patient=3)
    fold_of = splits.folds(data.patients, data.y, 5, seed)
    by_patient = {}
    for patient, fold in zip(data.patients, fold_of, strict=True):
        assert by_patient.setdefault(patient, fold) == fold   # one fold per patient
    # stratified: each class's patients spread over the folds as evenly as dealing them in turn allows (within 1)
    classes = splits.patient_classes(data.patients, data.y)
    for key in set(classes.values()):
        counts = np.bincount([by_patient[p] for p, k in classes.items() if k == key], minlength=5)
        assert counts.max() - counts.min() <= 1


@pytest.mark.parametrize("seed", range(10))
def test_regimes_are_nested_and_label_balanced(seed):
    data = _planted(200, 2, seed)
    rows = list(range(40, 200))   # a fold's training part
    order = splits.regime_order(rows, data.patients, data.y, seed)
    assert sorted(order) == rows
    small, large = set(order[:20]), set(order[:60])
    assert small <= large
    # one image per patient here: a prefix holds as many of each class as the rarer class allows (within one)
    positives = int(data.y[rows].sum())
    for n in (10, 20, 60):
        got = int(data.y[order[:n]].sum())
        want_low = min(n // 2, positives, n - (len(rows) - positives))
        assert abs(got - n / 2) <= 1 or got in (want_low, n - want_low)


def _result(synthetic, seed=0):
    real, test = _planted(300, 20, 1), _planted(1000, 20, 2)
    plan = harness.Plan(settings=("real", "synthetic", "mixed", "pretrain"), ratios=(10,), sizes=(10, "all"),
                        folds=5, seed=seed)
    result = harness.run(real, synthetic, test, plan, ["positive"])
    return result, summary.table(result, ["positive"], seed)


def test_planted_synthetic_features_help_at_small_regimes():
    """Synthetic features from the real distribution, correctly labelled: ten real images in 20 dimensions make a
    noisy probe, a hundred more synthetic ones a better one. The gain must be reported, positive and significant on
    1,000 test patients."""
    result, table = _result(_planted(2000, 20, 3))
    small = table["cells"]["mixed 1:10"]["10"]["macro"]
    assert small["gain_mean"] > 0.02 and small["p_vs_real"] < 0.05
    assert table["cells"]["pretrain"]["10"]["macro"]["gain_mean"] > 0.02
    assert table["best_significant_gain"]["regime"] == "10"
    # every fold tests on the whole test set, so the pooled scores are the fold-mean scores of each test image
    assert np.allclose(result.pooled("real", "10"), np.mean([s for _, s in result.scores[("real", "10")]], 0))


def test_mislabelled_synthetic_features_hurt():
    _, table = _result(_planted(2000, 20, 3, flip=True))
    for regime in ("10", "all"):
        macro = table["cells"]["mixed 1:10"][regime]["macro"]
        assert macro["gain_mean"] < -0.05 and macro["p_vs_real"] < 0.05
    assert table["cells"]["synthetic"]["all"]["macro"]["auc_mean"] < 0.5
    assert table["best_significant_gain"] is None


def test_cross_validation_pools_each_real_image_once():
    """Without a test set each real image tests in its own fold only; its pooled score is that fold's."""
    real = _planted(120, 4, 5, per_patient=2)
    plan = harness.Plan(settings=("real",), sizes=("all",), folds=4)
    result = harness.run(real, None, None, plan, ["positive"])
    rows = np.concatenate([r for r, _ in result.scores[("real", "all")]])
    assert sorted(rows.tolist()) == list(range(120))
    for fold, (rows, _) in enumerate(result.scores[("real", "all")]):
        assert set(np.asarray(result.fold_of)[rows]) == {fold}
        train = set(result.subsets[("all", fold)])
        assert not {real.patients[i] for i in train} & {real.patients[i] for i in rows}


def test_a_fold_without_positives_is_refused():
    real = _planted(40, 2, 0)
    real.y[:] = False
    real.y[:2] = True   # two positive patients: four of five folds test none
    with pytest.raises(splits.SplitError, match="no positive case of 'positive'; use fewer folds"):
        harness.run(real, None, None, harness.Plan(settings=("real",), sizes=("all",), folds=5), ["positive"])


def test_pretrain_without_a_prior_is_sklearns_logistic_regression():
    """fit_towards with the prior at 0 minimises sklearn's objective: the same probe. 1e-5 on the decision function:
    both solvers stop at a gradient of ~1e-8..1e-4 relative; the weights are O(1)."""
    data = _planted(200, 6, 4)
    z = (data.x - data.x.mean(0)) / data.x.std(0)
    ref = LogisticRegression(C=0.5, tol=1e-10, max_iter=10000).fit(z, data.y[:, 0])
    ours = fit_towards(data.x, data.y, np.zeros((6, 1)), np.zeros(1), c=0.5)
    assert np.abs(ours.scores(data.x)[:, 0] - ref.decision_function(z)).max() < 1e-5


def test_pretrain_prior_is_where_the_penalty_pulls():
    """With the prior w_syn, the fitted w satisfies the optimality condition C * X^T (p - y) + (w - w_syn) = 0 and
    an unpenalised intercept, computed here with numpy alone (1e-6: LBFGS's gradient tolerance, scaled)."""
    data = _planted(60, 3, 6)
    prior = np.array([[2.0], [-1.0], [0.5]])
    fit = fit_towards(data.x, data.y, prior, np.array([0.3]), c=2.0)
    z = (data.x - fit.mean) / fit.std
    p = 1 / (1 + np.exp(-(z @ fit.w + fit.b)))
    residual = p - data.y
    assert np.abs(2.0 * z.T @ residual + (fit.w - prior * fit.std[:, None])).max() < 1e-6
    assert abs(2.0 * residual.sum()) < 1e-6
