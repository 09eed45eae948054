"""`python -m medti.evaluate` beyond the default network: FD-DINOv2 through the CLI, the antialiased resize of
torchmetrics 1.9 end to end, and the offline path when no Inception file is given or cached."""
import json

import numpy as np
import torch
from test_evaluate import _error, _uint8, _write_set
from transformers import Dinov2Config, Dinov2Model

from conftest import randomize_, rel_err
from medti import evaluate
from minisd import dinov2, dinov2_load, inception_load


class Features(torch.nn.Module):
    """A feature function as a torchmetrics `feature` module (it asks for `num_features`)."""

    def __init__(self, fn, model, dim):
        super().__init__()
        self.fn, self.model, self.num_features = fn, model, dim

    def forward(self, x):
        return self.fn(self.model, x)


def _fid(net, real, fake) -> float:
    from torchmetrics.image.fid import FrechetInceptionDistance
    fid = FrechetInceptionDistance(feature=net)
    fid.update(real, real=True)
    fid.update(fake, real=False)
    return float(fid.compute())


def test_dinov2_features_through_the_cli(tmp_path):
    """FD-DINOv2 from the CLI equals torchmetrics' FID on the same DINOv2 features (the network itself is tested
    against transformers and torch-fidelity's preparation in tests/test_dinov2.py)."""
    folder = tmp_path / "dinov2-small-random"
    torch.manual_seed(0)
    ref = randomize_(Dinov2Model(Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                              patch_size=14, image_size=98)))
    ref.save_pretrained(folder)
    real, fake = _write_set(tmp_path / "r", 6, seed=1), _write_set(tmp_path / "f", 6, seed=2)
    out = tmp_path / "o"
    assert evaluate.main(["--real", str(real), "--fake", str(fake), "--out", str(out), "--features", "dinov2",
                          "--dinov2", str(folder), "--kid-subset-size", "4"]) == 0
    report = json.loads((out / "report.json").read_text())
    # the local folder by its name: a report holds no path
    assert report["features"] == "dinov2 dinov2-small-random" and report["weights_official"] is None
    assert str(tmp_path) not in (out / "report.json").read_text() + (out / "report.md").read_text()
    want = _fid(Features(dinov2.features, dinov2_load.load_dinov2(folder), 64), _uint8(real), _uint8(fake))
    # The same float32 features on both sides, float64 statistics; torchmetrics' general (non-symmetric)
    # eigen-solver leaves rounding-level terms in the 58 null directions of 6 images in 64 dimensions (1.5e-6
    # relative measured here): 1e-5 relative. A wrong preparation moves the features by far more.
    assert rel_err(torch.tensor(report["fid"]), torch.tensor(want)) <= 1e-5
    # a statistics file saved before networks lost their paths (its network "dinov2 /path/to/folder") still reads
    stats = tmp_path / "real.npz"
    assert evaluate.main(["--real", str(real), "--save-stats", str(stats), "--features", "dinov2", "--dinov2",
                          str(folder)]) == 0
    with np.load(stats) as saved:
        arrays = {key: saved[key] for key in saved.files}
    np.savez(stats, **{**arrays, "network": np.array(f"dinov2 {folder}")})
    assert evaluate.main(["--real", str(stats), "--fake", str(fake), "--out", str(tmp_path / "again"), "--features",
                          "dinov2", "--dinov2", str(folder), "--kid-subset-size", "4"]) == 0
    assert json.loads((tmp_path / "again" / "report.json").read_text())["fid"] == report["fid"]


def test_antialias_equals_torchmetrics_19_default(inception_file, tmp_path):
    """--antialias is torchmetrics 1.9's default FID (NoTrainInceptionV3 with antialias=True) end to end. 1e-4
    relative: float32 features that agree to ~1e-6, in float64 statistics."""
    from torchmetrics.image.fid import NoTrainInceptionV3
    real, fake = _write_set(tmp_path / "r", 5, size=(96, 80), seed=1), _write_set(tmp_path / "f", 5, seed=2)
    out = tmp_path / "o"
    assert evaluate.main(["--real", str(real), "--fake", str(fake), "--out", str(out), "--inception",
                          str(inception_file), "--antialias", "--kid-subset-size", "4"]) == 0
    report = json.loads((out / "report.json").read_text())
    net = NoTrainInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(inception_file),
                             antialias=True)
    want = _fid(net, _uint8(real), _uint8(fake))
    assert rel_err(torch.tensor(report["fid"]), torch.tensor(want)) <= 1e-4 and "antialiased" in report["features"]


def test_offline_without_weights_says_what_to_fetch(tmp_path, monkeypatch, capsys):
    """No --inception and nothing in torch's hub cache, offline: one line with the file's address and the flag,
    before any image is encoded, and no --out folder left behind."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(inception_load, "hub_reachable", lambda url: False)
    real, fake = _write_set(tmp_path / "r", 4, seed=1), _write_set(tmp_path / "f", 4, seed=2)
    assert evaluate.main(["--real", str(real), "--fake", str(fake), "--out", str(tmp_path / "o")]) == 2
    err = _error(capsys)
    assert inception_load.URL in err and "--inception FILE" in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "torch").exists()
