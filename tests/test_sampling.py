"""Sampling equals diffusers: StableDiffusionPipeline + Euler(-ancestral) scheduler on the same tiny UNet,
prompt embeddings and per-image generators.

Tolerance: relative error <= 1e-4 of the final latents' scale (fp32). Both sides run the same UNet maths;
the step arithmetic differs only in float rounding (diffusers keeps sigmas as float32 tensors, we use Python
floats), which stays near 1e-6 over 12 steps; a wrong sigma, a wrong draw order or eps/v mix-up gives O(1).
"""
import pytest
import torch
from conftest import rel_err
from diffusers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, StableDiffusionPipeline

from minisd.sampling import SAMPLERS, Denoiser, GuidedDenoiser, draw, initial_sigma, step_schedule, training_sigmas

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
    table = torch.tensor(training_sigmas(), dtype=torch.float64)
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
