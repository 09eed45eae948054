"""`python -m medti.evaluate --run`: each saved step of a training run generated and scored, against the same
figures computed by hand (medti.generate into a folder, then `medti.evaluate --fake` on that folder)."""
import json

import pytest
import torch
from safetensors.torch import save_file
from test_evaluate import _error, _write_set

import minisd
from medti import evaluate, generate
from medti.files import embedding_file as E
from minisd.load import state_dict

CONFIG = {"unet": {"model_channels": 32, "channel_mult": [1, 2], "attention_resolutions": [1],
                   "num_head_channels": 16, "context_dim": 32},
          "vae": {"ch": 32, "ch_mult": [1, 2, 2, 2]}, "text": {"width": 32, "layers": 3, "heads": 2},
          "resolution": 64}
COMMON = ["--n", "4", "--steps", "2", "--kid-subset-size", "4", "--kid-subsets", "3", "--device", "cpu"]


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """A tiny random model and a 'run' with two saved steps (random vectors) and a log with val_loss."""
    root = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    sd = minisd.build(minisd.load_config(CONFIG), device="cpu")
    save_file(state_dict(sd),
              str(root / "tiny.safetensors"))
    (root / "tiny.json").write_text(json.dumps(CONFIG))
    run = root / "runs"
    run.mkdir()
    for step, seed in ((10, 1), (20, 2)):
        vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(seed))
        E.write(run / f"lesion-{step}.safetensors", E.Embedding("<lesion>", vectors, {"base_model": "unused"}))
    (run / "lesion.safetensors").write_bytes((run / "lesion-20.safetensors").read_bytes())   # not a step file
    (run / "log.jsonl").write_text('{"step": 10, "loss": 1.0, "val_loss": 0.5}\n{"step": 20, "loss": 0.9}\n')
    return root


def test_each_step_equals_generate_then_evaluate(run_folder, inception_file, tmp_path):
    model = ["--model", str(run_folder / "tiny.safetensors"), "--config", str(run_folder / "tiny.json")]
    real = _write_set(tmp_path / "real", 5, seed=7)
    out = tmp_path / "scores"
    assert evaluate.main(["--run", str(run_folder / "runs"), "--real", str(real), "--out", str(out),
                          "--inception", str(inception_file), *model, *COMMON]) == 0
    rows = json.loads((out / "steps.json").read_text())
    assert [r["step"] for r in rows] == [10, 20] and [r["val_loss"] for r in rows] == [0.5, None]
    assert (out / "kid.png").is_file() and "lowest KID at step" in (out / "steps.md").read_text()
    # by hand: the same generation, then evaluate on the folder; identical arithmetic, so equal figures
    by_hand = tmp_path / "by-hand"
    assert generate.main([*model, "--embeddings", str(run_folder / "runs" / "lesion-10.safetensors"), "--prompt",
                          "<lesion>", "--n", "4", "--seed", "0", "--steps", "2", "--sampler", "dpmpp_2m",
                          "--device", "cpu", "--out", str(by_hand)]) == 0
    assert evaluate.main(["--real", str(real), "--fake", str(by_hand), "--out", str(tmp_path / "rep"),
                          "--inception", str(inception_file), *COMMON[4:]]) == 0
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    for key in ("fid", "kid", "kid_mean", "kid_std", "precision", "recall"):
        assert rows[0][key] == report[key], key
    assert rows[0]["fid"] != rows[1]["fid"]   # the two steps' vectors differ, so their images do
    # a re-run into the same folder reuses the images (generation resumes) and gives the same table
    before = (out / "step-10" / "00000.png").stat().st_mtime_ns
    assert evaluate.main(["--run", str(run_folder / "runs"), "--real", str(real), "--out", str(out),
                          "--inception", str(inception_file), *model, *COMMON]) == 0
    assert json.loads((out / "steps.json").read_text()) == rows
    assert (out / "step-10" / "00000.png").stat().st_mtime_ns == before


def test_run_errors_are_one_line(run_folder, inception_file, tmp_path, capsys):
    real = _write_set(tmp_path / "real", 5, seed=7)
    base = ["--real", str(real), "--inception", str(inception_file), *COMMON]
    (tmp_path / "no-steps").mkdir()
    cases = [(["--run", str(tmp_path / "no-steps"), "--out", str(tmp_path / "o")], "no <name>-<step>.safetensors"),
             (["--run", str(run_folder / "runs"), "--out", str(run_folder / "runs" / "eval")], "is inside --run"),
             (["--run", str(run_folder / "runs"), "--fake", str(real), "--out", str(tmp_path / "o")],
              "exclude each other"),
             (["--run", str(run_folder / "runs")], "--out DIR is needed with --run"),
             (["--run", str(run_folder / "runs"), "--out", str(tmp_path / "o")], "unused")]   # base model missing
    for argv, words in cases:
        assert evaluate.main([*argv, *base]) == 2
        assert words in _error(capsys)
