"""Sampling: SD2's UNet as a denoiser, guidance, and the samplers as pure functions over an explicit sigma tensor.

Shaped like crowsonkb/k-diffusion (sampling.py, external.py): a denoiser maps (x, sigma) to the predicted clean
latent, and `sample_*(model, x, sigmas, ...)` are loops over `sigmas` that know nothing of timesteps, eps or v.
Which sigmas to visit is minisd.schedule's job (step_schedule); the order of random draws follows diffusers'
schedulers so that results can be compared with them (tests/test_sampling.py).
Scaling: x is in k-diffusion's "variance exploding" scaling, x = x0 + sigma * eps; diffusers' DDIM and DPMSolver
work in the variance-preserving one, x / sqrt(sigma^2 + 1), which is the same sampler written differently.
"""
import math
from dataclasses import dataclass
from typing import Callable

import torch

from .schedule import sigma_to_t


class DiscreteDenoiser:
    """What eps and v models share: the UNet sees c_in * x, c_in = 1 / sqrt(sigma^2 + 1) (unit variance), at the
    timestep that belongs to sigma, with `extra` channels appended unscaled (the 9-channel inpainting model's
    mask and masked-image latent; 0 channels for 4-channel models).

    steps (a minisd.schedule.Steps): the timestep diffusers pairs with each of its sigmas is used as it is -- for
    DPM++ with Karras sigmas it is rounded to an integer, which log-sigma interpolation would not reproduce. Any
    other sigma gets k-diffusion's interpolated timestep."""

    def __init__(self, unet, steps=None):
        self.unet = unet
        # sigmas has one entry more than timesteps (the final sigma, never a UNet input): strict=False on purpose
        self.paired = {} if steps is None else dict(zip(steps.sigmas.tolist(), steps.timesteps.tolist(), strict=False))

    def timestep(self, sigma: float) -> float:
        return self.paired[sigma] if sigma in self.paired else float(sigma_to_t(sigma))

    def model_output(self, x, sigma: float, context, extra):
        c_in = 1 / (sigma ** 2 + 1) ** 0.5
        t = torch.full((x.shape[0],), self.timestep(sigma), device=x.device)
        return self.unet(torch.cat([x * c_in, extra], dim=1), t, context)


class EpsDenoiser(DiscreteDenoiser):
    """eps-prediction models (SD2 -base files): D = x - sigma * eps (k-diffusion CompVisDenoiser)."""

    def __call__(self, x, sigma: float, context, extra):
        return x - self.model_output(x, sigma, context, extra) * sigma


class VDenoiser(DiscreteDenoiser):
    """v-prediction models (SD2 768-v files): D = x / (sigma^2 + 1) - sigma / sqrt(sigma^2 + 1) * v
    (k-diffusion CompVisVDenoiser: c_skip = 1 / (sigma^2 + 1), c_out = -sigma / sqrt(sigma^2 + 1))."""

    def __call__(self, x, sigma: float, context, extra):
        return x / (sigma ** 2 + 1) - self.model_output(x, sigma, context, extra) * (sigma / (sigma ** 2 + 1) ** 0.5)


DENOISERS = {"eps": EpsDenoiser, "v": VDenoiser}


def denoiser(unet, prediction: str, steps=None) -> DiscreteDenoiser:
    if prediction not in DENOISERS:
        raise ValueError(f"prediction must be one of {', '.join(DENOISERS)}, not {prediction!r}")
    return DENOISERS[prediction](unet, steps)


class GuidedDenoiser:
    """Classifier-free and composable guidance: D = D_u + cfg * sum_k w_k (D_k - D_u).

    conds: [K, T, width] term contexts, uncond: [1, T, width], weights: K floats. T is 77 for prompts; for an
    image-conditioned model the context is an image's global tokens and the uncond the null (zeros; see
    minisd.image_conditioning). All terms and the uncond run through the UNet in one batch per image (split into
    chunks of `batch` rows). cfg == 1 with a single term of weight 1 is plain conditional sampling: the uncond pass
    is skipped. extra: [B, C', h, w] per-image channels for the UNet input (9-channel inpainting), or None.
    """

    def __init__(self, denoiser, conds, uncond, weights, cfg: float, batch: int = 0, extra=None):
        self.denoiser, self.cfg, self.extra = denoiser, cfg, extra
        self.skip_uncond = cfg == 1 and len(weights) == 1 and weights[0] == 1
        self.context = conds if self.skip_uncond else torch.cat([conds, uncond])
        self.weights = torch.tensor(weights, dtype=torch.float32)
        self.batch = batch   # 0: everything in one call

    def __call__(self, x, sigma: float):
        n, rows = x.shape[0], self.context.shape[0]
        chunk = self.batch or n * rows
        # [B, C, h, w] -> [B*rows, C, h, w]: every image with every term (and the uncond, last)
        xs = x.repeat_interleave(rows, dim=0)
        ctx = self.context.repeat(n, 1, 1)
        extra = (x[:, :0] if self.extra is None else self.extra).repeat_interleave(rows, dim=0)   # x[:, :0]: none
        out = torch.cat([self.denoiser(xs[i:i + chunk], sigma, ctx[i:i + chunk], extra[i:i + chunk])
                         for i in range(0, n * rows, chunk)])
        out = out.unflatten(0, (n, rows))   # [B, rows, C, h, w]
        if self.skip_uncond:
            return out[:, 0]
        terms, uncond = out[:, :-1], out[:, -1]
        w = self.weights.to(out)[None, :, None, None, None]
        return uncond + self.cfg * (w * (terms - uncond[:, None])).sum(dim=1)


def draw(generators, like):
    """One N(0, 1) draw per image, each from its own generator, as diffusers' randn_tensor does with a list
    of generators: image i's noise never depends on the batch it is in."""
    return torch.cat([torch.randn((1, *like.shape[1:]), generator=g, dtype=torch.float32) for g in generators]
                     ).to(like)


def _done(callback, i, x):
    """Samplers hand x to the callback after each step; it may return a changed x (inpainting keeps a region)."""
    return callback(i, x) if callback else x


@torch.no_grad()
def sample_euler_ancestral(model, x, sigmas, generators, callback=None):
    """Euler ancestral (k-diffusion sample_euler_ancestral, eta 1): an Euler step down to sigma_down, then fresh
    noise of size sigma_up, where sigma_up^2 + sigma_down^2 = sigma_next^2. One draw per step, the last one
    included (diffusers draws it too, scaled by sigma_up = 0)."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = model(x, sigma)
        sigma_up = (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5
        sigma_down = (sigma_next ** 2 - sigma_up ** 2) ** 0.5
        x = x + (x - denoised) / sigma * (sigma_down - sigma)
        x = _done(callback, i, x + draw(generators, x) * sigma_up)
    return x


@torch.no_grad()
def sample_euler(model, x, sigmas, generators=None, callback=None):
    """Plain Euler (k-diffusion sample_euler with s_churn 0): deterministic after the initial noise."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        x = x + (x - model(x, sigma)) / sigma * (sigma_next - sigma)
        x = _done(callback, i, x)
    return x


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, generators=None, callback=None):
    """DPM-Solver++(2M) (Lu et al. 2022; k-diffusion sample_dpmpp_2m), in log-sigma time lambda = -log sigma:
    a first-order step first, then each step corrects the prediction with the previous one,
    D' = (1 + 1/2r) D_i - (1/2r) D_{i-1}, r = h_{i-1} / h_i (diffusers' "midpoint" solver_type, the same formula).
    The step to sigma = 0 is first order and lands on the prediction (diffusers' final_sigmas_type="zero")."""
    old = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = model(x, sigma)
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma / sigma_next)
            target = denoised
            if old is not None:
                r = math.log(float(sigmas[i - 1]) / sigma) / h
                target = denoised * (1 + 1 / (2 * r)) - old * (1 / (2 * r))
            x = x * (sigma_next / sigma) - target * math.expm1(-h)
        old = denoised
        x = _done(callback, i, x)
    return x


@torch.no_grad()
def sample_ddim(model, x, sigmas, generators=None, callback=None, landing=None):
    """DDIM with eta 0 (Song et al. 2021): in this scaling exactly an Euler step (x_next = x0 + sigma_next * eps).
    landing[i] is the sigma step i reaches (minisd.schedule.ddim_landing); where diffusers then reads the latent as
    being at sigmas[i + 1] instead, x is rescaled so its variance-preserving value carries over unchanged, as there."""
    landing = sigmas[1:] if landing is None else landing
    for i in range(len(sigmas) - 1):
        sigma, reached, sigma_next = float(sigmas[i]), float(landing[i]), float(sigmas[i + 1])
        x = x + (x - model(x, sigma)) / sigma * (reached - sigma)
        x = x * ((sigma_next ** 2 + 1) / (reached ** 2 + 1)) ** 0.5
        x = _done(callback, i, x)
    return x


@dataclass(frozen=True)
class Sampler:
    """One registry entry: the loop, the name A1111 writes in its `parameters` text, and which diffusers
    scheduler's discretisation (minisd.schedule family) it follows."""
    loop: Callable
    a1111: str
    family: str


SAMPLERS = {"euler_a": Sampler(sample_euler_ancestral, "Euler a", "euler"),
            "euler": Sampler(sample_euler, "Euler", "euler"),
            "dpmpp_2m": Sampler(sample_dpmpp_2m, "DPM++ 2M", "dpmsolver"),
            "ddim": Sampler(sample_ddim, "DDIM", "ddim")}
# diffusers' EulerAncestralDiscreteScheduler has no Karras option, so "euler_a" + "karras" has no reference to
# be tested against: refused rather than offered untested.
UNSUPPORTED = {("euler_a", "karras")}


def strength_start(steps, strength: float):
    """img2img/inpainting with strength < 1 skips the first steps: of n steps, the last int(n * strength)
    remain (diffusers' get_timesteps). strength 1 keeps them all."""
    n = len(steps.timesteps)
    return steps.tail(min(int(n * strength), n))


def keep_unmasked(init_latent, noise, mask, sigmas):
    """Sampler callback for masked inpainting with any 4-channel model (diffusers' StableDiffusionInpaintPipeline
    with a 4-channel UNet): after step i, where mask == 0 the latent becomes the init latent noised to the next
    sigma with the same fixed noise; after the last step the clean init latent, exactly (in the scale
    `to_output` undoes: DDIM ends at sigma_min, not 0). mask: [B or 1, 1, h, w], 1 = repaint."""
    last = len(sigmas) - 2

    def callback(i, x):
        sigma = float(sigmas[i + 1])
        kept = init_latent * (sigma ** 2 + 1) ** 0.5 if i == last else init_latent + noise * sigma
        return torch.where(mask > 0.5, x, kept)
    return callback


def to_output(x, sigmas):
    """The sampler's final x as the VAE reads it: x / sqrt(sigma_last^2 + 1), which is x itself when the last
    sigma is 0 and diffusers' variance-preserving latent when it is not (DDIM ends at sigma_min)."""
    return x / (float(sigmas[-1]) ** 2 + 1) ** 0.5

