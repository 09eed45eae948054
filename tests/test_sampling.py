"""Sampling equals diffusers: StableDiffusionPipeline with each sampler's scheduler (conftest.reference_scheduler)
on the same tiny UNet, prompt embeddings and per-image generators.

Tolerance: relative error <= 1e-4 of the final latents' scale (fp32). Both sides run the same UNet maths; the
step arithmetic differs only in float rounding (diffusers keeps sigmas as float32 tensors and DDIM/DPMSolver work
in the variance-preserving scaling; we use Python floats in k-diffusion's scaling), which stays near 1e-6 over
12-20 steps; a wrong sigma, timestep, draw order, solver coefficient or eps/v mix-up gives 1e-3 to O(1).
"""
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from conftest import reference_scheduler, rel_err
from minisd.sampling import SAMPLERS, GuidedDenoiser, denoiser, draw, keep_unmasked, strength_start, to_output
from minisd.schedule import sigma_to_t, step_schedule, training_sigmas

STEPS, CFG, LATENT = 12, 3.0, 16

CASES = [  # (sampler, prediction, spacing, steps)
    ("euler_a", "eps", "linspace", STEPS), ("euler_a", "v", "linspace", STEPS), ("euler_a", "eps", "leading", STEPS),
    ("euler_a", "eps", "trailing", STEPS), ("euler", "eps", "linspace", STEPS), ("euler", "v", "trailing", STEPS),
    ("euler", "eps", "karras", STEPS), ("euler", "v", "karras", STEPS),
    ("dpmpp_2m", "eps", "linspace", STEPS), ("dpmpp_2m", "v", "linspace", STEPS),
    ("dpmpp_2m", "eps", "karras", STEPS), ("dpmpp_2m", "v", "karras", STEPS), ("dpmpp_2m", "eps", "karras", 20),
    ("dpmpp_2m", "eps", "leading", STEPS), ("dpmpp_2m", "eps", "trailing", STEPS),
    # 12 steps: 1000 // 12 = 83 does not divide 1000, so linspace/trailing DDIM steps land off the listed timesteps
    ("ddim", "eps", "leading", STEPS), ("ddim", "v", "leading", STEPS), ("ddim", "eps", "linspace", STEPS),
    ("ddim", "v", "trailing", STEPS),
]


def reference_pipeline(refs, scheduler):
    return StableDiffusionPipeline(vae=refs["vae"], text_encoder=None, tokenizer=None, unet=refs["unet"],
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


@pytest.mark.parametrize("sampler,prediction,spacing,n", CASES)
def test_txt2img_latents_equal_diffusers(tiny, sampler, prediction, spacing, n):
    refs, sd = tiny
    gen = torch.Generator().manual_seed(5)
    cond, uncond = torch.randn(1, 77, 32, generator=gen), torch.randn(1, 77, 32, generator=gen)
    pipe = reference_pipeline(refs, reference_scheduler(sampler, prediction, spacing))
    scale = pipe.vae_scale_factor
    ref = pipe(prompt_embeds=cond.repeat(2, 1, 1), negative_prompt_embeds=uncond.repeat(2, 1, 1),
               num_inference_steps=n, guidance_scale=CFG, height=LATENT * scale, width=LATENT * scale,
               generator=[torch.Generator().manual_seed(s) for s in (10, 11)], output_type="latent").images

    spec = SAMPLERS[sampler]
    steps = step_schedule(n, spacing, spec.family)
    # the same discretisation: timesteps exactly as diffusers feeds them, sigmas to float32 rounding
    torch.testing.assert_close(steps.timesteps, pipe.scheduler.timesteps.float(), rtol=1e-6, atol=1e-4)
    if hasattr(pipe.scheduler, "sigmas"):
        torch.testing.assert_close(steps.sigmas, pipe.scheduler.sigmas.float(), rtol=1e-6, atol=0)
    gens = [torch.Generator().manual_seed(s) for s in (10, 11)]
    x = draw(gens, torch.zeros(2, 4, LATENT, LATENT)) * steps.init_sigma
    model = GuidedDenoiser(denoiser(sd.unet, prediction, steps), cond, uncond, [1.0], CFG)
    ours = to_output(spec.loop(model, x, steps.sigmas, gens, None, **steps.extra), steps.sigmas)
    err = rel_err(ours, ref)
    assert err <= 1e-4, f"{sampler}/{prediction}/{spacing}/{n}: relative error {err:.2e}"


def test_kdiffusion_spacing_is_log_sigma_interpolation():
    """Closed form: sigma(t) = exp of the linear interpolation of log sigma between integer timesteps."""
    steps = step_schedule(7, "kdiffusion")
    sigmas, t = steps.sigmas, steps.timesteps
    table = training_sigmas().double()
    assert t[0] == 999 and t[-1] == 0 and sigmas[-1] == 0 and len(sigmas) == 8
    for s, tt in zip(sigmas[:-1].double(), t.double(), strict=True):
        lo, hi = int(tt.floor()), int(tt.ceil())
        w = tt - lo
        expected = torch.exp((1 - w) * table[lo].log() + w * table[hi].log())
        assert abs(s - expected) / expected < 1e-6
    assert abs(sigmas[0].item() - 14.6146) < 1e-3 and abs(training_sigmas()[0] - 0.0292) < 1e-4
    assert steps.init_sigma == float(sigmas[0])   # k-diffusion starts at sigma_0, not sqrt(sigma_0^2 + 1)


def test_karras_sigmas_closed_form_and_sigma_to_t_inverts_the_table():
    """Karras et al. eq. 5 with rho 7 between the training extremes; sigma_to_t maps each training sigma back to
    its own timestep (to float32 rounding of the log table: 1e-3 of a step)."""
    table = training_sigmas().double()
    steps = step_schedule(10, "karras", "euler")
    i = torch.arange(10, dtype=torch.float64) / 9
    expected = (table[-1] ** (1 / 7) + i * (table[0] ** (1 / 7) - table[-1] ** (1 / 7))) ** 7
    torch.testing.assert_close(steps.sigmas[:-1].double(), expected, rtol=1e-6, atol=0)
    ts = np.array([0, 1, 250, 500, 998, 999])
    assert np.abs(sigma_to_t(table.numpy()[ts]) - ts).max() < 1e-3
    dpm = step_schedule(10, "karras", "dpmsolver")
    assert torch.equal(dpm.timesteps, dpm.timesteps.round())   # DPMSolver feeds integer timesteps


def test_unsupported_spacing_is_refused():
    with pytest.raises(ValueError, match="karras"):
        step_schedule(10, "karras", "ddim")


def test_cfg_one_skips_the_uncond_pass(tiny):
    _, sd = tiny
    calls = []
    unet = sd.unet

    def counting(x, t, context):
        calls.append(x.shape[0])
        return unet(x, t, context)
    cond, uncond = torch.randn(1, 77, 32), torch.randn(1, 77, 32)
    model = GuidedDenoiser(denoiser(counting, "eps"), cond, uncond, [1.0], 1.0)
    model(torch.randn(2, 4, LATENT, LATENT), 1.0)
    assert calls == [2]


def encode_sample(vae, images, generators, scale):
    """Per-image VAE encode with a draw from that image's generator: mean + std * N(0, 1), then scaled
    (diffusers' _encode_vae_image with a list of generators)."""
    out = []
    for image, g in zip(images, generators, strict=True):
        mean, logvar = vae.encode(image[None])
        out.append(mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=g))
    return torch.cat(out) * scale


@pytest.mark.parametrize("sampler,spacing,strength", [("euler_a", "linspace", 1.0), ("euler_a", "linspace", 0.6),
                                                      ("dpmpp_2m", "karras", 1.0), ("dpmpp_2m", "linspace", 0.6),
                                                      ("ddim", "linspace", 1.0), ("ddim", "leading", 0.6)])
@torch.no_grad()
def test_inpainting_equals_diffusers_4_channel(tiny, sampler, spacing, strength):
    """The pieces, written out here (medti.generation.pipeline puts them together; tests/test_pipeline.py checks
    that)."""
    from diffusers import StableDiffusionInpaintPipeline
    from PIL import Image
    refs, sd = tiny
    pixels = LATENT * 4   # the tiny VAE downsamples 4x
    rng = torch.Generator().manual_seed(7)
    image = (torch.rand(3, pixels, pixels, generator=rng) * 255).round().to(torch.uint8)
    mask = torch.zeros(pixels, pixels, dtype=torch.uint8)
    mask[8:40, 20:56] = 255   # white = repaint
    cond, uncond = torch.randn(1, 77, 32, generator=rng), torch.randn(1, 77, 32, generator=rng)
    pipe = StableDiffusionInpaintPipeline(vae=refs["vae"], text_encoder=None, tokenizer=None, unet=refs["unet"],
                                          scheduler=reference_scheduler(sampler, "eps", spacing),
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
    spec = SAMPLERS[sampler]
    steps = strength_start(step_schedule(STEPS, spacing, spec.family), strength)
    x = noise * steps.init_sigma if strength == 1 else init + noise * steps.sigmas[0]
    model = GuidedDenoiser(denoiser(sd.unet, "eps", steps), cond, uncond, [1.0], CFG)
    keep = keep_unmasked(init, noise, latent_mask, steps.sigmas)
    ours = to_output(spec.loop(model, x, steps.sigmas, gens, keep, **steps.extra), steps.sigmas)
    err = rel_err(ours, ref)
    assert err <= 1e-4, f"inpainting {sampler}/{spacing} strength {strength}: relative error {err:.2e}"
    kept = latent_mask.expand_as(ours) < 0.5
    # the kept region is the init latent: exactly when the last sigma is 0; DDIM ends at sigma_min, and undoing
    # its variance-preserving scale costs float32 rounding (1e-6 relative)
    torch.testing.assert_close(ours[kept], init[kept], rtol=0 if sampler != "ddim" else 1e-6, atol=0)
