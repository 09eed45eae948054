"""medti.downstream.stats against independent references: the AUC against scikit-learn's roc_auc_score, DeLong's
variance against a direct O(m n) implementation of the structural-components formula written here, and the
patient bootstrap against its definition.

Tolerances: the AUC and DeLong's figures are float64 means of a few thousand numbers in [0, 1] on both sides, so
they agree to rounding (1e-12 leaves four orders of magnitude over the ~1e-16 per operation)."""
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from conftest import rel_err
from medti.downstream import stats
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
