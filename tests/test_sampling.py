"""Sampling equals diffusers: StableDiffusionPipeline + Euler(-ancestral) scheduler on the same tiny UNet,
prompt embeddings and per-image generators.

Tolerance: relative error <= 1e-4 of the final latents' scale (fp32). Both sides run the same UNet maths;
the step arithmetic differs only in float rounding (diffusers keeps sigmas as float32 tensors, we use Python
floats), which stays near 1e-6 over 12 steps; a wrong sigma, a wrong draw order or eps/v mix-up gives O(1).
"""
import pytest
import torch
from diffusers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, StableDiffusionPipeline

from conftest import rel_err
from minisd.sampling import SAMPLERS, Denoiser, GuidedDenoiser, draw, initial_sigma, step_schedule
from minisd.schedule import training_sigmas

STEPS, CFG, LATENT = 12, 3.0, 16


def reference_pipeline(refs, scheduler):
    return StableDiffusionPipeline(vae=refs["vae"], text_encoder=None, tokenizer=None, unet=refs["unet"],
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def make_scheduler(sampler, prediction, spacing):
    kind = {"euler_a": EulerAncestralDiscreteScheduler, "euler": EulerDiscreteScheduler}[sampler]
    # SD2's hub scheduler config: scaled_linear betas 0.00085..0.012, steps_offset 1
    return kind(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing=spacing,
                steps_offset=1, prediction_type={"eps": "epsilon", "v": "v_prediction"}[prediction])


@pytest.mark.parametrize("sampler,prediction,spacing", [
    ("euler_a", "eps", "linspace"), ("euler_a", "v", "linspace"), ("euler_a", "eps", "leading"),
    ("euler_a", "eps", "trailing"), ("euler", "eps", "linspace"), ("euler", "v", "trailing")])
def test_txt2img_latents_equal_diffusers(tiny, sampler, prediction, spacing):
    refs, sd = tiny
    gen = torch.Generator().manual_seed(5)
    cond, uncond = torch.randn(1, 77, 32, generator=gen), torch.randn(1, 77, 32, generator=gen)
    pipe = reference_pipeline(refs, make_scheduler(sampler, prediction, spacing))
    scale = pipe.vae_scale_factor
    ref = pipe(prompt_embeds=cond.repeat(2, 1, 1), negative_prompt_embeds=uncond.repeat(2, 1, 1),
               num_inference_steps=STEPS, guidance_scale=CFG, height=LATENT * scale, width=LATENT * scale,
               generator=[torch.Generator().manual_seed(s) for s in (10, 11)], output_type="latent").images

    sigmas, timesteps = step_schedule(STEPS, spacing)
    torch.testing.assert_close(sigmas, pipe.scheduler.sigmas, rtol=1e-6, atol=0)   # same float32 schedule
    gens = [torch.Generator().manual_seed(s) for s in (10, 11)]
    x = draw(gens, torch.zeros(2, 4, LATENT, LATENT)) * initial_sigma(sigmas, spacing)
    model = GuidedDenoiser(Denoiser(sd.unet, prediction), cond, uncond, [1.0], CFG)
    ours = SAMPLERS[sampler](model, x, sigmas, timesteps, gens)
    err = rel_err(ours, ref)
    assert err <= 1e-4, f"{sampler}/{prediction}/{spacing}: relative error {err:.2e}"


def test_kdiffusion_spacing_is_log_sigma_interpolation():
    """Closed form: sigma(t) = exp of the linear interpolation of log sigma between integer timesteps."""
    sigmas, t = step_schedule(7, "kdiffusion")
    table = training_sigmas().double()
    assert t[0] == 999 and t[-1] == 0 and sigmas[-1] == 0 and len(sigmas) == 8
    for s, tt in zip(sigmas[:-1].double(), t.double(), strict=True):
        lo, hi = int(tt.floor()), int(tt.ceil())
        w = tt - lo
        expected = torch.exp((1 - w) * table[lo].log() + w * table[hi].log())
        assert abs(s - expected) / expected < 1e-6
    assert abs(sigmas[0].item() - 14.6146) < 1e-3 and abs(training_sigmas()[0] - 0.0292) < 1e-4


def test_cfg_one_skips_the_uncond_pass(tiny):
    _, sd = tiny
    calls = []
    unet = sd.unet

    def counting(x, t, context):
        calls.append(x.shape[0])
        return unet(x, t, context)
    cond, uncond = torch.randn(1, 77, 32), torch.randn(1, 77, 32)
    model = GuidedDenoiser(Denoiser(counting, "eps"), cond, uncond, [1.0], 1.0)
    model(torch.randn(2, 4, LATENT, LATENT), 1.0, 100.0)
    assert calls == [2]


def encode_sample(vae, images, generators, scale):
    """Per-image VAE encode with a draw from that image's generator: mean + std * N(0, 1), then scaled
    (diffusers' _encode_vae_image with a list of generators)."""
    out = []
    for image, g in zip(images, generators, strict=True):
        mean, logvar = vae.encode(image[None])
        out.append(mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=g))
    return torch.cat(out) * scale


@pytest.mark.parametrize("strength", [1.0, 0.6])
@torch.no_grad()
def test_inpainting_equals_diffusers_4_channel(tiny, strength):
    from diffusers import StableDiffusionInpaintPipeline
    from PIL import Image

    from minisd.sampling import keep_unmasked, strength_start
    refs, sd = tiny
    pixels = LATENT * 4   # the tiny VAE downsamples 4x
    rng = torch.Generator().manual_seed(7)
    image = (torch.rand(3, pixels, pixels, generator=rng) * 255).round().to(torch.uint8)
    mask = torch.zeros(pixels, pixels, dtype=torch.uint8)
    mask[8:40, 20:56] = 255   # white = repaint
    cond, uncond = torch.randn(1, 77, 32, generator=rng), torch.randn(1, 77, 32, generator=rng)
    pipe = StableDiffusionInpaintPipeline(vae=refs["vae"], text_encoder=None, tokenizer=None, unet=refs["unet"],
                                          scheduler=make_scheduler("euler_a", "eps", "linspace"),
                                          safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    ref = pipe(prompt_embeds=cond.repeat(2, 1, 1), negative_prompt_embeds=uncond.repeat(2, 1, 1),
               # one copy per image: given a single image, diffusers encodes it once with generator 0 only
               image=[Image.fromarray(image.permute(1, 2, 0).numpy())] * 2,
               mask_image=[Image.fromarray(mask.numpy())] * 2,
               strength=strength, num_inference_steps=STEPS, guidance_scale=CFG, height=pixels, width=pixels,
               generator=[torch.Generator().manual_seed(s) for s in (20, 21)], output_type="latent").images

    gens = [torch.Generator().manual_seed(s) for s in (20, 21)]
    images = (image.float() / 127.5 - 1).expand(2, -1, -1, -1)
    init = encode_sample(sd.vae, images, gens, sd.scale_factor)          # draw 1: the init image's latent
    noise = draw(gens, init)                                               # draw 2: the initial noise
    encode_sample(sd.vae, images, gens, sd.scale_factor)                  # draw 3: diffusers' masked-image latent
    latent_mask = torch.nn.functional.interpolate((mask > 127).float()[None, None], size=(LATENT, LATENT))
    sigmas, timesteps = strength_start(*step_schedule(STEPS, "linspace"), strength)
    x = noise * sigmas[0] if strength == 1 else init + noise * sigmas[0]
    model = GuidedDenoiser(Denoiser(sd.unet, "eps"), cond, uncond, [1.0], CFG)
    ours = SAMPLERS["euler_a"](model, x, sigmas, timesteps, gens, keep_unmasked(init, noise, latent_mask, sigmas))
    err = rel_err(ours, ref)
    assert err <= 1e-4, f"inpainting strength {strength}: relative error {err:.2e}"
    kept = latent_mask.expand_as(ours) < 0.5
    assert torch.equal(ours[kept], init[kept])   # the kept region is the init latent, exactly
