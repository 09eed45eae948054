"""Every setting, regime and fold on feature arrays: the function-level entry point of the harness (the command reads
images into features, then calls run()).

Each setting, regime and fold fits its own classifier: the linear probe (LinearProbe), or a network fine-tuned end
to end (medti.downstream.finetune.Finetune); both fit() and continue (towards()) the same way.

Settings: `real` (the regime's real images), `synthetic` (every synthetic image; one probe, the same in each fold and
regime, since the synthetic set is the same), `mixed 1:r` (the regime's real images and r times as many synthetic
ones, medti.downstream.splits), `pretrain` (the synthetic probe, continued on the regime's real images:
medti.downstream.transfer).

Which images test: with no test set, fold k's patients test the probe trained on the other folds (K-fold cross-
validation); with a test set, every fold tests on all of it, and fold k's probe trains on the real images outside
fold k, so the spread over folds is that of the training set. Each test image's scores are kept per fold (for the
mean +- SD over folds) and pooled: averaged over the folds that tested it (one fold without a test set, all K with
one), the pooled scores that DeLong's test and the bootstrap are computed on (medti.downstream.summary).
"""
import functools
import zlib
from dataclasses import dataclass, field

import numpy as np

from . import splits
from .probe import fit_probe
from .transfer import fit_towards, raw_weights

SETTINGS = ("real", "synthetic", "mixed", "pretrain")


@dataclass
class Data:
    x: np.ndarray    # float [n, d] features
    y: np.ndarray    # bool [n, L] labels
    patients: list   # one key per image


@dataclass(frozen=True)
class Plan:
    settings: tuple = ("real", "synthetic", "mixed", "pretrain")
    ratios: tuple = (1, 5, 10)
    sizes: tuple = (50, 100, 500, "all")
    folds: int = 5
    seed: int = 0
    c: float = 1.0   # the probe's inverse regularisation strength (scikit-learn's C)


@dataclass(frozen=True)
class LinearProbe:
    """The default classifier: fit() the probe; towards() continues a fitted one on other images (pretrain,
    medti.downstream.transfer). medti.downstream.finetune.Finetune has the same two methods; `patients` and `seed`
    are its (its validation split and its weights' draw), unused here."""
    c: float = 1.0

    def fit(self, x, y, patients, seed: int):
        return fit_probe(x, y, self.c)

    def towards(self, start, x, y, patients, seed: int):
        return fit_towards(x, y, *raw_weights(start, x.shape[1]), c=self.c)


def training_seed(seed: int, fold: int, regime: str, name: str) -> int:
    """One seed per network (setting, regime, fold) from --seed: reproducible, and independent of the order in
    which they train (crc32, not Python's hash, which changes between processes)."""
    return zlib.crc32(f"{seed} {fold} {regime} {name}".encode())


@dataclass
class Result:
    names: list                  # setting names: "real", "synthetic", "mixed 1:5", "pretrain"
    regimes: list                # regime names ("50", "all")
    test_y: np.ndarray           # bool [m, L]
    test_patients: list
    fold_of: list                # per real image, its fold
    seed: int = 0
    # (setting, regime) -> [per fold: (test rows, scores [rows, L])]
    scores: dict = field(default_factory=dict)
    subsets: dict = field(default_factory=dict)    # (regime, fold) -> real training rows
    synthetic_used: dict = field(default_factory=dict)   # (setting, regime, fold) -> synthetic images used

    def pooled(self, setting: str, regime: str) -> np.ndarray:
        """[m, L] each test image's score averaged over the folds that tested it."""
        total, count = np.zeros(self.test_y.shape), np.zeros(len(self.test_y))
        for rows, s in self.scores[(setting, regime)]:
            total[rows] += s
            count[rows] += 1
        return total / count[:, None]


def setting_names(plan: Plan, synthetic: bool) -> list:
    names = []
    for s in plan.settings:
        if s == "mixed":
            names += [f"mixed 1:{r}" for r in plan.ratios]
        elif s == "real" or synthetic:
            names.append(s)
    return ["real"] + [n for n in names if n != "real"]   # real-only first: every other is compared with it


def _fold_parts(real: Data, test: Data | None, fold_of: np.ndarray, fold: int) -> tuple:
    """(training rows of the real set, test Data, test rows in the pooled test set) of one fold."""
    if test is None:
        rows = np.flatnonzero(fold_of == fold)
        return np.flatnonzero(fold_of != fold), Data(real.x[rows], real.y[rows], None), rows
    return np.flatnonzero(fold_of != fold), test, np.arange(len(test.y))


def _fit_settings(real: Data, synthetic: Data | None, rows: np.ndarray, plan: Plan, syn_fit, classifier,
                  seed) -> dict:
    """name -> (classifier, synthetic images used) of every setting on the real training rows `rows`.
    seed(name): the setting's training seed."""
    x, y, patients = real.x[rows], real.y[rows], [real.patients[i] for i in rows]
    out = {"real": (classifier.fit(x, y, patients, seed("real")), 0)}
    if synthetic is None:
        return out
    order = splits.synthetic_order(len(synthetic.y), plan.seed)
    for name in setting_names(plan, True):
        if name == "synthetic":
            out[name] = (syn_fit, len(synthetic.y))
        elif name == "pretrain":
            out[name] = (classifier.towards(syn_fit, x, y, patients, seed(name)), len(synthetic.y))
        elif name.startswith("mixed"):
            take = order[:int(name.split(":")[1]) * len(rows)]
            both = patients + [synthetic.patients[i] for i in take]
            out[name] = (classifier.fit(np.concatenate([x, synthetic.x[take]]), np.vstack([y, synthetic.y[take]]),
                                        both, seed(name)), len(take))
    return out


def run(real: Data, synthetic: Data | None, test: Data | None, plan: Plan, label_names: list,
        progress=None, classifier=None) -> Result:
    """Fit and score every setting x regime x fold (see the module's doc). `progress(done, total)` if given.
    classifier: LinearProbe(plan.c) unless given (medti.downstream.finetune.Finetune)."""
    classifier = classifier or LinearProbe(plan.c)
    fold_of = np.asarray(splits.folds(real.patients, real.y, plan.folds, plan.seed))
    if test is None:
        splits.check_fold_positives(real.y, fold_of, label_names, plan.folds)
    base = test if test is not None else real
    smallest = min(int((fold_of != k).sum()) for k in range(plan.folds))
    regimes = splits.regime_sizes(list(plan.sizes), smallest)
    names = setting_names(plan, synthetic is not None)
    result = Result(names, [r for r, _ in regimes], base.y, base.patients, fold_of.tolist(), plan.seed)
    syn_fit = None
    if synthetic is not None:   # the synthetic classifier: the same data in every fold, fitted once
        syn_fit = classifier.fit(synthetic.x, synthetic.y, synthetic.patients,
                                 training_seed(plan.seed, -1, "", "synthetic"))
    for fold in range(plan.folds):
        train, part, test_rows = _fold_parts(real, test, fold_of, fold)
        order = np.asarray(splits.regime_order(train.tolist(), real.patients, real.y, plan.seed + fold))
        for regime, n in regimes:
            rows = order[:n]
            splits.check_subset(real.y[rows], label_names, regime)
            result.subsets[(regime, fold)] = rows.tolist()
            fitted = _fit_settings(real, synthetic, rows, plan, syn_fit, classifier,
                                   functools.partial(training_seed, plan.seed, fold, regime))
            for name, (probe, used) in fitted.items():
                scores = np.asarray(probe.scores(part.x), np.float64).reshape(len(part.y), -1)
                result.scores.setdefault((name, regime), []).append((test_rows, scores))
                result.synthetic_used[(name, regime, fold)] = used
            if progress:
                progress(fold * len(regimes) + regimes.index((regime, n)) + 1, plan.folds * len(regimes))
    return result
