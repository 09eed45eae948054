"""DreamBooth's prior preservation (Ruiz et al. 2023, "DreamBooth: Fine Tuning Text-to-Image Diffusion Models for
Subject-Driven Generation", eq. 2) for --method lora and unet: besides the instance images under
--instance-prompt, every micro-batch holds as many class images under --class-prompt, and their denoising loss,
times --prior-weight, is added, so the model keeps drawing the class as it did (a chest x-ray in general) while it
learns the instance (a chest x-ray of sks).

The class images are a folder (--class-images DIR, read like --data) or N images the frozen model makes once, before
the first step, with the class prompt (--class-images N): saved in the run folder as class-images/NNNNN.png and read
back from there on a resume, so a resumed run trains on the very same images. Made with diffusers' DreamBooth script's
pipeline defaults for this (50 steps, guidance 7.5), with Euler a, from seeds --seed + i.
"""
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from minisd.errors import arg

from ..files.atomic import inside
from ..files.images import save_png, to_pil
from ..files.pseudonyms import model_name
from ..generation.pipeline import SampleSettings, decode, sample
from ..generation.progress import Progress
from . import TrainError
from .distributed import barrier, main_process
from .objective import cache_latents, prediction_and_target

STEPS, GUIDANCE = 50, 7.5   # diffusers examples/dreambooth/train_dreambooth.py: the pipeline's own defaults


# Class images are generated once and their latents kept in memory (64 KB each at 512²): 10,000 is 0.6 GB and days
# of generation on one GPU, well past the hundreds that DreamBooth's recipes use.
MAX_CLASS_IMAGES = 10_000


def class_count(cfg) -> int | None:
    """--class-images as a count N, or None when it names a folder. ASCII digits only: str.isdigit accepts "²",
    which int() refuses."""
    return int(cfg.class_images) if re.fullmatch(r"[0-9]+", cfg.class_images) else None


def check(cfg):
    """The prior-preservation flags, before anything loads: all three together, with lora or unet."""
    given = [name for name in ("class_prompt", "class_images") if getattr(cfg, name)]
    if not given:
        if cfg.prior_weight != 1.0:   # alone it would weigh nothing: refused rather than silently ignored
            raise TrainError(f"{arg('prior_weight')} weighs the class images' loss: give it with "
                             f"{arg('class_prompt')} and {arg('class_images')}, or leave it out")
        return
    if cfg.method == "ti":
        raise TrainError(f"{arg(given[0])} is DreamBooth's, for {arg('method')} lora or unet")
    if len(given) < 2:
        missing = ({"class_prompt", "class_images"} - set(given)).pop()
        raise TrainError(f"{arg(given[0])} needs {arg(missing)} too (DreamBooth's prior preservation)")
    count = class_count(cfg)
    if count is not None and count > MAX_CLASS_IMAGES:
        raise TrainError(f"{arg('class_images')} {cfg.class_images}: at most {MAX_CLASS_IMAGES:,} images for the "
                         "frozen model to make (or a folder of class images)")
    if count == 0 or (count is None and not Path(cfg.class_images).is_dir()):
        raise TrainError(f"{arg('class_images')} {cfg.class_images}: a folder of class images, or a number of "
                         "images (at least 1) for the frozen model to make")
    if count is None and cfg.out and inside(cfg.out, cfg.class_images):   # as --out inside --data
        raise TrainError(f"{arg('out')} {cfg.out} is inside {arg('class_images')} {cfg.class_images}: its "
                         f"previews would become class images; choose an {arg('out')} outside that folder")
    if not 0 <= cfg.prior_weight < math.inf:   # NaN fails too; inf made every loss inf, blamed on --lr
        raise TrainError(f"{arg('prior_weight')} {cfg.prior_weight:g}: must be a finite number, 0 or more")


def recipe(cfg, i: int, model: str = "") -> str:
    """What class image i is made from, in its PNG's parameters: an image already in the folder is reused only if
    it says the same (a run killed while making them, started again with another prompt, seed, size or model,
    must not train on the old ones). The model by its name (medti.files.pseudonyms.model_name): a generated image
    carries no path; earlier releases wrote --model as given (`model`)."""
    return (f"class image {i}: {cfg.class_prompt}\nSteps: {STEPS}, Sampler: Euler a, CFG scale: {GUIDANCE}, "
            f"Seed: {cfg.seed + i}, Size: {cfg.resolution}x{cfg.resolution}, Model: {model or model_name(cfg.model)}")


def stale_class_images(cfg, folder: Path) -> list:
    """The class images in `folder` made from another recipe; on --resume one is an error (the run's own images
    are never replaced; the resumed settings differ from the run's), otherwise they are made again."""
    paths = [folder / f"{i:05d}.png" for i in range(class_count(cfg))]
    # the other forms: what the images made before the recipe was recorded, or held a path, say (their runs resume)
    stale = [p for i, p in enumerate(paths) if p.exists() and _parameters(p) not in
             (recipe(cfg, i), recipe(cfg, i, cfg.model), f"class image {i}: {cfg.class_prompt}")]
    if stale and cfg.resume:
        raise TrainError(f"{arg('resume')}: {stale[0]} was made with another {arg('class_prompt')}, "
                         f"{arg('seed')}, {arg('resolution')} or {arg('model')}; resume with the run's own settings")
    return stale


def _parameters(path: Path) -> str:
    try:
        with Image.open(path) as image:
            return image.info.get("parameters", "")
    except (OSError, ValueError):   # a damaged file: made again
        return ""


@torch.no_grad()
def make_class_images(sd, cfg, folder: Path, device, stale: list):
    """N images of the class prompt by the frozen model, once: the ones already in `folder` from this recipe are
    kept (a resume, or a run started again after it was killed while making them)."""
    folder.mkdir(parents=True, exist_ok=True)
    cond, uncond = sd.text([cfg.class_prompt]), sd.text([""])
    settings = SampleSettings(width=cfg.resolution, height=cfg.resolution, steps=STEPS, cfg=GUIDANCE)
    todo = [i for i in range(class_count(cfg)) if not (folder / f"{i:05d}.png").exists() or
            folder / f"{i:05d}.png" in stale]
    progress = Progress(len(todo))   # 200 images of 50 steps take minutes: say so, as generate does
    sd.vae.to(device)
    for i in todo:
        progress.begin(1)
        latents = sample(sd, cond, uncond, [1.0], [cfg.seed + i], settings, progress=progress.step)
        save_png(folder / f"{i:05d}.png", to_pil(decode(sd, latents)[0]), recipe(cfg, i))
        progress.end_batch()
    sd.vae.to("cpu")
    if todo or stale:
        progress.summary(f"{folder} (class images; {class_count(cfg) - len(todo)} already there)", 0)


def class_cache(sd, cfg, out: Path, device, load) -> dict | None:
    """The class images' latent cache (as cache_latents), or None without prior preservation. `load(folder)` reads
    a folder as --data is read."""
    if not cfg.class_prompt:
        return None
    folder = Path(cfg.class_images) if class_count(cfg) is None else out / "class-images"
    if class_count(cfg) is not None:
        stale = stale_class_images(cfg, folder)   # on every rank: an error stops them all, none waits
        if main_process():   # one maker; the other ranks read what it wrote
            make_class_images(sd, cfg, folder, device, stale)
        barrier()
    images = load(folder).images
    sd.vae.to(device)
    cache = cache_latents(sd, images, cfg.flip, cfg.seed + 1)
    sd.vae.to("cpu")
    return cache


def prior_preservation_loss(sd, context, latents, noise, t, instances: int, weight: float):
    """One UNet batch, rows :instances the instance images and the rest the class images: the instance rows' MSE
    plus `weight` times the class rows' (each a mean over its own rows, as in diffusers' train_dreambooth.py)."""
    prediction, target = prediction_and_target(sd, context, latents, noise, t)
    instance = F.mse_loss(prediction[:instances].float(), target[:instances].float())
    prior = F.mse_loss(prediction[instances:].float(), target[instances:].float())
    return instance + weight * prior
