"""Section 3 of tools/benchmark.py: one textual-inversion step, ours (medti's loop) against diffusers'
examples/textual_inversion recipe, timed and counted in FLOPs."""
import contextlib

import diffusers
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPTextConfig, CLIPTextModel

import minisd
from bench_common import N_VECTORS, TOKEN, medians, row, table
from medti.files import embedding_file as emb
from medti.training.objective import denoising_loss, initial_vectors
from medti.training.optim import enable_checkpointing


@contextlib.contextmanager

def checkpointing(sd):
    """medti.training.optim.enable_checkpointing (train.py's default) for a while; then the blocks are unwrapped."""
    enable_checkpointing(sd)
    try:
        yield
    finally:
        for blocks in (sd.unet.input_blocks, sd.unet.output_blocks, sd.text.tower.blocks):
            for i, block in enumerate(blocks):
                blocks[i] = block.block[0]
        sd.unet.middle_block = sd.unet.middle_block.block[0]

def ti_step_ours(sd, size):
    """One step of medti/train.py's loop: latents cached once, 64 fp32 vectors in AdamW (checkpointing: caller)."""
    if TOKEN not in sd.text.vectors:
        emb.attach(sd, {TOKEN: emb.Embedding(TOKEN, torch.zeros(N_VECTORS, sd.text.width))})
    vectors = torch.nn.Parameter(initial_vectors(sd, "*", N_VECTORS, 0))
    optimizer = torch.optim.AdamW([vectors], lr=5e-3, weight_decay=0.0)
    with torch.no_grad():
        image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
        latents = sd.vae.encode(image.to(next(sd.vae.parameters()).dtype))[0].float() * sd.scale_factor

    def step():
        optimizer.zero_grad(set_to_none=True)
        t = torch.randint(0, 1000, (1,))
        denoising_loss(sd, TOKEN, vectors, [TOKEN], latents, torch.randn_like(latents), t).backward()
        optimizer.step()
    return step


def ti_step_diffusers(refs, size):
    """diffusers' examples/textual_inversion step: VAE encode every step, DDPM add_noise, fp32 text encoder whose
    whole (resized) token table is in AdamW, all rows but the new token's restored after the step."""
    text, vae, unet = refs["text"], refs["vae"], refs["unet"]
    text.resize_token_embeddings(text.config.vocab_size + 1)   # the placeholder token, as the example adds it
    table = text.requires_grad_(False).get_input_embeddings().weight.requires_grad_(True)
    original, keep = table.detach().clone(), torch.arange(len(table)) != len(table) - 1
    optimizer = torch.optim.AdamW([table], lr=5e-3, weight_decay=1e-2)
    scheduler = diffusers.DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    pixels = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ids = torch.tensor([[49406, len(table) - 1, 49407] + [0] * 74])

    def step():
        latents = vae.encode(pixels).latent_dist.sample().detach() * vae.config.scaling_factor
        noise, t = torch.randn_like(latents), torch.randint(0, 1000, (1,))
        prediction = unet(scheduler.add_noise(latents, noise, t), t, text(ids)[0]).sample
        F.mse_loss(prediction.float(), noise.float()).backward()
        optimizer.step(), optimizer.zero_grad()
        with torch.no_grad():
            table[keep] = original[keep]
    return step

def ti_flops(b) -> tuple:
    """FLOPs of one TI step each way, counted on meta tensors: text tower and UNet forward + backward to the
    token vectors (ours); the same plus the example's VAE encode (diffusers). Their ratio is the time ratio at
    equal FLOP/s -- the floor that a faster implementation of the same kernels cannot go below."""
    sd, h = minisd.build(minisd.load_config(b.ours)), b.size // 8
    for module in (sd.unet, sd.text.tower):
        module.requires_grad_(False)
    with torch.device("meta"):
        tokens = torch.zeros(1, 77, sd.text.width, requires_grad=True)   # the spliced embeddings
        latents, t = torch.zeros(1, 4, h, h), torch.tensor([500.0])
        with FlopCounterMode(display=False) as ours:
            F.mse_loss(sd.unet(latents, t, sd.text.tower.forward_embeddings(tokens)), latents).backward()
        unet = diffusers.UNet2DConditionModel(**b.cfg["unet"]).requires_grad_(False)
        vae = diffusers.AutoencoderKL(**b.cfg["vae"]).requires_grad_(False)
        text = CLIPTextModel(CLIPTextConfig(**b.cfg["text"])).requires_grad_(False)
        text.get_input_embeddings().weight.requires_grad_(True)
        with FlopCounterMode(display=False) as theirs:
            latents = vae.encode(torch.zeros(1, 3, b.size, b.size)).latent_dist.sample()
            context = text(torch.zeros(1, 77, dtype=torch.long))[0]
            F.mse_loss(unet(latents, t, encoder_hidden_states=context).sample, latents).backward()
    return ours.get_total_flops(), theirs.get_total_flops()


def section3(b):
    ours = ti_step_ours(b.sd, b.size)

    def checkpointed():
        with checkpointing(b.sd):
            ours()
    m = medians({"on": checkpointed, "off": ours, "theirs": ti_step_diffusers(b.refs, b.size)}, b.runs)
    b.results["ti"] = m["theirs"]
    flops, flops_theirs = ti_flops(b)
    table(f"3. one textual-inversion step at {b.size}², fp32 (diffusers: the example's defaults, no checkpointing)",
          [row("ours, checkpointing on (the default with CUDA)", m["on"], m["theirs"], 0.5),
           row("ours, checkpointing off (the default on the CPU)", m["off"], m["theirs"], 0.5),
           ["TFLOP per step (counted; ratio = floor at equal FLOP/s)", f"{flops / 1e12:.2f}",
            f"{flops_theirs / 1e12:.2f}", f"{flops / flops_theirs:.2f}×", ""]])
