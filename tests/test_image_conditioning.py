"""Image conditioning (minisd/image_conditioning.py, `sd.image`) against diffusers and transformers on identical random
weights: the context our encoder gives is the global tokens transformers' Dinov2WithRegistersModel gives; the UNet
reads them as diffusers' UNet2DConditionModel reads encoder_hidden_states; and a variation sampled by our pipeline
with the null (zeros) as the uncond is StableDiffusionPipeline(prompt_embeds=tokens, negative_prompt_embeds=zeros)
with the reference's tokens, for several samplers, eps and v; an interpolation is the same with lerped tokens.

The image-conditioned model is the conftest's tiny SD2-shaped model saved with the `image_condition` metadata and
loaded by minisd.load, which loads the encoder from the folder the metadata names: the real path. The encoder is
32 wide like the tiny UNet's context, so there is no projection here (test_image_projection.py has it).

Tolerances, each the one of the piece it rests on: tokens 1e-6 of their scale (test_dino.py: both sides run the
same float32 operations; measured ~1e-7), the UNet 1e-4 (test_components.py), sampled latents 1e-4
(test_sampling.py). A token error of 1e-6 moves the latents far less than the 1e-4 left for the samplers' float
rounding, and a wrong token (another token order, the patch tokens, a non-zero null) moves them by 1e-2 to O(1).
"""
import copy
import json
from dataclasses import replace

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file, save_file
from test_dino import IMAGENET, image, sharpen_
from transformers import AutoImageProcessor, BitImageProcessor, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

import minisd
from conftest import TINY_CONFIG, randomize_, reference_scheduler, rel_err, write_official
from medti.generation.pipeline import SampleSettings, sample

STEPS, CFG, LATENT = 12, 3.0, 16
PIXELS = LATENT * 4   # the tiny VAE downsamples 4x


def encoder_release(folder, width=32, heads=4, layers=2, size=98):
    """A DINOv2-with-registers release written by transformers (4 registers): random weights, sharpened as in
    test_dino.py so the tokens depend on every step of the preparation."""
    torch.manual_seed(4)
    config = Dinov2WithRegistersConfig(hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                                       patch_size=14, image_size=size)
    ref = sharpen_(randomize_(Dinov2WithRegistersModel(config)))
    ref.save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": size + 14}, crop_size={"height": size, "width": size},
                      **IMAGENET).save_pretrained(folder)
    return ref


def with_image_metadata(path, metadata: dict):
    """The file at `path` rewritten with `metadata` in its header (what a training save writes)."""
    save_file(load_file(path), str(path), metadata=metadata)
    return path


def reference_tokens(ref, folder, images):
    """Global tokens by transformers: its processor's pixels, then CLS and the 4 registers of last_hidden_state."""
    pixels = AutoImageProcessor.from_pretrained(folder)(images=list(images), return_tensors="pt").pixel_values
    with torch.no_grad():
        return ref(pixel_values=pixels).last_hidden_state[:, :5], pixels


@pytest.fixture(scope="module")
def image_model(tiny, tmp_path_factory):
    refs, _ = tiny
    folder = tmp_path_factory.mktemp("encoder")
    ref_encoder = encoder_release(folder)
    entry = json.dumps({"encoder": str(folder), "width": 32, "count": 5, "tokens": "global", "projection": False})
    path = write_official(tmp_path_factory.mktemp("image-model") / "model.safetensors", **refs)
    sd = minisd.load(with_image_metadata(path, {"image_condition": entry}), config=TINY_CONFIG)
    return refs, sd, ref_encoder, folder


def cases():
    return torch.cat([image(300, 250, 0), image(300, 250, 1)])


@torch.no_grad()
def test_context_and_unet_equal_diffusers(image_model):
    refs, sd, ref_encoder, folder = image_model
    images = cases()
    theirs, pixels = reference_tokens(ref_encoder, folder, images)
    context = sd.image(images)
    assert context.shape == (2, 5, 32) and context.dtype == torch.float32
    assert rel_err(context, theirs) < 1e-6
    # prepared pixels give the same context as the uint8 images (the preparation is transformers', bit for bit)
    assert torch.equal(sd.image(pixels), context)
    x = torch.randn(2, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(0))
    for t in (torch.tensor([999.0, 0.0]), torch.tensor([417.25, 3.5])):
        err = rel_err(sd.unet(x, t, context), refs["unet"](x, t, encoder_hidden_states=theirs).sample)
        assert err <= 1e-4, f"UNet on image tokens: relative error {err:.2e} at t={t.tolist()}"


def test_null_is_zeros_of_the_context(image_model):
    _, sd, _, _ = image_model
    null = sd.image.null(3)
    assert null.shape == (3, 5, 32) and null.dtype == sd.image(cases()[:1]).dtype and not null.any()


def reference_latents(refs, sampler, prediction, tokens):
    """StableDiffusionPipeline on the reference tokens with zeros as negative_prompt_embeds, two seeds."""
    pipe = StableDiffusionPipeline(vae=refs["vae"], text_encoder=None, tokenizer=None, unet=refs["unet"],
                                   scheduler=reference_scheduler(sampler, prediction), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    return pipe(prompt_embeds=tokens.repeat(2, 1, 1), negative_prompt_embeds=torch.zeros_like(tokens).repeat(2, 1, 1),
                num_inference_steps=STEPS, guidance_scale=CFG, height=PIXELS, width=PIXELS, output_type="latent",
                generator=[torch.Generator().manual_seed(s) for s in (10, 11)]).images


def ours_latents(sd, sampler, prediction, context):
    model = copy.copy(sd)
    model.config = replace(sd.config, prediction=prediction)   # the same weights read as an eps or a v model
    return sample(model, context, sd.image.null(1), [1.0], [10, 11],
                  SampleSettings(width=PIXELS, height=PIXELS, steps=STEPS, cfg=CFG, sampler=sampler))


@pytest.mark.parametrize("sampler,prediction", [("euler_a", "eps"), ("euler_a", "v"), ("dpmpp_2m", "eps"),
                                                ("dpmpp_2m", "v"), ("ddim", "v")])
def test_variation_equals_diffusers(image_model, sampler, prediction):
    """Variations of one case: its context from our encoder, two seeds, guidance against the zeros null."""
    refs, sd, ref_encoder, folder = image_model
    images = cases()[:1]
    ref = reference_latents(refs, sampler, prediction, reference_tokens(ref_encoder, folder, images)[0])
    err = rel_err(ours_latents(sd, sampler, prediction, sd.image(images)), ref)
    assert err <= 1e-4, f"variation {sampler}/{prediction}: relative error {err:.2e}"


def test_interpolation_equals_diffusers_on_lerped_tokens(image_model):
    """sd.image.mix(a, b, [r]) sampled = the reference pipeline on lerp(tokens a, tokens b, r)."""
    refs, sd, ref_encoder, folder = image_model
    images = cases()
    theirs = reference_tokens(ref_encoder, folder, images)[0]
    r = 0.3
    ref = reference_latents(refs, "dpmpp_2m", "eps", torch.lerp(theirs[:1], theirs[1:], r))
    mixed = sd.image.mix(images[:1], images[1:], [0.0, r, 1.0])
    assert mixed.shape == (3, 5, 32)
    # the ends are the two cases themselves, exactly (torch.lerp is exact at weights 0 and 1)
    assert torch.equal(mixed[0], sd.image(images[:1])[0]) and torch.equal(mixed[2], sd.image(images[1:])[0])
    err = rel_err(ours_latents(sd, "dpmpp_2m", "eps", mixed[1:2]), ref)
    assert err <= 1e-4, f"interpolation at {r}: relative error {err:.2e}"
