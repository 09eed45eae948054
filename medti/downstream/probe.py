"""The linear probe: L2-regularised logistic regression on frozen, standardised features, one model per label.

It minimises the objective scikit-learn's LogisticRegression(C=c, penalty="l2", fit_intercept=True) minimises,
    0.5 * ||w||^2 + c * sum_i log(1 + exp(-s_i (z_i . w + b)))        (s_i = +1 for a positive case, -1 otherwise)
with the intercept b not penalised, on features z standardised by the training set's mean and population standard
deviation. scikit-learn reaches it with lbfgs, a quasi-Newton method that stops at a gradient tolerance; this file
takes Newton's method instead: the objective is smooth and strictly convex, so Newton's steps (with a backtracking
line search for the first, far-off steps) converge to its one minimum quadratically, and the last step leaves it at
float64 rounding rather than at a tolerance. tests/test_downstream_stats.py compares the two, coefficients and
scores, at the distance lbfgs' own stopping gradient allows.

The cost of a step is one [k+1, k+1] solve with k = min(features, cases): with more features than cases the
penalised weights lie in the span of the cases' feature vectors (the representer theorem; the penalty is the only
term outside it), so the problem is solved in an orthonormal basis of that span and mapped back.
"""
import numbers
from dataclasses import dataclass

import numpy as np

from minisd.errors import UserError, arg

NEWTON_STEPS = 100   # quadratic convergence takes 10-30 from w = 0; reaching this means something is wrong
# Converged when a Newton step moves no weight by more than this, relative to the largest weight: steps shrink
# quadratically (1e-3, 1e-6, 1e-12), so the next one would be at float64 rounding.
STEP = 1e-10
# Where the predicted decrease of the objective, g . H^-1 g, falls below this fraction of it, Newton's full step is
# taken without a line search (see _line_search).
QUADRATIC = 1e-8


class ProbeError(UserError):
    """Features or labels the probe cannot fit, in one line that names the argument."""


@dataclass(frozen=True)
class Probe:
    """A fitted probe: the training features' mean and scale [d], and per label the weights [L, d] on standardised
    features and the intercept [L]."""
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: np.ndarray

    def scores(self, x) -> np.ndarray:
        """The decision function z . w + b per case and label, float64 [n, L] (a monotone map of the probability,
        so the AUC is the same)."""
        x = _features(x)
        if x.shape[1] != len(self.mean):
            raise ProbeError(f"{arg('x')} has {x.shape[1]} features per case; the probe was fitted on "
                             f"{len(self.mean)} (features of another encoder?)")
        return ((x - self.mean) / self.scale) @ self.coef.T + self.intercept


def _features(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ProbeError(f"{arg('x')} must be features [cases, dimensions], got shape {x.shape}")
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).any(axis=1).sum())
        raise ProbeError(f"{arg('x')}: {bad} case(s) have non-finite features (NaN or inf); check those images")
    return x


def _targets(y, cases: int) -> np.ndarray:
    """y as bool [cases, L]; every label needs both classes (with one, the intercept runs off to infinity)."""
    y = np.asarray(y)
    if y.ndim not in (1, 2) or y.shape[0] != cases:
        raise ProbeError(f"{arg('y')} has shape {y.shape}; [{cases}] or [{cases}, labels] is needed, one row per "
                         "case of x")
    if y.dtype != bool:
        if not np.isin(y, (0, 1)).all():
            raise ProbeError(f"{arg('y')} must be True/False (or 1/0) per case and label")
        y = y.astype(bool)
    y = y.reshape(cases, -1)
    for label, column in enumerate(y.T):
        if column.all() or not column.any():
            kind = "positive" if column.all() else "negative"
            where = f"column {label}" if y.shape[1] > 1 else "y"
            raise ProbeError(f"{arg('y')}: {where} has only {kind} cases ({cases} of {cases}); a classifier needs "
                             "examples of both classes")
    return y


def standardisation(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The mean and population standard deviation (ddof 0, as scikit-learn's StandardScaler) of each feature.

    A feature that is the same for every training case has no scale: its mean is that value and its scale 1, so it
    standardises to exactly 0 (and its weight to 0), and a test case that differs there stays finite."""
    constant = (x == x[0]).all(axis=0)
    mean = np.where(constant, x[0], x.mean(axis=0))
    scale = np.where(constant, 1.0, x.std(axis=0))
    return mean, scale


def _objective(theta, a, y, c, penalised):
    """Objective, gradient and the margins' curvature p (1 - p) at theta = (w, b), for 0/1 labels y."""
    margin = a @ theta
    loss = np.logaddexp(0.0, margin) - y * margin           # = log(1 + exp(-s m)), without overflow
    p = np.exp(-np.logaddexp(0.0, -margin))                 # sigmoid(margin), without overflow
    value = 0.5 * theta[penalised] @ theta[penalised] + c * loss.sum()
    gradient = c * a.T @ (p - y)
    gradient[penalised] += theta[penalised]
    return value, gradient, p * (1.0 - p)


def _line_search(theta, step, decrement, value, terms):
    """theta - t step for the largest t in 1, 1/2, 1/4, ... that lowers the objective by a quarter of the predicted
    decrease (Armijo's rule), with the objective's terms there. Close to the minimum (a predicted decrease below
    QUADRATIC of the objective) the full step is taken: Newton's steps are exact there, and a decrease that small is
    below float64's resolution of a sum of hundreds of terms, so the test would reject good steps by rounding."""
    t = 1.0
    while True:
        trial = _objective(theta - t * step, *terms)
        if decrement <= QUADRATIC * max(value, 1.0) or trial[0] <= value - 0.25 * t * decrement or t < 1e-12:
            return theta - t * step, trial
        t /= 2


def _newton(a: np.ndarray, y: np.ndarray, c: float) -> np.ndarray:
    """The minimiser (w, b) of the objective for features a = [z, 1] ([n, k+1]) and 0/1 labels y, from 0."""
    theta, penalised = np.zeros(a.shape[1]), np.arange(a.shape[1]) < a.shape[1] - 1
    terms = (a, y, c, penalised)
    value, gradient, curvature = _objective(theta, *terms)
    for _ in range(NEWTON_STEPS):
        hessian = c * (a.T * curvature) @ a + np.diag(penalised.astype(np.float64))
        step = np.linalg.solve(hessian, gradient)
        if np.abs(step).max() <= STEP * (1.0 + np.abs(theta).max()):
            return theta - step   # the step that converged is the last one: taken, it leaves theta at rounding
        theta, (value, gradient, curvature) = _line_search(theta, step, float(gradient @ step), value, terms)
    raise ProbeError(f"the probe did not converge in {NEWTON_STEPS} Newton steps ({arg('x')} of shape {a.shape}, "
                     f"{arg('c')}{c}); check the features for near-duplicate columns of huge scale")


def fit_probe(x, y, c: float = 1.0) -> Probe:
    """Standardise x (float [n, d]) by its own mean and scale, then fit one L2 logistic regression per column of y
    (bool [n] or [n, L]) with inverse regularisation strength c, as scikit-learn's LogisticRegression(C=c)."""
    x = _features(x)
    y = _targets(y, len(x))
    if isinstance(c, bool) or not (isinstance(c, numbers.Real) and np.isfinite(c) and c > 0):
        raise ProbeError(f"{arg('c')} must be a positive number (the inverse regularisation strength), got {c!r}")
    mean, scale = standardisation(x)
    z = (x - mean) / scale
    basis = None
    if z.shape[1] > z.shape[0]:   # more features than cases: solve in the span of the cases (module docstring)
        basis, _ = np.linalg.qr(z.T)                       # [d, n], orthonormal columns
        z = z @ basis                                      # [n, n]: the same inner products, so the same problem
    a = np.hstack([z, np.ones((len(z), 1))])
    thetas = np.stack([_newton(a, column.astype(np.float64), float(c)) for column in y.T])   # [L, k+1]
    coef = thetas[:, :-1] if basis is None else thetas[:, :-1] @ basis.T
    # a constant feature's weight is exactly 0 at the minimum (its only term is 0.5 w^2); the basis above holds it
    # at rounding (~1e-17), which a reader of the weights should not have to explain
    coef[:, (x == mean).all(axis=0)] = 0.0
    return Probe(mean, scale, coef, thetas[:, -1].copy())
