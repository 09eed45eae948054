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
import torch
import torch.nn.functional as F

from minisd.sampling import (
    SAMPLERS,
    Denoiser,
    GuidedDenoiser,
    draw,
    initial_sigma,
    keep_unmasked,
    step_schedule,
    strength_start,
)


def encode_sample(sd, images, generators):
    """Per-image VAE encode and one posterior draw from that image's generator, scaled for the UNet."""
    latents = []
    for image, g in zip(images, generators, strict=True):
        mean, logvar = sd.vae.encode(image[None])
        latents.append(mean + torch.exp(0.5 * logvar) * draw([g], mean))
    return torch.cat(latents) * sd.scale_factor


@torch.no_grad()
def sample(sd, conds, uncond, weights, seeds, *, width, height, cfg=2.0, steps=100, sampler="euler_a",
           spacing="linspace", batch=0, init=None, mask=None, strength=1.0):
    """Final (scaled) latents [len(seeds), 4, height/8, width/8] (SD2's factor 8; see ModelConfig.latent_factor).

    conds [K, 77, w] with K weights, uncond [1, 77, w]: see GuidedDenoiser. init: [1, 3, H, W] in [-1, 1] or None;
    mask: [1, 1, H, W], 1 = repaint, 0 = keep (None with an init image: repaint everything, i.e. img2img).
    """
    param = next(sd.unet.parameters())
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    factor = sd.config.latent_factor
    like = torch.zeros(len(seeds), 4, height // factor, width // factor, dtype=param.dtype, device=param.device)
    sigmas, timesteps = step_schedule(steps, spacing)
    nine_channels = sd.config.unet.in_channels == 9
    callback, extra = None, None
    if init is None:
        if nine_channels:
            raise ValueError("the inpainting model (9 input channels) needs an init image and a mask")
        x = draw(generators, like) * initial_sigma(sigmas, spacing)
    else:
        images = init.to(like).expand(len(seeds), -1, -1, -1)
        mask = torch.ones_like(images[:, :1]) if mask is None else mask.to(like).expand(len(seeds), -1, -1, -1)
        # [B, 1, H, W] -> [B, 1, h, w]: nearest-neighbour, as diffusers' prepare_mask_latents
        latent_mask = F.interpolate(mask, size=like.shape[2:])
        init_latent = encode_sample(sd, images, generators) if not nine_channels or strength < 1 else None
        noise = draw(generators, like)
        masked_latent = encode_sample(sd, images * (mask < 0.5), generators)
        sigmas, timesteps = strength_start(sigmas, timesteps, strength)
        x = noise * initial_sigma(sigmas, spacing) if strength >= 1 else init_latent + noise * sigmas[0]
        if nine_channels:
            extra = torch.cat([latent_mask, masked_latent], dim=1)   # the model sees mask and masked image
        else:
            callback = keep_unmasked(init_latent, noise, latent_mask, sigmas)
    model = GuidedDenoiser(Denoiser(sd.unet, sd.prediction), conds.to(like), uncond.to(like), weights, cfg, batch,
                           extra)
    return SAMPLERS[sampler](model, x, sigmas, timesteps, generators, callback)


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
