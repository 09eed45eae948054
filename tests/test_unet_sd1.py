"""SD1's UNet: the three options in which v1-inference.yaml differs from SD2's YAML -- `num_heads: 8` with
`num_head_channels: -1` (a fixed head count instead of a fixed head width), `use_linear_in_transformer: false`
(1x1-conv proj_in/proj_out) and `context_dim: 768` -- against diffusers' UNet2DConditionModel with SD1's
configuration, on identical random weights (conftest.randomize_, converted by tools/convert_diffusers.py), tiny and
full size; and our module names and shapes against the official SD1 file's UNet keys (sd1_unet_keys.tsv).

diffusers' `attention_head_dim=8` is SD1's head COUNT (see FACTS.md): 8 heads at every level, so heads are
40/80/160 wide at 320/640/1280 channels, where SD2 has 5/10/20 heads of width 64.

Tolerance, as in test_components.py: max abs error <= 1e-4 of the reference's max |value|, fp32. Both sides compute
the same operations in another order (SDPA vs explicit softmax, conv kernel vs matmul for the 1x1 projections), so
they agree to float32 rounding accumulated over the depth (measured: see the run's summary table); a real mistake --
heads split 5/10/20 instead of 8, a projection transposed, the wrong context width -- gives errors of 1e-3 to 1.
"""
import json
import re
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from test_components import TOL
from transformers import CLIPTextConfig, CLIPTextModel

import convert_diffusers
import minisd
from conftest import TINY_CONFIG, TINY_TEXT, TINY_VAE, randomize_, rel_err, write_official
from minisd.attention import Conv1x1, CrossAttention, SpatialTransformer
from minisd.config import LoadError, parse_config
from minisd.unet import UNetConfig, UNetModel

KEYS_TSV = Path(__file__).with_name("sd1_unet_keys.tsv")
PREFIX = "model.diffusion_model."

# v1-inference.yaml's unet_config.params, in our config's names (image_size and use_checkpoint do not shape it).
SD1 = {"in_channels": 4, "out_channels": 4, "model_channels": 320, "attention_resolutions": [4, 2, 1],
       "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4], "num_heads": 8, "num_head_channels": -1,
       "transformer_depth": 1, "context_dim": 768, "use_linear_in_transformer": False}
# diffusers' SD1 UNet: its defaults give SD1's blocks (320/640/1280/1280, 8 heads, conv projections); text is 768 wide.
SD1_DIFFUSERS = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8, use_linear_projection=False)

# Tiny SD1-shaped: channel_mult (1, 2, 4, 4) as SD1, 8 heads of width 4/8/16, conv projections, context 32 (the
# tiny text tower's width).
TINY_SD1_DIFFUSERS = dict(sample_size=16, block_out_channels=(32, 64, 128, 128), layers_per_block=2,
                          attention_head_dim=8, cross_attention_dim=32, use_linear_projection=False,
                          down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                          up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
TINY_SD1 = {"model_channels": 32, "channel_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attention_resolutions": [4, 2, 1],
            "num_heads": 8, "num_head_channels": -1, "context_dim": 32, "use_linear_in_transformer": False}


def official_unet_keys() -> dict:
    """The official SD1 file's `model.diffusion_model.` tensor names -> shapes (see the TSV's header)."""
    keys = {}
    for line in KEYS_TSV.read_text().splitlines():
        if line and not line.startswith("#"):
            name, shape = line.split("\t")
            keys[name] = tuple(int(n) for n in shape.split("x"))
    return keys


SD1_TEXT = {"tower": "openai"}   # SD1's text tower: 768 wide, the UNet's context_dim


def sd1_config() -> UNetConfig:
    return parse_config({"unet": SD1, "text": SD1_TEXT}, "SD1 config").unet


def test_defaults_stay_sd2():
    cfg = UNetConfig()
    assert (cfg.num_head_channels, cfg.num_heads, cfg.context_dim) == (64, -1, 1024)
    assert cfg.use_linear_in_transformer
    with torch.device("meta"):
        unet = UNetModel(cfg)
    assert [m.heads for m in unet.modules() if isinstance(m, CrossAttention)][::2] == [5, 5, 10, 10, 20, 20, 20] + \
        [20] * 3 + [10] * 3 + [5] * 3   # attn1 of each block: input 1,2,4,5,7,8; middle; output 3..11


def test_sd1_config_builds_sd1_shapes():
    """A config JSON with SD1's fields builds 8 heads everywhere and conv projections that read 768-wide text."""
    with torch.device("meta"):
        unet = UNetModel(sd1_config())
    attentions = [m for m in unet.modules() if isinstance(m, CrossAttention)]
    assert len(attentions) == 32 and all(m.heads == 8 for m in attentions)
    transformers = [m for m in unet.modules() if isinstance(m, SpatialTransformer)]
    assert all(isinstance(m.proj_in, Conv1x1) and isinstance(m.proj_out, Conv1x1) for m in transformers)
    state = unet.state_dict()
    assert state["input_blocks.1.1.proj_in.weight"].shape == (320, 320, 1, 1)
    assert state["middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape == (1280, 768)


@pytest.mark.parametrize("change, message", [
    ({"num_heads": -1}, "unet.num_head_channels and unet.num_heads are both -1"),
    ({"num_heads": 3}, "unet.num_heads 3 does not divide the attention widths [320, 640, 1280, 1280]"),
    ({"num_heads": 0}, "unet.num_heads must be a positive integer or -1 (not set), not 0"),
    ({"num_head_channels": -2}, "unet.num_head_channels must be a positive integer or -1 (not set), not -2"),
    ({"model_channels": -1}, "unet.model_channels must be a positive integer, not -1"),
])
def test_bad_head_fields_are_one_line(change, message):
    with pytest.raises(LoadError, match=re.escape(message)):
        parse_config({"unet": SD1 | change, "text": SD1_TEXT}, "cfg.json")


def test_set_head_width_wins_as_in_ldm():
    """ldm: num_head_channels, when set, overrides num_heads (openaimodel.py UNetModel.__init__)."""
    cfg = parse_config({"unet": SD1 | {"num_head_channels": 64}, "text": SD1_TEXT}, "cfg.json").unet
    with torch.device("meta"):
        heads = {m.heads for m in UNetModel(cfg).modules() if isinstance(m, CrossAttention)}
    assert heads == {5, 10, 20}


def test_converter_restates_sd1_config(tmp_path):
    """diffusers' SD1 UNet config restates as v1-inference.yaml's unet params (head COUNT 8, not width 8)."""
    with torch.device("meta"):
        UNet2DConditionModel(**SD1_DIFFUSERS).save_config(tmp_path)
    restated = convert_diffusers._section(convert_diffusers._unet_config, tmp_path / "config.json")
    assert restated == SD1 | {"upcast_attention": False}
    assert parse_config({"unet": restated, "text": SD1_TEXT}, "restated").unet == sd1_config()


def test_module_names_and_shapes_are_the_official_sd1_keys():
    with torch.device("meta"):
        ours = {PREFIX + k: tuple(v.shape) for k, v in UNetModel(sd1_config()).state_dict().items()}
    official = official_unet_keys()
    assert len(official) == 686
    assert ours == official


def test_names_and_shapes_through_diffusers_own_sd1_loader():
    """diffusers' original-file loader (`convert_ldm_unet_checkpoint`, which from_single_file applies to SD1 files)
    maps our names and shapes exactly onto its SD1 UNet's state dict, and our converter maps that back: an
    independent statement of the official layout, made on the meta device (shapes only)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    with torch.device("meta"):
        ours = UNetModel(sd1_config()).state_dict()
        ref = UNet2DConditionModel(**SD1_DIFFUSERS)
    theirs = convert_ldm_unet_checkpoint({PREFIX + k: v for k, v in ours.items()}, dict(ref.config))
    assert {k: v.shape for k, v in theirs.items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert {k: v.shape for k, v in convert_diffusers.convert_unet(theirs).items()} == \
        {k: v.shape for k, v in ours.items()}


@pytest.fixture(scope="module")
def tiny_sd1(tmp_path_factory):
    """A tiny SD1-shaped diffusers UNet and our UNet loaded from it through the converter and minisd.load."""
    torch.manual_seed(0)
    ref = randomize_(UNet2DConditionModel(**TINY_SD1_DIFFUSERS), 1)
    folder = tmp_path_factory.mktemp("tiny_sd1")
    path = write_official(folder / "tiny-sd1.safetensors", unet=ref, vae=randomize_(AutoencoderKL(**TINY_VAE), 2),
                          text=randomize_(CLIPTextModel(CLIPTextConfig(**TINY_TEXT)), 3))
    (folder / "tiny-sd1.json").write_text(json.dumps(TINY_CONFIG | {"unet": TINY_SD1}))
    return ref, minisd.load(path, config=folder / "tiny-sd1.json").unet


@torch.no_grad()
def test_tiny_sd1_unet_matches_diffusers(tiny_sd1):
    ref, ours = tiny_sd1
    assert {m.heads for m in ours.modules() if isinstance(m, CrossAttention)} == {8}
    assert ours.state_dict()["input_blocks.1.1.proj_in.weight"].shape == (32, 32, 1, 1)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=gen)
    context = torch.randn(2, 77, 32, generator=gen)
    for t in (torch.tensor([999.0, 0.0]), torch.tensor([417.25, 3.5])):   # fractional t, as samplers give
        err = rel_err(ours(x, t, context), ref(x, t, encoder_hidden_states=context).sample)
        assert err <= TOL, f"tiny SD1 UNet relative error {err:.2e} at t={t.tolist()}"


@pytest.fixture(scope="module")
def full_sd1():
    """Full-size SD1 UNet, built once per module (tens of seconds): diffusers' with random weights, and ours built
    on the meta device and assigned the converted tensors (one copy of the 3.4 GB of fp32 weights, shared)."""
    torch.manual_seed(0)
    ref = randomize_(UNet2DConditionModel(**SD1_DIFFUSERS), 1)
    with torch.device("meta"):
        ours = UNetModel(sd1_config())
    ours.load_state_dict(convert_diffusers.convert_unet(ref.state_dict()), strict=True, assign=True)
    return ref, ours.eval()


@torch.no_grad()
def test_full_size_sd1_unet_matches_diffusers(full_sd1):
    ref, ours = full_sd1
    gen = torch.Generator().manual_seed(0)
    x, context = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 77, 768, generator=gen)
    t = torch.tensor([321.5])
    err = rel_err(ours(x, t, context), ref(x, t, encoder_hidden_states=context).sample)
    assert err <= TOL, f"full-size SD1 UNet relative error {err:.2e}"
