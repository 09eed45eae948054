"""SD1.x single files: the whole file's key set, strict loading with the extras SD1 files carry, and the errors for
a file of the other generation.

The official SD1.5 file (v1-5-pruned-emaonly.safetensors) holds 1145 tensors: the count in a public download
manifest pinning stable-diffusion-v1-5/stable-diffusion-v1-5@451f4fe16113bff5a5d2269ed5ad43b0592e9a14 (the same
record gives its sha256 6ce01616..., which weights/presets.json cites). Our model's keys plus the keys we ignore by
name must be exactly that many: a name we would wrongly refuse, or a tensor we build that the file lacks, changes it.
"""
import json

import pytest
import torch
from safetensors.torch import save_file
from test_full_size import official_keys as sd2_keys
from test_unet_sd1 import TINY_SD1, official_unet_keys
from transformers import CLIPTextConfig, CLIPTextModel

import minisd
from conftest import TINY_CONFIG
from minisd import clip_openai
from minisd.load import EMA_SCALARS, SCHEDULE, ignored, state_dict
from minisd.tokenizer import PAD_SD1

# A tiny SD1: SD1's UNet options, the OpenAI CLIP tower (transformers' names), 32 wide = the UNet's context_dim.
TINY_SD1_CONFIG = {"unet": TINY_SD1, "vae": TINY_CONFIG["vae"],
                   "text": {"tower": "openai", "hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 3,
                            "num_attention_heads": 4, "vocab_size": 1000}}
SD1_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                max_position_embeddings=77, hidden_act="quick_gelu")


def test_full_sd1_keys_are_the_official_file():
    """UNet: tests/sd1_unet_keys.tsv; VAE: SD2's (the same first stage); text tower: transformers' CLIPTextModel of
    openai/clip-vit-large-patch14 under the SD1 prefix, plus the position_ids buffer SD1 files store."""
    cfg = minisd.load_config("sd15")
    ours = {k: tuple(v.shape) for k, v in state_dict(minisd.build(cfg)).items()}
    with torch.device("meta"):
        text = CLIPTextModel(CLIPTextConfig(**SD1_TEXT))
    expected = official_unet_keys() | {k: v for k, v in sd2_keys().items() if k.startswith("first_stage_model.")}
    expected |= {clip_openai.PREFIX + k.removeprefix("text_model."): tuple(v.shape)
                 for k, v in text.state_dict().items()}
    assert ours == expected
    file_keys = set(ours) | set(SCHEDULE) | set(EMA_SCALARS) | set(clip_openai.IGNORED)
    assert len(file_keys) == 1145 and set(ignored(cfg)) == set(SCHEDULE) | set(EMA_SCALARS) | set(clip_openai.IGNORED)


def tiny_sd1_file(tmp_path, extra=None):
    torch.manual_seed(0)
    sd = minisd.build(minisd.load_config(TINY_SD1_CONFIG), device="cpu")
    state = {k: v.contiguous() for k, v in state_dict(sd).items()}
    path = tmp_path / "tiny-sd1.safetensors"
    save_file(state | (extra or {}), str(path))
    (tmp_path / "tiny-sd1.json").write_text(json.dumps(TINY_SD1_CONFIG))
    return path, tmp_path / "tiny-sd1.json", state


def test_sd1_file_loads_with_its_extras(tmp_path):
    """position_ids (here as a merger's corrupted floats, which must not be read), the EMA scalars and the schedule
    buffers are ignored; everything else loads strictly and bit for bit; SD1 pads with the end token."""
    from minisd.schedule import alphas_cumprod
    extra = {clip_openai.IGNORED[0]: torch.arange(77.0)[None] * 1.0001, "model_ema.decay": torch.tensor(0.9999),
             "model_ema.num_updates": torch.tensor(1000), "alphas_cumprod": alphas_cumprod()}
    path, config, state = tiny_sd1_file(tmp_path, extra)
    sd = minisd.load(path, config=config)
    assert all(torch.equal(v, state[k]) for k, v in state_dict(sd).items())
    assert sd.text.tokenizer.pad_id == PAD_SD1 and sd.text.tokenizer(["x"])[0, -1] == PAD_SD1
    assert type(sd.text.tower).__name__ == "OpenAITextTransformer" and sd.text.width == 32


def load_error(*args, **kwargs) -> str:
    with pytest.raises(minisd.LoadError) as info:
        minisd.load(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_a_file_of_the_other_generation_is_named(tmp_path):
    path, _, _ = tiny_sd1_file(tmp_path)
    sd2_config = TINY_CONFIG | {"unet": TINY_SD1}   # SD2's tower, same UNet
    assert "this looks like an SD1.x checkpoint (OpenAI CLIP text tower); pass an SD1 config such as the preset " \
           "sd15" in load_error(path, config=sd2_config)
    torch.manual_seed(0)
    sd2 = tmp_path / "tiny-sd2.safetensors"
    save_file({k: v.contiguous() for k, v in state_dict(minisd.build(minisd.load_config(sd2_config), "cpu")).items()},
              str(sd2))
    assert "this looks like an SD2.x checkpoint" in load_error(sd2, config=TINY_SD1_CONFIG)


@pytest.mark.parametrize("tower, layer, runs", [("openai", "last", 12), ("openai", "penultimate", 11),
                                                 ("openclip", "penultimate", 23), ("openclip", "last", 24)])
def test_layer_is_stated_in_the_config(tower, layer, runs):
    """`layer` sets how many blocks run; the OpenAI tower keeps all 12 built (its file loads strictly either way),
    the OpenCLIP tower builds only what runs and skips the rest of the file by name."""
    unet = {} if tower == "openclip" else minisd.presets()["sd15"]["unet"]
    cfg = minisd.load_config({"unet": unet, "text": {"tower": tower, "layer": layer}})
    tower_module = minisd.build(cfg).text.tower
    assert (tower_module.depth if tower == "openai" else len(tower_module.blocks)) == runs
    assert len(cfg.text.unused()) == (1 if (tower, layer) == ("openclip", "penultimate") else 0)
