"""Does the model itself remember a prompt? Wen et al.'s model-side memorization signal.

Yuxin Wen, Yuchen Liu, Chen Chen and Lingjuan Lyu, "Detecting, Explaining, and Mitigating Memorization in Diffusion
Models", ICLR 2024: for a memorized prompt the text-conditional noise prediction departs from the unconditional one
by much more than for an ordinary prompt, from the very first sampling step and whatever the starting noise, because
the prompt alone pulls every start towards the one training image. The signal of a prompt is

    d = mean over seeds and over the first k steps of  || eps(x_t, c) - eps(x_t, "") ||_2

The setup is theirs, read from their released detect_mem.py and local_sd_pipeline.py (github.com/YuxinWenRick/
diffusion_memorization; facts only, no code taken): diffusers' DDIMScheduler made from the model's scheduler config
(SD's: "leading" timesteps with steps_offset 1, so 981, 961, ... for 50 steps), 50 steps, guidance 7.5 on the
trajectory, 4 images per prompt, the empty prompt as the unconditional, and per image the L2 norm over the whole
latent [4, h, w] of the difference (`noise_pred_text[j].norm(p=2)`). The paper reports it over the first step, the
first 10 and all 50. The norm is theirs, not a per-element mean: it grows with the square root of the latent's size,
so compare signals only at one resolution (the model's native one here), and only on one model.

Here the sampling is minisd's own DDIM (equal to diffusers', tests/test_sampling.py) driven by the same guided
denoiser as medti.generate, with one recorder between the UNet and the guidance. The starting noise of seed s is
image s of `medti.generate --sampler ddim --sigmas leading --seed 0`. A v-prediction model's output is turned into
its eps equivalent from the denoised latents D: eps = (x - D) / sigma, so the difference is (D_u - D_c) / sigma, the
same quantity for either kind of model (for an eps model the UNet's own outputs, to float rounding).
"""
from dataclasses import dataclass

import torch

from minisd.sampling import SAMPLERS, GuidedDenoiser, denoiser, draw
from minisd.schedule import step_schedule

STEPS = 50          # DDIM steps of the run the signal is read from (detect_mem.py's num_inference_steps)
SPACING = "leading"  # DDIMScheduler.from_config of SD1's and SD2's scheduler configs (steps_offset 1)
GUIDANCE = 7.5      # detect_mem.py's guidance_scale: it shapes the trajectory after the first step
FIRST = 1           # steps averaged by default: the paper's cheapest setting, the start alone
SEEDS = 4           # detect_mem.py's num_images_per_prompt


@dataclass(frozen=True)
class SignalSettings:
    """Which part of which sampling run the signal averages: the first `first` of `steps` DDIM steps, for the
    starting noises of seeds seed, seed + 1, ..., seed + count - 1, at `side` pixels square."""
    side: int
    first: int = FIRST
    count: int = SEEDS
    seed: int = 0
    steps: int = STEPS
    guidance: float = GUIDANCE

    @property
    def seeds(self) -> list:
        return list(range(self.seed, self.seed + self.count))


class Recorder:
    """Between the guided denoiser and the UNet: passes the denoised latents on unchanged and writes down, per image,
    the L2 norm of eps(x, c) - eps(x, "") at each call. GuidedDenoiser (batch 0) hands it every image's rows in one
    call, each image's conditional row first and its unconditional row second."""

    def __init__(self, inner):
        self.inner, self.norms = inner, []

    def __call__(self, x, sigma: float, context, extra):
        denoised = self.inner(x, sigma, context, extra)
        pairs = denoised.unflatten(0, (-1, 2)).double()   # [B*2, C, h, w] -> [B, (cond, uncond), C, h, w]
        difference = (pairs[:, 1] - pairs[:, 0]) / sigma     # eps_c - eps_u = (D_u - D_c) / sigma
        self.norms.append(difference.flatten(1).norm(dim=1))
        return denoised


@torch.no_grad()
def signal(sd, cond: torch.Tensor, uncond: torch.Tensor, settings: SignalSettings) -> torch.Tensor:
    """||eps(x_t, c) - eps(x_t, "")||_2 of each seed at each of the first steps: float64 [seeds, first]. cond and
    uncond: [1, 77, width] contexts (sd.text of the prompt and of the empty prompt). Only the first steps are run:
    the later ones cannot change them."""
    param = next(sd.unet.parameters())
    factor = sd.config.latent_factor
    like = torch.zeros(settings.count, 4, settings.side // factor, settings.side // factor, dtype=param.dtype,
                       device=param.device)
    steps = step_schedule(settings.steps, SPACING, "ddim")
    generators = [torch.Generator().manual_seed(s) for s in settings.seeds]
    x = draw(generators, like) * steps.init_sigma
    recorder = Recorder(denoiser(sd.unet, sd.prediction, steps))
    model = GuidedDenoiser(recorder, cond.to(like), uncond.to(like), [1.0], settings.guidance)
    k = settings.first
    # k steps of the 50-step run: the sigmas it starts from (k + 1: the loop reads the next one) and where it lands
    SAMPLERS["ddim"].loop(model, x, steps.sigmas[:k + 1], landing=steps.extra["landing"][:k])
    return torch.stack(recorder.norms, dim=1).cpu()
