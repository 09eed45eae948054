"""`python -m medti.utility` end to end on tiny image folders (DINOv2 with random weights, as
tests/test_evaluate_features.py), and its one-line refusals, each before any network loads."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_data_dicom_series import _series
from transformers import Dinov2Config, Dinov2Model

from conftest import randomize_
from medti import utility


def _images(folder, n: int, seed: int, bright: bool = False):
    """n smooth random grey images; `bright` ones are lighter, so a probe can tell the two classes apart."""
    folder.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(seed)
    for i in range(n):
        low = g.random((5, 5)) * 0.5 + (0.5 if bright else 0.0)
        Image.fromarray((low * 255).astype(np.uint8)).resize((28, 28), Image.BICUBIC).save(folder / f"i{i:02d}.png")
    return folder


def _classes(root, n: int, seed: int):
    _images(root / "healthy", n, seed)
    _images(root / "sick", n, seed + 1, bright=True)
    return root


def _error(capsys, *argv) -> str:
    assert utility.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    return err


@pytest.fixture
def dinov2(tmp_path):
    folder = tmp_path / "dinov2-random"
    torch.manual_seed(0)
    randomize_(Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, patch_size=14,
                                        image_size=28))).save_pretrained(folder)
    return folder


def test_end_to_end_and_a_rerun_reuses_every_feature(tmp_path, dinov2, capsys):
    real, syn, test = (_classes(tmp_path / n, k, s) for n, k, s in (("real", 10, 0), ("syn", 12, 10),
                                                                    ("test", 6, 20)))
    out = tmp_path / "out"
    argv = ["--real", real, "--synthetic", syn, "--test", test, "--out", out, "--features", "dinov2", "--dinov2",
            dinov2, "--real-sizes", "6,all", "--ratios", "1", "--folds", "2"]
    assert utility.main([str(a) for a in argv]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["settings"] == ["real", "synthetic", "mixed 1:1", "pretrain"] and report["regimes"] == ["6", "all"]
    assert report["labels"] == ["healthy", "sick"] and report["features_reused"] == 0
    cell = report["table"]["cells"]["mixed 1:1"]["6"]["macro"]
    assert 0 <= cell["ci95"][0] <= cell["ci95"][1] <= 1 and 0 < cell["p_vs_real"] <= 1
    split = json.loads((out / "split.json").read_text())
    assert sorted(p for fold in split["folds"] for p in fold) == sorted({p for fold in split["folds"] for p in fold})
    assert all(set(split["regimes"]["6"][k]) <= set(split["regimes"]["all"][k]) for k in range(2))
    text = "".join((out / f).read_text() for f in ("report.json", "report.md", "split.json"))
    assert str(tmp_path) not in text and "i00.png" not in text   # pseudonyms only
    assert (out / "gain.png").is_file() and "mixed 1:1" in (out / "report.md").read_text()
    assert utility.main([str(a) for a in argv]) == 0
    again = json.loads((out / "report.json").read_text())
    assert again["features_reused"] == 10 * 2 + 12 * 2 + 6 * 2   # every image's features from the cache
    assert again["table"] == report["table"]   # and the same figures


def _csv(path, rows):
    path.write_text("\n".join(",".join(map(str, r)) for r in rows) + "\n")
    return path


def test_refusals_name_the_file_or_flag(tmp_path, capsys):
    real = _classes(tmp_path / "real", 4, 0)
    out = ["--out", tmp_path / "out"]
    flat = _images(tmp_path / "flat", 6, 3)
    rows = [["file", "sick"]] + [[f"i{i:02d}.png", i % 2] for i in range(6)]
    err = _error(capsys, "--real", flat, "--labels", _csv(tmp_path / "a.csv", rows[:-1]), "--settings", "real", *out)
    assert "a.csv: no row for i05.png" in err   # a label CSV missing an image
    err = _error(capsys, "--real", flat, "--labels", _csv(tmp_path / "b.csv", rows + [["zz.png", 1]]), "--settings",
                 "real", *out)
    assert "b.csv: names zz.png, which no set holds" in err   # ... or naming an unknown one
    err = _error(capsys, "--real", flat, "--labels", _csv(tmp_path / "c.csv", rows[:1] + [[r[0], 0] for r in rows[1:]]),
                 "--settings", "real", *out)
    assert "--labels: label 'sick' has no positive case in --real" in err   # one class only
    _images(tmp_path / "one" / "healthy", 4, 5)
    assert "one class only" in _error(capsys, "--real", tmp_path / "one", "--settings", "real", *out)
    test = _images(tmp_path / "test" / "healthy", 3, 7).parent
    err = _error(capsys, "--real", real, "--test", test, "--settings", "real", *out)
    assert "--test: label 'sick' has no positive case in the test set" in err   # a test set with no positive case
    err = _error(capsys, "--real", real, "--synthetic", flat, *out)
    assert "--synthetic: i00.png sits outside any class sub-folder, so it has no label" in err


def test_a_patient_in_train_and_test_is_refused(tmp_path, capsys):
    """Two DICOM series of one PatientID, one in --real and one in --test: the same person on both sides."""
    hu = (np.random.default_rng(0).random((3, 16, 16)) * 400).astype(np.int16)
    for root, k in (("real", 0), ("test", 1)):
        _series(tmp_path / root / "sick" / "ser", hu, seed=k, PatientID="P-7")
        _images(tmp_path / root / "healthy", 3, k)
    err = _error(capsys, "--real", tmp_path / "real", "--test", tmp_path / "test", "--settings", "real",
                 "--out", tmp_path / "out", "--slices", "all")
    assert "--test: 1 patient(s) have images in both --real and --test" in err
