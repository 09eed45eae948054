"""The statistics a downstream-utility table reports: the AUC, DeLong's test for two ROC curves on the same cases, and a
bootstrap interval over patients.

All three work from the structural components of DeLong, DeLong & Clarke-Pearson (1988), "Comparing the areas under
two or more correlated receiver operating characteristic curves: a nonparametric approach", Biometrics 44(3):837-845.
With m positive cases X_i, n negative cases Y_j and psi(X, Y) = 1 if X > Y, 1/2 if X == Y, 0 otherwise:
    V10_i = (1/n) sum_j psi(X_i, Y_j)      (one per positive case)
    V01_j = (1/m) sum_i psi(X_i, Y_j)      (one per negative case)
    AUC = mean(V10) = mean(V01)            (the Mann-Whitney statistic: ties count one half)
Both are computed from midranks in O(N log N), as Sun & Xu (2014, IEEE Signal Processing Letters 21(11)) showed:
V10_i = (rank of X_i among all cases - rank of X_i among the positives) / n, and symmetrically for V01.
Everything is float64 numpy; the AUC equals sklearn.metrics.roc_auc_score (tests/test_downstream_stats.py).
"""
import math
import numbers
from typing import NamedTuple

import numpy as np

from minisd.errors import UserError, arg


class StatsError(UserError):
    """Scores, labels or patients a statistic cannot use, in one line that names the argument."""


class Delong(NamedTuple):
    """DeLong's paired test of two ROC curves on the same cases: both AUCs, their variances and covariance, the z
    statistic of auc_a - auc_b and its two-sided p-value."""
    auc_a: float
    auc_b: float
    var_a: float
    var_b: float
    cov: float
    z: float
    p: float


def _labels(labels, cases: int) -> np.ndarray:
    """labels as bool [cases], with at least one case of each class (an AUC compares positives with negatives)."""
    labels = np.asarray(labels)
    if labels.shape != (cases,):
        raise StatsError(f"{arg('labels')} has shape {labels.shape}; one label per score ({cases}) is needed")
    if labels.dtype != bool:
        if not np.isin(labels, (0, 1)).all():
            raise StatsError(f"{arg('labels')} must be True/False (or 1/0) per case")
        labels = labels.astype(bool)
    positives = int(labels.sum())
    if positives in (0, cases):
        kind = "positive" if positives else "negative"
        raise StatsError(f"{arg('labels')} has only {kind} cases ({cases} of {cases}): an AUC needs at least one "
                         "positive and one negative case")
    return labels


def _scores(scores, name: str) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1 or scores.size == 0:
        raise StatsError(f"{arg(name)} must be a non-empty 1-D array of scores, got shape {scores.shape}")
    if not np.isfinite(scores).all():
        raise StatsError(f"{arg(name)} has {int((~np.isfinite(scores)).sum())} non-finite score(s) (NaN or inf); "
                         "check the classifier that made them")
    return scores


def _midranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of `values`, tied values sharing the mean of their ranks."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    # runs of equal values: each run [start, end) gets the mean rank (start + 1 + end) / 2
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], len(values)]
    ranks = np.empty(len(values))
    ranks[order] = np.repeat((starts + 1 + ends) / 2, ends - starts)
    return ranks


def _components(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong's structural components (V10 [m], V01 [n]) by midranks (see the module's docstring)."""
    positive, negative = scores[labels], scores[~labels]
    m, n = len(positive), len(negative)
    overall = _midranks(scores)
    v10 = (overall[labels] - _midranks(positive)) / n         # negatives below X_i, ties one half
    v01 = 1.0 - (overall[~labels] - _midranks(negative)) / m  # positives above Y_j, ties one half
    return v10, v01


def auc(scores, labels) -> float:
    """The area under the ROC curve of `scores` (float [N]) for `labels` (bool [N]), ties counting one half."""
    scores = _scores(scores, "scores")
    v10, _ = _components(scores, _labels(labels, len(scores)))
    return float(v10.mean())


def delong(a, b, labels) -> Delong:
    """DeLong et al.'s (1988) test that two classifiers' scores `a` and `b` of the same cases have equal AUCs.

    S10 and S01 are the 2 x 2 sample covariances (denominator m - 1 and n - 1) of the components of both curves;
    S = S10 / m + S01 / n is the covariance of (auc_a, auc_b); z = (auc_a - auc_b) / sqrt(var_a + var_b - 2 cov) and
    p = erfc(|z| / sqrt 2), the two-sided normal tail. When the difference has no spread at all (identical scores,
    or two rankings that differ by the same amount for every case) z is 0 with p = 1 if the AUCs are equal, else
    +-inf with p = 0: the estimate then has no sampling error to test against.
    """
    a, b = _scores(a, "a"), _scores(b, "b")
    if a.shape != b.shape:
        raise StatsError(f"{arg('a')} and {arg('b')} must score the same cases: {len(a)} vs {len(b)} scores")
    labels = _labels(labels, len(a))
    if min(int(labels.sum()), int((~labels).sum())) < 2:
        raise StatsError(f"{arg('labels')} needs at least two positive and two negative cases for DeLong's "
                         "variance (a covariance over one case is undefined)")
    (v10a, v01a), (v10b, v01b) = _components(a, labels), _components(b, labels)
    s10, s01 = np.cov(np.stack([v10a, v10b])), np.cov(np.stack([v01a, v01b]))   # [2, 2] each, ddof 1
    s = s10 / len(v10a) + s01 / len(v01a)
    auc_a, auc_b = float(v10a.mean()), float(v10b.mean())
    spread = s[0, 0] + s[1, 1] - 2 * s[0, 1]
    if spread > 0:
        z = (auc_a - auc_b) / math.sqrt(spread)
    else:
        z = 0.0 if auc_a == auc_b else math.copysign(math.inf, auc_a - auc_b)
    return Delong(auc_a, auc_b, float(s[0, 0]), float(s[1, 1]), float(s[0, 1]), z, math.erfc(abs(z) / math.sqrt(2)))


def _patient_of_case(patients, cases: int) -> np.ndarray:
    """Each case's patient as an index 0 .. P-1 (int [cases])."""
    patients = np.asarray(patients)
    if patients.shape != (cases,):
        raise StatsError(f"{arg('patients')} has shape {patients.shape}; one patient per score ({cases}) is needed")
    return np.unique(patients, return_inverse=True)[1].reshape(cases)


def bootstrap_auc(scores, labels, patients, seed: int, draws: int = 2000) -> tuple[float, float]:
    """A 95 % percentile interval of the AUC by resampling patients with replacement, all of a patient's cases
    together (cases of one patient are correlated; resampling images would understate the spread).

    Each draw picks as many patients as there are, uniformly with replacement, from numpy's PCG64 generator seeded
    with `seed`, so the interval is the same for the same seed; a patient drawn k times brings each of its cases k
    times. A draw in which one class is missing has no AUC; it is drawn again (the interval is then conditional on
    both classes being present, as pROC's bootstrap is). The interval is the 2.5th and 97.5th percentiles of the
    `draws` AUCs (numpy's default linear interpolation between order statistics).
    """
    scores = _scores(scores, "scores")
    labels = _labels(labels, len(scores))
    patient = _patient_of_case(patients, len(scores))
    for name, value, least in (("seed", seed, 0), ("draws", draws, 1)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < least:
            raise StatsError(f"{arg(name)} must be a whole number >= {least}, got {value!r}")
    rng = np.random.Generator(np.random.PCG64(int(seed)))
    count, aucs = int(patient.max()) + 1, []
    # The redrawing ends: a draw of P from P patients includes a given one with probability 1 - (1 - 1/P)^P >= 1 - 1/e,
    # so it includes a patient with a positive case and one with a negative case with probability >= 2 (1 - 1/e) - 1
    # = 0.26 (labels have both classes), and fewer than 4 tries per kept draw are expected.
    while len(aucs) < draws:
        times = np.bincount(rng.integers(0, count, count), minlength=count)   # draws of each patient
        chosen = np.repeat(np.arange(len(scores)), times[patient])            # every case of a patient, k times
        drawn = labels[chosen]
        if drawn.all() or not drawn.any():
            continue
        v10, _ = _components(scores[chosen], drawn)
        aucs.append(v10.mean())
    low, high = np.percentile(np.array(aucs), [2.5, 97.5])
    return float(low), float(high)
