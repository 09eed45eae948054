"""tools/convert_diffusers.py against two independent references: the official key list (names and shapes of
full-size SD2) and diffusers' own original->diffusers single-file loader (bit-exact round trip of tiny models)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from test_load_diffusers import clip_tokenizer
from transformers import CLIPTextConfig, CLIPTextModel

import minisd
from minisd import diffusers_config as folders

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import convert_diffusers  # noqa: E402  (tools/ is not a package)

TOOL = ROOT / "tools" / "convert_diffusers.py"
PREFIXES = {"unet": "model.diffusion_model.", "vae": "first_stage_model.", "text": "cond_stage_model.model."}
# In the official file but never used by SD2, so the converter does not invent them.
NOT_PRODUCED = ("cond_stage_model.model.transformer.resblocks.23.", "cond_stage_model.model.text_projection",
                "cond_stage_model.model.logit_scale")


def sd2_models(tiny: bool):
    """diffusers/transformers SD2 networks: full size (as in stabilityai/stable-diffusion-2-1) or a tiny copy
    with the same block structure (2 levels, cross-attention in the first, head widths equal)."""
    unet = {"block_out_channels": (320, 640, 1280, 1280), "attention_head_dim": (5, 10, 20, 20),
            "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, "cross_attention_dim": 1024,
            "sample_size": 64}
    vae = {"block_out_channels": (128, 256, 512, 512)}
    text = {"hidden_size": 1024, "num_hidden_layers": 23, "num_attention_heads": 16, "intermediate_size": 4096,
            "vocab_size": 49408}
    if tiny:   # 32 groups in every norm and CLIP's 49408 tokens, as minisd.diffusers requires of a folder
        unet |= {"block_out_channels": (32, 64), "attention_head_dim": (1, 2),
                 "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
                 "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"), "cross_attention_dim": 32, "sample_size": 8}
        vae |= {"block_out_channels": (32, 64), "sample_size": 16}
        text |= {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2, "intermediate_size": 128}
    levels = len(vae["block_out_channels"])
    return (UNet2DConditionModel(layers_per_block=2, use_linear_projection=True, **unet),
            AutoencoderKL(latent_channels=4, layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * levels,
                          up_block_types=("UpDecoderBlock2D",) * levels, **vae),
            CLIPTextModel(CLIPTextConfig(hidden_act="gelu", max_position_embeddings=77, **text)))


def official_keys(prefix: str) -> dict[str, str]:
    lines = (ROOT / "tests" / "sd2_checkpoint_keys.tsv").read_text().splitlines()
    rows = (line.split("\t") for line in lines if not line.startswith("#"))
    return {name: shape for name, shape in rows if name.startswith(prefix) and not name.startswith(NOT_PRODUCED)}


@pytest.mark.parametrize("index, component", list(enumerate(PREFIXES)))
def test_full_size_names_and_shapes(index, component):
    with torch.device("meta"):  # no memory: names and shapes only
        model = sd2_models(tiny=False)[index]
    convert = getattr(convert_diffusers, f"convert_{component}")
    got = {PREFIXES[component] + name: "x".join(map(str, t.shape)) or "scalar"
           for name, t in convert(model.state_dict()).items()}
    assert got == official_keys(PREFIXES[component])


def run_tool(*args):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True,
                          timeout=120, check=False)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tiny random SD2 saved by diffusers, converted by the CLI: (folder, models, official file)."""
    tmp = tmp_path_factory.mktemp("convert")
    torch.manual_seed(0)
    models = sd2_models(tiny=True)
    with torch.no_grad():
        for model in models:
            for param in model.parameters():  # every tensor, norms included, so a swapped name cannot hide
                param.normal_()
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    unet, vae, text = models
    StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=clip_tokenizer(tmp, "!"), unet=unet,
                            scheduler=scheduler, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(tmp / "sd")
    result = run_tool(tmp / "sd", tmp / "sd2.safetensors")
    assert result.returncode == 0, result.stderr
    return tmp / "sd", models, tmp / "sd2.safetensors"


def assert_bit_identical(original, loaded):
    expected, got = original.state_dict(), loaded.state_dict()
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


def test_round_trip_unet_and_vae(converted):
    folder, (unet, vae, _), file = converted
    assert_bit_identical(unet, UNet2DConditionModel.from_single_file(file, config=str(folder), subfolder="unet",
                                                                    local_files_only=True))
    assert_bit_identical(vae, AutoencoderKL.from_single_file(file, config=str(folder), subfolder="vae",
                                                             local_files_only=True))


def test_round_trip_text_encoder(converted):
    # transformers models have no from_single_file: diffusers converts OpenCLIP text only through a pipeline.
    folder, (_, _, text), file = converted
    pipe = StableDiffusionPipeline.from_single_file(file, config=str(folder), local_files_only=True)
    assert_bit_identical(text, pipe.text_encoder)


def test_file_holds_only_official_prefixes_and_config(converted):
    file = converted[2]
    keys = load_file(file).keys()
    assert all(key.startswith(tuple(PREFIXES.values())) for key in keys)
    assert sum(key.startswith("cond_stage_model.model.transformer.resblocks.") for key in keys) == 3 * 12
    assert json.loads(file.with_suffix(".json").read_text()) == {
        "unet": {"model_channels": 32, "channel_mult": [1, 2], "num_res_blocks": 2, "attention_resolutions": [1],
                 "num_head_channels": 32, "context_dim": 32, "transformer_depth": 1,
                 "use_linear_in_transformer": True, "in_channels": 4, "out_channels": 4, "upcast_attention": False},
        "vae": {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 2, "z_channels": 4, "embed_dim": 4, "in_channels": 3,
                "out_ch": 3},
        "text": {"tower": "openclip", "layer": "penultimate", "width": 32, "layers": 4, "heads": 2,
                 "context_length": 77, "vocab_size": 49408},
        "prediction": "eps", "scale_factor": 0.18215, "resolution": 16}   # unet sample_size 8 x VAE factor 2


def test_converted_file_loads_like_the_folder(converted):
    """minisd.load of the written file + config gives the same weights as minisd.load of the folder."""
    folder, _, file = converted
    direct, single = minisd.load(folder), minisd.load(file, config=file.with_suffix(".json"))
    assert direct.config == single.config
    for part in ("unet", "vae"):
        theirs = getattr(single, part).state_dict()
        assert all(torch.equal(t, theirs[k]) for k, t in getattr(direct, part).state_dict().items())


def test_sd2_config_matches_ldm_yaml(tmp_path):
    """Full-size diffusers configs restate as v2-inference-v.yaml / OpenCLIP ViT-H-14 text."""
    with torch.device("meta"):
        unet, vae, text = sd2_models(tiny=False)
    unet.save_config(tmp_path / "unet")
    vae.save_config(tmp_path / "vae")
    text.config.save_pretrained(tmp_path / "text_encoder")
    DDIMScheduler(prediction_type="v_prediction", beta_start=0.00085, beta_end=0.012,
                  beta_schedule="scaled_linear").save_config(tmp_path / "scheduler")
    sections = {"unet": ("unet/config.json", folders.unet_section), "vae": ("vae/config.json", folders.vae_section),
                "text": ("text_encoder/config.json", folders.text_section),
                "prediction": ("scheduler/scheduler_config.json", folders.prediction)}
    config = {key: read(tmp_path / name, folders.read_json(tmp_path / name)) for key, (name, read) in sections.items()}
    assert config["unet"] == {"model_channels": 320, "channel_mult": [1, 2, 4, 4], "num_res_blocks": 2,
                              "attention_resolutions": [4, 2, 1], "num_head_channels": 64, "context_dim": 1024,
                              "transformer_depth": 1, "use_linear_in_transformer": True, "in_channels": 4,
                              "out_channels": 4, "upcast_attention": False}
    assert config["vae"] == {"ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "z_channels": 4,
                             "embed_dim": 4, "in_channels": 3, "out_ch": 3}
    assert config["text"] == {"tower": "openclip", "layer": "penultimate", "width": 1024, "layers": 24, "heads": 16,
                              "context_length": 77, "vocab_size": 49408}
    assert config["prediction"] == "v"


def test_bin_weights_with_hub_prefix(converted, tmp_path):
    """Old hub folders: pytorch_model.bin, `text_model.` prefix, a saved `position_ids` buffer."""
    folder, _, file = converted
    shutil.copytree(folder, tmp_path / "sd")
    weights = tmp_path / "sd" / "text_encoder" / "model.safetensors"
    state_dict = {"text_model." + key: tensor for key, tensor in load_file(weights).items()}
    torch.save(state_dict | {"text_model.embeddings.position_ids": torch.arange(77)[None]},
               weights.with_name("pytorch_model.bin"))
    weights.unlink()
    state_dict, _ = convert_diffusers.convert_folder(tmp_path / "sd")
    expected = load_file(file)
    assert state_dict.keys() == expected.keys()
    assert all(torch.equal(state_dict[key], tensor) for key, tensor in expected.items())


def assert_one_line_error(result, out: Path, *words):
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr
    assert all(word in result.stderr for word in words), result.stderr
    assert not out.exists() and not out.with_suffix(".json").exists()
    assert not list(out.parent.glob(".*.tmp"))


def test_cli_missing_unet_folder(converted, tmp_path):
    shutil.copytree(converted[0], tmp_path / "sd", ignore=shutil.ignore_patterns("unet"))
    out = tmp_path / "out.safetensors"
    assert_one_line_error(run_tool(tmp_path / "sd", out), out, "has no unet/ folder, which model_index.json names")


def test_cli_unmapped_key(converted, tmp_path):
    shutil.copytree(converted[0], tmp_path / "sd")
    weights = tmp_path / "sd" / "unet" / "diffusion_pytorch_model.safetensors"
    save_file(load_file(weights) | {"mid_block.resnets.0.extra.weight": torch.zeros(1)}, weights)
    out = tmp_path / "out.safetensors"
    assert_one_line_error(run_tool(tmp_path / "sd", out), out, "mid_block.resnets.0.extra.weight does not map")


def test_cli_unequal_head_widths(converted, tmp_path):
    """Neither a fixed head width (ldm's num_head_channels, SD2) nor a fixed head count (num_heads, SD1): refused.
    (Equal counts with unequal widths, e.g. [1, 1], is SD1's rule and converts: tests/test_unet_sd1.py.)"""
    shutil.copytree(converted[0], tmp_path / "sd")
    config_path = tmp_path / "sd" / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    c0, c1 = config["block_out_channels"]
    assert c0 / 1 != c1 / 4   # heads [1, 4]: unequal widths as well as unequal counts
    config_path.write_text(json.dumps(config | {"attention_head_dim": [1, 4]}))
    out = tmp_path / "out.safetensors"
    assert_one_line_error(run_tool(tmp_path / "sd", out), out, "config.json", "attention_head_dim")


def test_cli_failed_write_leaves_nothing(converted, tmp_path):
    """The weights are written first, the config fails: neither file (nor a temporary) may remain."""
    out = tmp_path / "out.safetensors"
    result = run_tool(converted[0], out, "--config-out", tmp_path / "no-such-dir" / "out.json")
    assert_one_line_error(result, out, "no-such-dir")


def test_cli_output_is_readable_and_never_overwritten_silently(converted, tmp_path):
    """safetensors creates its file 0600; the model gets the umask's mode like the config. An existing output is
    refused unless --force."""
    import os
    folder, _, first = converted
    umask = os.umask(0)
    os.umask(umask)
    assert first.stat().st_mode & 0o777 == 0o666 & ~umask == first.with_suffix(".json").stat().st_mode & 0o777
    out = tmp_path / "again.safetensors"
    out.write_bytes(b"mine")
    result = run_tool(folder, out)
    assert result.returncode != 0 and "again.safetensors exists" in result.stderr and "--force" in result.stderr
    assert out.read_bytes() == b"mine"
    assert run_tool(folder, out, "--force").returncode == 0 and out.read_bytes() == first.read_bytes()
