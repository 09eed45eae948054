"""The samplers through `python -m medti.generate`: every registered sampler with each step schedule it offers
runs, names itself in the PNG as A1111 does, and equals the pipeline called directly (bit for bit: the CLI adds
no arithmetic). Combinations without a diffusers reference are refused in one line. The numbers themselves are
compared with diffusers in test_sampling.py."""
import pytest
import torch
from PIL import Image
from test_generate import generate, model_files  # noqa: F401 (the fixture is used by name)

import minisd
from medti.generate import main
from medti.generation.pipeline import SampleSettings, sample
from minisd.sampling import SAMPLERS, UNSUPPORTED
from minisd.schedule import SPACINGS

OFFERED = [(s, sp) for s in SAMPLERS for sp in SPACINGS[SAMPLERS[s].family] if (s, sp) not in UNSUPPORTED]


@pytest.mark.parametrize("sampler,spacing", [("dpmpp_2m", "karras"), ("ddim", "leading"), ("euler", "karras"),
                                             ("dpmpp_2m", "kdiffusion")])
def test_cli_runs_each_sampler_and_records_it(model_files, tmp_path, sampler, spacing):  # noqa: F811
    out = tmp_path / "out"
    assert generate(model_files, out, "--prompt", "chest x-ray", "--sampler", sampler, "--sigmas", spacing,
                    "--save-latents") == 0
    text = Image.open(out / "00000.png").text["parameters"]
    assert f"Sampler: {SAMPLERS[sampler].a1111}," in text and f"Sigmas: {spacing}" in text
    assert ("Schedule type: Karras" in text) == (spacing == "karras")
    from safetensors.torch import load_file
    saved = load_file(str(out / "00000.safetensors"))["latent"]
    model, config = model_files
    sd = minisd.load(model, config=config)
    from minisd.packing import pack_convs
    pack_convs(sd.unet), pack_convs(sd.vae)   # as the CLI does on the CPU
    ref = sample(sd, sd.text(["chest x-ray"]), sd.text([""]), [1.0], [0],
                 SampleSettings(width=64, height=64, steps=3, sampler=sampler, sigmas=spacing))
    assert torch.equal(saved, ref[0])


@pytest.mark.parametrize("sampler,spacing", [("ddim", "karras"), ("euler_a", "karras"), ("ddim", "kdiffusion")])
def test_untested_combinations_are_refused(model_files, tmp_path, capsys, sampler, spacing):  # noqa: F811
    assert generate(model_files, tmp_path / "o", "--prompt", "x", "--sampler", sampler, "--sigmas", spacing) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --sigmas {spacing} is not offered with --sampler {sampler}") and "\n" not in err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").glob("*.png"))


def test_help_lists_every_sampler(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert all(name in text for name in SAMPLERS) and all(spacing in text for _, spacing in OFFERED)
