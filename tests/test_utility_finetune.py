"""`--classifier finetune`: one training step against a hand-written step on torchxrayvision's own DenseNet, early
stopping, seeded reproducibility, the command end to end on planted images, and its one-line refusals. A tiny
DenseNet (two dense blocks of one layer) keeps a run to seconds; the code is the same at DenseNet-121's size."""
import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchxrayvision as xrv
from PIL import Image
from safetensors.torch import save_file

from conftest import randomize_
from medti import utility
from medti.downstream import finetune
from minisd import densenet_load
from minisd.densenet import DenseNet, DenseNetConfig

TINY = DenseNetConfig(growth_rate=4, block_config=(1, 1), num_init_features=8, bn_size=2)


def _batch(n: int, seed: int, size: int = 64) -> tuple:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, size, size, generator=g) * 500, (torch.rand(n, 2, generator=g) < 0.5).float()


def test_a_training_step_equals_one_on_torchxrayvisions_densenet():
    ours = randomize_(finetune.Finetune(finetune.Settings(config=TINY)).new(2, seed=0))
    ref = xrv.models.DenseNet(growth_rate=4, block_config=(1, 1), num_init_features=8, bn_size=2, num_classes=2)
    ref.load_state_dict(ours.state_dict())
    x, y = _batch(4, 1)
    ours.train(), ref.train()
    opt = torch.optim.AdamW(ours.parameters(), lr=1e-4, weight_decay=1e-5)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-4, weight_decay=1e-5)
    loss = finetune.train_step(ours, opt, x, y)
    # the hand-written step: xrv's forward (features2, then its classifier), BCE on the logits, AdamW
    ref_opt.zero_grad()
    ref_loss = F.binary_cross_entropy_with_logits(ref(x), y)
    ref_loss.backward()
    grads = {name: p.grad.clone() for name, p in ref.named_parameters()}
    ref_opt.step()
    # float32 rounding only: xrv pools with adaptive_avg_pool2d, ours with a mean, summed in another order
    assert loss == pytest.approx(ref_loss.item(), rel=1e-5)
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(ours.state_dict(), ref.state_dict(), rtol=1e-5, atol=1e-7)


def test_early_stopping_stops_after_patience_and_restores_the_best_epoch():
    model = finetune.Finetune(finetune.Settings(config=TINY)).new(2, seed=0)
    x, y = _batch(20, 2, size=32)
    script, states = iter([0.5, 0.7, 0.9, 0.8, 0.85, 0.6, 0.95]), []

    def score(scores, labels):   # the validation AUC, scripted; remembers the weights each epoch ended with
        states.append(copy.deepcopy(model.state_dict()))
        return next(script)

    settings = finetune.Settings(config=TINY, epochs=7, patience=3, batch=4)
    trained, history = finetune.train(model, x.half().numpy(), y.bool().numpy(), [f"p{i}" for i in range(20)],
                                      settings, seed=0, score=score)
    assert history == [0.5, 0.7, 0.9, 0.8, 0.85, 0.6]   # three epochs without beating 0.9: stopped before 0.95
    torch.testing.assert_close(trained.state_dict(), states[2], rtol=0, atol=0)   # epoch 3's weights, exactly
    assert not torch.equal(states[2]["classifier.weight"], states[5]["classifier.weight"])   # it did move on


def test_same_seed_same_scores():
    x, y = _batch(16, 3, size=32)
    x, y = x.half().numpy(), y.bool().numpy()
    patients = [f"p{i}" for i in range(16)]
    fit = finetune.Finetune(finetune.Settings(config=TINY, epochs=2, batch=4))
    first, again, other = (fit.fit(x, y, patients, seed).scores(x) for seed in (3, 3, 4))
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)   # the seed is what makes them equal


def test_pretrain_continues_the_synthetic_network_and_leaves_it_alone():
    """towards() (the pretrain setting's second stage) starts from the synthetic network's trained weights, head
    included, not from a new network; and trains a copy, so the synthetic network stays as it was for the other
    folds. With lr 0 one epoch changes no weight (AdamW's decay is lr x weight decay; only the batch norms' running
    statistics move, as they do in any training epoch), so the weights must be the start's exactly, while fit() from
    the same seed is a new network."""
    x, y = _batch(16, 5, size=32)
    x, y = x.half().numpy(), y.bool().numpy()
    patients = [f"p{i}" for i in range(16)]
    trained = finetune.Finetune(finetune.Settings(config=TINY, epochs=2, batch=4)).fit(x, y, patients, 1)
    before = {name: p.detach().clone() for name, p in trained.model.named_parameters()}
    frozen = finetune.Finetune(finetune.Settings(config=TINY, epochs=1, batch=4, lr=0.0))
    continued = frozen.towards(trained, x, y, patients, 2)
    after, start = dict(continued.model.named_parameters()), dict(trained.model.named_parameters())
    for name, value in before.items():
        assert torch.equal(after[name], value), name
        assert torch.equal(start[name], value), name   # the start was not trained in place
    fresh = frozen.fit(x, y, patients, 2)
    assert not np.array_equal(fresh.scores(x), continued.scores(x))


def _discs(folder, n: int, seed: int, bright: bool):
    """n grey images with a disc of random place and size: bright on dark for one class, dim for the other."""
    folder.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(seed)
    rows, cols = np.mgrid[:48, :48]
    for i in range(n):
        cy, cx, r = g.uniform(16, 32), g.uniform(16, 32), g.uniform(8, 14)
        disc = (rows - cy) ** 2 + (cols - cx) ** 2 < r ** 2
        image = 30 + g.normal(0, 8, (48, 48)) + disc * (180 if bright else 40)
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(folder / f"d{i:02d}.png")


def _classes(root, n: int, seed: int):
    _discs(root / "dark", n, seed, False)
    _discs(root / "bright", n, seed + 1, True)
    return root


def test_finetune_end_to_end_on_planted_discs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(densenet_load, "RELEASE_CONFIG", TINY)   # the tiny network stands in for DenseNet-121
    torch.manual_seed(0)
    weights = tmp_path / "xrv-tiny.safetensors"   # torchxrayvision's layout: an 18-pathology head, replaced
    save_file(randomize_(DenseNet(DenseNetConfig(**{**TINY.__dict__, "num_classes": 18}))).state_dict(), weights)
    real, test = _classes(tmp_path / "real", 12, 0), _classes(tmp_path / "test", 8, 10)
    synthetic, out = _classes(tmp_path / "synthetic", 6, 20), tmp_path / "out"
    argv = ["--real", real, "--test", test, "--out", out, "--classifier", "finetune", "--encoder", f"xrv={weights}",
            "--synthetic", synthetic, "--ratios", "1", "--real-sizes", "all", "--folds", "2", "--epochs", "15",
            "--patience", "5", "--batch", "4", "--lr", "3e-3", "--device", "cpu"]   # lr: seconds, not minutes
    assert utility.main([str(a) for a in argv]) == 0
    assert "--classifier finetune on a CPU: at most" in capsys.readouterr().err   # the cost, said first
    report = json.loads((out / "report.json").read_text())
    assert report["classifier"] == "finetune" and report["weights_sha256"] and report["regimes"] == ["all"]
    assert report["settings"] == ["real", "synthetic", "mixed 1:1", "pretrain"]
    assert report["table"]["cells"]["real"]["all"]["macro"]["auc_mean"] > 0.9
    assert "each network fine-tuned" in (out / "report.md").read_text()


def _error(capsys, *argv) -> str:
    assert utility.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    return err


def test_finetune_refusals(tmp_path, capsys):
    real = _classes(tmp_path / "real", 3, 0)
    base = ["--real", real, "--out", tmp_path / "out", "--classifier", "finetune", "--settings", "real"]
    err = _error(capsys, *base, "--encoder", "rad-dino=microsoft/rad-dino")
    assert "--encoder rad-dino=microsoft/rad-dino: --classifier finetune trains torchxrayvision's DenseNet-121" in err
    err = _error(capsys, *base, "--epochs", "0")
    assert "--epochs 0 / --patience 5 / --lr 0.0001: finetune needs at least 1 epoch" in err
    err = _error(capsys, *base, "--encoder", f"xrv={tmp_path / 'none.pt'}")
    assert f"xrv={tmp_path / 'none.pt'}: no such file" in err
