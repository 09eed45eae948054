"""Section 13 of tools/benchmark.py: one image-conditioned training step (`--method unet --condition dinov2`,
DiNO-Diffusion's recipe), ours (the pieces of medti.training.trainer's loop) against the same recipe written the
diffusers way, on the same random SD1-shaped UNet and VAE and the same random DINOv2-with-registers encoder.

  ours       medti.training.image_method.ImageFineTune (fp32 on the CPU). Per step, as the loop does: the image's
             latents and its global tokens from the caches made once at setup (medti.training.objective
             .cache_latents and .cache_tokens, timed on their own: once per training image), the condition dropout
             drawn from the step's generator (image_method.draw_dropped), the method's context (the projection where
             the encoder's width differs from the UNet's context width, the null's zeros in dropped rows),
             diffusion_loss, backward, total_norm (logged), the trainer's fused AdamW.
  diffusers  examples/text_to_image/train_text_to_image.py's loop with the text encoder replaced by the image
             encoder, as DiNO-Diffusion adapted it: per step, vae.encode(pixel_values).latent_dist.sample() times
             the scaling factor, transformers' Dinov2WithRegistersModel(pixel_values) and its global tokens (CLS and
             the 4 registers of last_hidden_state) as encoder_hidden_states, computed every step as the example
             computes its text embeddings, rows zeroed with probability 0.1 (the dropout), DDPMScheduler.add_noise,
             UNet, MSE, backward, clip_grad_norm_(1.0), torch's default AdamW (a for-loop on the CPU). The
             processor's resize/crop/normalise (PIL) is outside the timer, as the example's data loader is.

One more row says where the difference comes from: theirs from the cached latents and cached tokens (the same work
as ours). Fair by construction: one copy of the UNet and VAE weights (bench_finetune.models' meta-device trick:
ours is assigned diffusers' tensors under the official names), our encoder loaded by minisd.dino_load from the
folder transformers saved its random model to (the same numbers), the same image, batch 1, fp32.

Sizes: the full run is SD1's UNet (context 768 = ViT-B's width, so no projection, as in the paper) at 256² pixels
(32² latents) with a ViT-B/14 reg4 at 224² (the release's crop), which a 2-core CPU runs in a few minutes; --quick
is the tiny SD1 with a 48-wide encoder into its 64-wide context, so the projection's path runs too.
"""
import diffusers
import numpy as np
import torch
import torch.nn.functional as F

import minisd
from bench_common import medians, row, table
from bench_finetune import randomise_, timed
from bench_models import MODELS, diffusers_configs
from convert_diffusers import convert_unet, convert_vae
from medti.training import methods
from medti.training.config import TrainConfig
from medti.training.image_method import ImageFineTune, conditions, draw_dropped
from medti.training.objective import cache_latents, cache_tokens, diffusion_loss
from medti.training.optim import adamw, precision, total_norm
from medti.training.trainer import draw_latents
from minisd.dino_load import load_encoder
from minisd.image_conditioning import attach

DROPOUT, REGISTERS = 0.1, 4   # --condition-dropout's default; the paper's ViT-B/14 reg4
CPU = torch.device("cpu")
IMAGENET = dict(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
# quick -> (bench_models' model, pixel size, encoder width / layers / heads, the encoder's crop)
SIZES = {True: ("sd1-tiny", 128, 48, 2, 4, 98), False: ("sd1", 256, 768, 12, 12, 224)}


def encoder_release(folder, width: int, layers: int, heads: int, crop: int):
    """transformers' Dinov2WithRegistersModel with random weights, saved as a release with its BitImageProcessor
    (shortest edge crop + 32, centre crop: the DINOv2 releases' 256 -> 224): (the reference model, its processor)."""
    from transformers import BitImageProcessor, Dinov2WithRegistersConfig, Dinov2WithRegistersModel
    config = Dinov2WithRegistersConfig(hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                                       patch_size=14, image_size=518, num_register_tokens=REGISTERS)
    ref = randomise_(Dinov2WithRegistersModel(config), 5).requires_grad_(False).eval()
    ref.save_pretrained(folder)
    processor = BitImageProcessor(size={"shortest_edge": crop + 32}, crop_size={"height": crop, "width": crop},
                                  **IMAGENET)
    processor.save_pretrained(folder)
    return ref, processor


def models(config, size: int, folder, encoder_shape: tuple):
    """diffusers' UNet and VAE (random, fp32) and the reference encoder; ours holding the same UNet/VAE tensors,
    image-conditioned by our encoder loaded from the reference's release folder. The text tower is never built."""
    cfg = minisd.load_config(config)
    kwargs = diffusers_configs(cfg, size)
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**kwargs["unet"])
    ref = {"unet": randomise_(unet.to_empty(device="cpu"), 0).requires_grad_(False),
           "vae": randomise_(diffusers.AutoencoderKL(**kwargs["vae"]), 1).requires_grad_(False)}
    ref["encoder"], ref["processor"] = encoder_release(folder, *encoder_shape)
    sd = minisd.build(cfg, device="meta")
    sd.unet.load_state_dict(convert_unet(ref["unet"].state_dict()), strict=True, assign=True)
    sd.vae.load_state_dict(convert_vae(ref["vae"].state_dict()), strict=True, assign=True)
    image = attach(sd, str(folder), load_encoder(folder), seed=0)
    ref["proj"] = None   # the recipe's own nn.Linear where the widths differ, started from our projection's values
    if image.proj is not None:
        ref["proj"] = torch.nn.Linear(image.cfg.width, sd.config.unet.context_dim).requires_grad_(False)
        ref["proj"].load_state_dict(image.proj.state_dict())
    return sd, ref


def inputs(sd, ref: dict, size: int):
    """One training image as each loop holds it: the VAE's pixels in [-1, 1], the encoder processor's pixel_values
    of the same 8-bit image (prepared outside the timer, as the example's data loader does), and ours: the latent
    and token caches."""
    gen = torch.Generator().manual_seed(1)
    uint8 = torch.randint(0, 256, (size, size, 3), generator=gen, dtype=torch.uint8)
    pixels = uint8.permute(2, 0, 1)[None].float() / 127.5 - 1
    dino_pixels = ref["processor"](images=[uint8.numpy().astype(np.uint8)], return_tensors="pt").pixel_values
    with torch.no_grad():
        cache = cache_latents(sd, pixels, False, 0)
    cache["tokens"] = cache_tokens(sd.image, pixels, False)
    return pixels, dino_pixels, cache


def ours_step(sd, cache: dict, device=CPU):
    """One step of medti.training.trainer.loop for --method unet --condition dinov2 on `device` (the model's dtype
    there: fp32 on the CPU; in fp16 the trainer's autocast and grad scaler), and its optimizer."""
    cfg = TrainConfig(method="unet", condition="dinov2", encoder=sd.image.cfg.encoder, condition_dropout=DROPOUT)
    m = ImageFineTune(sd, cfg, device, cache["tokens"][0], "bench")
    optimizer = adamw(list(m.params.values()), float(methods.learning_rate(cfg)))
    scaler = torch.amp.GradScaler(device.type, enabled=m.autocast == torch.float16)
    g = torch.Generator().manual_seed(0)

    def step():
        optimizer.zero_grad(set_to_none=True)
        latents = draw_latents(cache, [0], cfg.latents, g) * sd.scale_factor
        t, noise = torch.randint(0, 1000, (1,), generator=g), torch.randn(latents.shape, generator=g)
        conds = conditions(cache["tokens"], [0], draw_dropped(1, DROPOUT, g))
        with precision(m, device):
            loss = diffusion_loss(sd, m.context(conds), latents.to(device), noise.to(device), t.to(device))
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        total_norm([p.grad for p in m.params.values()])
        scaler.step(optimizer)
        scaler.update()
    return step, optimizer


def diffusers_step(ref: dict, pixels, dino_pixels, fixed=None, device=CPU, dtype=torch.float32):
    """One step of train_text_to_image.py's loop with image embeddings, one process: from the pixels, or with
    `fixed` = (latents, tokens) the UNet part alone. In fp16 as its accelerate mixed precision runs it (the UNet and
    projection fp32, the VAE and encoder in fp16, autocast around the UNet, a grad scaler); fp32 on the CPU."""
    scheduler = diffusers.DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    params = list(ref["unet"].parameters()) + (list(ref["proj"].parameters()) if ref["proj"] else [])
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    unet, vae, encoder = ref["unet"], ref["vae"], ref["encoder"]
    pixels, dino_pixels = pixels.to(device, dtype), dino_pixels.to(device, dtype)

    def step():
        latents, states = fixed or (vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor,
                                    encoder(pixel_values=dino_pixels).last_hidden_state[:, :1 + REGISTERS])
        dropped = (torch.rand(len(states)) < DROPOUT).to(device)[:, None, None]
        noise, t = torch.randn_like(latents), torch.randint(0, 1000, (1,), device=device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            states = ref["proj"](states) if ref["proj"] else states
            states = torch.where(dropped, torch.zeros_like(states), states)
            prediction = unet(scheduler.add_noise(latents, noise, t), t, states, return_dict=False)[0]
        scaler.scale(F.mse_loss(prediction.float(), noise.float(), reduction="mean")).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
    return step, optimizer


def encodes(sd, ref: dict, pixels, dino_pixels, cache: dict, runs: int) -> dict:
    """What the recipe does per step and ours once per image: the VAE encode and the encoder forward, timed alone;
    and theirs' fixed (latents, tokens) for the equal-work row."""
    vae, encoder = ref["vae"], ref["encoder"]
    with torch.no_grad():
        fixed = (vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor,
                 encoder(pixel_values=dino_pixels).last_hidden_state[:, :1 + REGISTERS])
        seconds = medians({"vae": lambda: vae.encode(pixels).latent_dist.sample(),
                           "encoder": lambda: encoder(pixel_values=dino_pixels),
                           "ours_vae": lambda: cache_latents(sd, pixels, False, 0),
                           "ours_encoder": lambda: cache_tokens(sd.image, pixels, False)}, runs, warmup=True)
    # both sides describe the image alike: our preparation (minisd.dino_prepare) vs the processor's differs by a
    # grey level on a few values (docs/verification.md: tokens end to end 1e-3 against timm), the network not at all
    with torch.no_grad():
        theirs = ref["proj"](fixed[1]) if ref["proj"] else fixed[1]
        check = ((sd.image.project(cache["tokens"]) - theirs).abs().max() / theirs.abs().max()).item()
    return seconds | {"fixed": fixed, "check": check}


def steps(sd, ref: dict, runs: int, pixels, dino_pixels, cache, fixed) -> dict:
    """The whole UNet (and the projection, if any) in AdamW, one side at a time: their AdamW states would not fit
    in memory together at SD1's size."""
    seconds = {"ours": timed(lambda: ours_step(sd, cache), runs)}
    for module in (ref["unet"], ref["proj"] or ref["unet"]):
        module.requires_grad_(True).train()
    seconds["theirs"] = timed(lambda: diffusers_step(ref, pixels, dino_pixels), runs)
    seconds["unet_only"] = timed(lambda: diffusers_step(ref, pixels, dino_pixels, fixed), runs)
    for module in (ref["unet"], ref["proj"] or ref["unet"]):
        module.requires_grad_(False)
    return seconds


def section13(args, tmp, quick: bool) -> dict:
    """Build the models (tiny with --quick), time the encodes and the three steps, print one table; return the
    figures (seconds) for a caller that checks them."""
    model, size, *encoder_shape = SIZES[quick]
    config = MODELS[model][0]
    sd, ref = models(config, size, tmp / "dinov2-release", tuple(encoder_shape))
    pixels, dino_pixels, cache = inputs(sd, ref, size)
    enc = encodes(sd, ref, pixels, dino_pixels, cache, args.runs)
    step = steps(sd, ref, args.runs, pixels, dino_pixels, cache, enc.pop("fixed"))
    n, image = sum(p.numel() for p in ref["unet"].parameters()), sd.image.cfg
    proj = f"a {image.width}->{sd.config.unet.context_dim} projection" if image.projection else "no projection"
    table(f"13. one image-conditioned training step (--method unet --condition dinov2), {'tiny' if quick else 'SD1'} "
          f"UNet ({n / 1e6:,.0f} M weights), {size}² images ({size // sd.config.latent_factor}² latents), "
          f"DINOv2 with {REGISTERS} registers, {image.width} wide ({image.count} global tokens, {proj}), batch 1, "
          f"fp32, dropout {DROPOUT}: ours (medti's loop) vs train_text_to_image.py with image embeddings", [
              row("whole UNet, AdamW, embeddings computed per step (their recipe step)", step["ours"],
                  step["theirs"], 0.8),
              row("the same, theirs from cached latents and tokens (equal work)", step["ours"], step["unet_only"]),
              row("VAE encode of the image: ours once at setup, theirs every step", enc["ours_vae"], enc["vae"]),
              row("encoder forward (global tokens): ours once at setup (with its image preparation), theirs every "
                  f"step; max |ours - theirs| / max |theirs| = {enc['check']:.1e}", enc["ours_encoder"],
                  enc["encoder"])],
          ("", "ours", "diffusers", "ratio", "target"))
    return step | enc
