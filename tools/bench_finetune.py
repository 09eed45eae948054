"""Section 12 of tools/benchmark.py: one LoRA training step and one full UNet fine-tuning step, ours (the pieces of
medti.training.trainer's loop) against the diffusers examples' recipes, on the same random full-size SD2 UNet, VAE
and text tower.

  ours       medti.training.methods.LoRAMethod / UNetFineTune (fp32 on the CPU: no autocast). Per step, as the loop
             does: the image's latents from the cache made once at setup (medti.training.objective.cache_latents,
             timed on its own: once per training image), the prompt's conditioning from the method (the frozen text
             tower's output is kept per prompt: medti.training.methods.FrozenText),
             medti.training.objective.diffusion_loss, backward, medti.training.optim.total_norm (the loop logs it),
             the trainer's fused AdamW (medti.training.optim.adamw).
  diffusers  examples/dreambooth/train_dreambooth_lora.py: peft LoraConfig(r=4, lora_alpha=4, init_lora_weights=
             "gaussian", target_modules to_k/to_q/to_v/to_out.0) added to UNet2DConditionModel, AdamW (weight decay
             1e-2) on the LoRA parameters; examples/text_to_image/train_text_to_image.py: the whole UNet in AdamW.
             Per step, as both examples do by default: vae.encode(pixel_values).latent_dist.sample() times the
             scaling factor, text_encoder(input_ids), DDPMScheduler.add_noise, UNet, MSE on the noise, backward,
             clip_grad_norm_(1.0) (both examples clip), AdamW step (torch's default: a for-loop on the CPU).
             Loading and transforming the image (PIL, a few ms) and tokenizing are outside the timer.

Two more rows say where the difference comes from: theirs from fixed latents and conditioning (the same work as
ours; counted FLOPs equal), and the VAE encode and text encoder forward alone.

Why one copy of the weights: diffusers' UNet is built on the meta device, materialised once with random values,
and our UNet is assigned the SAME tensors under the official names (tools/convert_diffusers.py renames, it does not
copy); the VAE and text tower likewise (only fused q/k/v are new tensors). The steps update the UNet in place; a
step's cost does not depend on the values. The full fine-tune's AdamW state (2 moments + a gradient: 3 x 3.5 GB) is
built for one side at a time and freed before the other's.
"""
import gc

import diffusers
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import minisd
from bench_common import medians, row, table
from bench_models import MODELS, diffusers_configs
from convert_diffusers import convert_text, convert_unet, convert_vae
from medti.training import methods
from medti.training.config import TrainConfig
from medti.training.objective import cache_latents, diffusion_loss
from medti.training.optim import adamw, precision, total_norm
from medti.training.trainer import draw_latents

PROMPT = "a chest x-ray of sks"
TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]   # train_dreambooth_lora.py's UNet LoRA targets


@torch.no_grad()
def randomise_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random values in place of to_empty's garbage: weights N(0, 1/fan_in) keep activations near unit scale (no
    overflow, no denormals, which would slow the CPU), norm scales near 1, small biases."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if p.ndim > 1:
            p.normal_(0, p[0].numel() ** -0.5, generator=gen)
        else:
            p.normal_(1.0 if "norm" in name and name.endswith("weight") else 0.0, 0.02, generator=gen)
    return module


def models(config, size: int):
    """diffusers' UNet and VAE, transformers' text encoder (random, fp32), and our model holding the same tensors."""
    from transformers import CLIPTextConfig, CLIPTextModel
    cfg = minisd.load_config(config)
    kwargs = diffusers_configs(cfg, size)
    with torch.device("meta"):   # the UNet only: the text model's position_ids buffer must be built for real
        unet = diffusers.UNet2DConditionModel(**kwargs["unet"])
    ref = {"unet": unet.to_empty(device="cpu"), "vae": diffusers.AutoencoderKL(**kwargs["vae"]),
           "text": CLIPTextModel(CLIPTextConfig(**kwargs["text"]))}
    ref = {k: randomise_(m, i).requires_grad_(False) for i, (k, m) in enumerate(ref.items())}
    sd = minisd.build(cfg, device="meta")
    for ours, convert, theirs in ((sd.unet, convert_unet, "unet"), (sd.vae, convert_vae, "vae"),
                                  (sd.text.tower, convert_text, "text")):
        ours.load_state_dict(convert(ref[theirs].state_dict()), strict=True, assign=True)
    return sd, ref


def inputs(sd, size: int):
    """One training image as both loops hold it: pixels in [-1, 1] [1, 3, size, size] (the recipe's pixel_values),
    our latent cache of it, the prompt's token ids [1, 77] (the same ids both sides)."""
    pixels = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        cache = cache_latents(sd, pixels, False, 0)
    return pixels, cache, sd.text.tokenizer([PROMPT])


def ours_step(sd, method: str, cache: dict, trainable="all"):
    """One step of medti.training.trainer.loop for --method lora|unet (fp32 on the CPU), and its optimizer."""
    cfg = TrainConfig(method=method, instance_prompt=PROMPT, trainable=trainable)
    m = methods.make(sd, cfg, [PROMPT], torch.device("cpu"))
    optimizer = adamw(list(m.params.values()), float(methods.learning_rate(cfg)))
    g = torch.Generator().manual_seed(0)

    def step():
        optimizer.zero_grad(set_to_none=True)
        latents = draw_latents(cache, [0], cfg.latents, g) * sd.scale_factor
        t, noise = torch.randint(0, 1000, (1,), generator=g), torch.randn(latents.shape, generator=g)
        with precision(m, latents.device):
            loss = diffusion_loss(sd, m.context([PROMPT]), latents, noise, t)
        loss.backward()
        total_norm([p.grad for p in m.params.values()])
        optimizer.step()
    return step, optimizer


def diffusers_step(ref: dict, params: list, lr: float, pixels, ids, fixed=None):
    """One step of the diffusers examples' loop (fp32, no accelerate wrapper: one process, no mixed precision):
    from the pixels and token ids, or with `fixed` = (latents, conditioning) the UNet part alone."""
    scheduler = diffusers.DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    unet, vae, text = ref["unet"], ref["vae"], ref["text"]

    def step():
        latents, context = fixed or (vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor,
                                     text(ids, return_dict=False)[0])
        noise, t = torch.randn_like(latents), torch.randint(0, 1000, (1,))
        prediction = unet(scheduler.add_noise(latents, noise, t), t, context, return_dict=False)[0]
        F.mse_loss(prediction.float(), noise.float(), reduction="mean").backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
    return step, optimizer


def encodes(sd, ref: dict, pixels, ids, runs: int) -> dict:
    """What the recipe does per step and ours once: the VAE encode and the text encoder forward, timed alone."""
    with torch.no_grad():
        fixed = (ref["vae"].encode(pixels).latent_dist.sample(), ref["text"](ids, return_dict=False)[0])
        seconds = medians({"vae": lambda: ref["vae"].encode(pixels).latent_dist.sample(),
                           "text": lambda: ref["text"](ids), "cache": lambda: cache_latents(sd, pixels, False, 0)},
                          runs, warmup=True)
    return seconds | {"fixed": fixed}


def free(optimizer):
    """Drop an optimizer's state and its parameters' gradients (gigabytes for a full fine-tune)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = None
    optimizer.state.clear()
    gc.collect()


def timed(make, runs: int) -> float:
    """Median seconds of a step `make()` builds, its optimizer state freed after."""
    step, optimizer = make()
    seconds = medians({"step": step}, runs, warmup=True)["step"]
    free(optimizer)
    return seconds


def full_finetune(sd, ref, runs: int, pixels, cache, ids, fixed) -> dict:
    """The whole UNet in AdamW, one side at a time (their AdamW states would not fit in memory together)."""
    seconds = {"ours": timed(lambda: ours_step(sd, "unet", cache), runs)}
    params = list(ref["unet"].requires_grad_(True).train().parameters())
    lr = 1e-4   # train_text_to_image's default
    seconds["theirs"] = timed(lambda: diffusers_step(ref, params, lr, pixels, ids), runs)
    seconds["unet_only"] = timed(lambda: diffusers_step(ref, params, lr, pixels, ids, fixed), runs)
    ref["unet"].requires_grad_(False)
    return seconds


def lora(sd, ref, runs: int, pixels, cache, ids, fixed) -> dict:
    """Rank-4 adapters on the UNet's attention q/k/v/out, the three steps interleaved (the adapters are small)."""
    from peft import LoraConfig
    ours, _ = ours_step(sd, "lora", cache)
    ref["unet"].add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=TARGETS))
    params = [p for p in ref["unet"].parameters() if p.requires_grad]
    theirs, _ = diffusers_step(ref, params, 5e-4, pixels, ids)   # train_dreambooth_lora's default lr
    unet_only, _ = diffusers_step(ref, params, 5e-4, pixels, ids, fixed)
    return medians({"ours": ours, "theirs": theirs, "unet_only": unet_only}, runs, warmup=True) | {
        "adapters": sum(map(torch.numel, params))}


def step_flops(config, size: int, method: str) -> tuple:
    """FLOPs of one step's forward + backward each way (matmul, conv, attention; AdamW's elementwise work is not
    counted), on meta tensors: FlopCounterMode counts 0 for the CPU SDPA kernel on real ones. Their ratio is the
    time ratio at equal FLOP/s -- the floor for an implementation of the same kernels."""
    from peft import LoraConfig
    cfg = minisd.load_config(config)
    sd = minisd.build(cfg, device="meta")
    methods.make(sd, TrainConfig(method=method, instance_prompt=PROMPT), [PROMPT], torch.device("meta"))
    with torch.device("meta"):
        ref = diffusers.UNet2DConditionModel(**diffusers_configs(cfg, size)["unet"])
        if method == "lora":
            ref.requires_grad_(False).add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                                             target_modules=TARGETS))
        h = size // cfg.latent_factor
        latents, context, t = torch.zeros(1, 4, h, h), torch.zeros(1, 77, cfg.unet.context_dim), torch.tensor([500])
        with FlopCounterMode(display=False) as ours:
            diffusion_loss(sd, context, latents, latents, t).backward()
        with FlopCounterMode(display=False) as theirs:
            F.mse_loss(ref(latents, t, context, return_dict=False)[0], latents).backward()
    return ours.get_total_flops(), theirs.get_total_flops()


def flop_row(what: str, flops: tuple) -> list:
    return [what, f"{flops[0] / 1e12:.2f}", f"{flops[1] / 1e12:.2f}", f"{flops[0] / flops[1]:.2f}×", ""]


def section12(args, quick: bool):
    """Build the models (tiny with --quick), time the encodes, the full fine-tuning step, then the LoRA step."""
    config, size, _ = MODELS["sd2-tiny" if quick else "sd2"]
    sd, ref = models(config, size)
    pixels, cache, ids = inputs(sd, size)
    enc = encodes(sd, ref, pixels, ids, args.runs)
    fixed = (enc["fixed"][0] * ref["vae"].config.scaling_factor, enc["fixed"][1])
    full = full_finetune(sd, ref, args.runs, pixels, cache, ids, fixed)
    low = lora(sd, ref, args.runs, pixels, cache, ids, fixed)
    h, flops = size // sd.config.latent_factor, {m: step_flops(config, size, m) for m in ("lora", "unet")}
    n = sum(p.numel() for p in ref["unet"].parameters())
    table(f"12. one training step, {'tiny' if quick else 'full-size SD2'} UNet ({n / 1e6:,.0f} M weights), "
          f"{size}² images ({h}² latents), batch 1, fp32, no checkpointing: ours (medti's loop) vs the diffusers "
          "examples", [
              row(f"LoRA rank 4 on attention q/k/v/out ({low['adapters'] / 1e6:.2f} M; train_dreambooth_lora.py)",
                  low["ours"], low["theirs"], 0.8),
              row("full UNet fine-tune, AdamW (train_text_to_image.py)", full["ours"], full["theirs"], 0.8),
              row("LoRA, theirs from fixed latents and conditioning (equal work)", low["ours"], low["unet_only"]),
              row("full fine-tune, the same", full["ours"], full["unet_only"]),
              row("VAE encode of the image: ours once at setup, theirs every step", enc["cache"], enc["vae"]),
              ["text encoder forward: ours once per prompt, theirs every step", "-", f"{enc['text']:.2f} s", "", ""],
              flop_row("LoRA: UNet TFLOP per step (counted; ratio = floor at equal FLOP/s)", flops["lora"]),
              flop_row("full fine-tune: UNet TFLOP per step (the same)", flops["unet"])],
          ("", "ours", "diffusers", "ratio", "target"))
