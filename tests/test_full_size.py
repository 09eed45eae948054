"""Full-size SD2: our modules carry exactly the official checkpoint's names and shapes, and one forward of
each network at a small input equals the reference on identical random full-size weights.

The reference weights are diffusers/transformers modules built with the SD2 configs (the hub's
stabilityai/stable-diffusion-2-base folder configs, written out here), converted to the official layout by
tools/convert_diffusers.py and loaded back through minisd.load -- the real loading path. Tolerance as in
test_components.py (1e-4 of the output scale, fp32).
"""
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from test_components import TOL
from transformers import CLIPTextConfig, CLIPTextModel

import minisd
from conftest import randomize_, rel_err, write_official
from minisd.load import ignored as IGNORED
from minisd.load import state_dict

KEYS_TSV = Path(__file__).with_name("sd2_checkpoint_keys.tsv")

SD2_UNET = dict(sample_size=64, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                use_linear_projection=True)   # diffusers' defaults give the rest of SD2's layout
SD2_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
               down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
SD2_TEXT = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=1024)


def official_keys() -> dict:
    """The official file's tensor names -> shapes, from the reference list (see the file's header)."""
    keys = {}
    for line in KEYS_TSV.read_text().splitlines():
        if line and not line.startswith("#"):
            name, shape = line.split("\t")
            keys[name] = () if shape == "scalar" else tuple(int(n) for n in shape.split("x"))
    return keys


def test_module_names_and_shapes_are_the_official_keys():
    cfg = minisd.ModelConfig()
    sd = minisd.build(cfg)   # meta device: shapes only
    ours = {k: tuple(v.shape) for k, v in state_dict(sd).items()}
    official = official_keys()
    assert len(official) == 1228
    skip = cfg.text.unused()
    ignored = {k for k in official if k in IGNORED(cfg) or k.startswith(skip)}
    # everything the file holds is either ours, with the same shape, or ignored by name
    assert ours == {k: v for k, v in official.items() if k not in ignored}
    assert len(ignored) == 14   # 12 text-block-23 tensors + text_projection + logit_scale (schedule not listed)


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    torch.manual_seed(0)
    refs = {"unet": randomize_(UNet2DConditionModel(**SD2_UNET), 1),
            "vae": randomize_(AutoencoderKL(**SD2_VAE), 2),
            "text": randomize_(CLIPTextModel(CLIPTextConfig(**SD2_TEXT)), 3)}
    path = write_official(tmp_path_factory.mktemp("full") / "sd2.safetensors", **refs)
    sd = minisd.load(path, config="sd2-base")
    path.unlink()
    return refs, sd


@torch.no_grad()
def test_full_size_unet(full):
    refs, sd = full
    gen = torch.Generator().manual_seed(0)
    x, context = torch.randn(1, 4, 16, 16, generator=gen), torch.randn(1, 77, 1024, generator=gen)
    t = torch.tensor([321.5])
    err = rel_err(sd.unet(x, t, context), refs["unet"](x, t, encoder_hidden_states=context).sample)
    assert err <= TOL, f"full-size UNet relative error {err:.2e}"


@torch.no_grad()
def test_full_size_vae(full):
    refs, sd = full
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    mean, _ = sd.vae.encode(images)
    assert rel_err(mean, refs["vae"].encode(images).latent_dist.mean) <= TOL
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    assert rel_err(sd.vae.decode(z), refs["vae"].decode(z).sample) <= TOL


@torch.no_grad()
def test_full_size_text(full):
    refs, sd = full
    ids = torch.randint(0, 49406, (1, 77), generator=torch.Generator().manual_seed(3))
    ids[0, 0], ids[0, 20], ids[0, 21:] = 49406, 49407, 0
    err = rel_err(sd.text.tower(ids), refs["text"](input_ids=ids).last_hidden_state)
    assert err <= TOL, f"full-size text relative error {err:.2e}"
