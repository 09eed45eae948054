"""`python -m medti.generate` end to end on a tiny random-weight model: determinism, per-image seeds, PNG
parameters, manifest, and one-line errors. The numbers themselves are checked against diffusers in
test_sampling.py; here the CLI's plumbing is under test."""
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import minisd
from medti.generate import main
from minisd.load import state_dict
from minisd.packing import pack_convs

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
    state = state_dict(sd)
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
    (["--prompt", "x", "--size", "100"], "--size 100: must be a multiple of 16"),
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


def test_inpainting_cli_equals_pipeline(model_files, tmp_path):
    """The CLI's inpainting is medti.generation.pipeline.sample on the loaded image and mask (that function is compared
    with diffusers in test_pipeline.py); the kept region of the saved latent is the init latent's."""
    from medti.files.images import load_image, load_mask
    from medti.generation.pipeline import InitImage, SampleSettings, sample
    Image.fromarray((torch.rand(96, 96, 3, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy()
                    ).save(tmp_path / "init.png")
    mask = Image.new("L", (48, 48))    # any size with the same aspect; white = repaint
    mask.paste(255, (10, 10, 30, 40))
    mask.save(tmp_path / "mask.png")
    out = tmp_path / "out"
    assert generate(model_files, out, "--prompt", "chest x-ray", "--init-image", str(tmp_path / "init.png"),
                    "--mask", str(tmp_path / "mask.png"), "--mask-blur", "1.5", "--strength", "0.8", "--cfg", "2",
                    "--save-latents", "--seed", "3") == 0
    from safetensors.torch import load_file
    saved = load_file(str(out / "00000.safetensors"))["latent"]
    model, config = model_files
    sd = minisd.load(model, config=config)
    pack_convs(sd.unet), pack_convs(sd.vae)   # as the CLI does on the CPU unless --no-pack
    cond, uncond = sd.text(["chest x-ray"]), sd.text([""])
    init, m = load_image(tmp_path / "init.png", 64, 64), load_mask(tmp_path / "mask.png", 64, 64, 1.5)
    ref = sample(sd, cond, uncond, [1.0], [3], SampleSettings(width=64, height=64, cfg=2.0, steps=3),
                 InitImage(init, m, 0.8))
    assert torch.equal(saved, ref[0])
    assert 0 < m.mean() < 1


def test_sweep_grid_and_manifest(model_files, tmp_path):
    assert generate(model_files, tmp_path, "--sweep", "healthy lungs", "enlarged heart", "--weights", "0,0.5,1",
                    "--n", "2", "--grid") == 0
    records = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in records] == [0, 0, 0, 1, 1, 1]   # same seed along a row
    assert records[1]["prompt"] == "healthy lungs :0.5 AND enlarged heart :0.5"
    assert records[2]["prompt"] == "healthy lungs :0 AND enlarged heart :1"
    width, height = Image.open(tmp_path / "grid.png").size   # one column per weight, under a band naming A and B
    assert width == 3 * 64 and height > 2 * 64   # (the band itself: tests/test_generate_output.py)


def test_resume_after_a_dead_shard_equals_an_uninterrupted_run(model_files, tmp_path, monkeypatch, capsys):
    assert generate(model_files, tmp_path / "whole", "--prompt", "x", "--n", "4") == 0
    part = tmp_path / "part"
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")   # rank 0 of 2 alone: rank 1 "died" before making anything
    assert generate(model_files, part, "--prompt", "x", "--n", "4") == 0
    assert sorted(p.name for p in part.glob("*.png")) == ["00000.png", "00002.png"]
    assert not (part / "manifest.jsonl").exists()   # incomplete: nothing merged yet
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert generate(model_files, part, "--prompt", "x", "--n", "4") == 2   # a used folder needs --resume
    assert generate(model_files, part, "--prompt", "x", "--n", "4", "--resume") == 0
    assert (part / "manifest.jsonl").read_text() == (tmp_path / "whole" / "manifest.jsonl").read_text()
    for i in range(4):
        assert (part / f"{i:05d}.png").read_bytes() == (tmp_path / "whole" / f"{i:05d}.png").read_bytes()
    assert not list(part.glob("manifest.part*"))
    # other parameters: refused in one line naming each with the saved value and the new one
    capsys.readouterr()
    assert generate(model_files, part, "--prompt", "y", "--n", "4", "--steps", "4", "--seed", "5", "--resume") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "00000.png was made with other parameters: --prompt x (now y), --seed 0 (now 5), " \
        "--steps 3 (now 4); --resume continues the same run" in err, err


def test_a_refused_resume_names_files_by_their_hashes():
    """Fields nobody types (the files' sha256, the size read from the model) are named in words, hashes cut to 12
    digits; an old manifest without `format` is a PNG run (ADDED)."""
    from medti.generation.manifest import described
    a, b = "a" * 64, "b" * 64
    done = {"file": "00003.png", "seed": 10, "model_sha256": a, "embeddings": {"<t>": a}, "width": 64}
    planned = {**done, "seed": 3, "model_sha256": b, "embeddings": {}, "width": 128, "format": "dicom",
               "loras": [{"name": "x", "weight": 0.5, "sha256": b}]}
    assert described(done, planned, 0) == (   # image 3 had seed 10: the first run's --seed was 7
        "--embeddings <t> aaaaaaaaaaaa (now none), --format png (now dicom), LoRAs none (now x:0.5 bbbbbbbbbbbb), "
        "the --model file's sha256 aaaaaaaaaaaa (now bbbbbbbbbbbb), --seed 7 (now 0), image width 64 (now 128)")


def test_torchrun_two_processes(model_files, tmp_path):
    """Two CPU processes under torchrun make the same files as one process. torchrun runs each process with
    OMP_NUM_THREADS=1, and a different thread count changes float summation order (last-bit differences that
    can flip a pixel value), so the single-process reference runs with one thread too."""
    model, config = model_files
    args = ["--model", str(model), "--config", str(config), "--steps", "3", "--prompt", "x", "--n", "5"]
    one = subprocess.run([sys.executable, "-m", "medti.generate", *args, "--out", str(tmp_path / "one")],
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "medti.generate", "--", *args, "--out", str(tmp_path / "two")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "two" / "manifest.jsonl").read_text() == (tmp_path / "one" / "manifest.jsonl").read_text()
    for i in range(5):
        assert (tmp_path / "two" / f"{i:05d}.png").read_bytes() == (tmp_path / "one" / f"{i:05d}.png").read_bytes()


def test_embeddings_in_prompts_and_width_check(model_files, tmp_path, capsys):
    from medti.files import embedding_file as E
    E.export(E.Embedding("x", torch.randn(3, 32), {}), tmp_path / "lesion.pt", "a1111")   # token = file stem
    E.write(tmp_path / "sd1.safetensors", E.Embedding("<sd1>", torch.randn(2, 48), {}))
    assert generate(model_files, tmp_path / "a", "--prompt", "lesion in the lung",
                    "--embeddings", str(tmp_path / "lesion.pt")) == 0
    assert "lesion" in json.loads((tmp_path / "a" / "manifest.jsonl").read_text())["embeddings"]
    assert generate(model_files, tmp_path / "b", "--prompt", "x",
                    "--embeddings", str(tmp_path / "sd1.safetensors")) == 2
    assert "48 wide" in capsys.readouterr().err


@pytest.mark.parametrize("extra,words", [
    (["--init-image", "{tmp}/nope.png"], "nope.png: not a readable image"),
    (["--init-image", "{tmp}/wide.png"], "a different aspect"),
    (["--init-image", "{tmp}/square.png", "--mask", "{tmp}/wide.png"], "wide.png: the mask is 80x40"),
    (["--mask", "{tmp}/wide.png"], "--mask and --strength < 1 need --init-image"),
    (["--out", "{tmp}/file.txt/sub"], "cannot write there"),
])
def test_image_and_output_errors(model_files, tmp_path, capsys, extra, words):
    (tmp_path / "nope.png").write_text("not an image")
    (tmp_path / "file.txt").write_text("")
    Image.new("RGB", (80, 40)).save(tmp_path / "wide.png")
    Image.new("I;16", (64, 64)).save(tmp_path / "square.png")
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    model, config = model_files
    out = [] if "--out" in extra else ["--out", str(tmp_path / "o")]
    assert main(["--model", str(model), "--config", str(config), "--prompt", "x", *out, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and words in err, err


def test_bf16_and_kdiffusion_euler_run(model_files, tmp_path):
    """The reduced-precision path and the other sampler/schedule run end to end (their maths is checked in
    test_sampling.py; here: flags reach the pipeline and the output is recorded)."""
    assert generate(model_files, tmp_path, "--prompt", "x", "--dtype", "bf16", "--sampler", "euler",
                    "--sigmas", "kdiffusion", "--width", "64", "--height", "32") == 0
    assert Image.open(tmp_path / "00000.png").size == (64, 32)
    rec = json.loads((tmp_path / "manifest.jsonl").read_text())
    assert (rec["sampler"], rec["sigmas"], rec["width"], rec["height"]) == ("euler", "kdiffusion", 64, 32)


def test_packed_default_and_no_pack_agree(model_files, tmp_path, monkeypatch):
    """On the CPU the CLI packs the conv weights (minisd.packing) unless --no-pack; both give the same latents to
    fp32 rounding (bound: test_sampling.py's 1e-4; the packed networks are compared with diffusers in
    test_packing.py)."""
    import medti.generation.run as G
    from conftest import rel_err
    packed = []
    monkeypatch.setattr(G, "pack_convs", lambda module: packed.append(module) or pack_convs(module))
    from safetensors.torch import load_file
    latents = {}
    for name, extra in (("packed", ()), ("plain", ("--no-pack",))):
        assert generate(model_files, tmp_path / name, "--prompt", "chest x-ray", "--save-latents", *extra) == 0
        latents[name] = load_file(str(tmp_path / name / "00000.safetensors"))["latent"]
        assert len(packed) == 2   # UNet and VAE, on the first run only
    err = rel_err(latents["packed"], latents["plain"])
    assert err <= 1e-4, f"packed vs plain CLI latents: relative error {err:.2e}"
