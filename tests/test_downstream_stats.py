"""medti.downstream.stats against independent references: the AUC against scikit-learn's roc_auc_score, DeLong's
variance against a direct O(m n) implementation of the structural-components formula written here, and the
patient bootstrap against its definition.

Tolerances: the AUC and DeLong's figures are float64 means of a few thousand numbers in [0, 1] on both sides, so
they agree to rounding (1e-12 leaves four orders of magnitude over the ~1e-16 per operation)."""
import math

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from conftest import rel_err
from medti.downstream import stats
from medti.downstream.probe import fit_probe
from medti.downstream.stats import StatsError


def tied(seed: int, cases: int = 400, levels: int = 6):
    """Scores on a few levels (so most comparisons are ties, as a reader's 1-5 scale or a rounded probability
    gives), labels correlated with them, and a second, noisier classifier of the same cases."""
    rng = np.random.default_rng(seed)
    truth = rng.random(cases) < 0.35
    a = np.clip(np.round(truth * 1.5 + rng.normal(0, 1.2, cases)), 0, levels - 1)
    b = np.clip(np.round(truth * 0.8 + rng.normal(0, 1.2, cases)), 0, levels - 1)
    return a.astype(np.float64), b.astype(np.float64), truth


@pytest.mark.parametrize("seed", range(5))
def test_auc_is_sklearns_with_ties(seed):
    a, b, labels = tied(seed)
    continuous = np.random.default_rng(seed).normal(size=len(a)) + labels
    for scores in (a, b, continuous, np.zeros_like(a)):
        assert abs(stats.auc(scores, labels) - roc_auc_score(labels, scores)) < 1e-12
    assert abs(stats.auc(a, labels.astype(int)) - roc_auc_score(labels, a)) < 1e-12   # 1/0 labels read the same


def delong_direct(a: np.ndarray, b: np.ndarray, labels: np.ndarray):
    """DeLong et al. (1988), section 2, written out: psi over every (positive, negative) pair, the components as
    row and column means, S10 and S01 as explicit sums of products over cases."""
    def psi(scores):
        x, y = scores[labels][:, None], scores[~labels][None, :]
        return (x > y) + 0.5 * (x == y)                       # [m, n]
    v10 = [psi(s).mean(axis=1) for s in (a, b)]               # [m] per curve
    v01 = [psi(s).mean(axis=0) for s in (a, b)]               # [n] per curve
    areas = [float(v.mean()) for v in v10]
    m, n = len(v10[0]), len(v01[0])

    def s(components, r, t, count):
        return sum((components[r][i] - areas[r]) * (components[t][i] - areas[t]) for i in range(count)) / (count - 1)
    cov = [[s(v10, r, t, m) / m + s(v01, r, t, n) / n for t in range(2)] for r in range(2)]
    return areas, cov


@pytest.mark.parametrize("seed", range(4))
def test_delong_is_the_structural_components_formula(seed):
    a, b, labels = tied(seed, cases=300)
    if seed % 2:   # continuous scores too, where no pair ties
        rng = np.random.default_rng(seed)
        a, b = a + rng.normal(0, 0.3, len(a)), b + rng.normal(0, 0.3, len(b))
    areas, cov = delong_direct(a, b, labels)
    got = stats.delong(a, b, labels)
    def pair(values):
        return torch.tensor(values, dtype=torch.float64)
    assert rel_err(pair([got.auc_a, got.auc_b]), pair(areas)) < 1e-12
    # the covariance is compared on the variances' scale: it enters z only through var_a + var_b - 2 cov
    assert rel_err(pair([got.var_a, got.var_b, got.cov]), pair([cov[0][0], cov[1][1], cov[0][1]])) < 1e-12
    z = (areas[0] - areas[1]) / math.sqrt(cov[0][0] + cov[1][1] - 2 * cov[0][1])
    assert abs(got.z - z) < 1e-9 * abs(z) + 1e-12
    # the two-sided normal tail, from the error function's series-free relation Phi(x) = (1 + erf(x / sqrt 2)) / 2
    assert abs(got.p - 2 * (1 - (1 + math.erf(abs(z) / math.sqrt(2))) / 2)) < 1e-12


def test_delong_without_spread():
    """Identical scores: nothing to test, z 0 and p 1; a perfect ranking against a constant one: the difference
    has no spread, so it is certain (p 0), not a division by zero."""
    _, b, labels = tied(0)
    same = stats.delong(b, b.copy(), labels)
    assert (same.z, same.p) == (0.0, 1.0)
    perfect = stats.delong(labels.astype(float), np.zeros(len(labels)), labels)
    assert (perfect.auc_a, perfect.auc_b, perfect.z, perfect.p) == (1.0, 0.5, math.inf, 0.0)


def test_bootstrap_is_reproducible_and_resamples_patients():
    rng = np.random.default_rng(3)
    patients = np.repeat(np.arange(60), rng.integers(1, 6, 60))          # 1-5 images per patient
    cases = len(patients)
    truth = (rng.random(60) < 0.4)[patients]                             # a patient's images share the label
    scores = truth + rng.normal(0, 1.0, cases)
    names = np.array([f"P{k:03d}" for k in patients])
    first = stats.bootstrap_auc(scores, truth, names, seed=7, draws=300)
    assert first == stats.bootstrap_auc(scores, truth, names, seed=7, draws=300)
    assert first != stats.bootstrap_auc(scores, truth, names, seed=8, draws=300)
    low, high = first
    assert low < stats.auc(scores, truth) < high

    # the same draws by construction: seed the same generator, pick patients, and take all their images each time
    generator = np.random.Generator(np.random.PCG64(7))
    ids = np.unique(names)
    aucs = []
    while len(aucs) < 300:
        picked = ids[generator.integers(0, len(ids), len(ids))]
        chosen = np.concatenate([np.flatnonzero(names == p) for p in picked])
        if truth[chosen].all() or not truth[chosen].any():
            continue
        aucs.append(roc_auc_score(truth[chosen], scores[chosen]))
    assert np.allclose(first, np.percentile(aucs, [2.5, 97.5]), rtol=0, atol=1e-12)


def test_bootstrap_redraws_a_draw_with_one_class():
    """Two patients, one positive: about half of the draws hold one patient only and are drawn again."""
    scores, labels = np.array([0.1, 0.3, 0.35, 0.8]), np.array([False, False, True, True])
    low, high = stats.bootstrap_auc(scores, labels, ["a", "a", "b", "b"], seed=0, draws=50)
    assert low == high == 1.0   # every kept draw holds both patients, whose images separate perfectly


@pytest.mark.parametrize("call, words", [
    (lambda: stats.auc([0.1, 0.2, 0.3], [True, True, True]), "labels= has only positive cases (3 of 3)"),
    (lambda: stats.auc([0.1, 0.2], [False, False]), "labels= has only negative cases"),
    (lambda: stats.auc([0.1, float("nan")], [True, False]), "scores= has 1 non-finite score"),
    (lambda: stats.auc([0.1, 0.2], [True, False, True]), "labels= has shape (3,)"),
    (lambda: stats.auc([0.1, 0.2], [2, 0]), "labels= must be True/False"),
    (lambda: stats.delong([0.1, 0.2, 0.3], [0.1, 0.2], [True, False, True]), "a= and b= must score the same"),
    (lambda: stats.delong([0.1, 0.2, 0.3], [0.1, 0.2, 0.3], [True, False, True]), "at least two positive and two"),
    (lambda: stats.bootstrap_auc([0.1, 0.2], [True, False], ["a"], seed=0), "patients= has shape (1,)"),
    (lambda: stats.bootstrap_auc([0.1, 0.2], [True, False], ["a", "b"], seed=-1), "seed= must be a whole number"),
    (lambda: stats.bootstrap_auc([0.1, 0.2], [True, False], ["a", "b"], seed=0, draws=0), "draws= must be"),
])
def test_bad_input_is_one_line(call, words):
    with pytest.raises(StatsError) as caught:
        call()
    assert words in str(caught.value) and "\n" not in str(caught.value)


# The linear probe against scikit-learn's LogisticRegression, fitted on scikit-learn's own StandardScaler output.
# Tolerance: lbfgs stops where its gradient is small, not at the minimum. Near the minimum the objective is
# quadratic, so a point whose gradient is g lies H^-1 g from it (H the Hessian, computed here at our solution, with
# the objective written out below rather than taken from either side). The two solutions may then differ by
# |H^-1 g_sklearn| + |H^-1 g_ours|, with a factor 2 for the Hessian's change between the points (they are ~1e-7
# apart, where it changes by far less) and the quadratic model's error. A score moves by at most |[z, 1]| times that.
def objective_gradient(theta, z, y, c):
    """The gradient of 0.5 |w|^2 + c sum log(1 + exp(-s (z.w + b))) at theta = (w, b), s = +-1, and its Hessian."""
    a, s = np.hstack([z, np.ones((len(z), 1))]), np.where(y, 1.0, -1.0)
    tail = 1.0 / (1.0 + np.exp(s * (a @ theta)))            # sigmoid(-s m)
    gradient = -c * a.T @ (s * tail)
    gradient[:-1] += theta[:-1]
    hessian = c * (a.T * (tail * (1 - tail))) @ a + np.diag(np.r_[np.ones(z.shape[1]), 0.0])
    return gradient, hessian


def planted(seed: int, cases: int, dims: int, labels: int):
    """Features with a few informative, correlated directions (as an encoder's are) and a constant column, labels
    from a noisy linear rule per label, and held-out cases whose constant column differs."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(dims, dims)) / np.sqrt(dims)
    x = rng.normal(size=(cases + 50, dims)) @ mixing * rng.uniform(0.1, 10, dims) + rng.normal(0, 3, dims)
    x[:cases, 1] = 2.5
    rules = rng.normal(size=(dims, labels))
    margins = (x - x.mean(0)) / x.std(0) @ rules / np.sqrt(dims) * 3
    y = margins + rng.logistic(size=margins.shape) > 0.3
    return x[:cases], y[:cases], x[cases:]


@pytest.mark.parametrize("c", [0.1, 1.0, 10.0])
@pytest.mark.parametrize("cases, dims, labels", [(300, 20, 1), (200, 40, 3), (60, 150, 2)])
def test_probe_is_sklearns_logistic_regression(c, cases, dims, labels):
    x, y, held_out = planted(int(c * 10) + dims, cases, dims, labels)
    probe = fit_probe(x, y if labels > 1 else y[:, 0], c=c)   # one label as y [n], as a binary task passes it
    scaler = StandardScaler().fit(x)
    z, z_test = scaler.transform(x), scaler.transform(held_out)
    for label in range(labels):
        # penalty "l2" is the default (naming it is deprecated in 1.8); tol and max_iter let lbfgs get close
        reference = LogisticRegression(C=c, solver="lbfgs", tol=1e-10, max_iter=10_000).fit(z, y[:, label])
        ours = np.r_[probe.coef[label], probe.intercept[label]]
        theirs = np.r_[reference.coef_[0], reference.intercept_[0]]
        g_ours, hessian = objective_gradient(ours, z, y[:, label], c)
        g_theirs, _ = objective_gradient(theirs, z, y[:, label], c)
        distance = 2 * sum(np.linalg.norm(np.linalg.solve(hessian, g)) for g in (g_ours, g_theirs))
        assert distance < 1e-5 * np.linalg.norm(theirs)   # the bound is tight enough to mean something
        assert np.linalg.norm(ours - theirs) <= distance
        score_bound = distance * np.linalg.norm(np.hstack([z_test, np.ones((50, 1))]), axis=1).max()
        expected = reference.decision_function(z_test)
        assert np.abs(probe.scores(held_out)[:, label] - expected).max() <= score_bound
        rel_err(torch.from_numpy(probe.scores(held_out)[:, label]), torch.from_numpy(expected))
    assert probe.coef[:, 1].tolist() == [0.0] * labels   # the constant column standardises to 0: weight exactly 0
    assert np.isfinite(probe.scores(held_out)).all() and probe.scores(held_out).shape == (50, labels)
