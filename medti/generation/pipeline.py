"""From prompt embeddings to latents and images: txt2img, img2img and masked inpainting in one code path.

The random draws follow diffusers' StableDiffusionInpaintPipeline exactly (tests/test_sampling.py and
tests/test_pipeline.py compare with it), one generator per image:
  1. the init image's latent, sampled from the VAE posterior (4-channel models, or strength < 1),
  2. the initial noise,
  3. the masked image's latent (used by 9-channel inpainting models; drawn for 4-channel models too, as
     diffusers does, so that the per-step draws line up),
  then one draw per sampler step. Without an init image only 2 and the steps are drawn (txt2img).
img2img is inpainting with an all-white mask.
"""
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from minisd.errors import UserError
from minisd.sampling import SAMPLERS, GuidedDenoiser, denoiser, draw, keep_unmasked, strength_start, to_output
from minisd.schedule import step_schedule
from minisd.vae import posterior_sample


@dataclass(frozen=True)
class SampleSettings:
    """How to sample: image size in pixels, steps, guidance scale, sampler (minisd.sampling.SAMPLERS), step
    schedule (`sigmas`: a spacing of minisd.schedule.SPACINGS) and UNet rows per call (0: one image per call)."""
    width: int
    height: int
    steps: int = 100
    cfg: float = 2.0
    sampler: str = "euler_a"
    sigmas: str = "linspace"
    batch: int = 0


@dataclass(frozen=True)
class InitImage:
    """img2img and inpainting: image [1, 3, H, W] in [-1, 1]; mask [1, 1, H, W], 1 = repaint, 0 = keep (None:
    repaint everything, i.e. img2img); strength 1 starts from pure noise, < 1 keeps that much of the image."""
    image: torch.Tensor
    mask: torch.Tensor | None = None
    strength: float = 1.0


def encode_sample(sd, images, generators):
    """Per-image VAE encode and one posterior draw from that image's generator, scaled for the UNet."""
    latents = []
    for image, g in zip(images, generators, strict=True):
        mean, logvar = sd.vae.encode(image[None])
        latents.append(posterior_sample(mean, logvar, draw([g], mean)))
    return torch.cat(latents) * sd.scale_factor


def start_from_image(sd, init: InitImage, steps, generators, like):
    """(x, steps, callback, extra) for img2img/inpainting, with diffusers' draw order (module docstring)."""
    images = init.image.to(like).expand(len(generators), -1, -1, -1)
    mask = torch.ones_like(images[:, :1]) if init.mask is None else init.mask.to(like).expand_as(images[:, :1])
    # [B, 1, H, W] -> [B, 1, h, w]: nearest-neighbour, as diffusers' prepare_mask_latents
    latent_mask = F.interpolate(mask, size=like.shape[2:])
    init_latent = encode_sample(sd, images, generators) if not sd.config.inpainting or init.strength < 1 else None
    noise = draw(generators, like)
    masked_latent = encode_sample(sd, images * (mask < 0.5), generators)
    steps = strength_start(steps, init.strength)
    x = noise * steps.init_sigma if init.strength >= 1 else init_latent + noise * float(steps.sigmas[0])
    if sd.config.inpainting:   # the model sees the mask and the masked image; nothing is kept by hand
        return x, steps, None, torch.cat([latent_mask, masked_latent], dim=1)
    return x, steps, keep_unmasked(init_latent, noise, latent_mask, steps.sigmas), None


@torch.no_grad()
def sample(sd, conds, uncond, weights, seeds, settings: SampleSettings, init: InitImage | None = None,
           progress: Callable[[int, int], None] | None = None):
    """Final (scaled) latents [len(seeds), 4, height/8, width/8] (8: SD1's and SD2's ModelConfig.latent_factor).

    conds [K, T, w] with K weights, uncond [1, T, w]: see GuidedDenoiser (prompts: T = 77; an image-conditioned model:
    sd.image(images) and sd.image.null(1)). progress(done, total) is called after
    every sampler step (for a progress line; it must not change anything)."""
    param = next(sd.unet.parameters())
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    factor = sd.config.latent_factor
    like = torch.zeros(len(seeds), 4, settings.height // factor, settings.width // factor, dtype=param.dtype,
                       device=param.device)
    spec = SAMPLERS[settings.sampler]
    steps = step_schedule(settings.steps, settings.sigmas, spec.family)
    if init is None:
        if sd.config.inpainting:
            # a Python caller's mistake only: medti.generate refuses it in its own words before loading anything
            raise UserError("the inpainting model (9 input channels) needs an image and a mask: pass "
                            "init=InitImage(image, mask)")
        x, keep, extra = draw(generators, like) * steps.init_sigma, None, None
    else:
        x, steps, keep, extra = start_from_image(sd, init, steps, generators, like)
    model = GuidedDenoiser(denoiser(sd.unet, sd.prediction, steps), conds.to(like), uncond.to(like), weights,
                           settings.cfg, settings.batch, extra)

    def after_step(i, x):
        x = keep(i, x) if keep else x
        if progress:
            progress(i + 1, len(steps.timesteps))
        return x
    x = spec.loop(model, x, steps.sigmas, generators, after_step, **steps.extra)
    return to_output(x, steps.sigmas)


def compile_for_inference(sd):
    """torch.compile the UNet and the VAE decoder in place, for generation only (`--compile`).

    On the CPU, inductor's `freezing` turns the weights into graph constants, so oneDNN packs each conv and
    linear weight once instead of at every call; that, not the fusions, is most of the gain measured in
    tools/benchmark.py. The price: a compile of about a minute per network at full size on 2 cores, repeated for
    every new input shape (dynamic=False: kernels specialised to the shape), and weights that must not change
    afterwards -- fine for generation, wrong for training. Results match eager fp32 to float rounding
    (tests/test_pipeline.py)."""
    options = {"freezing": True} if next(sd.unet.parameters()).device.type == "cpu" else None
    sd.unet = torch.compile(sd.unet, dynamic=False, options=options)
    sd.vae.decoder = torch.compile(sd.vae.decoder, dynamic=False, options=options)
    return sd


@torch.no_grad()
def decode(sd, latents):
    """Scaled latents -> images [B, 3, H, W] in [-1, 1]. A half-precision VAE can overflow to inf/NaN on
    some latents; then the decode is redone in fp32 (and the VAE returned to its dtype)."""
    images = sd.vae.decode(latents / sd.scale_factor)
    if not torch.isfinite(images).all():
        dtype = next(sd.vae.parameters()).dtype
        images = sd.vae.float().decode(latents.float() / sd.scale_factor)
        sd.vae.to(dtype)
    return images.float().clamp(-1, 1)
