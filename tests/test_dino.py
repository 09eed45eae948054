"""minisd's DINO image encoders against transformers and timm on identical random weights, with each release's own
image preparation (transformers' image processors, timm's data config and transforms) on a structured image.

Releases are written by the reference libraries themselves (transformers' save_pretrained with the processor's
preprocessor_config.json; timm's save_for_hf) and loaded through minisd.dino_load.load_encoder, the real path.
Tiny configs trained at 98 px (7 x 7 patches of 14; DINOv1: 4 x 4 of 16), positions at unit scale and attention
sharpened (queries and keys x20) so that the tokens depend on where the position table is resampled; the register
tokens drawn at random too (the libraries start them at zero, which would hide registers in the wrong order).

Tolerances. Networks: 1e-6 of the output's scale (about 8 float32 ulps); both sides run the same float32 operations,
measured 0 to 1e-7 (SwiGLU: transformers 5 splits the fused gate/value projection in two matmuls). Preparation:
transformers' processors run torch's uint8 resize, as we do: bit-identical, asserted with torch.equal. timm resizes
PIL images: PIL's fixed-point bicubic differs from torch's by one grey level on some pixels (measured 0.5 %), so
inputs are held to one grey level (1 / (255 * std)) on under 2 % of the values, ulps (1e-5) elsewhere.
"""
import json

import pytest
import timm
import torch
from PIL import Image
from timm.models import save_for_hf
from transformers import (
    AutoImageProcessor,
    BitImageProcessor,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    ViTConfig,
    ViTImageProcessor,
    ViTModel,
)

from conftest import randomize_, rel_err
from minisd import dino, dino_load, dino_prepare

TOLERANCE = 1e-6
SHARPEN = 20
SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
IMAGENET = dict(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])


def sharpen_(model):
    """Unit-scale positions, random registers, queries and keys x20 (see the module docstring)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("position_embeddings", "pos_embed", "register_tokens", "reg_token")):
                p.normal_()
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(SHARPEN)
            elif name.endswith("attn.qkv.weight"):   # timm: rows of query, key, value
                p[:2 * p.shape[1]].mul_(SHARPEN)
    return model


def registers_release(folder, swiglu=False):
    torch.manual_seed(0)
    config = Dinov2WithRegistersConfig(**SMALL, patch_size=14, image_size=98, use_swiglu_ffn=swiglu)
    ref = sharpen_(randomize_(Dinov2WithRegistersModel(config)))
    ref.save_pretrained(folder)
    # the hub files state the position resampling too (fields transformers 5 writes no more)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "interpolate_antialias": True, "interpolate_offset": 0}))
    BitImageProcessor(size={"shortest_edge": 112}, crop_size={"height": 98, "width": 98}, **IMAGENET).save_pretrained(
        folder)
    return ref, folder


def timm_release(folder, giant=False):
    """timm's vit_{base,giant}_patch14_reg4_dinov2 shrunk; the giant's packed SwiGLU is 352 wide for width 64
    (DINOv2's rule: 2 x 176), so mlp_ratio 5.5 (timm states 2.66667 * 2 for the real one)."""
    torch.manual_seed(1)
    name = "vit_giant_patch14_reg4_dinov2" if giant else "vit_base_patch14_reg4_dinov2"
    extra = dict(mlp_ratio=5.5) if giant else {}
    ref = sharpen_(randomize_(timm.create_model(name, embed_dim=64, depth=2, num_heads=4, img_size=98,
                                                dynamic_img_size=True, **extra)))
    save_for_hf(ref, folder, safe_serialization=True, data_config={"input_size": (3, 98, 98), "crop_pct": 0.875})
    # The reference as a timm user has it: built from the folder (config.json's model_args and pretrained_cfg).
    return timm.create_model(f"local-dir:{folder}", pretrained=True).eval(), folder


def dinov1_release(folder, pooler=False):
    torch.manual_seed(2)
    config = ViTConfig(**SMALL, intermediate_size=128, patch_size=16, image_size=64)
    ref = sharpen_(randomize_(ViTModel(config, add_pooling_layer=pooler)))
    ref.save_pretrained(folder)
    ViTImageProcessor(size={"height": 64, "width": 64}, **IMAGENET).save_pretrained(folder)
    return ref, folder


@pytest.fixture(scope="module", params=[False, True], ids=["mlp", "swiglu"])
def registers(request, tmp_path_factory):
    ref, folder = registers_release(tmp_path_factory.mktemp("reg"), request.param)
    return ref, folder, dino_load.load_encoder(folder)


@pytest.fixture(scope="module", params=[False, True], ids=["base", "giant"])
def timm_reg(request, tmp_path_factory):
    ref, folder = timm_release(tmp_path_factory.mktemp("timm"), request.param)
    return ref, folder, dino_load.load_encoder(folder)


@pytest.fixture(scope="module", params=[False, True], ids=["no-pooler", "pooler"])
def dinov1(request, tmp_path_factory):
    ref, folder = dinov1_release(tmp_path_factory.mktemp("dinov1"), request.param)
    return ref, folder, dino_load.load_encoder(folder)


def randn(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(3))


def image(height=300, width=250, seed=0) -> torch.Tensor:
    """A radiograph-like uint8 RGB image [1, 3, H, W]: grey (three equal channels), a dark background with two
    bright lung-field ellipses, a brighter mediastinum between them, ribs as a ripple, sensor noise."""
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
    shift = 0.1 * float(torch.rand(1, generator=g))
    lungs = sum(((x - cx) / 0.32) ** 2 + ((y - shift) / 0.7) ** 2 < 1 for cx in (-0.42, 0.42)).float()
    body = 50 + 90 * lungs * (1 + 0.15 * torch.sin(30 * y + 3 * x)) + 120 * ((x.abs() < 0.12) & (y > -0.5))
    grey = (body + 6 * torch.randn(body.shape, generator=g)).clamp(0, 255).round().to(torch.uint8)
    return grey.expand(3, -1, -1)[None].contiguous()


def pil(images: torch.Tensor) -> Image.Image:
    return Image.fromarray(images[0].permute(1, 2, 0).numpy())


# 98: the trained grid; 224: resampled 7 -> 16 (as the 518-px releases at 224); 98 x 140: not square.
SIZES = [(98, 98), (224, 224), (98, 140)]


@pytest.mark.parametrize("size", SIZES)
def test_registers_equal_transformers(registers, size):
    ref, _, ours = registers
    pixels = randn(2, 3, *size)
    with torch.no_grad():
        theirs = ref(pixel_values=pixels).last_hidden_state
        assert rel_err(ours(pixels), theirs) < TOLERANCE
        # the global tokens: CLS and the 4 registers; transformers' pooler_output is the CLS token itself
        tokens = ours.global_tokens(pixels)
    assert tokens.shape == (2, 5, 64) and torch.equal(tokens, ours(pixels)[:, :5])
    assert rel_err(tokens[:, 0], ref(pixel_values=pixels).pooler_output) < TOLERANCE


@pytest.mark.parametrize("size", SIZES)
def test_timm_equals_timm(timm_reg, size):
    """timm's forward_features (all tokens after the final norm; with dynamic_img_size off the trained size)."""
    ref, _, ours = timm_reg
    pixels = randn(2, 3, *size)
    with torch.no_grad():
        assert rel_err(ours(pixels), ref.forward_features(pixels)) < TOLERANCE
        assert rel_err(ours.global_tokens(pixels)[:, 0], ref(pixels)) < TOLERANCE   # timm's pooled output: CLS


@pytest.mark.parametrize("size", [(64, 64), (96, 80)])
def test_dinov1_equals_transformers(dinov1, size):
    ref, _, ours = dinov1
    pixels = randn(2, 3, *size)
    with torch.no_grad():
        out = ref(pixel_values=pixels, interpolate_pos_encoding=True)
        assert rel_err(ours(pixels), out.last_hidden_state) < TOLERANCE
        tokens = ours.global_tokens(pixels)
    if ref.pooler is None:   # the releases: the CLS token alone
        assert tokens.shape == (2, 1, 64) and out.pooler_output is None
    else:                    # a file with a pooler: CLS, then transformers' pooler_output
        assert tokens.shape == (2, 2, 64) and rel_err(tokens[:, 1], out.pooler_output) < TOLERANCE
    assert rel_err(tokens[:, 0], out.last_hidden_state[:, 0]) < TOLERANCE


@pytest.mark.parametrize("size", [(300, 250), (251, 300), (98, 98), (60, 70)])
@pytest.mark.parametrize("release", ["registers", "dinov1"])
def test_preparation_is_the_processors(release, size, tmp_path):
    """Shortest edge, then a crop with an odd margin at 300 x 250; squash to a square; an image smaller than the
    model's input (upsampled). The uint8 tensor and the PIL image give the processor the same pixels."""
    folder = (registers_release if release == "registers" else dinov1_release)(tmp_path)[1]
    images = image(*size)
    theirs = AutoImageProcessor.from_pretrained(folder)(images=pil(images), return_tensors="pt").pixel_values
    ours = dino_prepare.prepare(dino_load.read_release(folder)[2], images)
    assert torch.equal(ours, theirs)


def test_legacy_processor_file(tmp_path):
    """The form files written before 2023 carry: ViTFeatureExtractor, `size` as one integer (a square for ViT),
    do_rescale left out (default true)."""
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "feature_extractor_type": "ViTFeatureExtractor", "do_resize": True, "size": 64, "resample": 2,
        "do_normalize": True, **IMAGENET}))
    images = image()
    theirs = AutoImageProcessor.from_pretrained(tmp_path)(images=pil(images), return_tensors="pt").pixel_values
    prep = dino_prepare.from_processor(tmp_path / "preprocessor_config.json")
    assert prep.size == (64, 64) and torch.equal(dino_prepare.prepare(prep, images), theirs)


# timm's crop starts at round(17.5) = 18 for 251 x 300 (resized to 112 x 133), where int() would give 17.
@pytest.mark.parametrize("size", [(300, 250), (251, 300), (300, 251), (120, 120)])
def test_preparation_is_timms(timm_reg, size):
    """timm's eval transform from the release's data config (shortest edge 98 / 0.875 = 112, crop 98) on the PIL
    image vs ours on the tensor: one grey level at most, on few values (measured 0.16-0.4 %).

    End to end (dino.encode vs timm's model on timm's pixels) that grey level moves the tokens by 2e-5 to 2.5e-4 of
    their scale in this sharpened network (measured); asserted below 1e-3. A crop box one pixel off, as int() in
    place of round() gives at 251 x 300, moves them by 2e-2 (measured), so the bound tells the two apart."""
    ref, _, ours = timm_reg
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=ref))
    images = image(*size)
    theirs = transform(pil(images))[None]
    mine = dino_prepare.prepare(ours.preparation, images)
    assert mine.shape == theirs.shape == (1, 3, 98, 98)
    grey = 1 / (255 * min(ours.preparation.std))
    diff = (mine - theirs).abs()
    assert diff.max() <= grey * 1.001 and (diff > 1e-5).float().mean() < 0.02
    with torch.no_grad():
        assert rel_err(dino.encode(ours, images), ref.forward_features(theirs)[:, :5]) < 1e-3


def reference_tokens(ref, pixels):
    """The global tokens from the reference's outputs: CLS (+ registers: the next R tokens) (+ a pooler's output)."""
    with torch.no_grad():
        out = ref(pixel_values=pixels)
    count = 1 + getattr(ref.config, "num_register_tokens", 0)
    pooled = [out.pooler_output[:, None]] if getattr(ref, "pooler", None) is not None else []
    return torch.cat([out.last_hidden_state[:, :count], *pooled], dim=1)


def test_encode_end_to_end(registers, dinov1):
    """dino.encode: uint8 images -> the global tokens transformers gives for its processor's pixels."""
    images = torch.cat([image(300, 250, 0), image(300, 250, 1)])
    for ref, folder, ours in (registers, dinov1):
        pixels = AutoImageProcessor.from_pretrained(folder)(images=list(images), return_tensors="pt").pixel_values
        tokens = dino.encode(ours, images)
        assert tokens.dtype == torch.float32 and tokens.shape == (2, ours.num_global_tokens, 64)
        assert rel_err(tokens, reference_tokens(ref, pixels)) < TOLERANCE


def test_encode_refuses_other_images(registers):
    for wrong in (torch.zeros(1, 3, 8, 8), torch.zeros(3, 8, 8, dtype=torch.uint8),
                  torch.zeros(1, 1, 8, 8, dtype=torch.uint8)):
        with pytest.raises(ValueError, match="DINO encoders take uint8 RGB images"):
            dino.encode(registers[2], wrong)


def test_state_dict_is_the_release(registers, timm_reg, dinov1):
    """Our names are transformers' file names, all but the ignored mask token; timm's file maps onto all of ours."""
    from safetensors.torch import load_file
    for _, folder, ours in (registers, dinov1):
        stored = set(load_file(folder / "model.safetensors"))
        assert set(ours.state_dict()) == stored - dino_load.IGNORED_KEYS
    stored, ours = load_file(timm_reg[1] / "model.safetensors"), timm_reg[2]
    assert len(stored) == len(ours.state_dict()) - 4 * SMALL["num_hidden_layers"]   # q, k, v (w, b): one qkv (w, b)
    table = ours.embeddings.position_embeddings   # timm's class token holds its position: our row 0 is zero
    assert torch.equal(table[:, 1:], stored["pos_embed"]) and not table[:, 0].any()
