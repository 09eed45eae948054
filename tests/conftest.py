"""Shared test helpers: references are diffusers/transformers modules with random weights, converted to the
official layout by tools/convert_diffusers.py and loaded through minisd.load."""
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

import minisd
from medti.cli import default_threads

ROOT = Path(__file__).resolve().parent.parent
# The commands set torch's thread count (medti.cli.default_threads); the test process uses the same rule, so a
# command called in-process and the pieces it is compared with bit for bit run with one thread count.
torch.set_num_threads(default_threads())
sys.path.insert(0, str(ROOT / "tools"))
from convert_diffusers import PREFIXES, convert_text, convert_unet, convert_vae  # noqa: E402 (tools/: no package)


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter a random value, norm affines included (their defaults 1/0 would hide a swapped
    weight and bias), keeping the library's weight init so activations stay in a sensible range."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            elif p.ndim == 1:
                p.copy_(0.2 * noise)
            else:
                p.add_(0.1 * p.std().nan_to_num(0.02) * noise)
    return module.eval()


MEASURED: dict = {}   # test id -> largest relative error it measured, printed at the end of the run


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| relative to the reference's output scale (its max |value|)."""
    err = ((ours.double() - ref.double()).abs().max() / ref.double().abs().max()).item()
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
    MEASURED[test] = max(err, MEASURED.get(test, 0.0))
    return err


def pytest_terminal_summary(terminalreporter):
    """Print what each reference comparison measured, so the tolerances' margins are visible in every run."""
    if MEASURED:
        terminalreporter.section("measured relative errors (ours vs reference)")
        for test, err in sorted(MEASURED.items()):
            terminalreporter.write_line(f"{err:9.1e}  {test}")


# Tiny SD2-shaped configs: 4 levels with cross-attention on the first three, linear projections, fixed head
# width (16 here, 64 in SD2), 32 groups in every GroupNorm.
TINY_UNET = dict(sample_size=16, block_out_channels=(32, 64, 64, 64), layers_per_block=2,
                 attention_head_dim=(2, 4, 4, 4), cross_attention_dim=32, use_linear_projection=True,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
TINY_VAE = dict(block_out_channels=(32, 64, 64), layers_per_block=2, latent_channels=4,
                down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)
TINY_TEXT = dict(vocab_size=1000, hidden_size=32, intermediate_size=128, num_hidden_layers=3,
                 num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu",
                 bos_token_id=998, eos_token_id=999, pad_token_id=0)
TINY_CONFIG = {
    "unet": {"model_channels": 32, "channel_mult": [1, 2, 2, 2], "num_res_blocks": 2,
             "attention_resolutions": [4, 2, 1], "num_head_channels": 16, "context_dim": 32},
    "vae": {"ch": 32, "ch_mult": [1, 2, 2]},
    "text": {"width": 32, "layers": 4, "heads": 4, "vocab_size": 1000},   # width = unet.context_dim
}


def write_official(path, unet=None, vae=None, text=None):
    """Convert reference modules to one official-layout file (absent parts taken from a fresh tiny build)."""
    state = {}
    for prefix, module, convert in ((PREFIXES["unet"], unet, convert_unet), (PREFIXES["vae"], vae, convert_vae),
                                    (PREFIXES["text_encoder"], text, convert_text)):
        state.update({prefix + k: v.contiguous() for k, v in convert(module.state_dict()).items()})
    save_file(state, str(path))
    return path


def private_key(path) -> dict:
    """{pseudonym: path} of a key file that maps the pseudonyms of shared files to the images' paths
    (medti.files.pseudonyms), read as its header says: `pseudonym<TAB>path`, then one row per image. A folder:
    its names.private.tsv."""
    path = Path(path)
    rows = (path / "names.private.tsv" if path.is_dir() else path).read_text(encoding="utf-8").splitlines()
    assert rows[0] == "pseudonym\tpath", rows[0]
    return dict(row.split("\t") for row in rows[1:])


def reference_scheduler(sampler: str, prediction: str = "eps", spacing: str = "linspace"):
    """The diffusers scheduler each of our samplers must equal, with SD2's training schedule (scaled_linear betas
    0.00085..0.012, steps_offset 1 as in SD2's hub scheduler config). "karras" is use_karras_sigmas=True over the
    default spacing; our "kdiffusion" spacing has no diffusers scheduler."""
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
    )
    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                  prediction_type={"eps": "epsilon", "v": "v_prediction"}[prediction],
                  timestep_spacing="linspace" if spacing == "karras" else spacing)
    karras = {"use_karras_sigmas": spacing == "karras"}
    if sampler == "euler_a":
        return EulerAncestralDiscreteScheduler(**common)
    if sampler == "euler":
        return EulerDiscreteScheduler(**common, **karras)
    if sampler == "dpmpp_2m":
        return DPMSolverMultistepScheduler(**common, **karras, algorithm_type="dpmsolver++", solver_order=2,
                                           final_sigmas_type="zero")
    return DDIMScheduler(**common, set_alpha_to_one=False, clip_sample=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    refs = {"unet": randomize_(UNet2DConditionModel(**TINY_UNET), 1),
            "vae": randomize_(AutoencoderKL(**TINY_VAE), 2),
            "text": randomize_(CLIPTextModel(CLIPTextConfig(**TINY_TEXT)), 3)}
    folder = tmp_path_factory.mktemp("tiny")
    path = write_official(folder / "tiny.safetensors", **refs)
    (folder / "tiny.json").write_text(json.dumps(TINY_CONFIG))
    return refs, minisd.load(path, config=folder / "tiny.json")


@pytest.fixture(scope="session")
def inception_file(tmp_path_factory) -> Path:
    """A weights file in the layout of torch-fidelity's weights-inception-2015-12-05-6726825d.pth, with random
    weights calibrated so activations stay O(1) (tests/test_inception.py: calibrated_state); made once per run."""
    from test_inception import calibrated_state
    path = tmp_path_factory.mktemp("inception") / "weights-inception-random.pth"
    torch.save(calibrated_state(), path)
    return path
