"""The SD2 noise schedule (DDPM "scaled linear" betas, 1,000 training timesteps): the one home of that rule.

Source: ldm/modules/diffusionmodules/util.py make_beta_schedule("linear") with linear_start 0.00085,
linear_end 0.012 from the SD2 YAML -- "linear" in ldm means linear in sqrt(beta). Training (medti.inversion),
sampling (minisd.sampling) and the loader's self-check all read it from here.
"""
import torch

NUM_TIMESTEPS = 1000
LINEAR_START, LINEAR_END = 0.00085, 0.012


def alphas_cumprod() -> torch.Tensor:
    """abar_t = prod_{s<=t} (1 - beta_s) for t = 0..999, float32 [1000].

    Computed as diffusers' schedulers compute it (a float32 linspace in sqrt(beta), squared, cumprod in float32),
    so that our step sigmas and training noise agree with diffusers bit for bit. ldm computes it in float64 and
    stores it as float32; the two differ by < 1e-7 (tests/test_load.py compares with a file's copy)."""
    betas = torch.linspace(LINEAR_START ** 0.5, LINEAR_END ** 0.5, NUM_TIMESTEPS, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def training_sigmas() -> torch.Tensor:
    """k-diffusion's noise level of each training timestep, sigma_t = sqrt((1 - abar_t) / abar_t), float32 [1000]
    (SD2: 0.0292 .. 14.6146)."""
    abar = alphas_cumprod()
    return ((1 - abar) / abar) ** 0.5
