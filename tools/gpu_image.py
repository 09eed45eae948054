"""The image-conditioned mode of tools/gpu_check.py (`--condition dinov2`, DiNO-Diffusion's recipe): on one GPU, ours
and diffusers side by side on identical random weights of the paper's shapes, SD1's UNet and VAE with a DINOv2
ViT-B/14 with 4 registers (768 wide: no projection into SD1's 768-wide context), 512² images:

  1. one image-conditioned training step (`--method unet --condition dinov2`): seconds and peak GPU memory. Ours as
     the trainer runs it on CUDA: cached latents and tokens, fp32 UNet masters under fp16 autocast with a grad
     scaler, gradient checkpointing (--checkpointing auto), fused AdamW (tools/bench_image.py's ours_step). Theirs:
     train_text_to_image.py's loop with the DINOv2 tokens as encoder_hidden_states, computed every step, with
     --mixed_precision fp16 and --gradient_checkpointing (the same memory regime), torch's default AdamW
     (foreach on CUDA) and clip_grad_norm_ (bench_image's diffusers_step);
  2. one variation (`python -m medti.generate --condition-image case.png`): Euler a, --steps, CFG 2 with the null
     (zeros) as the uncond, VAE decode included, the model in fp16; theirs StableDiffusionPipeline(prompt_embeds=
     the encoder's tokens, negative_prompt_embeds=zeros).
With --tiny the same on tools/bench_image.py's tiny models (a 48-wide encoder: the projection's path runs too).
"""
import gc

import torch
from gpu_check import figure, ours_txt2img, peak_memory, say, seconds
from gpu_diffusers import diffusers_pipe, diffusers_txt2img

import bench_image
from bench_finetune import free

FULL = ("sd1", 512, 768, 12, 12, 224)   # bench_image.SIZES' fields at the paper's 512²


def build(tiny: bool, tmp):
    """The shared-weights models (CPU, fp32), the image as each side holds it, our caches, and the 8-bit image."""
    model, size, *encoder = bench_image.SIZES[True] if tiny else FULL
    sd, ref = bench_image.models(bench_image.MODELS[model][0], size, tmp / "dinov2-release", tuple(encoder))
    pixels, dino_pixels, cache = bench_image.inputs(sd, ref, size)
    uint8 = ((pixels + 1) * 127.5).round().to(torch.uint8)   # the same 8-bit image inputs() drew
    return sd, ref, pixels, dino_pixels, cache, uint8


def release(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_ours(sd, cache, uint8, args, device, dtype) -> dict:
    """A variation with the model in `dtype` (as medti.generate loads it), then the training step (the trainer's
    fp32 masters of the UNet); the model leaves the device after."""
    from medti.training.optim import enable_checkpointing
    size = uint8.shape[-1]
    sd.unet.to(device, dtype), sd.vae.to(device, dtype), sd.image.encoder.to(device)
    if sd.image.proj is not None:
        sd.image.proj.to(device)
    with torch.no_grad():
        cond = sd.image(uint8).to(dtype)
    out = {"variation_s": seconds(ours_txt2img(sd, cond, sd.image.null(1).to(cond), 1, size, args.steps), device,
                                  args.runs)}
    say(f"ours: one variation, {args.steps} steps: {figure(out['variation_s'])} s")
    sd.image.encoder.to("cpu")   # training reads the cached tokens (medti.training.image_method.prepare)
    if device.type == "cuda":
        enable_checkpointing(sd)
    step, optimizer = bench_image.ours_step(sd, cache, device)
    out["step_peak"], out["step_s"] = peak_memory(step, device), seconds(step, device, args.runs)
    say(f"ours: image-conditioned training step: {figure(out['step_s'])} s")
    free(optimizer)
    sd.unet.to("meta"), sd.vae.to("meta")
    release(device)
    return out


def measure_diffusers(ref, pixels, dino_pixels, args, device, dtype) -> dict:
    """The pipeline's variation (fp16 UNet), then the recipe's step (fp32 UNet, fp16 VAE and encoder)."""
    size = pixels.shape[-1]
    unet, vae, encoder = ref["unet"].to(device, dtype), ref["vae"].to(device, dtype), ref["encoder"].to(device, dtype)
    proj = ref["proj"].to(device) if ref["proj"] else None
    with torch.no_grad():
        tokens = encoder(pixel_values=dino_pixels.to(device, dtype)).last_hidden_state[:, :1 + bench_image.REGISTERS]
        cond = (proj(tokens.float()) if proj else tokens).to(dtype)
    pipe = diffusers_pipe({"unet": unet, "vae": vae})
    out = {"variation_s": seconds(diffusers_txt2img(pipe, cond, torch.zeros_like(cond), 1, size, args.steps),
                                  device, args.runs)}
    say(f"diffusers: one variation, {args.steps} steps: {figure(out['variation_s'])} s")
    unet.float().requires_grad_(True).train()
    if proj:
        proj.requires_grad_(True)
    if device.type == "cuda":
        unet.enable_gradient_checkpointing()
    step, optimizer = bench_image.diffusers_step(ref, pixels, dino_pixels, device=device, dtype=dtype)
    out["step_peak"], out["step_s"] = peak_memory(step, device), seconds(step, device, args.runs)
    say(f"diffusers: image-conditioned training step: {figure(out['step_s'])} s")
    free(optimizer)
    return out


def measure(args, device, dtype, tmp) -> dict:
    """Both sides' figures, ours first, its model freed before diffusers' peak is taken."""
    sd, ref, pixels, dino_pixels, cache, uint8 = build(args.tiny, tmp)
    results = {"size": pixels.shape[-1], "encoder": f"DINOv2 with registers, {sd.image.cfg.width} wide, "
               f"{sd.image.cfg.count} global tokens" + (", projected" if sd.image.proj is not None else ""),
               "ours": measure_ours(sd, cache, uint8, args, device, dtype)}
    results["diffusers"] = measure_diffusers(ref, pixels, dino_pixels, args, device, dtype)
    return results


def report(results: dict):
    """The figures side by side, one line each."""
    ours, theirs = results["ours"], results["diffusers"]
    rows = [(f"step peak, {k.replace('_gib', '')} (GiB)", ours["step_peak"][k], theirs["step_peak"][k])
            for k in ("allocated_gib", "reserved_gib")]
    rows += [("training step (s)", ours["step_s"], theirs["step_s"]),
             (f"one variation, {results['steps']} steps (s)", ours["variation_s"], theirs["variation_s"])]
    print(f"# {results['device']}, {results['dtype']}, {results['size']}², {results['encoder']}, torch "
          f"{results['torch']}, {results['mode']}")
    print(f"{'':<34} {'ours':>22} {'diffusers':>22}")
    for name, a, b in rows:
        print(f"{name:<34} {figure(a):>22} {figure(b):>22}")
