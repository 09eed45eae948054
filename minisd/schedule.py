"""The SD2 noise schedule (DDPM "scaled linear" betas, 1,000 training timesteps): the one home of that rule.

Source: ldm/modules/diffusionmodules/util.py make_beta_schedule("linear") with linear_start 0.00085,
linear_end 0.012 from the SD2 YAML -- "linear" in ldm means linear in sqrt(beta). Training (medti.training),
sampling (minisd.sampling) and the loader's self-check all read it from here, and so do the step schedules
below: which sigmas a sampler visits in n steps.
"""
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import UserError, arg

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


# ---- Step schedules: which sigmas (and UNet timesteps) n sampler steps visit ----------------------------------
# Each diffusers scheduler discretises the training schedule its own way, and a sampler is only equal to diffusers
# when it visits the same sigmas and feeds the UNet the same timesteps. A `family` names the scheduler whose rule
# is followed (read from diffusers 0.42's set_timesteps; tests/test_sampling.py compares with each):
#   "euler"     EulerDiscreteScheduler / EulerAncestralDiscreteScheduler: fractional t, sigma interpolated in t;
#   "dpmsolver" DPMSolverMultistepScheduler: integer t, "linspace"/"leading" space n + 1 points and drop the last;
#   "ddim"      DDIMScheduler (set_alpha_to_one=False): integer t, ends at sigma_min, not 0 (see ddim_landing).
# Two spacings are not diffusers' timestep_spacing: "kdiffusion" (k-diffusion's DiscreteSchedule: t = linspace(999,
# 0, n), log-sigma interpolation; the web UI the reference study used) and "karras" (Karras et al. 2022, rho 7,
# between the training sigma_min and sigma_max: diffusers' use_karras_sigmas=True, A1111's "Schedule type: Karras").
SPACINGS = {"euler": ("linspace", "leading", "trailing", "kdiffusion", "karras"),
            "dpmsolver": ("linspace", "leading", "trailing", "kdiffusion", "karras"),
            "ddim": ("linspace", "leading", "trailing")}
STEPS_OFFSET = 1   # SD2's hub scheduler config; diffusers adds it to "leading" timesteps
# A bound on the arrays and the loop, far past any useful count (the reference study sampled 100 steps). The integer
# spacings reach their own, lower limit first: see distinct_steps.
MAX_STEPS = 10_000


@dataclass(frozen=True)
class Steps:
    """n sampler steps: sigmas [n+1] float32 (descending, last 0, or sigma_min for DDIM), the UNet timestep paired
    with each of the first n, the std of a pure-noise start, and sampler arguments the discretisation fixes."""
    sigmas: torch.Tensor
    timesteps: torch.Tensor
    init_sigma: float
    extra: dict = field(default_factory=dict)

    def tail(self, k: int) -> "Steps":
        """The last k steps (img2img's strength); init_sigma is kept, a pure-noise start does not use it."""
        start = len(self.timesteps) - k
        return Steps(self.sigmas[start:], self.timesteps[start:], self.init_sigma,
                     {name: value[start:] for name, value in self.extra.items()})


def sigma_to_t(sigma) -> np.ndarray:
    """The (fractional) training timestep of a sigma: log-sigma interpolation between the two neighbouring training
    sigmas (k-diffusion's DiscreteSchedule.sigma_to_t; diffusers' _sigma_to_t, float32 table)."""
    log_table = np.log(training_sigmas().numpy())
    log_sigma = np.log(np.maximum(np.asarray(sigma, dtype=np.float64), 1e-10))
    low = np.clip(np.searchsorted(log_table, log_sigma, side="right") - 1, 0, NUM_TIMESTEPS - 2)
    w = np.clip((log_table[low] - log_sigma) / (log_table[low] - log_table[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


def spaced_timesteps(n: int, spacing: str, family: str) -> np.ndarray:
    """diffusers' timestep_spacing rules, descending (SD2: steps_offset 1 for "leading")."""
    last = NUM_TIMESTEPS - 1
    if spacing == "linspace":
        if family == "euler":   # fractional: the sigmas are interpolated in t
            return np.linspace(0, last, n, dtype=np.float32)[::-1].astype(np.float64)
        if family == "ddim":
            return np.linspace(0, last, n).round()[::-1]
        return np.linspace(0, last, n + 1).round()[::-1][:-1]   # dpmsolver: n + 1 points, t = 0 dropped
    if spacing == "leading":
        k = n + 1 if family == "dpmsolver" else n   # dpmsolver again spaces n + 1 points and drops the last
        return (np.arange(k) * (NUM_TIMESTEPS // k)).round()[::-1][:n] + STEPS_OFFSET
    return np.arange(NUM_TIMESTEPS, 0, -NUM_TIMESTEPS / n).round() - 1   # trailing


def karras_sigmas(n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022, eq. 5: sigma_i = (max^(1/rho) + i/(n-1) (min^(1/rho) - max^(1/rho)))^rho, between the
    training schedule's smallest and largest sigma, float64."""
    table = training_sigmas()
    low, high = float(table[0]), float(table[-1])
    ramp = np.linspace(0, 1, n)
    return (high ** (1 / rho) + ramp * (low ** (1 / rho) - high ** (1 / rho))) ** rho


def ddim_landing(timesteps: np.ndarray, n: int) -> np.ndarray:
    """The sigma each DDIM step lands on. diffusers' DDIMScheduler steps from t to t - 1000 // n whatever the
    spacing (and from t < 1000 // n to abar_0: set_alpha_to_one=False), which for "linspace" and "trailing" is not
    always the next listed timestep; the sampler then reads the latent as if it were at that next timestep."""
    table = training_sigmas().numpy().astype(np.float64)
    prev = timesteps.astype(np.int64) - NUM_TIMESTEPS // n
    return np.where(prev >= 0, table[np.maximum(prev, 0)], table[0])


def distinct_steps(n: int, spacing: str, family: str) -> bool:
    """Whether n steps of this spacing visit n distinct timesteps. The integer spacings of 1,000 training steps
    cannot: past about 1,000 two steps share a timestep, and then DPM++ 2M divides by a zero step (h = 0) and DDIM
    (which steps back 1000 // n) stands still at t = 1. Fractional t (Euler's linspace), k-diffusion's and Karras'
    sigmas are always distinct."""
    if spacing in ("kdiffusion", "karras") or (spacing == "linspace" and family == "euler"):
        return True
    t = spaced_timesteps(n, spacing, family)
    return bool(np.all(np.diff(t) < 0)) and (family != "ddim" or NUM_TIMESTEPS // n >= 1)


def check_steps(n: int, spacing: str, family: str, name: str = "steps"):
    """Refuse a step count the schedule cannot do, in one line naming the largest count it can. `name`: the setting
    that gave n (train's preview_steps)."""
    if not 1 <= n <= MAX_STEPS:
        raise UserError(f"{arg(name)} {n}: give 1 to {MAX_STEPS:,} steps")
    if not distinct_steps(n, spacing, family):
        most = max(m for m in range(min(n, NUM_TIMESTEPS + 1), 0, -1) if distinct_steps(m, spacing, family))
        more = "" if family == "ddim" else " (the kdiffusion and karras spacings take more)"
        raise UserError(f"{arg(name)} {n}: the {spacing} spacing has {NUM_TIMESTEPS:,} training timesteps to "
                        f"visit, so this sampler takes at most {most} steps with it{more}")


def step_schedule(n: int, spacing: str = "linspace", family: str = "euler") -> Steps:
    """The Steps of n sampler steps with `spacing`, as `family`'s diffusers scheduler discretises (see above)."""
    if spacing not in SPACINGS[family]:
        raise ValueError(f"spacing {spacing!r} is not one of {family}'s: {', '.join(SPACINGS[family])}")
    check_steps(n, spacing, family)
    table = training_sigmas().numpy()
    if spacing == "karras":
        sigmas = karras_sigmas(n)
        t = sigma_to_t(sigmas)
        t = t.round() if family == "dpmsolver" else t   # DPMSolver feeds integer timesteps, sigmas stay exact
    elif spacing == "kdiffusion":
        t = np.linspace(NUM_TIMESTEPS - 1, 0, n)
        low, w = np.floor(t).astype(int), t - np.floor(t)
        log_table = np.log(table.astype(np.float64))
        sigmas = np.exp((1 - w) * log_table[low] + w * log_table[np.ceil(t).astype(int)])
    else:
        t = spaced_timesteps(n, spacing, family)
        sigmas = np.interp(t, np.arange(NUM_TIMESTEPS), table)
    extra, final = {}, 0.0
    if family == "ddim":
        landing = ddim_landing(t, n)
        extra, final = {"landing": torch.tensor(landing, dtype=torch.float32)}, float(landing[-1])
    sigmas = torch.tensor(np.append(sigmas, final), dtype=torch.float32)
    return Steps(sigmas, torch.tensor(t.copy(), dtype=torch.float32), initial_sigma(sigmas, spacing, family), extra)


def initial_sigma(sigmas: torch.Tensor, spacing: str, family: str) -> float:
    """Std of the initial latent in our (k-diffusion) scaling. DDIM and DPMSolver start from N(0, 1) in their
    variance-preserving scaling, which is sqrt(sigma_0^2 + 1) here; diffusers' Euler schedulers use
    sqrt(sigma_max^2 + 1) for "leading" and sigma_max otherwise; k-diffusion (and A1111) start at sigma_0."""
    top = float(sigmas[0])
    if spacing == "kdiffusion" or (family == "euler" and spacing != "leading"):
        return top
    return (top ** 2 + 1) ** 0.5
