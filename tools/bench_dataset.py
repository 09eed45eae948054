"""Section 8 of tools/benchmark.py: how long the reference study's synthetic set (2,000 images, 512²) takes to
generate, ours and diffusers', at the study's settings (Euler a, 100 steps, CFG 2) and with DPM++ 2M Karras at 25
steps (A1111's usual choice), on this machine.

A full 100-step image takes tens of minutes on a 2-core CPU, so each side is timed at two short step counts
(k1 < k2) and the cost of n steps is extrapolated from the straight line t(k) = fixed + k * per_step: fixed is the
VAE decode (the prompt is encoded once per set; excluded), per_step one guided UNet call. The line is exact up to
timing noise, because every step does the same work; the fitted per-step times of both samplers are printed so
the reader can check that the sampler's own arithmetic is negligible next to the UNet.
"""
import statistics
import time

import diffusers
import torch

from medti.generation.pipeline import SampleSettings, decode, sample

STUDY_IMAGES = 2000
CONFIGS = (("Euler a, 100 steps (the study)", "euler_a", "linspace", 100),
           ("DPM++ 2M Karras, 25 steps", "dpmpp_2m", "karras", 25))
SHORT = (2, 4)   # the two step counts timed


def reference_scheduler(sampler: str):
    """diffusers' scheduler for each (tests/conftest.py has the full table; SD2's betas, steps_offset 1)."""
    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    if sampler == "euler_a":
        return diffusers.EulerAncestralDiscreteScheduler(**common)
    return diffusers.DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2,
                                                 final_sigmas_type="zero", use_karras_sigmas=True)


def timed(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def fit(b, sd, sampler: str, spacing: str) -> dict:
    """Seconds per image for both sides at each short step count -> {side: (fixed, per_step)}."""
    pipe = diffusers.StableDiffusionPipeline(vae=b.refs["vae"], text_encoder=None, tokenizer=None,
                                             unet=b.refs["unet"], scheduler=reference_scheduler(sampler),
                                             safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    found = {"ours": [], "theirs": []}

    def ours(k):
        settings = SampleSettings(width=b.size, height=b.size, steps=k, cfg=2.0, sampler=sampler, sigmas=spacing)
        return decode(sd, sample(sd, b.cond, b.uncond, [1.0], [0], settings))

    def theirs(k):
        return pipe(prompt_embeds=b.cond, negative_prompt_embeds=b.uncond, guidance_scale=2.0, width=b.size,
                    height=b.size, num_inference_steps=k, generator=torch.Generator().manual_seed(0), output_type="pt")
    # one untimed image each first: packed convs lay out their weights at the first call of each input size, which
    # a set of 2,000 images pays once (measured without this: the first timed call took longer than a 4-step one)
    ours(1), theirs(1)
    for k in SHORT:
        found["ours"].append(timed(lambda k=k: ours(k), b.runs))
        found["theirs"].append(timed(lambda k=k: theirs(k), b.runs))
    return {side: line(*times) for side, times in found.items()}


def line(t1: float, t2: float) -> tuple:
    """(fixed, per_step, bound) of t(k) = fixed + k * per_step through the two timed points. Where the steps
    cost little next to the timing noise (tiny models, a busy machine), t2 - t1 can come out negative, and a line
    through them gave negative times ("-0.3 h"). Then no line is fitted: the longer run's time per step, t2 / k2,
    is an upper bound of a step's cost (it carries the fixed cost too), and bound says so."""
    per_step = (t2 - t1) / (SHORT[1] - SHORT[0])
    fixed = t1 - SHORT[0] * per_step
    if per_step > 0 and fixed >= 0:
        return fixed, per_step, False
    return 0.0, t2 / SHORT[1], True


def section8(b, sd, table):
    """sd: ours as generation runs it on the CPU (packed convs); table: benchmark.py's table printer."""
    rows, ours_hours = [], []
    for label, sampler, spacing, steps in CONFIGS:
        fits = fit(b, sd, sampler, spacing)
        hours = {side: STUDY_IMAGES * (fixed + steps * per) / 3600 for side, (fixed, per, _) in fits.items()}
        shown = {side: ("≤ " if fits[side][2] else "") + f"{hours[side]:.1f} h" for side in fits}
        noise = [side for side in fits if fits[side][2]]
        rows.append([f"{label}: {STUDY_IMAGES} images", shown["ours"], shown["theirs"],
                     f"{hours['ours'] / hours['theirs']:.2f}×",
                     f"per step {fits['ours'][1]:.2f} / {fits['theirs'][1]:.2f} s, fixed {fits['ours'][0]:.1f} / "
                     f"{fits['theirs'][0]:.1f} s" + (f" (≤: {' and '.join(noise)} within timing noise, t({SHORT[1]})"
                                                      f" / {SHORT[1]} per step)" if noise else "")])
        ours_hours.append(hours["ours"])
    ours_speedup = ours_hours[0] / ours_hours[1]
    table(f"8. the study's {STUDY_IMAGES}-image set at {b.size}², CFG 2, fp32, batch 1, extrapolated from "
          f"{SHORT[0]} and {SHORT[1]} timed steps (DPM++ 2M Karras 25 steps is {ours_speedup:.1f}× faster than "
          f"Euler a 100 for ours)", rows, ("", "ours", "diffusers", "ratio", "fitted (ours / diffusers)"))
