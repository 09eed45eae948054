"""The `pretrain` setting for the linear probe: fit on synthetic images, then continue on real ones.

Why not a warm start alone: the probe's objective (L2-regularised logistic loss) is strictly convex, so it has one
minimum, and a solver started at the synthetic solution ends at the same place as one started at zero -- "pretrain"
would equal "real" to the solver's tolerance. What carries over from pre-training in a convex model is where the
regulariser pulls: continuing on real images here minimises

    C * sum_i log(1 + exp(-z_i * (w . x_i + b)))  +  1/2 * ||w - w_syn||^2

(sklearn's objective for LogisticRegression(C), the penalty centred on the synthetic solution w_syn instead of 0;
"hypothesis transfer", Kuzborskij & Orabona 2013), started at w_syn. With few real images the model stays near what
synthetic images taught; with many, the real data move it away. w_syn = 0 gives the real-only probe exactly.
"""
from dataclasses import dataclass

import numpy as np
import torch

from .probe import standardisation


@dataclass
class Linear:
    """scores(x) = standardise(x) @ w + b, as the probe's decision function; mean/std from the training features."""
    mean: np.ndarray   # [d]
    std: np.ndarray    # [d], 1 where a feature is constant (it is then 0 after centring, whatever the scale)
    w: np.ndarray      # [d, L]
    b: np.ndarray      # [L]

    def scores(self, x) -> np.ndarray:
        return ((np.asarray(x, np.float64) - self.mean) / self.std) @ self.w + self.b


def raw_weights(probe, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(w [d, L], b [L]) of a probe on raw features, read off its decision function: scores are affine in x, so
    scores(0) is b and scores(e_j) - b is row j of w. Needs only Probe.scores."""
    points = np.vstack([np.zeros((1, dim)), np.eye(dim)])
    s = np.asarray(probe.scores(points), np.float64).reshape(dim + 1, -1)
    return s[1:] - s[:1], s[0]


def fit_towards(x, y, w_raw: np.ndarray, b_raw: np.ndarray, c: float = 1.0, tol: float = 1e-9) -> Linear:
    """The probe on (x, y) whose penalty is centred on the raw-feature solution (w_raw, b_raw), started there. y:
    bool [n, L]. Columns are independent problems, solved together (their objectives add)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, bool).reshape(len(x), -1)
    mean, std = standardisation(x)   # the probe's own rule (a constant feature: scale 1)
    # the prior in standardised coordinates: w.x_raw + b = (w*std).z + (b + w.mean)
    w0 = torch.from_numpy(w_raw * std[:, None])
    b0 = torch.from_numpy(b_raw + mean @ w_raw)
    z = torch.from_numpy((x - mean) / std)
    sign = torch.from_numpy(np.where(y, 1.0, -1.0))
    w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=1000, tolerance_grad=tol, tolerance_change=1e-14,
                            history_size=20, line_search_fn="strong_wolfe")

    def objective():
        opt.zero_grad()
        loss = c * torch.nn.functional.softplus(-sign * (z @ w + b)).sum() + 0.5 * ((w - w0) ** 2).sum()
        loss.backward()
        return loss

    for _ in range(20):   # LBFGS stops at max_iter; a few restarts reach the tolerance on hard problems
        opt.step(objective)
        if max(w.grad.abs().max(), b.grad.abs().max()) <= tol * max(1.0, len(x)):
            break
    return Linear(mean, std, w.detach().numpy(), b.detach().numpy())
