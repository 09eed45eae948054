"""Each network equals its reference (diffusers UNet2DConditionModel / AutoencoderKL, transformers
CLIPTextModel) on identical random weights: tiny configs with SD2's block structure here, full size in
test_full_size.py.

Tolerance: max abs error <= 1e-4 of the output's scale in fp32. Both sides compute the same operations in a
different order (fused vs split projections, SDPA vs explicit softmax), so agreement is to float32 rounding
accumulated over the network's depth -- measured 1e-7..1e-6 here; 1e-4 leaves room for other CPUs while
any real mistake (a swapped norm, a wrong eps, sin/cos order, a missing block) gives errors of 1e-3..1.
"""
import json

import pytest
import torch
from conftest import randomize_, rel_err
from convert_diffusers import PREFIXES, convert_text, convert_unet, convert_vae
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

import minisd

TOL = 1e-4

# Tiny SD2-shaped configs: 4 levels with cross-attention on the first three, linear projections, fixed head
# width (16 here, 64 in SD2), 32 groups in every GroupNorm.
TINY_UNET = dict(sample_size=16, block_out_channels=(32, 64, 64, 64), layers_per_block=2,
                 attention_head_dim=(2, 4, 4, 4), cross_attention_dim=32, use_linear_projection=True,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
TINY_VAE = dict(block_out_channels=(32, 64, 64), layers_per_block=2, latent_channels=4,
                down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)
TINY_TEXT = dict(vocab_size=1000, hidden_size=64, intermediate_size=256, num_hidden_layers=3,
                 num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu",
                 bos_token_id=998, eos_token_id=999, pad_token_id=0)
TINY_CONFIG = {
    "unet": {"model_channels": 32, "channel_mult": [1, 2, 2, 2], "num_res_blocks": 2,
             "attention_resolutions": [4, 2, 1], "num_head_channels": 16, "context_dim": 32},
    "vae": {"ch": 32, "ch_mult": [1, 2, 2]},
    "text": {"width": 64, "layers": 4, "heads": 4, "vocab_size": 1000},
}


def write_official(path, unet=None, vae=None, text=None):
    """Convert reference modules to one official-layout file (absent parts taken from a fresh tiny build)."""
    state = {}
    for prefix, module, convert in ((PREFIXES["unet"], unet, convert_unet), (PREFIXES["vae"], vae, convert_vae),
                                    (PREFIXES["text_encoder"], text, convert_text)):
        state.update({prefix + k: v.contiguous() for k, v in convert(module.state_dict()).items()})
    save_file(state, str(path))
    return path


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


@torch.no_grad()
def test_unet_matches_diffusers(tiny):
    refs, sd = tiny
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=gen)
    context = torch.randn(2, 77, 32, generator=gen)
    for t in (torch.tensor([999.0, 0.0]), torch.tensor([417.25, 3.5])):   # fractional t, as samplers give
        ref = refs["unet"](x, t, encoder_hidden_states=context).sample
        err = rel_err(sd.unet(x, t, context), ref)
        assert err <= TOL, f"UNet relative error {err:.2e} at t={t.tolist()}"


@torch.no_grad()
def test_unet_scalar_timestep_broadcasts(tiny):
    _, sd = tiny
    x, context = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 32)
    torch.testing.assert_close(sd.unet(x, 500, context), sd.unet(x, torch.tensor([500.0, 500.0]), context))


@torch.no_grad()
def test_vae_matches_diffusers(tiny):
    refs, sd = tiny
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    dist = refs["vae"].encode(images).latent_dist
    mean, logvar = sd.vae.encode(images)
    assert rel_err(mean, dist.mean) <= TOL and rel_err(logvar, dist.logvar) <= TOL
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    err = rel_err(sd.vae.decode(z), refs["vae"].decode(z).sample)
    assert err <= TOL, f"VAE decode relative error {err:.2e}"


@torch.no_grad()
def test_text_tower_matches_transformers(tiny):
    refs, sd = tiny
    ids = torch.randint(0, 1000, (3, 77), generator=torch.Generator().manual_seed(3))
    ids[:, 10:] = 0    # SD2 pads with id 0 and conditions on every position, padding included
    ref = refs["text"](input_ids=ids).last_hidden_state
    err = rel_err(sd.text_encoder(ids), ref)
    assert err <= TOL, f"text tower relative error {err:.2e}"
    # token embeddings in, same result: the path textual inversion uses
    err = rel_err(sd.text_encoder.forward_embeddings(sd.text_encoder.token_embedding(ids)), ref)
    assert err <= TOL


@torch.no_grad()
def test_causal_mask_is_applied(tiny):
    """Changing a later token must not change earlier positions (and must change the later ones)."""
    _, sd = tiny
    ids = torch.randint(1, 1000, (1, 77), generator=torch.Generator().manual_seed(4))
    other = ids.clone()
    other[0, 40] = (ids[0, 40] + 1) % 1000
    a, b = sd.text_encoder(ids), sd.text_encoder(other)
    assert torch.equal(a[:, :40], b[:, :40]) and not torch.allclose(a[:, 40:], b[:, 40:])
