"""Section 12 of tools/benchmark.py: one LoRA training step and one full UNet fine-tuning step, ours (the pieces of
medti.trainer's loop) against the diffusers examples' recipes, on the same random full-size SD2 UNet.

  ours       medti.methods.LoRAMethod / UNetFineTune (fp32 on the CPU: no autocast) on our UNet; per step
             medti.inversion.diffusion_loss, backward, medti.inversion.total_norm (the loop logs it), AdamW as
             medti.trainer.setup makes it.
  diffusers  examples/dreambooth/train_dreambooth_lora.py: peft LoraConfig(r=4, lora_alpha=4, init_lora_weights=
             "gaussian", target_modules to_k/to_q/to_v/to_out.0) added to UNet2DConditionModel, AdamW (weight decay
             1e-2) on the LoRA parameters; examples/text_to_image/train_text_to_image.py: the whole UNet in AdamW.
             Per step DDPMScheduler.add_noise, UNet, MSE on the noise, backward, clip_grad_norm_(1.0) (both
             examples clip), AdamW step.

Why one copy of the weights: diffusers' UNet is built on the meta device, materialised once with random values,
and our UNet is assigned the SAME tensors under the official names (tools/convert_diffusers.py renames, it does not
copy). The steps update them in place; a step's cost does not depend on the values. The full fine-tune's AdamW
state (2 moments + a gradient: 3 x 3.5 GB) is built for one side at a time and freed before the other's.
Both sides take the same fixed latents and text conditioning (the frozen text tower's forward is the same 0.2 s
either side, and it would be a second full-size model in memory); noise and timesteps are drawn per step.
"""
import gc

import diffusers
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import minisd
from bench_common import medians, row, table
from bench_models import MODELS, diffusers_configs
from convert_diffusers import convert_unet
from medti import methods
from medti.inversion import diffusion_loss, precision, total_norm
from medti.train_config import TrainConfig

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


def unets(config, size: int):
    """diffusers' UNet (random, fp32) and our model whose UNet holds the same weight tensors."""
    cfg = minisd.load_config(config)
    with torch.device("meta"):
        ref = diffusers.UNet2DConditionModel(**diffusers_configs(cfg, size)["unet"])
    ref = randomise_(ref.to_empty(device="cpu"), 0)
    sd = minisd.build(cfg, device="meta")   # text tower and VAE stay meta: never run here
    sd.unet.load_state_dict(convert_unet(ref.state_dict()), strict=True, assign=True)
    return sd, ref


def inputs(sd, size: int):
    """Fixed scaled latents [1, 4, h, w] and a text conditioning [1, 77, width], the same for both sides."""
    gen, h = torch.Generator().manual_seed(1), size // sd.config.latent_factor
    return torch.randn(1, 4, h, h, generator=gen), torch.randn(1, 77, sd.config.unet.context_dim, generator=gen)


def ours_step(sd, method: str, latents, context, trainable="all"):
    """One step of medti.trainer.loop for --method lora|unet (fp32 on the CPU), and its optimizer."""
    cfg = TrainConfig(method=method, instance_prompt=PROMPT, trainable=trainable)
    m = methods.make(sd, cfg, [PROMPT], torch.device("cpu"))
    optimizer = torch.optim.AdamW(list(m.params.values()), lr=float(methods.learning_rate(cfg)), weight_decay=0.0)

    def step():
        optimizer.zero_grad(set_to_none=True)
        t, noise = torch.randint(0, 1000, (1,)), torch.randn_like(latents)
        with precision(m, latents.device):
            loss = diffusion_loss(sd, context, latents, noise, t)
        loss.backward()
        total_norm([p.grad for p in m.params.values()])
        optimizer.step()
    return step, optimizer


def diffusers_step(unet, params: list, lr: float, latents, context):
    """One step of the diffusers examples' loop (fp32, no accelerate wrapper: one process, no mixed precision)."""
    scheduler = diffusers.DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)

    def step():
        noise, t = torch.randn_like(latents), torch.randint(0, 1000, (1,))
        prediction = unet(scheduler.add_noise(latents, noise, t), t, context, return_dict=False)[0]
        F.mse_loss(prediction.float(), noise.float(), reduction="mean").backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
    return step, optimizer


def free(optimizer):
    """Drop an optimizer's state and its parameters' gradients (gigabytes for a full fine-tune)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = None
    optimizer.state.clear()
    gc.collect()


def full_finetune(sd, ref, runs: int, latents, context) -> dict:
    """The whole UNet in AdamW, one side at a time (their AdamW states would not fit in memory together)."""
    step, optimizer = ours_step(sd, "unet", latents, context)
    seconds = medians({"ours": step}, runs, warmup=True)
    free(optimizer)
    params = list(ref.requires_grad_(True).train().parameters())
    step, optimizer = diffusers_step(ref, params, 1e-4, latents, context)   # train_text_to_image's default lr
    seconds |= medians({"theirs": step}, runs, warmup=True)
    free(optimizer)
    ref.requires_grad_(False)
    return seconds


def lora(sd, ref, runs: int, latents, context) -> dict:
    """Rank-4 adapters on the UNet's attention q/k/v/out, both sides interleaved (the adapters are small)."""
    from peft import LoraConfig
    ours, _ = ours_step(sd, "lora", latents, context)
    ref.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=TARGETS))
    params = [p for p in ref.parameters() if p.requires_grad]
    theirs, _ = diffusers_step(ref, params, 5e-4, latents, context)   # train_dreambooth_lora's default lr
    return medians({"ours": ours, "theirs": theirs}, runs, warmup=True) | {"adapters": sum(map(torch.numel, params))}


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
    """Build one UNet (tiny with --quick), time the full fine-tuning step, then the LoRA step; one table."""
    config, size, _ = MODELS["sd2-tiny" if quick else "sd2"]
    sd, ref = unets(config, size)
    latents, context, n = *inputs(sd, size), sum(p.numel() for p in ref.parameters())
    full = full_finetune(sd, ref, args.runs, latents, context)
    low = lora(sd, ref, args.runs, latents, context)
    h, flops = size // sd.config.latent_factor, {m: step_flops(config, size, m) for m in ("lora", "unet")}
    table(f"12. one training step, {'tiny' if quick else 'full-size SD2'} UNet ({n / 1e6:,.0f} M weights), {h}² "
          "latents, batch 1, fp32, no checkpointing, fixed latents and text conditioning: ours (medti's loop) vs "
          "the diffusers examples", [
              row(f"LoRA rank 4 on attention q/k/v/out ({low['adapters'] / 1e6:.2f} M; train_dreambooth_lora.py)",
                  low["ours"], low["theirs"], 0.8),
              row("full UNet fine-tune, AdamW (train_text_to_image.py)", full["ours"], full["theirs"], 0.8),
              flop_row("LoRA: TFLOP per step (counted; ratio = floor at equal FLOP/s)", flops["lora"]),
              flop_row("full fine-tune: TFLOP per step (the same)", flops["unet"])],
          ("", "ours", "diffusers", "ratio", "target (issue 15)"))
