"""The utility's untested paths: synthetic labels from a generation manifest (a prompt map, a variation's source in
--real, a folder of runs), the per-file synthetic CSV, a multi-label run end to end, --encoder as evaluate's, the
macro bootstrap against a direct computation, and gain.png's category ticks."""
import argparse
import json

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score
from test_utility_cli import _classes, _csv, _images, dinov2  # noqa: F401  (dinov2: a fixture)

from medti import utility
from medti.downstream import harness, inputs, labels, outputs, summary
from medti.files import plots
from medti.quality.folders import Reading


def _args(real, synthetic, synthetic_labels=None, labels=None) -> argparse.Namespace:
    return argparse.Namespace(real=str(real), test=None, synthetic=str(synthetic), labels=labels,
                              synthetic_labels=str(synthetic_labels) if synthetic_labels else None)


def _run(folder, records: list):
    """A generation run as medti.generate writes it: its images and manifest.jsonl (file, prompt, condition)."""
    _images(folder, len(records), 40)
    (folder / "manifest.jsonl").write_text("".join(json.dumps({"file": f"i{i:02d}.png", **r}) + "\n"
                                                   for i, r in enumerate(records)))
    return folder


def _labels(args):
    sets = inputs.read_inputs(args, harness.Plan(), Reading())
    names, y = sets.items["synthetic"][0].names, sets.items["synthetic"][1].y
    return {n: row.tolist() for n, row in zip(names, y, strict=True)}, sets.label_names


def test_prompt_map_labels_a_run_and_a_folder_of_runs(tmp_path):
    real = _classes(tmp_path / "real", 3, 0)
    prompts = ["a sick chest", "a healthy chest", "a sick chest"]
    run = _run(tmp_path / "run", [{"prompt": p} for p in prompts])
    table = tmp_path / "map.json"
    table.write_text(json.dumps({"a healthy chest": "healthy", "a sick chest": ["sick"]}))
    found, names = _labels(_args(real, run, table))
    assert names == ["healthy", "sick"]
    assert found == {f"i{i:02d}.png": [p == "a healthy chest", p == "a sick chest"] for i, p in enumerate(prompts)}
    # two runs side by side, one per prompt, given as their parent folder: each run's manifest labels its images
    _run(tmp_path / "runs" / "h", [{"prompt": "a healthy chest"}] * 2)
    _run(tmp_path / "runs" / "s", [{"prompt": "a sick chest"}] * 2)
    found, _ = _labels(_args(real, tmp_path / "runs", table))
    assert found == {f"{k}/i{i:02d}.png": [k == "h", k == "s"] for k in "hs" for i in range(2)}


def test_map_may_name_an_embedding_token_instead_of_each_prompt(tmp_path, capsys):
    """A textual-inversion run uses its token in many prompts: the map may name the token once. The record's
    "embeddings" (token -> sha256, as medti.generate writes it) gives the tokens; a prompt the map names wins."""
    real = _classes(tmp_path / "real", 3, 0)
    records = [{"prompt": "a chest x-ray of <sick>", "embeddings": {"<sick>": "0" * 64}},
               {"prompt": "<sick>, frontal view", "embeddings": {"<sick>": "0" * 64}},
               {"prompt": "a plain chest", "embeddings": {}}]
    run = _run(tmp_path / "run", records)
    table = tmp_path / "map.json"
    table.write_text(json.dumps({"<sick>": "sick", "a plain chest": "healthy"}))
    found, names = _labels(_args(real, run, table))
    assert names == ["healthy", "sick"]
    assert found == {"i00.png": [False, True], "i01.png": [False, True], "i02.png": [True, False]}
    table.write_text(json.dumps({"a plain chest": "healthy"}))   # the token unnamed: refused, not a negative
    with pytest.raises(labels.LabelError, match="i00.png has no label .neither its prompt nor an embedding token"):
        _labels(_args(real, run, table))


def test_a_variation_takes_its_sources_label(tmp_path):
    real = _classes(tmp_path / "real", 2, 0)
    sets = inputs.read_inputs(argparse.Namespace(real=str(real), test=None, synthetic=None, labels=None),
                              harness.Plan(settings=("real",)), Reading())
    image_set, real_labels = sets.items["real"][:2]
    source = {n: p for n, p in zip(image_set.names, image_set.pseudonyms, strict=True)}
    # a variation of each sick case, and one made from a prompt alone, labelled by the map
    records = [{"prompt": "", "condition": [{"pseudonym": source[f"sick/i{i:02d}.png"]}]} for i in range(2)]
    run = _run(tmp_path / "run", records + [{"prompt": "normal"}])
    table = tmp_path / "map.json"
    table.write_text(json.dumps({"normal": "healthy"}))
    found, _ = _labels(_args(real, run, table))
    assert found == {"i00.png": [False, True], "i01.png": [False, True], "i02.png": [True, False]}
    assert real_labels.names == ["healthy", "sick"]


def test_a_per_file_synthetic_csv_labels_each_image(tmp_path):
    real = _classes(tmp_path / "real", 3, 0)
    flat = _images(tmp_path / "syn", 4, 9)
    rows = [["file", "healthy", "sick"]] + [[f"i{i:02d}.png", int(i < 1), int(i >= 1)] for i in range(4)]
    found, _ = _labels(_args(real, flat, _csv(tmp_path / "syn.csv", rows)))
    assert found == {r[0]: [bool(r[1]), bool(r[2])] for r in rows[1:]}


def test_multi_label_end_to_end(tmp_path, dinov2):  # noqa: F811
    """Two labels from a CSV, some images positive for both: each label's AUC per fold, macro = their mean."""
    g = np.random.default_rng(3)
    rows = [["file", "effusion", "edema"]]
    for name, folder in (("real", 16), ("test", 10)):
        for i in range(folder):
            a, b = bool(i % 2), bool(i % 3 == 0)
            grey = (g.random((5, 5)) * 0.4 + 0.3 * a + 0.25 * b) * 255
            (tmp_path / name).mkdir(exist_ok=True)
            Image.fromarray(grey.astype(np.uint8)).resize((28, 28)).save(tmp_path / name / f"{name}{i:02d}.png")
            rows.append([f"{name}{i:02d}.png", int(a), int(b)])
    out = tmp_path / "out"
    argv = ["--real", tmp_path / "real", "--test", tmp_path / "test", "--labels", _csv(tmp_path / "l.csv", rows),
            "--settings", "real", "--out", out, "--features", "dinov2", "--encoder", dinov2, "--real-sizes", "all",
            "--folds", "2"]
    assert utility.main([str(a) for a in argv]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["labels"] == ["effusion", "edema"] and report["features"] == "dinov2 dinov2-random"
    cell = report["table"]["cells"]["real"]["all"]
    per_label = [cell["labels"][k]["auc_mean"] for k in report["labels"]]
    assert cell["macro"]["auc_mean"] == pytest.approx(np.mean(per_label), abs=1e-12)   # float sums only
    assert len(set(per_label)) == 2   # two labels scored apart, not one column twice
    assert "## edema" in (out / "report.md").read_text()


def test_encoder_kind_must_be_the_features(tmp_path, capsys):
    real = _classes(tmp_path / "real", 2, 0)
    for extra, words in ((["--encoder", "xrv=w.pth"], "--encoder xrv=...: --features does not name xrv"),
                         (["--dinov2", "a", "--encoder", "dinov2=b"], "--dinov2 and --encoder dinov2=... both")):
        assert utility.main(["--real", str(real), "--settings", "real", "--out", str(tmp_path / "o"),
                             "--features", "dinov2", *extra]) == 2
        assert words in capsys.readouterr().err


def test_macro_bootstrap_is_the_direct_computation(monkeypatch):
    """Several labels: the interval and p from the draws redone here, plainly, with scikit-learn's AUC."""
    draws = 200   # enough to compare the two computations draw for draw; the figure itself is not tested
    monkeypatch.setattr(summary, "DRAWS", draws)
    g = np.random.default_rng(5)
    patients = [f"p{i // 2}" for i in range(40)]
    y = np.repeat(g.random((20, 3)) < 0.5, 2, axis=0)
    a, b = g.normal(size=(40, 3)) + y, g.normal(size=(40, 3)) + 0.5 * y
    ci, p = summary._macro_bootstrap(a, b, y, patients, seed=11)
    keys = sorted(set(patients))
    rng = np.random.Generator(np.random.PCG64(11))
    macro, gains = [], []
    while len(gains) < draws:
        drawn = rng.integers(0, len(keys), len(keys))
        rows = [i for k in sorted(drawn) for i in range(40) if patients[i] == keys[k]]
        if any(len(set(y[rows, c])) < 2 for c in range(3)):
            continue
        one = np.mean([roc_auc_score(y[rows, c], a[rows, c]) for c in range(3)])
        two = np.mean([roc_auc_score(y[rows, c], b[rows, c]) for c in range(3)])
        macro.append(one)
        gains.append(one - two)
    gains = np.array(gains)
    want = max(2 * min((gains <= 0).mean(), (gains >= 0).mean()), 1 / draws)
    assert p == pytest.approx(want, abs=1e-12) and 0 < p < 1   # shares of the same draws: equal, up to float
    assert ci == pytest.approx(tuple(np.percentile(macro, [2.5, 97.5])), abs=1e-12)


def test_gain_plot_ticks_name_the_settings_and_never_overlap(tmp_path, monkeypatch):
    names, regimes = ["real", "synthetic", "mixed 1:1", "mixed 1:5", "mixed 1:10", "pretrain"], ["50", "all"]
    g = np.random.default_rng(0)
    cells = {s: {r: {"fold_gain": g.normal(0, 0.03, 5).tolist()} for r in regimes} for s in names}
    drawn = []
    monkeypatch.setattr(plots, "text", lambda draw, xy, words: drawn.append((xy, words)))
    outputs.gain_plot({"settings": names, "regimes": regimes, "table": {"cells": cells}}, tmp_path / "gain.png")
    below = [(xy, w) for xy, w in drawn if xy[1] > 400 - plots.BOTTOM - 40]   # under the frame
    assert sorted(w for _, w in below) == sorted(names[1:] * 2 + ["50 real", "all real"])   # no numbered ticks
    boxes = [(x, y, x + plots.text_width(w), y + 13) for (x, y), w in below]
    for i, one in enumerate(boxes):
        for two in boxes[i + 1:]:
            assert one[2] <= two[0] or two[2] <= one[0] or one[3] <= two[1] or two[3] <= one[1], (one, two)


def test_label_rows_put_a_colliding_label_in_the_next_row():
    assert plots.label_rows([0, 50, 30, 100], [40, 40, 40, 10]) == [0, 0, 1, 0]
