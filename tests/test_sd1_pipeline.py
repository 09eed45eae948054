"""SD1 end to end against diffusers' own pipelines: a tiny SD1 model (conv projections, 8 heads per level as
v1-inference.yaml, an OpenAI CLIP text tower with quick_gelu over the full 49408-id vocabulary) built with diffusers'
and transformers' classes and random weights, saved by `save_pretrained` and loaded back by `minisd.load(folder)`.
Prompts go through each side's own tokenizer -- transformers' CLIPTokenizer with pad_token "<|endoftext|>" for the
pipeline, minisd's with SD1's pad id 49407 for us -- so SD1's padding is checked as the final images see it.

Compared: txt2img (StableDiffusionPipeline, Euler ancestral, two images with their own generators) latents and
decoded images; composition (GuidedDenoiser with two weighted prompts) against a loop over the pipeline's UNet and
scheduler with the composition formula on its noise predictions (as tests/test_pipeline.py does for SD2); masked
inpainting with the 4-channel model and a 9-channel SD1 inpainting model (StableDiffusionInpaintPipeline).

Tolerance, as in tests/test_sampling.py: relative error <= 1e-4 of the reference's max |value|, fp32. The same
network maths on both sides, with the step arithmetic in other float rounding, agrees to ~1e-6 (measured: the run's
summary table); the wrong pad id changes the text context by O(1), a wrong head split or draw order gives 1e-3 to 1.
"""
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from test_load_diffusers import clip_tokenizer
from test_unet_sd1 import TINY_SD1_DIFFUSERS
from transformers import CLIPTextConfig, CLIPTextModel

import minisd
from conftest import TINY_VAE, randomize_, reference_scheduler, rel_err
from medti.generation.pipeline import InitImage, SampleSettings, decode, sample

TOL = 1e-4
STEPS, CFG, LATENT = 8, 3.0, 16
PIXELS = LATENT * 4                          # the tiny VAE (3 levels) downsamples 4x
# SD1's text tower, tiny: quick_gelu (OpenAI CLIP's activation), the full vocabulary so that real prompts tokenize;
# transformers' defaults bos 49406 / eos 49407 are CLIP's start and end ids.
SD1_TEXT = dict(vocab_size=49408, hidden_size=32, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                max_position_embeddings=77, hidden_act="quick_gelu")
# A literal "!" is an ordinary token for SD1 on both sides (only SD2's transformers tokenizer pads with it).
PROMPT, NEGATIVE = "a chest x-ray, frontal view!", "blurry"
TERMS = ["an x-ray of healthy lungs", "cardiomegaly"]


def sd1_pipeline(folder, channels: int = 4, seed: int = 0):
    """A tiny random SD1 (in_channels 4) or SD1-inpainting (9) pipeline, saved to `folder`; returns it."""
    torch.manual_seed(seed)   # the libraries' own init, which randomize_ perturbs, comes from the global generator
    unet = UNet2DConditionModel(**{**TINY_SD1_DIFFUSERS, "in_channels": channels})
    cls = StableDiffusionInpaintPipeline if channels == 9 else StableDiffusionPipeline
    folder.mkdir(parents=True, exist_ok=True)
    pipe = cls(vae=randomize_(AutoencoderKL(**TINY_VAE), seed + 1),
               text_encoder=randomize_(CLIPTextModel(CLIPTextConfig(**SD1_TEXT)), seed + 2),
               unet=randomize_(unet, seed + 3), tokenizer=clip_tokenizer(folder.parent, "<|endoftext|>"),
               scheduler=reference_scheduler("euler_a"), safety_checker=None, feature_extractor=None,
               requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return pipe


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """channels -> (diffusers pipeline, our model loaded from its saved folder)."""
    tmp = tmp_path_factory.mktemp("sd1")
    out = {}
    for channels, seed in ((4, 0), (9, 10)):
        pipe = sd1_pipeline(tmp / f"sd1-{channels}", channels, seed)
        out[channels] = pipe, minisd.load(tmp / f"sd1-{channels}")
    return out


def generators(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


@torch.no_grad()
def test_sd1_text_padding_is_the_end_token(sd1):
    """The context both sides feed the UNet; our ids pad with 49407 after the end token, as transformers' do."""
    pipe, sd = sd1[4]
    ids = sd.text.tokenizer([PROMPT])[0]
    theirs = pipe.tokenizer([PROMPT], padding="max_length", max_length=77, return_tensors="pt").input_ids[0]
    assert ids.tolist() == theirs.tolist() and ids[-1] == 49407 and sd.text.tokenizer.pad_id == 49407
    ref = pipe.encode_prompt([PROMPT, NEGATIVE], "cpu", 1, False)[0]
    err = rel_err(sd.text([PROMPT, NEGATIVE]), ref)
    assert err <= TOL, f"text context: relative error {err:.2e}"


@torch.no_grad()
def test_txt2img_latents_and_images_equal_diffusers(sd1):
    pipe, sd = sd1[4]
    common = dict(prompt=[PROMPT] * 2, negative_prompt=[NEGATIVE] * 2, num_inference_steps=STEPS,
                  guidance_scale=CFG, height=PIXELS, width=PIXELS)
    ref_latents = pipe(**common, generator=generators(10, 11), output_type="latent").images
    ref_images = pipe(**common, generator=generators(10, 11), output_type="pt").images   # [2, 3, H, W] in [0, 1]

    settings = SampleSettings(width=PIXELS, height=PIXELS, steps=STEPS, cfg=CFG, sampler="euler_a")
    latents = sample(sd, sd.text([PROMPT]), sd.text([NEGATIVE]), [1.0], [10, 11], settings)
    images = (decode(sd, latents) + 1) / 2   # diffusers' postprocess: [-1, 1] -> [0, 1]
    for name, ours, ref in (("latents", latents, ref_latents), ("images", images, ref_images)):
        err = rel_err(ours, ref)
        assert err <= TOL, f"txt2img {name}: relative error {err:.2e}"


@torch.no_grad()
def test_composable_prompt_equals_reference_loop(sd1):
    pipe, sd = sd1[4]
    weights = [0.7, 0.3]
    conds = pipe.encode_prompt(TERMS, "cpu", 1, False)[0]      # the pipeline's tokenizer and text encoder
    uncond = pipe.encode_prompt([NEGATIVE], "cpu", 1, False)[0]
    sched = reference_scheduler("euler_a")
    sched.set_timesteps(STEPS)
    g = torch.Generator().manual_seed(42)
    latents = torch.randn(1, 4, LATENT, LATENT, generator=g) * sched.init_noise_sigma
    for t in sched.timesteps:   # D = D_u + cfg * sum_k w_k (D_k - D_u), written on the noise predictions
        inp = sched.scale_model_input(latents, t)
        eps_u = pipe.unet(inp, t, encoder_hidden_states=uncond).sample
        eps = eps_u + CFG * sum(w * (pipe.unet(inp, t, encoder_hidden_states=c[None]).sample - eps_u)
                                for w, c in zip(weights, conds, strict=True))
        latents = sched.step(eps, t, latents, generator=g).prev_sample

    ours = sample(sd, sd.text(TERMS), sd.text([NEGATIVE]), weights, [42],
                  SampleSettings(width=PIXELS, height=PIXELS, steps=STEPS, cfg=CFG))
    err = rel_err(ours, latents)
    assert err <= TOL, f"SD1 composition: relative error {err:.2e}"


@pytest.mark.parametrize("channels,strength", [(4, 1.0), (4, 0.6), (9, 1.0), (9, 0.7)])
@torch.no_grad()
def test_masked_inpainting_equals_diffusers(sd1, channels, strength):
    pipe, sd = sd1[channels]
    pipe = StableDiffusionInpaintPipeline(**pipe.components)   # the 4-channel model through the inpaint pipeline
    rng = torch.Generator().manual_seed(8)
    image = (torch.rand(3, PIXELS, PIXELS, generator=rng) * 255).round().to(torch.uint8)
    mask = torch.zeros(PIXELS, PIXELS, dtype=torch.uint8)
    mask[8:40, 20:56] = 255
    ref = pipe(prompt=[PROMPT] * 2, negative_prompt=[NEGATIVE] * 2,
               image=[Image.fromarray(image.permute(1, 2, 0).numpy())] * 2,
               mask_image=[Image.fromarray(mask.numpy())] * 2, strength=strength, num_inference_steps=STEPS,
               guidance_scale=CFG, height=PIXELS, width=PIXELS, output_type="latent",
               generator=generators(30, 31)).images

    init = InitImage(image[None].float() / 127.5 - 1, (mask > 127).float()[None, None], strength)
    ours = sample(sd, sd.text([PROMPT]), sd.text([NEGATIVE]), [1.0], [30, 31],
                  SampleSettings(width=PIXELS, height=PIXELS, cfg=CFG, steps=STEPS), init)
    err = rel_err(ours, ref)
    assert err <= TOL, f"SD1 {channels}-channel inpainting, strength {strength}: relative error {err:.2e}"
