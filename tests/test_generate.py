"""`python -m medti.generate` end to end on a tiny random-weight model: determinism, per-image seeds, PNG
parameters, manifest, and one-line errors. The numbers themselves are checked against diffusers in
test_sampling.py; here the CLI's plumbing is under test."""
import json
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import minisd
from medti.generate import main
from minisd.load import PREFIXES

# tiny SD2-shaped model with the full CLIP vocabulary, so real prompts tokenize
GEN_CONFIG = {"unet": {"model_channels": 32, "channel_mult": [1, 2], "attention_resolutions": [1],
                       "num_head_channels": 16, "context_dim": 32},
              "vae": {"ch": 32, "ch_mult": [1, 2, 2, 2]},
              "text": {"width": 32, "layers": 3, "heads": 2},
              "resolution": 64}


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gen")
    torch.manual_seed(0)
    sd = minisd.build(minisd.load_config(GEN_CONFIG), device="cpu")
    state = {prefix + k: v for name, prefix in PREFIXES.items() for k, v in getattr(sd, name).state_dict().items()}
    save_file(state, str(folder / "tiny.safetensors"))
    (folder / "tiny.json").write_text(json.dumps(GEN_CONFIG))
    return folder / "tiny.safetensors", folder / "tiny.json"


def generate(model_files, out, *extra):
    model, config = model_files
    return main(["--model", str(model), "--config", str(config), "--steps", "3", "--out", str(out), *extra])


def test_same_seed_same_bytes_and_image_i_is_seed_plus_i(model_files, tmp_path):
    assert generate(model_files, tmp_path / "a", "--prompt", "chest x-ray", "--n", "3", "--seed", "7") == 0
    assert generate(model_files, tmp_path / "b", "--prompt", "chest x-ray", "--n", "3", "--seed", "7") == 0
    assert generate(model_files, tmp_path / "c", "--prompt", "chest x-ray", "--seed", "9") == 0
    for i in range(3):
        assert (tmp_path / "a" / f"{i:05d}.png").read_bytes() == (tmp_path / "b" / f"{i:05d}.png").read_bytes()
    assert (tmp_path / "a" / "00002.png").read_bytes() == (tmp_path / "c" / "00000.png").read_bytes()
    assert (tmp_path / "a" / "00000.png").read_bytes() != (tmp_path / "a" / "00001.png").read_bytes()


def test_png_parameters_and_manifest(model_files, tmp_path):
    assert generate(model_files, tmp_path, "--prompt", "a :0.3 AND b :70%", "--negative", "blurry",
                    "--cfg", "3", "--n", "2") == 0
    image = Image.open(tmp_path / "00001.png")
    assert image.size == (64, 64)
    lines = image.text["parameters"].splitlines()
    assert lines[0] == "a :0.3 AND b :70%" and lines[1] == "Negative prompt: blurry"
    assert "Steps: 3" in lines[2] and "Sampler: Euler a" in lines[2] and "Seed: 1" in lines[2]
    records = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert [r["file"] for r in records] == ["00000.png", "00001.png"]
    assert records[1]["seed"] == 1 and records[1]["cfg"] == 3.0 and len(records[1]["model_sha256"]) == 64


@pytest.mark.parametrize("extra,words", [
    (["--prompt", "<healthy> lungs"], "prompt token <healthy> matches no loaded embedding"),
    (["--prompt", "a dog:0.5x"], "a dog:0.5x"),
    (["--prompt", "x", "--size", "100"], "--size 100: must be a multiple of 64"),
    (["--prompt", "x", "--steps", "0"], "--steps must be at least 1"),
])
def test_errors_are_one_line_before_sampling(model_files, tmp_path, capsys, extra, words):
    assert generate(model_files, tmp_path, *extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and words in err
    assert not list(tmp_path.glob("*.png"))


def test_cli_error_has_no_traceback(model_files, tmp_path):
    model, config = model_files
    result = subprocess.run([sys.executable, "-m", "medti.generate", "--model", str(tmp_path / "missing.safetensors"),
                             "--config", str(config), "--prompt", "x", "--out", str(tmp_path / "o")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "no such file" in result.stderr
