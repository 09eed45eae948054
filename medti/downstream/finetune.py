"""`--classifier finetune`: a DenseNet-121 trained end to end per setting, regime and fold, with a fresh head.

The protocol is the one DiNO-Diffusion (Jha et al. 2024, "DiNO-Diffusion: Scaling Medical Diffusion via
Self-Supervised Pre-Training") reports for its downstream classifiers: a DenseNet-121 started from
torchxrayvision's `densenet121-res224-all` weights, AdamW with lr 1e-4 and weight decay 1e-5, and early stopping on
the validation AUC. The validation images are one fifth of each training set's patients (VALIDATION_FOLDS), split by
patient and class as medti.downstream.splits.folds splits the folds, so no patient validates and trains. Training
stops after `patience` epochs without a better validation AUC (or at `epochs`) and the weights of the best epoch are
restored. The loss is binary cross-entropy per label column (a multi-label head, as torchxrayvision's own).

Images arrive prepared by minisd.densenet.prepare (grey, [-1024, 1024], centre crop, 224) as float16
[N, 1, 224, 224] (prepared_images): 100 KB per image, 200 MB for 2,000. Why float16 is enough: 8-bit grey levels
are 8.03 apart in that range, float16's rounding there is at most 0.5.
"""
import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from minisd import densenet, densenet_load
from minisd.densenet import DenseNet, DenseNetConfig
from minisd.errors import UserError, arg

from . import splits
from .stats import auc

VALIDATION_FOLDS = 5   # one fold of five validates: 20 % of a training set's patients


@dataclass(frozen=True)
class Settings:
    """How each network trains (the command's flags)."""
    weights: str | None = None   # torchxrayvision weights as tensors (minisd.densenet_load); None: a random start
    epochs: int = 30             # at most this many passes over the training images
    patience: int = 5            # epochs without a better validation AUC before stopping
    batch: int = 32
    device: str = "cpu"
    lr: float = 1e-4
    weight_decay: float = 1e-5
    config: DenseNetConfig | None = None   # None: the release's (densenet_load.RELEASE_CONFIG); tests shrink it


def prepared_images(images: list) -> np.ndarray:
    """uint8 images [3, H, W] (any sizes) -> float16 [N, 1, 224, 224], prepared one at a time (peak memory: one)."""
    out = np.empty((len(images), 1, densenet.INPUT_SIZE, densenet.INPUT_SIZE), np.float16)
    for i, image in enumerate(images):
        out[i] = densenet.prepare(image[None]).numpy()
    return out


def xrv_init_(model: DenseNet) -> DenseNet:
    """torchxrayvision's DenseNet initialisation (its __init__ loop): He-normal convolutions, batch norm 1 and 0,
    linear biases 0; the random start of a run without weights."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.constant_(module.weight, 1)
            nn.init.constant_(module.bias, 0)
        elif isinstance(module, nn.Linear):
            nn.init.constant_(module.bias, 0)
    return model


def logits(model: DenseNet, x: torch.Tensor) -> torch.Tensor:
    """[N, 1, 224, 224] -> [N, L]: the head on the features, as xrv's DenseNet.forward without op_threshs."""
    return model.classifier(model(x))


def train_step(model: DenseNet, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    """One AdamW step on a batch; y float [N, L] in {0, 1}. Returns the loss before the step."""
    opt.zero_grad(set_to_none=True)
    loss = F.binary_cross_entropy_with_logits(logits(model, x), y)
    loss.backward()
    opt.step()
    return loss.item()


@torch.no_grad()
def predict(model: DenseNet, x: np.ndarray, batch: int) -> np.ndarray:
    """float64 [N, L] logits of prepared images, batch norm from its running statistics."""
    model.eval()
    device = next(model.parameters()).device
    parts = [logits(model, torch.from_numpy(x[i:i + batch]).to(device, torch.float32)).double().cpu()
             for i in range(0, len(x), batch)]
    return torch.cat(parts).numpy()


def validation_score(scores: np.ndarray, y: np.ndarray) -> float:
    """Mean validation AUC over the labels with both classes among the validation images; where no label has
    both (a tiny set), minus the mean cross-entropy, so early stopping still has something to follow."""
    aucs = [auc(scores[:, j], y[:, j]) for j in range(y.shape[1]) if 0 < y[:, j].sum() < len(y)]
    if aucs:
        return float(np.mean(aucs))
    return -float(F.binary_cross_entropy_with_logits(torch.from_numpy(scores), torch.from_numpy(y * 1.0)))


def validation_split(patients: list, y: np.ndarray, seed: int) -> tuple:
    """(training rows, validation rows): fold 0 of VALIDATION_FOLDS patient-grouped, class-stratified folds."""
    k = min(VALIDATION_FOLDS, len(set(patients)))
    if k < 2:
        raise UserError(f"{arg('real_sizes')}: a training set of one patient cannot spare one to validate "
                        "early stopping; choose larger sizes")
    fold_of = np.asarray(splits.folds(patients, y, k, seed))
    return np.flatnonzero(fold_of != 0), np.flatnonzero(fold_of == 0)


def train(model: DenseNet, x: np.ndarray, y: np.ndarray, patients: list, settings: Settings, seed: int,
          score=validation_score) -> tuple:
    """(the model at its best validation epoch, in eval mode; validation score per epoch run). x: prepared float16
    [N, 1, 224, 224]; y bool [N, L]. `score(scores, y)`: the early-stopping criterion (tests script it)."""
    fit_rows, val_rows = validation_split(patients, y, seed)
    device = next(model.parameters()).device
    target = torch.from_numpy(y[fit_rows] * 1.0).float()
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    order = torch.Generator().manual_seed(seed)
    best, best_state, waited, history = -np.inf, None, 0, []
    for _ in range(settings.epochs):
        model.train()
        for batch in torch.randperm(len(fit_rows), generator=order).split(settings.batch):
            images = torch.from_numpy(x[fit_rows[batch.numpy()]]).to(device, torch.float32)
            train_step(model, opt, images, target[batch].to(device))
        history.append(score(predict(model, x[val_rows], settings.batch), y[val_rows]))
        if history[-1] > best:
            best, best_state, waited = history[-1], copy.deepcopy(model.state_dict()), 0
        else:
            waited += 1
            if waited >= settings.patience:
                break
    model.load_state_dict(best_state)
    return model.eval(), history


@dataclass
class Finetuned:
    """A trained network as the harness scores it: scores(prepared images) -> float64 [N, L] logits."""
    model: DenseNet
    batch: int

    def scores(self, x: np.ndarray) -> np.ndarray:
        return predict(self.model, x, self.batch)


class Finetune:
    """The harness's classifier (as harness.LinearProbe): fit() a new network, towards() continues a trained one
    (pretrain: synthetic first, then real with the same early stopping)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.config = settings.config or densenet_load.RELEASE_CONFIG
        # the weights are read once, checked by densenet_load, and copied into every new network
        self.start = densenet_load.load_densenet(settings.weights, self.config).state_dict() \
            if settings.weights else None

    def new(self, labels: int, seed: int) -> DenseNet:
        """A DenseNet-121 from the weights (or xrv's random initialisation) with a fresh [labels] head."""
        with torch.random.fork_rng(devices=[]):   # seeded without moving the caller's global generator
            torch.manual_seed(seed)
            model = xrv_init_(DenseNet(self.config))
            if self.start is not None:
                model.load_state_dict(self.start)
            model.classifier = nn.Linear(model.feature_dim, labels)   # fresh head, torch's default init
            nn.init.constant_(model.classifier.bias, 0)
        return model.to(self.settings.device).requires_grad_(True)

    def fit(self, x, y, patients, seed: int) -> Finetuned:
        model = self.new(y.shape[1], seed)
        return Finetuned(train(model, x, y, patients, self.settings, seed)[0], self.settings.batch)

    def towards(self, start: Finetuned, x, y, patients, seed: int) -> Finetuned:
        model = copy.deepcopy(start.model).requires_grad_(True)
        return Finetuned(train(model, x, y, patients, self.settings, seed)[0], self.settings.batch)
