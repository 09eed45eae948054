"""What the training loop (medti/training/trainer.py) minimises, and the randomness it draws: the initial vectors of a
token, the latent cache, the per-step generators and epoch order, and the denoising loss. How parameters are
stepped is in optim.py; what a run saves to resume from, in state.py.

Recipe (the reference study, after Gal et al. 2022 and A1111's implementation): only a [vectors, width] fp32
tensor is trained; it is spliced into the frozen token embeddings wherever the placeholder token appears; the
loss is the usual diffusion MSE on eps (v for v-models) at a uniformly drawn training timestep.
"""

import hashlib

import torch
import torch.nn.functional as F

from minisd.errors import arg
from minisd.schedule import alphas_cumprod
from minisd.vae import posterior_sample

from . import TrainError


def initial_vectors(sd, init: str, n: int, seed: int) -> torch.Tensor:
    """[n, width] fp32 start vectors. Words: their token embeddings spread over the n vectors, vector i taking
    token i * L // n of the L init tokens (A1111's rule; its default init text is "*"). "random": N(0, s^2) with
    s the token table's standard deviation, so the start has the scale of ordinary tokens."""
    table = sd.text.tower.token_embedding.weight.detach().float().cpu()
    if init == "random":
        return torch.randn(n, table.shape[1], generator=torch.Generator().manual_seed(seed)) * table.std()
    ids = sd.text.tokenizer.encode(init)
    if not ids:
        raise TrainError(f"{arg('init')} {init!r} gives no tokens; use words, or {arg('init')} random")
    return torch.stack([table[ids[i * len(ids) // n]] for i in range(n)]).clone()


def once_noise(seed: int, image: int, mirrored: bool, shape) -> torch.Tensor:
    """The noise of --latents once for one image (or its mirror image): from a generator of its own, seeded by a hash
    of (--seed, the image's index in the set, mirrored), so a cache encoded in shards (medti.training.cache_write)
    draws exactly what the whole set encoded at once draws. A hash keeps these seeds off step_generator's."""
    digest = hashlib.sha256(f"medti once {seed} {image} {int(mirrored)}".encode()).digest()
    return torch.randn(shape, generator=torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1))


@torch.no_grad()
def cache_latents(sd, images, flip: bool, seed: int, first: int = 0) -> dict:
    """Encode every training image once (and its mirror image with --flip): the VAE posterior's mean and
    log-variance, plus one sample drawn now for --latents once. Kept on the CPU in fp32, unscaled. `first`: the
    index of images[0] in the whole set, when these are one shard of it. The images and then their mirror images
    go through the VAE in chunks of 4 counted from the first of each, so a shard of a multiple of 4 images encodes
    bit-identically to the same images within the whole set (the VAE's arithmetic may depend on the batch size)."""
    param = next(sd.vae.parameters())
    parts = (images, images.flip(-1)) if flip else (images,)   # rows N.. are the mirrored copies
    means, logvars = [], []
    for chunk in (chunk for part in parts for chunk in part.split(4)):
        mean, logvar = sd.vae.encode(chunk.to(param))
        means.append(mean.float().cpu())
        logvars.append(logvar.float().cpu())
    mean, logvar = torch.cat(means), torch.cat(logvars)
    n = len(images)
    noise = torch.stack([once_noise(seed, first + row % n, row >= n, mean.shape[1:]) for row in range(len(mean))])
    return {"mean": mean, "logvar": logvar, "once": posterior_sample(mean, logvar, noise)}


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """The VAE's input pixels in [-1, 1] -> uint8 0..255, what an image encoder's release preparation takes. Exact for
    8-bit sources (x = v / 127.5 - 1 maps back to v); a 16-bit source (DICOM) is rounded to 8 bits here, as
    DiNO-Diffusion converts its 16-bit X-rays to 8-bit before anything sees them."""
    return ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


@torch.no_grad()
def cache_tokens(image, images, flip: bool) -> torch.Tensor:
    """The image encoder's global tokens [rows, count, width] (fp32, CPU, before the projection, which trains) of
    exactly the images cache_latents encodes, in the same rows: with --flip, rows N.. are of the mirrored images --
    the condition of a mirrored image is the mirrored image's own (minisd.image_conditioning: `image.tokens`)."""
    parts = (images, images.flip(-1)) if flip else (images,)   # chunked as cache_latents chunks them
    return torch.cat([image.tokens(to_uint8(chunk)).float().cpu() for part in parts for chunk in part.split(4)])


def step_generator(seed: int, step: int, micro: int) -> torch.Generator:
    """The random draws of one micro-batch (images, flips, timesteps, noise) come from a generator seeded by
    (seed, step, micro-batch): a resumed run draws exactly what an uninterrupted one would, with no RNG state to
    save, and any step can be replayed alone."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_009 + micro)


def epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """A fresh shuffle of the n training images per epoch, also derived from (seed, epoch) alone."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7_919 + epoch + 1))


def prediction_and_target(sd, context, latents, noise, t) -> tuple:
    """The UNet's prediction for scaled latents [B, 4, h, w] noised with `noise` at integer timesteps t [B], and
    its target: the noise for eps models, v = sqrt(abar) noise - sqrt(1 - abar) x0 for v models (diffusers'
    add_noise / get_velocity, in fp32)."""
    abar = alphas_cumprod().to(latents.device)[t].float()[:, None, None, None]
    noisy = abar.sqrt() * latents + (1 - abar).sqrt() * noise
    target = noise if sd.prediction == "eps" else abar.sqrt() * noise - (1 - abar).sqrt() * latents
    return sd.unet(noisy.to(context.dtype), t, context), target


def diffusion_loss(sd, context, latents, noise, t):
    """MSE between the UNet's prediction and its target (prediction_and_target), with the text conditioning
    `context` [B, 77, width]."""
    prediction, target = prediction_and_target(sd, context, latents, noise, t)
    return F.mse_loss(prediction.float(), target.float())


def denoising_loss(sd, token: str, vectors, prompts: list, latents, noise, t):
    """diffusion_loss with `token` spliced in as `vectors` wherever `prompts` hold it: textual inversion's loss."""
    return diffusion_loss(sd, sd.text(prompts, override={token: vectors}), latents, noise, t)
