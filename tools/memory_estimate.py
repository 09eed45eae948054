"""ESTIMATED peak GPU memory of one textual-inversion training step (and of generation), without a GPU.

    python tools/memory_estimate.py [--model sd15] [--resolution 768] [--batch N] [--no-checkpointing]
    python tools/memory_estimate.py --method lora [--rank 4]              # medti.train --method lora's step
    python tools/memory_estimate.py --method unet [--trainable attention] [--ema] [--foreach]

--model: a preset (sd2-base, sd21, sd15, sd15-inpainting, ...), a JSON config file or a diffusers folder (only its
config files are read); default SD2 at the --resolution it was trained at. The real code runs on fake tensors
(tools/memory_common.py): the full-size model is built on the meta device and materialised as fake fp16 tensors,
then one training step runs through medti.training.objective (denoising_loss, backward, AdamW); estimate_*() ->
{category: bytes}. --method lora|unet estimates the step of `python -m medti.train --method lora|unet`
(tools/memory_methods.py). """
import argparse
import sys

import torch

import minisd
from bench_models import diffusers_configs  # tools/, the script's folder (not a package)
from medti.files import embedding_file as emb
from medti.generation.pipeline import InitImage, SampleSettings, decode, sample
from medti.training.objective import denoising_loss
from medti.training.optim import enable_checkpointing
from memory_common import (  # re-exported: tests and tools import them from here
    DEVICE,
    GB,
    adamw,
    describe,
    fake_device,
    materialise,
    model_config,
    on_device,
    report,
    training_step,
)
from memory_methods import main as method_main

TOKEN, N_VECTORS = "<medti>", 64
CACHED_IMAGES = 100            # training images whose latents medti.train caches, on the CPU
LIMITS = {"required": 8 * GB, "target": 3.5 * GB}   # for training; generation's target is 3 GB
# --method (medti.training.methods.METHODS), --trainable
METHODS, TRAINABLE = ("ti", "lora", "unet"), ("all", "attention")


def estimate_training(resolution=512, batch=1, checkpointing=True, dtype=torch.float16, config="sd2-base") -> dict:
    """Bytes per category of one step of medti/train.py's loop on the device (the VAE stays off it)."""
    cfg = model_config(config)
    if cfg.inpainting:   # medti.training feeds the UNet 4-channel latents: TI trains on the plain model
        raise ValueError("textual inversion trains on a 4-channel model, not on the 9-channel inpainting UNet")
    sd = minisd.build(cfg, device="meta")
    if checkpointing:
        enable_checkpointing(sd)
    width, h = sd.text.width, resolution // sd.config.latent_factor
    emb.attach(sd, {TOKEN: emb.Embedding(TOKEN, torch.zeros(N_VECTORS, width))})   # real: the start vectors
    with fake_device() as mem:
        materialise(sd.unet, dtype), materialise(sd.text.tower, dtype)
        weights = mem.now
        vectors = torch.nn.Parameter(on_device(N_VECTORS, width))   # fp32 whatever the model's dtype
        optimizer = adamw([vectors])
        trainable = mem.now - weights
        latents, noise = on_device(batch, 4, h, h), on_device(batch, 4, h, h)
        t = torch.randint(0, 1000, (batch,))   # on the CPU, as medti/train.py draws it
        inputs = mem.now - weights - trainable
        step = training_step(mem, lambda: denoising_loss(sd, TOKEN, vectors, [TOKEN] * batch, latents, noise, t),
                             [vectors], optimizer)
    cached = 3 * CACHED_IMAGES * 4 * h * h * 4   # cache_latents: mean, logvar, one sample; fp32 on the CPU
    return {"weights": weights, "trainable": trainable, "inputs": inputs, **step, "cpu_cached_latents": cached}


def estimate_diffusers_recipe(resolution=512, batch=1, checkpointing=True, dtype=torch.float16,
                              config="sd2-base") -> dict:
    """diffusers' examples/textual_inversion/textual_inversion.py: fp16 UNet and VAE, fp32 text encoder under
    accelerate's fp16 autocast, its WHOLE token table trained by AdamW (and a copy kept to restore all rows but
    the new token's), a VAE encode every step. The networks: `config`'s, in diffusers' classes."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    cfg = model_config(config)
    if cfg.inpainting:   # the example feeds the UNet 4-channel latents
        raise ValueError("the diffusers example trains a 4-channel model, not the 9-channel inpainting UNet")
    kwargs = diffusers_configs(cfg, resolution)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(**kwargs["unet"]), AutoencoderKL(**kwargs["vae"])
        # 49,408 + 1 rows: the example adds one placeholder token (num_vectors=1) and resizes the table
        text = CLIPTextModel(CLIPTextConfig(**{**kwargs["text"], "vocab_size": kwargs["text"]["vocab_size"] + 1}))
    if checkpointing:   # the example calls gradient_checkpointing_enable(), transformers 5's old name for this
        unet.enable_gradient_checkpointing(), text.activation_checkpointing_enable()
    with fake_device() as mem:
        materialise(unet, dtype), materialise(vae, dtype), materialise(text, torch.float32)
        table = text.get_input_embeddings().weight.requires_grad_(True)
        weights = mem.now - table.nbytes
        original = table.detach().clone()   # the example's orig_embeds_params
        optimizer = adamw([table])
        trainable = mem.now - weights
        pixels, ids = on_device(batch, 3, resolution, resolution, dtype=dtype), on_device(batch, 77, dtype=torch.long)
        inputs = mem.now - weights - trainable
        keep = torch.arange(len(table)) != len(table) - 1   # index_no_updates: all rows but the placeholder's
        def loss_fn():
            latents = vae.encode(pixels).latent_dist.sample().detach() * cfg.scale_factor
            noise, t = torch.randn_like(latents), torch.randint(0, 1000, (batch,))
            with torch.autocast(DEVICE, dtype=dtype):   # accelerate wraps the prepared text encoder's forward
                context = text(ids)[0].float().to(dtype)
            prediction = unet(scheduler.add_noise(latents, noise, t), t, context).sample
            return torch.nn.functional.mse_loss(prediction.float(), noise.float())
        step = training_step(mem, loss_fn, [table], optimizer)
        with torch.no_grad():
            table[keep] = original[keep]
        step["total"] = max(step["total"], mem.peak)
    return {"weights": weights, "trainable": trainable, "inputs": inputs, **step}


def estimate_generation(resolution=512, cfg=True, dtype=torch.float16, config="sd2-base") -> dict:
    """medti.generation.pipeline: one sampler step (UNet at batch 2 with CFG, no grad), then the VAE decode; all
    resident. An inpainting model samples from an image and a mask (its VAE encode counts in the sampler step)."""
    sd = minisd.build(model_config(config), device="meta")
    with fake_device() as mem, torch.no_grad():
        materialise(sd.unet, dtype), materialise(sd.text.tower, dtype), materialise(sd.vae, dtype)
        weights = mem.peak = mem.now
        cond, uncond = sd.text(["chest x-ray"]), sd.text([""])
        init = InitImage(on_device(1, 3, resolution, resolution, dtype=dtype),
                         on_device(1, 1, resolution, resolution, dtype=dtype)) if sd.config.inpainting else None
        latents = sample(sd, cond, uncond, [1.0], [0], SampleSettings(width=resolution, height=resolution,
                         cfg=2.0 if cfg else 1.0, steps=1), init)
        sampler_peak, mem.peak = mem.peak, mem.now
        decode(sd, latents)
    return {"weights": weights, "sampler_step": sampler_peak - weights, "vae_decode": mem.peak - weights,
            "total": max(sampler_peak, mem.peak)}


TRAINING = {"weights": "weights", "trainable": "trainable tensor(s) + AdamW state", "inputs": "inputs on the device",
            "saved_for_backward": "saved for backward, after the forward", "gradient": "gradient",
            "activations": "activations + temporaries (fwd/bwd peak minus the rest)"}
GENERATION = {"weights": "weights", "sampler_step": "sampler step above weights", "vae_decode": "decode above weights"}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="preset, JSON config or diffusers folder (default: SD2, sd2-base "
                   "below 768 px, sd2 from 768)")
    p.add_argument("--resolution", type=int, default=512, help="image size; latents are 1/8 of it")
    p.add_argument("--batch", type=int, default=1, help="images per training micro-batch")
    p.add_argument("--no-checkpointing", action="store_true", help="without gradient checkpointing")
    p.add_argument("--method", default="ti", help="ti (default: textual inversion, and generation) | lora | unet")
    p.add_argument("--rank", type=int, default=4, help="lora: adapter rank")
    p.add_argument("--trainable", default="all", help="unet: all | attention")
    p.add_argument("--ema", action="store_true", help="unet: with an EMA of the trained weights")
    p.add_argument("--foreach", action="store_true", help="lora, unet: torch's default CUDA AdamW (foreach, as the "
                   "diffusers examples run it) instead of medti's fused one")
    args = p.parse_args(argv)
    for flag, value, allowed in (("method", args.method, METHODS), ("trainable", args.trainable, TRAINABLE)):
        if value not in allowed:   # one line, like --model's errors (argparse's choices print the usage too)
            sys.exit(f"memory_estimate: error: --{flag} {value}: one of {', '.join(allowed)}")
    res, checkpointing = args.resolution, not args.no_checkpointing
    # default: the SD2 file trained at that size; the networks are the same
    model = args.model or ("sd2" if res >= 768 else "sd2-base")
    try:
        cfg = model_config(model)
    except minisd.LoadError as e:   # one line in the flag's words, not a traceback
        sys.exit(f"memory_estimate: error: --model {model}: {str(e).removeprefix(f'config {model}: ')}")
    width, rows = cfg.text.width, cfg.text.vocab_size + 1
    print(f"ESTIMATED peak device memory (live tensor bytes on fake tensors), BEFORE the CUDA context (~300-500 MB) "
          f"and allocator fragmentation.\n{describe(cfg)}, {model}, {res}x{res} (latents {res // 8}x{res // 8}), "
          f"batch {args.batch}, fp16, gradient checkpointing {'on' if checkpointing else 'off'}")
    if args.method != "ti":
        return method_main(args, cfg, checkpointing)
    if cfg.inpainting:   # neither medti nor the diffusers example trains TI on the 9-channel UNet
        print("\nTraining: not estimated -- textual inversion trains on the 4-channel model; the inpainting UNet "
              "is for generation")
    else:
        ours = estimate_training(res, args.batch, checkpointing, config=cfg)
        report(f"medti training step: fp16 UNet + text tower; {N_VECTORS}x{width} fp32 vectors trained; latents "
               f"cached on the CPU (not counted: {CACHED_IMAGES} images x mean, logvar, sample = "
               f"{ours['cpu_cached_latents'] / 2 ** 20:.1f} MiB)", ours, TRAINING, LIMITS)
        report(f"diffusers textual_inversion example: fp16 UNet + VAE (encode every step), fp32 text encoder whose "
               f"whole {rows:,}x{width} table is trained (+ a copy of it)",
               estimate_diffusers_recipe(res, args.batch, checkpointing, config=cfg), TRAINING, LIMITS)
    report("medti generation, fp16: text tower, a sampler step (UNet at batch 2 for CFG, no grad), VAE decode"
           + (" (inpainting: from an image and a mask)" if cfg.inpainting else ""),
           estimate_generation(res, config=cfg), GENERATION, {"target": 3 * GB})


if __name__ == "__main__":
    main()
