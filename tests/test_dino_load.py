"""Loading DINO encoders: strict (every tensor loaded or ignored by name), one-line errors for a folder of another
network or a bad config, the hub table offline, a pickled DINOv1 release."""
import json

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from test_dino import dinov1_release, randn, registers_release, timm_release
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersForImageClassification,
)

from minisd import dino_load
from minisd.config import LoadError
from minisd.errors import INTERFACE


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    """One folder of each layout: transformers' registers, timm's, DINOv1."""
    return {"registers": registers_release(tmp_path_factory.mktemp("reg"))[1],
            "timm": timm_release(tmp_path_factory.mktemp("timm"))[1],
            "dinov1": dinov1_release(tmp_path_factory.mktemp("v1"))[1]}


def load_error(*args, cli=False) -> str:
    token = INTERFACE.set("cli" if cli else "python")
    try:
        with pytest.raises(LoadError) as info:
            dino_load.load_encoder(*args)
    finally:
        INTERFACE.reset(token)
    message = str(info.value)
    assert "\n" not in message, "loader errors are one line"
    return message


def copy_release(folder, tmp_path, config=None, state=None, processor=None):
    """The release folder with config.json, the tensors or preprocessor_config.json replaced."""
    tmp_path.mkdir(exist_ok=True)
    for name, new in (("config.json", config), ("preprocessor_config.json", processor)):
        if (folder / name).exists():
            (tmp_path / name).write_text(json.dumps(new) if new is not None else (folder / name).read_text())
    save_file(state if state is not None else load_file(folder / "model.safetensors"), tmp_path / "model.safetensors")
    return tmp_path


def config_of(folder):
    return json.loads((folder / "config.json").read_text())


def test_folders_of_other_networks(tmp_path):
    """Each with its own words: no config, DINOv2 without registers, another model type, a classifier."""
    (tmp_path / "empty").mkdir()
    assert "no config.json" in load_error(tmp_path / "empty")
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2)).save_pretrained(
        tmp_path / "plain")
    assert "DINOv2 without registers (facebook/dinov2-*)" in load_error(tmp_path / "plain")
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2)).save_pretrained(tmp_path / "clip")
    message = load_error(tmp_path / "clip", cli=True)
    assert "model_type \"clip_vision_model\": another network's config; pass a DINO release to --encoder" in message
    probe = tmp_path / "probe"
    Dinov2WithRegistersForImageClassification(Dinov2WithRegistersConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_labels=3)).save_pretrained(probe)
    (probe / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "BitImageProcessor"}))
    assert "unknown field id2label" not in load_error(probe)   # labels are ignored; the head's tensors are not
    assert "unexpected key classifier.bias (and " in load_error(probe)


def test_missing_files(releases, tmp_path):
    folder = copy_release(releases["registers"], tmp_path)
    (folder / "preprocessor_config.json").unlink()
    assert "no preprocessor_config.json; the release's image preparation is read from it" in load_error(folder)
    (folder / "model.safetensors").unlink()
    (folder / "preprocessor_config.json").write_text((releases["registers"] / "preprocessor_config.json").read_text())
    assert "no model.safetensors (or pytorch_model.bin)" in load_error(folder)


def test_pickled_dinov1_release(releases, tmp_path):
    """A 2021 conversion writes pytorch_model.bin; read with torch.load(weights_only=True)."""
    folder = releases["dinov1"]
    for name in ("config.json", "preprocessor_config.json"):
        (tmp_path / name).write_text((folder / name).read_text())
    torch.save(load_file(folder / "model.safetensors"), tmp_path / "pytorch_model.bin")
    model, path = dino_load.load_encoder(tmp_path, with_path=True)
    assert path.name == "pytorch_model.bin"
    pixels = randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(pixels), dino_load.load_encoder(folder)(pixels))


@pytest.mark.parametrize("layout, field, value, words", [
    ("registers", "hidden_act", "relu", "hidden_act \"relu\" is not supported"),
    ("registers", "num_register_tokens", "4", "num_register_tokens must be a positive integer"),
    ("registers", "rope_theta", 1.0, "unknown field rope_theta"),
    ("registers", "interpolate_offset", 0.1, "interpolate_offset 0.1 is not supported; the DINO releases"),
    ("dinov1", "pooler_output_size", 32, "pooler_output_size 32 is not hidden_size 64"),
    ("timm", "architecture", "vit_base_patch14_dinov2", "timm architecture \"vit_base_patch14_dinov2\" is not a"),
    ("timm", "num_classes", 10, "num_classes 10: a classifier on top of the backbone"),
    ("timm", "model_args", {"embed_dim": 64, "depth": 2, "num_heads": 4, "img_size": 98, "pos_embed": "rope"},
     "unknown model_args field pos_embed"),
    ("timm", "model_args", {"no_embed_class": False}, "model_args.no_embed_class false is not supported"),
    ("timm", "pretrained_cfg", {"input_size": [3, 98, 98], "crop_mode": "border"}, "crop_mode \"border\""),
])
def test_config_errors(releases, tmp_path, layout, field, value, words):
    config = {**config_of(releases[layout]), field: value}
    assert words in load_error(copy_release(releases[layout], tmp_path, config=config))


@pytest.mark.parametrize("field, value, words", [
    ("image_processor_type", "CLIPImageProcessor", "image processor \"CLIPImageProcessor\" is not one DINO"),
    ("resample", 1, "resample 1 is not supported; DINO releases resize bicubic (3) or bilinear (2)"),
    ("rescale_factor", 1.0, "do_rescale true with rescale_factor 1/255"),
    ("image_std", [0.2, 0.0, 0.2], "image_std must be three finite numbers"),
    ("crop_size", {"height": 200, "width": 98}, "the crop [200, 98] is larger than the resized image [112]"),
    ("do_pad", True, "unknown field do_pad"),
])
def test_processor_errors(releases, tmp_path, field, value, words):
    processor = {**json.loads((releases["registers"] / "preprocessor_config.json").read_text()), field: value}
    assert words in load_error(copy_release(releases["registers"], tmp_path, processor=processor))


def test_weights_of_another_release(releases, tmp_path):
    """Shapes against config.json, and a transformers file in a timm folder (the names are the other layout's)."""
    state = load_file(releases["registers"] / "model.safetensors")
    state["layernorm.weight"] = torch.ones(32)
    assert "layernorm.weight is F32 [32] where config.json gives float [64]" in load_error(
        copy_release(releases["registers"], tmp_path / "a", state=state))
    transformers_file = load_file(releases["registers"] / "model.safetensors")
    folder = copy_release(releases["timm"], tmp_path / "b", state=transformers_file)
    assert "unexpected key embeddings.cls_token (and " in load_error(folder)
    assert "in timm's layout" in load_error(folder)
    state = load_file(releases["timm"] / "model.safetensors")
    state["blocks.0.attn.qkv.weight"] = state["blocks.0.attn.qkv.weight"][:128]
    assert "blocks.0.attn.qkv.weight is F32 [128, 64] where config.json gives float [192, 64]" in load_error(
        copy_release(releases["timm"], tmp_path / "c", state=state))
    state = load_file(releases["timm"] / "model.safetensors")
    state["reg_token"] = torch.full_like(state["reg_token"], float("nan"))
    folder = copy_release(releases["timm"], tmp_path / "d", state=state)
    assert "model.safetensors: reg_token holds NaN or inf values" in load_error(folder)


def test_timm_file_loads_as_timm_reads_it(releases):
    """Our model from timm's folder equals timm's own model built from the folder."""
    ref = timm.create_model(f"local-dir:{releases['timm']}", pretrained=True).eval()
    pixels = randn(1, 3, 98, 98)
    with torch.no_grad():
        assert torch.equal(dino_load.load_encoder(releases["timm"])(pixels), ref.forward_features(pixels))


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """An empty huggingface_hub cache and a hub the probe cannot reach."""
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://huggingface.co")
    monkeypatch.setattr(dino_load, "hub_reachable", lambda endpoint: False)
    return tmp_path / "hub"


def test_offline_hub_names(offline):
    message = load_error("timm/vit_base_patch14_reg4_dinov2.lvd142m", cli=True)
    assert message.startswith("timm/vit_base_patch14_reg4_dinov2.lvd142m: not downloaded yet and "
                              "https://huggingface.co cannot be reached; connect and retry, or fetch config.json and "
                              "model.safetensors from https://huggingface.co/timm/vit_base_patch14_reg4_dinov2.lvd142m")
    assert message.endswith("pass --encoder FOLDER")
    assert "fetch config.json, preprocessor_config.json and model.safetensors" in load_error("facebook/dino-vitb16")
    assert "not a DINO release minisd knows (facebook/dinov2-with-registers-small" in load_error("someone/dino-x")
    assert "neither a folder" in load_error("no-such-folder")


def test_offline_hub_name_from_cache(releases, offline):
    """A release downloaded before loads offline, from huggingface_hub's cache layout."""
    commit = "0" * 40
    repo = offline / "models--facebook--dinov2-with-registers-small"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for name in ("config.json", "preprocessor_config.json", "model.safetensors"):
        (repo / "snapshots" / commit / name).write_bytes((releases["registers"] / name).read_bytes())
    model, path = dino_load.load_encoder("facebook/dinov2-with-registers-small", with_path=True)
    assert path == repo / "snapshots" / commit / "model.safetensors"
    pixels = randn(1, 3, 98, 98)
    with torch.no_grad():
        assert torch.equal(model(pixels), dino_load.load_encoder(releases["registers"])(pixels))
