"""Sampling: the SD2 denoiser (schedule + eps/v scalings), step sigmas, guidance, and the samplers.

Shaped like crowsonkb/k-diffusion: a denoiser maps (x, sigma) to the predicted clean latent, and samplers are
pure functions over an explicit `sigmas` tensor. The step sigmas and the order of random draws follow
diffusers' EulerAncestralDiscreteScheduler / EulerDiscreteScheduler so that results can be compared with it.
"""
import numpy as np
import torch

from .schedule import NUM_TIMESTEPS, training_sigmas

SPACINGS = ("linspace", "leading", "trailing", "kdiffusion")


def step_schedule(n: int, spacing: str = "linspace"):
    """(sigmas [n+1] ending in 0, timesteps [n]) for n sampling steps.

    linspace/leading/trailing: diffusers' `timestep_spacing`; sigma is linearly interpolated in t.
    kdiffusion: t = linspace(999, 0, n) with log-sigma interpolation (k-diffusion's DiscreteSchedule, and the
    web UI the reference study used).
    """
    sig = training_sigmas().numpy()
    if spacing == "linspace":
        t = np.linspace(0, NUM_TIMESTEPS - 1, n, dtype=np.float32)[::-1].copy()
    elif spacing == "leading":   # steps_offset=1 as in SD2's scheduler config
        t = (np.arange(0, n) * (NUM_TIMESTEPS // n)).round()[::-1].astype(np.float32) + 1
    elif spacing == "trailing":
        t = np.arange(NUM_TIMESTEPS, 0, -NUM_TIMESTEPS / n).round().astype(np.float32) - 1
    elif spacing == "kdiffusion":
        t = np.linspace(NUM_TIMESTEPS - 1, 0, n)
        log_sigmas = np.log(sig.astype(np.float64))
        low, high, w = np.floor(t).astype(int), np.ceil(t).astype(int), t - np.floor(t)
        sigmas = np.exp((1 - w) * log_sigmas[low] + w * log_sigmas[high])
        return torch.tensor(np.append(sigmas, 0.0), dtype=torch.float32), torch.tensor(t, dtype=torch.float32)
    else:
        raise ValueError(f"spacing must be one of {', '.join(SPACINGS)}, not {spacing!r}")
    sigmas = np.interp(t, np.arange(NUM_TIMESTEPS), sig)
    return torch.tensor(np.append(sigmas, 0.0), dtype=torch.float32), torch.tensor(t, dtype=torch.float32)


def initial_sigma(sigmas, spacing: str) -> float:
    """What the initial N(0, 1) latent is multiplied by. diffusers uses sqrt(sigma_max^2 + 1) for "leading"
    (a DDPM-style start); the others start at sigma_max."""
    top = float(sigmas.max())
    return (top ** 2 + 1) ** 0.5 if spacing == "leading" else top


class Denoiser:
    """SD2's UNet as a denoiser D(x, sigma) -> predicted clean latent (k-diffusion CompVis(V)Denoiser).

    eps model: D = x - sigma * eps(c_in x).  v model: D = x / (sigma^2 + 1) - sigma / sqrt(sigma^2 + 1) * v(c_in x).
    In both, the UNet sees c_in x with c_in = 1 / sqrt(sigma^2 + 1) (unit variance) at the timestep t that
    belongs to sigma; the sampler supplies both. `extra` channels (the 9-channel inpainting model's mask and
    masked-image latent) are appended after that scaling, unscaled; for 4-channel models they have 0 channels.
    """

    def __init__(self, unet, prediction: str):
        if prediction not in ("eps", "v"):
            raise ValueError(f"prediction must be 'eps' or 'v', not {prediction!r}")
        self.unet, self.v = unet, prediction == "v"

    def __call__(self, x, sigma: float, t: float, context, extra):
        c_in = 1 / (sigma ** 2 + 1) ** 0.5
        out = self.unet(torch.cat([x * c_in, extra], dim=1), torch.full((x.shape[0],), t, device=x.device), context)
        if self.v:
            return x / (sigma ** 2 + 1) - out * (sigma * c_in)
        return x - out * sigma


class GuidedDenoiser:
    """Classifier-free and composable guidance: D = D_u + cfg * sum_k w_k (D_k - D_u).

    conds: [K, 77, width] term embeddings, uncond: [1, 77, width], weights: K floats. All terms and the uncond
    run through the UNet in one batch per image (split into chunks of `batch` rows). cfg == 1 with a single
    term of weight 1 is plain conditional sampling: the uncond pass is skipped. extra: [B, C', h, w] per-image
    channels for the UNet input (9-channel inpainting), or None.
    """

    def __init__(self, denoiser: Denoiser, conds, uncond, weights, cfg: float, batch: int = 0, extra=None):
        self.denoiser, self.cfg, self.extra = denoiser, cfg, extra
        self.skip_uncond = cfg == 1 and len(weights) == 1 and weights[0] == 1
        self.context = conds if self.skip_uncond else torch.cat([conds, uncond])
        self.weights = torch.tensor(weights, dtype=torch.float32)
        self.batch = batch   # 0: everything in one call

    def __call__(self, x, sigma: float, t: float):
        n, rows = x.shape[0], self.context.shape[0]
        chunk = self.batch or n * rows
        # [B, C, h, w] -> [B*rows, C, h, w]: every image with every term (and the uncond, last)
        xs = x.repeat_interleave(rows, dim=0)
        ctx = self.context.repeat(n, 1, 1)
        extra = (x[:, :0] if self.extra is None else self.extra).repeat_interleave(rows, dim=0)   # x[:, :0]: none
        out = torch.cat([self.denoiser(xs[i:i + chunk], sigma, t, ctx[i:i + chunk], extra[i:i + chunk])
                         for i in range(0, n * rows, chunk)])
        out = out.unflatten(0, (n, rows))   # [B, rows, C, h, w]
        if self.skip_uncond:
            return out[:, 0]
        terms, uncond = out[:, :-1], out[:, -1]
        w = self.weights.to(out)[None, :, None, None, None]
        return uncond + self.cfg * (w * (terms - uncond[:, None])).sum(dim=1)


def strength_start(sigmas, timesteps, strength: float):
    """img2img/inpainting with strength < 1 skips the first steps: of n steps, the last int(n * strength)
    remain (diffusers' get_timesteps). strength 1 keeps them all."""
    n = len(timesteps)
    start = n - min(int(n * strength), n)
    return sigmas[start:], timesteps[start:]


def keep_unmasked(init_latent, noise, mask, sigmas):
    """Sampler callback for masked inpainting with any 4-channel model (diffusers' StableDiffusionInpaintPipeline
    with a 4-channel UNet): after step i, where mask == 0 the latent becomes the init latent noised to the next
    sigma with the same fixed noise; the last step (sigma 0) leaves the clean init latent there exactly.
    mask: [B or 1, 1, h, w], 1 = repaint."""
    def callback(i, x):
        kept = init_latent + noise * float(sigmas[i + 1])
        return torch.where(mask > 0.5, x, kept)
    return callback


def draw(generators, like):
    """One N(0, 1) draw per image, each from its own generator, as diffusers' randn_tensor does with a list
    of generators: image i's noise never depends on the batch it is in."""
    return torch.cat([torch.randn((1, *like.shape[1:]), generator=g, dtype=torch.float32) for g in generators]
                     ).to(like)


@torch.no_grad()
def sample_euler_ancestral(model, x, sigmas, timesteps, generators, callback=None):
    """Euler ancestral (k-diffusion sample_euler_ancestral, eta 1): an Euler step down to sigma_down, then fresh
    noise of size sigma_up, where sigma_up^2 + sigma_down^2 = sigma_next^2. One draw per step, the last one
    included (diffusers draws it too, scaled by sigma_up = 0)."""
    for i in range(len(timesteps)):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = model(x, sigma, float(timesteps[i]))
        sigma_up = (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5
        sigma_down = (sigma_next ** 2 - sigma_up ** 2) ** 0.5
        x = x + (x - denoised) / sigma * (sigma_down - sigma)
        x = x + draw(generators, x) * sigma_up
        x = callback(i, x) if callback else x
    return x


@torch.no_grad()
def sample_euler(model, x, sigmas, timesteps, generators=None, callback=None):
    """Plain Euler (k-diffusion sample_euler with s_churn 0): deterministic after the initial noise."""
    for i in range(len(timesteps)):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = model(x, sigma, float(timesteps[i]))
        x = x + (x - denoised) / sigma * (sigma_next - sigma)
        x = callback(i, x) if callback else x
    return x


SAMPLERS = {"euler_a": sample_euler_ancestral, "euler": sample_euler}
