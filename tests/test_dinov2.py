"""minisd.dinov2 against transformers' Dinov2Model and torch-fidelity's DINOv2 preparation, on random weights.

The reference model is written by transformers' `save_pretrained` (the layout of the facebook/dinov2-* files) and
loaded through `load_dinov2`. Its trained image size is 98 px (7x7 patches of 14), so 224-px inputs interpolate the
position embeddings, as the 518-px releases do at 224. Where the interpolation runs, the reference is transformers
with its `interpolate_pos_encoding` replaced by a transcription of the torch.hub model's (which torch-fidelity runs
and FD-DINOv2 is defined with): transformers 5.x interpolates differently (see minisd/dinov2.py), and
`test_transformers_interpolates_otherwise` measures by how much.

Tolerance: relative 1e-6 of the output's scale (about 8 float32 ulps). Both sides run the same float32 operations
(SDPA, the same bicubic call), ours with layer norm on the CLS token alone; measured 0 here, but kernels may pick
another summation order on another CPU. transformers' own interpolation is off by about 1e-3 relative (asserted:
> 500 times the tolerance).
"""
import json
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import load_file, save_file
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
from transformers import Dinov2Config, Dinov2ForImageClassification, Dinov2Model, ViTConfig, ViTModel

from conftest import randomize_, rel_err
from minisd import dinov2, dinov2_load
from minisd.config import LoadError
from minisd.errors import INTERFACE

TOLERANCE = 1e-6
SHARPEN = 20
SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=14, image_size=98)


def hub_interpolate_pos_encoding(module, embeddings, height, width):
    """facebookresearch/dinov2 dinov2/models/vision_transformer.py `interpolate_pos_encoding` as the hub models
    dinov2_vit{s,b,l,g}14 run it (interpolate_offset 0.1, no antialiasing), transcribed onto transformers' module.
    Checked once against PyPI dinov2 0.0.1.dev2 (that code): equal to 4e-7 on random weights."""
    table = module.position_embeddings
    npatch, n = embeddings.shape[1] - 1, table.shape[1] - 1
    if npatch == n and height == width:
        return table
    pos = table.float()
    w0, h0 = height // module.patch_size + 0.1, width // module.patch_size + 0.1
    side = math.sqrt(n)
    grid = pos[:, 1:].reshape(1, int(side), int(side), -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=(w0 / side, h0 / side), mode="bicubic")
    assert grid.shape[-2:] == (int(w0), int(h0))
    return torch.cat((pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, pos.shape[-1])), dim=1).to(embeddings.dtype)


def make_release(folder, swiglu: bool):
    """(transformers model, its save_pretrained folder, our model loaded from it); swiglu: dinov2-giant's FFN."""
    torch.manual_seed(0)
    ref = randomize_(Dinov2Model(Dinov2Config(**SMALL, use_swiglu_ffn=swiglu)))
    with torch.no_grad():
        # Unit-scale positions and sharp attention (queries and keys x20), so that the CLS token depends on where
        # the position table is sampled: with the library's 0.02-scale init every token attends almost uniformly
        # and the CLS output barely moves (3e-5 relative) whichever way the table is interpolated.
        ref.embeddings.position_embeddings.normal_()
        for layer in ref.encoder.layer:
            layer.attention.q_proj.weight.mul_(SHARPEN)
            layer.attention.k_proj.weight.mul_(SHARPEN)
    ref.save_pretrained(folder)
    return ref, folder, dinov2_load.load_dinov2(folder)


@pytest.fixture(scope="module", params=[False, True], ids=["mlp", "swiglu"])
def release(request, tmp_path_factory):
    return make_release(tmp_path_factory.mktemp("dinov2"), request.param)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """One release for the error cases, which do not depend on the feed-forward."""
    return make_release(tmp_path_factory.mktemp("dinov2-plain"), False)


@pytest.fixture
def hub_ref(release, monkeypatch):
    """The reference with the hub model's interpolation."""
    ref = release[0]
    monkeypatch.setattr(ref.embeddings, "interpolate_pos_encoding",
                        lambda *args: hub_interpolate_pos_encoding(ref.embeddings, *args))
    return ref


def reference_prepare(images):
    """torch-fidelity FeatureExtractorDinoV2.forward up to the model: its TF1 resize, torchvision's normalize."""
    x = interpolate_bilinear_2d_like_tensorflow1x(images.float(), size=(224, 224), align_corners=False)
    return torchvision.transforms.functional.normalize(
        x, (255 * 0.485, 255 * 0.456, 255 * 0.406), (255 * 0.229, 255 * 0.224, 255 * 0.225), inplace=False)


def randn(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(2))


def pooled(ref, pixels):
    with torch.no_grad():
        return ref(pixel_values=pixels).pooler_output


def test_trained_grid_equals_transformers(release):
    """At the trained size nothing is interpolated: transformers as it is is the reference."""
    ref, _, ours = release
    pixels = randn(3, 3, 98, 98)
    with torch.no_grad():
        assert rel_err(ours(pixels), pooled(ref, pixels)) < TOLERANCE


@pytest.mark.parametrize("size", [(224, 224), (294, 196), (56, 56)])
def test_interpolated_equals_hub_reference(hub_ref, release, size):
    pixels = randn(2, 3, *size)
    with torch.no_grad():
        assert rel_err(release[2](pixels), pooled(hub_ref, pixels)) < TOLERANCE


def test_transformers_interpolates_otherwise(release):
    """transformers 5.x resamples the 7x7 table to size=(16, 16); the hub model (and we) with scale (16 + 0.1) / 7,
    so every sample sits elsewhere. The tables differ by 6-7 % of their largest value (asserted: > 3 %), the CLS
    features through this network by 1e-3 relative (9.5e-4 and 1.7e-3 measured; asserted: 500 times the tolerance),
    so the tests above tell the two apart."""
    ref, _, ours = release
    table = ref.embeddings.position_embeddings
    tokens = torch.zeros(1, 1 + 16 * 16, SMALL["hidden_size"])
    with torch.no_grad():
        theirs = ref.embeddings.interpolate_pos_encoding(tokens, 224, 224)
        assert torch.equal(dinov2.interpolate_positions(table, 224, 224, 14),
                           hub_interpolate_pos_encoding(ref.embeddings, tokens, 224, 224))
        assert (dinov2.interpolate_positions(table, 224, 224, 14) - theirs).abs().max() > 0.03 * table.abs().max()
        pixels = randn(2, 3, 224, 224)
        ours_out, theirs_out = ours(pixels), pooled(ref, pixels)
    assert ((ours_out - theirs_out).abs().max() / theirs_out.abs().max()).item() > 500 * TOLERANCE


@pytest.mark.parametrize("size", [(224, 224), (300, 200), (64, 64), (31, 517)])
def test_features_equal_torch_fidelity_path(hub_ref, release, size):
    """uint8 images of any size: the preparation is bit-identical, the features equal the reference's."""
    images = torch.randint(0, 256, (2, 3, *size), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(dinov2.prepare(images), reference_prepare(images))
    out = dinov2.features(release[2], images)
    assert out.dtype == torch.float32 and out.shape == (2, 64)
    assert rel_err(out, pooled(hub_ref, reference_prepare(images))) < TOLERANCE


def test_layout_is_the_release_and_loads_strictly(release):
    """Our parameter names are the file's tensor names, every one of them; with_path names the weights file."""
    ref, folder, ours = release
    model, path = dinov2_load.load_dinov2(folder, with_path=True)
    assert path == folder / "model.safetensors"
    assert set(model.state_dict()) == set(load_file(path))
    assert "embeddings.mask_token" in model.state_dict() and not model.training


def load_error(*args) -> str:
    with pytest.raises(LoadError) as info:
        dinov2_load.load_dinov2(*args)
    message = str(info.value)
    assert "\n" not in message, "loader errors are one line"
    return message


def copy_release(release, tmp_path, config=None, state=None):
    """The release folder with its config.json or tensors replaced."""
    _, folder, _ = release
    (tmp_path / "config.json").write_text(config or (folder / "config.json").read_text())
    save_file(state or load_file(folder / "model.safetensors"), str(tmp_path / "model.safetensors"))
    return tmp_path


def test_folder_errors(plain, tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert "no config.json" in load_error(tmp_path)
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=28, patch_size=14)).save_pretrained(tmp_path / "vit")
    assert "model_type \"vit\", not \"dinov2\" -- another network's config" in load_error(tmp_path / "vit")
    Dinov2ForImageClassification(Dinov2Config(**SMALL, num_labels=5)).save_pretrained(tmp_path / "probe")
    assert "unexpected key classifier.bias (and 44 more)" in load_error(tmp_path / "probe")
    assert "neither a folder" in load_error(tmp_path / "model.safetensors")
    assert "no such folder, and not a hub name" in load_error("not a name")


@pytest.mark.parametrize("field, value, words", [
    ("hidden_act", '"relu"', "hidden_act \"relu\" is not supported"),
    ("num_register_tokens", "4", "unknown field num_register_tokens"),
    ("hidden_size", '"64"', "hidden_size must be a positive integer"),
])
def test_config_errors(plain, tmp_path, field, value, words):
    config = {**json.loads((plain[1] / "config.json").read_text()), field: json.loads(value)}
    assert words in load_error(copy_release(plain, tmp_path, config=json.dumps(config)))


def test_weights_of_another_model(plain, tmp_path):
    state = load_file(plain[1] / "model.safetensors")
    state["blocks.0.attn.qkv.weight"] = state.pop("encoder.layer.1.attention.attention.query.weight")
    message = load_error(copy_release(plain, tmp_path, state=state))
    assert "unexpected key blocks.0.attn.qkv.weight -- not a DINOv2 backbone as the" in message
    state = load_file(plain[1] / "model.safetensors")
    state["layernorm.weight"] = torch.ones(32)
    assert "layernorm.weight is F32 [32] where config.json gives float [64]" in load_error(
        copy_release(plain, tmp_path, state=state))


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """An empty huggingface_hub cache and a hub the probe cannot reach."""
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://huggingface.co")
    monkeypatch.setattr(dinov2_load, "hub_reachable", lambda endpoint: False)
    return tmp_path / "hub"


def test_offline_hub_name(offline):
    token = INTERFACE.set("cli")
    try:
        message = load_error("facebook/dinov2-large")
    finally:
        INTERFACE.reset(token)
    assert "facebook/dinov2-large: not downloaded yet and https://huggingface.co cannot be reached" in message
    assert "fetch config.json and model.safetensors from https://huggingface.co/facebook/dinov2-large" in message
    assert message.endswith("pass --dinov2 FOLDER")


def test_offline_hub_name_from_cache(plain, offline):
    """A release downloaded before loads offline, from huggingface_hub's cache layout."""
    commit = "0" * 40
    repo = offline / "models--facebook--dinov2-small"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for name in dinov2_load.FILES:
        (repo / "snapshots" / commit / name).write_bytes((plain[1] / name).read_bytes())
    model, path = dinov2_load.load_dinov2("facebook/dinov2-small", with_path=True)
    assert path == repo / "snapshots" / commit / "model.safetensors"
    pixels = randn(1, 3, 98, 98)
    with torch.no_grad():
        assert torch.equal(model(pixels), plain[2](pixels))
