"""medti.generation.pipeline.sample equals diffusers: composable prompts against a reference loop built from diffusers'
UNet and scheduler with the composition formula, and masked inpainting/img2img against
StableDiffusionInpaintPipeline with 4- and 9-channel UNets. Tolerance as in test_sampling.py."""
import json

import pytest
import torch
from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionInpaintPipeline, UNet2DConditionModel
from PIL import Image

import minisd
from conftest import TINY_CONFIG, TINY_UNET, randomize_, rel_err, write_official
from medti.generation.pipeline import InitImage, SampleSettings, sample

STEPS, CFG, LATENT = 12, 3.0, 16


def scheduler():
    return EulerAncestralDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                           steps_offset=1)


@torch.no_grad()
def test_composable_prompt_equals_reference_loop(tiny):
    refs, sd = tiny
    gen = torch.Generator().manual_seed(3)
    conds, uncond = torch.randn(3, 77, 32, generator=gen), torch.randn(1, 77, 32, generator=gen)
    weights = [0.25, 0.75, -0.5]   # a negative weight pushes away from that concept

    # Reference: diffusers' UNet and scheduler, the composition written out on the noise predictions
    # (D = D_u + cfg * sum_k w_k (D_k - D_u) on denoised latents is the same linear combination on eps).
    sched = scheduler()
    sched.set_timesteps(STEPS)
    g = torch.Generator().manual_seed(42)
    latents = torch.randn(1, 4, LATENT, LATENT, generator=g) * sched.init_noise_sigma
    for t in sched.timesteps:
        inp = sched.scale_model_input(latents, t)
        eps_u = refs["unet"](inp, t, encoder_hidden_states=uncond).sample
        eps = eps_u + CFG * sum(w * (refs["unet"](inp, t, encoder_hidden_states=c[None]).sample - eps_u)
                                for w, c in zip(weights, conds, strict=True))
        latents = sched.step(eps, t, latents, generator=g).prev_sample

    ours = sample(sd, conds, uncond, weights, [42], SampleSettings(width=LATENT * 4, height=LATENT * 4, cfg=CFG,
                  steps=STEPS, batch=2))   # batch 2: the 4 UNet rows go in two chunks
    err = rel_err(ours, latents)
    assert err <= 1e-4, f"composition: relative error {err:.2e}"


@pytest.fixture(scope="module")
def tiny9(tiny, tmp_path_factory):
    """The tiny model with a 9-channel (inpainting) UNet."""
    refs, _ = tiny
    unet9 = randomize_(UNet2DConditionModel(**{**TINY_UNET, "in_channels": 9}), 4)
    folder = tmp_path_factory.mktemp("tiny9")
    path = write_official(folder / "tiny9.safetensors", unet=unet9, vae=refs["vae"], text=refs["text"])
    config = json.loads(json.dumps(TINY_CONFIG))
    config["unet"]["in_channels"] = 9
    return {**refs, "unet": unet9}, minisd.load(path, config=config)


@pytest.mark.parametrize("channels,strength,masked", [(4, 1.0, True), (4, 0.6, True), (4, 0.5, False),
                                                      (9, 1.0, True), (9, 0.7, True)])
@torch.no_grad()
def test_inpainting_and_img2img_equal_diffusers(tiny, tiny9, channels, strength, masked):
    refs, sd = tiny if channels == 4 else tiny9
    pixels = LATENT * 4   # the tiny VAE downsamples 4x
    rng = torch.Generator().manual_seed(8)
    image = (torch.rand(3, pixels, pixels, generator=rng) * 255).round().to(torch.uint8)
    mask = torch.full((pixels, pixels), 255 if not masked else 0, dtype=torch.uint8)
    mask[8:40, 20:56] = 255
    cond, uncond = torch.randn(1, 77, 32, generator=rng), torch.randn(1, 77, 32, generator=rng)
    pipe = StableDiffusionInpaintPipeline(vae=refs["vae"], text_encoder=None, tokenizer=None, unet=refs["unet"],
                                          scheduler=scheduler(), safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)
    ref = pipe(prompt_embeds=cond.repeat(2, 1, 1), negative_prompt_embeds=uncond.repeat(2, 1, 1),
               image=[Image.fromarray(image.permute(1, 2, 0).numpy())] * 2,
               mask_image=[Image.fromarray(mask.numpy())] * 2, strength=strength, num_inference_steps=STEPS,
               guidance_scale=CFG, height=pixels, width=pixels, output_type="latent",
               generator=[torch.Generator().manual_seed(s) for s in (30, 31)]).images

    init = InitImage(image[None].float() / 127.5 - 1, (mask > 127).float()[None, None] if masked else None, strength)
    ours = sample(sd, cond, uncond, [1.0], [30, 31], SampleSettings(width=pixels, height=pixels, cfg=CFG,
                  steps=STEPS), init)
    err = rel_err(ours, ref)
    assert err <= 1e-4, f"{channels}-channel, strength {strength}: relative error {err:.2e}"


@torch.no_grad()
def test_half_precision_vae_overflow_is_redone_in_fp32(tiny):
    """A decode that overflows in fp16 (inf/NaN) is redone in fp32; the VAE keeps its dtype afterwards."""
    import copy

    from medti.generation.pipeline import decode
    _, sd = tiny
    sd = copy.copy(sd)
    sd.vae = copy.deepcopy(sd.vae)
    sd.vae.decoder.conv_in.weight.mul_(3e4)   # activations beyond fp16's 65504, fine in fp32
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sd.vae.half()
    # the fp32 redo runs the fp16-rounded weights in fp32
    reference = copy.deepcopy(sd.vae).float().decode(latents.half().float() / sd.scale_factor).clamp(-1, 1)
    assert not torch.isfinite(sd.vae.decode(latents.half() / sd.scale_factor)).all()
    images = decode(sd, latents.half())
    assert torch.isfinite(images).all() and torch.equal(images, reference)
    assert next(sd.vae.parameters()).dtype == torch.float16


@torch.no_grad()
def test_compiled_generation_equals_eager(tiny):
    """--compile (torch.compile with inductor freezing on the CPU) changes speed, not results: the same latents
    and images as the eager modules, up to fp32 rounding in fused kernels (bound: test_sampling.py's 1e-4)."""
    import copy

    from medti.generation.pipeline import compile_for_inference, decode
    refs, sd = tiny
    fast = copy.copy(sd)
    fast.unet, fast.vae = copy.deepcopy(sd.unet), copy.deepcopy(sd.vae)
    compile_for_inference(fast)
    gen = torch.Generator().manual_seed(5)
    cond, uncond = torch.randn(1, 77, 32, generator=gen), torch.randn(1, 77, 32, generator=gen)

    def run(model):
        latents = sample(model, cond, uncond, [1.0], [7], SampleSettings(width=8 * LATENT, height=8 * LATENT,
                         cfg=CFG, steps=4))
        return latents, decode(model, latents)
    (lat, img), (lat_c, img_c) = run(sd), run(fast)
    assert type(fast.unet).__name__ == "OptimizedModule"   # the compiled path really ran
    for name, ours, ref in (("latents", lat_c, lat), ("images", img_c, img)):
        err = rel_err(ours, ref)
        assert err <= 1e-4, f"compiled {name}: relative error {err:.2e}"
