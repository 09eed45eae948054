"""The figures of the table: per setting, regime and label, and macro over labels.

- AUC mean +- SD over folds: each fold's test AUC (SD with ddof=1: the spread of a sample of folds).
- pooled AUC, its 95 % interval, and the p-value against real-only, on the pooled scores (harness.Result.pooled:
  each test image's score averaged over the folds that tested it): the interval by bootstrap over test patients
  (stats.bootstrap_auc), the p-value by DeLong's paired test (stats.delong) of the setting's pooled scores against
  real-only's in the same regime, on the same test images.
- macro: the mean over labels of each figure; its SD over folds is that of each fold's macro AUC. With one label the
  macro figures are the label's. With several, the macro interval and p-value come from one paired bootstrap over
  test patients (the same draws for both settings, the percentile interval of the macro AUC, and the two-sided
  p = 2 * min(share of draws with gain <= 0, share with gain >= 0), floored at 1/draws): DeLong's test is for one
  ROC curve per setting.
"""
import numpy as np

from .stats import auc, bootstrap_auc, delong

DRAWS = 2000
ALPHA = 0.05   # "significant": p below this


def fold_aucs(result, setting: str, regime: str) -> np.ndarray:
    """[folds, L] each fold's test AUC per label."""
    return np.array([[auc(s[:, col], result.test_y[rows, col]) for col in range(result.test_y.shape[1])]
                     for rows, s in result.scores[(setting, regime)]])


def _macro_bootstrap(a: np.ndarray, b: np.ndarray, y: np.ndarray, patients: list, seed: int) -> tuple:
    """(interval of a's macro AUC, p of the macro gain a - b) by resampling patients, draws with one class of any
    label redrawn."""
    keys, patient = np.unique(np.asarray(patients), return_inverse=True)
    rng = np.random.Generator(np.random.PCG64(seed))
    macro_a, gains = [], []
    while len(gains) < DRAWS:
        times = np.bincount(rng.integers(0, len(keys), len(keys)), minlength=len(keys))
        chosen = np.repeat(np.arange(len(y)), times[patient])
        drawn = y[chosen]
        if (drawn.all(0) | ~drawn.any(0)).any():
            continue
        one = np.mean([auc(a[chosen, c], drawn[:, c]) for c in range(y.shape[1])])
        two = np.mean([auc(b[chosen, c], drawn[:, c]) for c in range(y.shape[1])])
        macro_a.append(one)
        gains.append(one - two)
    gains = np.array(gains)
    p = max(2 * min((gains <= 0).mean(), (gains >= 0).mean()), 1 / DRAWS)
    return tuple(float(v) for v in np.percentile(macro_a, [2.5, 97.5])), float(min(p, 1.0))


def _label_row(folds: np.ndarray, pooled, real, y, patients, seed: int, col: int) -> dict:
    row = {"auc_mean": float(folds[:, col].mean()), "auc_sd": float(folds[:, col].std(ddof=1)) if len(folds) > 1
           else 0.0, "auc_pooled": auc(pooled[:, col], y[:, col]),
           "ci95": list(bootstrap_auc(pooled[:, col], y[:, col], patients, seed, DRAWS))}
    if real is not None:
        test = delong(pooled[:, col], real[:, col], y[:, col])
        row.update(p_vs_real=test.p, z_vs_real=test.z)
    return row


def cell(result, setting: str, regime: str, label_names: list, seed: int) -> dict:
    """The figures of one (setting, regime): per label and macro, and each fold's macro AUC."""
    folds, pooled = fold_aucs(result, setting, regime), result.pooled(setting, regime)
    real = None if setting == "real" else result.pooled("real", regime)
    y, patients = result.test_y, result.test_patients
    labels = {name: _label_row(folds, pooled, real, y, patients, seed, col) for col, name in enumerate(label_names)}
    per_fold = folds.mean(1)
    real_folds = fold_aucs(result, "real", regime).mean(1)
    macro = {"auc_mean": float(per_fold.mean()), "auc_sd": float(per_fold.std(ddof=1)) if len(per_fold) > 1 else 0.0,
             "auc_pooled": float(np.mean([v["auc_pooled"] for v in labels.values()])),
             "gain_mean": float((per_fold - real_folds).mean())}
    if len(label_names) == 1:
        only = labels[label_names[0]]
        macro.update(ci95=only["ci95"], **({"p_vs_real": only["p_vs_real"]} if real is not None else {}))
    else:
        ci, p = _macro_bootstrap(pooled, real if real is not None else pooled, y, patients, seed)
        macro.update(ci95=list(ci), **({"p_vs_real": p} if real is not None else {}))
    return {"labels": labels, "macro": macro, "fold_macro_auc": per_fold.tolist(),
            "fold_gain": (per_fold - real_folds).tolist()}


def table(result, label_names: list, seed: int) -> dict:
    """{setting: {regime: cell}} and the best significant macro gain over real-only."""
    cells = {s: {r: cell(result, s, r, label_names, seed) for r in result.regimes} for s in result.names}
    best = None
    for s in result.names[1:]:
        for r in result.regimes:
            macro = cells[s][r]["macro"]
            if macro["gain_mean"] > 0 and macro["p_vs_real"] < ALPHA and (
                    best is None or macro["gain_mean"] > cells[best[0]][best[1]]["macro"]["gain_mean"]):
                best = (s, r)
    return {"cells": cells, "best_significant_gain": {"setting": best[0], "regime": best[1]} if best else None}
