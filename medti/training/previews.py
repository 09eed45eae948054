"""The preview images of a training run: every --preview-every steps, a strip of four images of the method's
prompt, the same seeds each time, so that previews differ by training alone. Announced before it starts (it is a
pause of minutes on a CPU) and timed: the progress line's ETA counts the previews still to come
(medti.training.progress). `s` is the trainer's Session; under torchrun only rank 0 makes them."""
import sys
import time

import torch

from minisd.errors import UserError, arg
from minisd.sampling import SAMPLERS
from minisd.schedule import check_steps

from ..files.images import contact_sheet, save_png, to_pil
from ..generation.pipeline import SampleSettings, decode, sample
from ..generation.progress import duration
from . import TrainError
from .distributed import main_process
from .optim import precision

SEEDS = range(4)   # the preview's images


def check_preview(cfg):
    """--preview-sampler one of generate's samplers, and --preview-steps a count its schedule can do (DPM++ 2M and
    DDIM: at most 1,000 distinct training timesteps), refused before the first preview, hours into a run."""
    if cfg.preview_sampler not in SAMPLERS:
        raise TrainError(f"{arg('preview_sampler')} {cfg.preview_sampler!r}: one of {', '.join(SAMPLERS)}")
    try:
        check_steps(cfg.preview_steps, "linspace", SAMPLERS[cfg.preview_sampler].family, "preview_steps")
    except UserError as e:
        raise TrainError(str(e)) from None


def preview_due(cfg, step: int) -> bool:
    """Whether a preview is made at `step` (cfg: the TrainConfig)."""
    return bool(cfg.preview_every) and step > 0 and step % cfg.preview_every == 0


def preview(s, step: int):
    """The preview of `step`, announced on stderr before it starts, and timed."""
    if not main_process():
        return
    cfg, last = s.cfg, s.clock.preview_s
    print(f"preview at step {step}: {len(SEEDS)} images, {cfg.preview_steps} steps of "
          f"{SAMPLERS[cfg.preview_sampler].a1111}" + (f", about {duration(last)} as the last one" if last else ""),
          file=sys.stderr)
    began = time.perf_counter()
    written = write_preview(s, step)
    took = time.perf_counter() - began
    s.clock.previewed(took)
    if written:
        print(f"preview at step {step}: wrote {written.name} in {duration(took)}", file=sys.stderr)


@torch.no_grad()
def write_preview(s, step: int):
    """Four images of the method's prompt (TI: the token alone) from fixed seeds at CFG 2 (the study's guidance),
    with --preview-sampler and --preview-steps, in one strip, each image labelled with its step and seed. An image
    that is not finite (fp16 overflow) is not written: a warning says so, and training goes on. Returns the path
    written, or None."""
    sd, size = s.sd, s.cfg.resolution
    sd.vae.to(s.plan.device)   # the VAE visits the device only for previews
    settings = SampleSettings(width=size, height=size, steps=s.cfg.preview_steps, cfg=2.0,
                              sampler=s.cfg.preview_sampler)
    with precision(s.method, s.plan.device):
        # an image-conditioned run: variations of one fixed image, against the null as the uncond
        cond = s.method.context([s.method.prompt])
        uncond = sd.image.null(1) if sd.image is not None else sd.text([""])
        latents = sample(sd, cond, uncond, [1.0], SEEDS, settings)
    images = decode(sd, latents) if torch.isfinite(latents).all() else None   # a NaN latent is not decoded
    sd.vae.to("cpu")
    if images is None or not torch.isfinite(images).all():
        print(f"warning: step {step}: the preview is not finite; no preview written", file=sys.stderr)
        return None
    path = s.out / f"preview-{step:06d}.png"
    labels = [f"step {step}, seed {seed}" for seed in SEEDS]
    about = f"variations of {s.method.shown}" if sd.image is not None else s.method.prompt   # an image by its pseudonym
    save_png(path, contact_sheet([to_pil(i) for i in images], len(images), labels),
             f"{about} (training step {step}; seeds {SEEDS[0]}-{SEEDS[-1]}, "
             f"{settings.steps} steps of {SAMPLERS[settings.sampler].a1111}, CFG {settings.cfg:g})")
    return path
