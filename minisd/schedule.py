"""The SD2 noise schedule (DDPM "scaled linear" betas, 1,000 training timesteps) and its sigmas.

Source: ldm/modules/diffusionmodules/util.py make_beta_schedule("linear") with linear_start 0.00085,
linear_end 0.012 from the SD2 YAML -- "linear" in ldm means linear in sqrt(beta).
"""
import torch

NUM_TIMESTEPS = 1000


def alphas_cumprod(linear_start: float = 0.00085, linear_end: float = 0.012, n: int = NUM_TIMESTEPS):
    """Cumulative product of (1 - beta_t), t = 0..n-1, as float64 [n]."""
    betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, n, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def sigmas_from_alphas(alphas_cumprod_t):
    """k-diffusion's noise level of each training timestep: sigma = sqrt((1 - a) / a); SD2: 0.0292 -> 14.6146."""
    return ((1 - alphas_cumprod_t) / alphas_cumprod_t) ** 0.5
