"""Which images train and which test: patient-grouped folds, nested label-balanced regimes of the real training
images, and the synthetic images mixed in at each ratio.

The rules (docs/utility.md states them for users):
- A patient's class is its images' most common label row (ties: the first in image order). Patients are shuffled
  (`seed`) within each class and dealt to the K folds in turn, one class after the other, each class starting where
  the last left off: every fold holds as even a share of each class as the patients allow, and a patient sits in one
  fold only, so an image never tests a model that trained on its patient's other images.
- Regimes (`--real-sizes`): in each fold's training part, patients are put in one order that takes one patient of
  each class in turn (classes by their shuffled patients; a class that runs out drops out of the turn); a regime of n
  images is the first n images of that order. Smaller regimes are prefixes of larger ones, so they are nested, and
  a regime holds as many patients of each class as the rarest class allows (DiNO-Diffusion's balanced subsets).
- Mixed (`--ratios`): at real:synthetic 1:r the regime's n real images are joined by the first r*n synthetic images
  of one seeded order of the synthetic set (all of them, and the report says so, when there are fewer): the
  synthetic images of a smaller ratio are inside those of a larger one.
"""
from collections import Counter, defaultdict

import numpy as np

from minisd.errors import UserError, arg


class SplitError(UserError):
    """A split that cannot be made, in one line naming the flag."""


def patient_classes(patients: list, y: np.ndarray) -> dict:
    """{patient: class key}, patients in first-seen order; the key is the patient's most common label row."""
    rows = defaultdict(list)
    for patient, row in zip(patients, map(tuple, y.tolist()), strict=True):
        rows[patient].append(row)
    return {p: Counter(r).most_common(1)[0][0] for p, r in rows.items()}


def _by_class(classes: dict, rng: np.random.Generator) -> list:
    """[[patients of one class, shuffled], ...], classes in a fixed order (sorted keys) so a seed is reproducible."""
    groups = defaultdict(list)
    for patient, key in classes.items():
        groups[key].append(patient)
    return [[groups[k][i] for i in rng.permutation(len(groups[k]))] for k in sorted(groups)]


def folds(patients: list, y: np.ndarray, k: int, seed: int) -> list:
    """Fold number (0..k-1) of each image: patient-grouped and label-stratified as stated in the module's doc."""
    classes = patient_classes(patients, y)
    if len(classes) < k:
        raise SplitError(f"{arg('folds')} {k}: only {len(classes)} patients; a fold needs at least one patient")
    fold_of, turn = {}, 0
    for group in _by_class(classes, np.random.default_rng(seed)):
        for patient in group:
            fold_of[patient] = turn % k
            turn += 1
    return [fold_of[p] for p in patients]


def regime_order(rows: list, patients: list, y: np.ndarray, seed: int) -> list:
    """The training images `rows` (indices) in the order regimes take them (see the module's doc)."""
    chosen = [patients[r] for r in rows]
    classes = patient_classes(chosen, y[rows])
    queues = _by_class(classes, np.random.default_rng(seed))
    order = []
    while any(queues):
        for queue in queues:
            if queue:
                order.append(queue.pop(0))
    images = defaultdict(list)
    for r in rows:
        images[patients[r]].append(r)
    return [r for patient in order for r in images[patient]]


def regime_sizes(sizes: list, available: int) -> list:
    """(name, n) of each --real-sizes entry ("all" or a count; n None for "all": each fold's whole training part)
    that every fold's training part can fill; a larger count is left out (the report lists the regimes run)."""
    return [(str(s), None if s == "all" else s) for s in sizes if s == "all" or s <= available]


def synthetic_order(count: int, seed: int) -> np.ndarray:
    """One seeded order of the synthetic images; a ratio takes a prefix of it."""
    return np.random.default_rng([seed, 1]).permutation(count)


def check_fold_positives(y: np.ndarray, fold_of: list, label_names: list, k: int):
    """Every fold's test part has a positive and a negative case of every label, else its AUC is undefined."""
    fold_of = np.asarray(fold_of)
    for fold in range(k):
        part = y[fold_of == fold]
        for column, name in enumerate(label_names):
            if not part[:, column].any() or part[:, column].all():
                what = "positive" if not part[:, column].any() else "negative"
                raise SplitError(f"{arg('folds')} {k}: fold {fold + 1}'s test patients have no {what} case of "
                                 f"{name!r}; use fewer folds (or more patients with that label)")


def check_disjoint(train: list, test: list, flag: str = "test"):
    """A patient in both the training images and the test set would make the test score a memory test."""
    shared = sorted(set(train) & set(test))
    if shared:
        raise SplitError(f"{arg(flag)}: {len(shared)} patient(s) have images in both {arg('real')} and {arg(flag)}; a "
                         "patient must sit on one side only: move their images to one set")


def check_subset(y: np.ndarray, label_names: list, regime: str):
    """A regime's real images hold both classes of every label, or no probe can be fitted on them."""
    for column, name in enumerate(label_names):
        if y[:, column].all() or not y[:, column].any():
            raise SplitError(f"{arg('real_sizes')} {regime}: a fold's {regime} real images hold one class of "
                             f"{name!r} only; choose larger sizes")
