"""diffusers' side of tools/gpu_check.py: the textual-inversion step of its examples/textual_inversion recipe and
the text-to-image pipeline, on the reference models of tools/bench_models.py."""
import diffusers
import torch


def diffusers_ti_step(refs, size: int, device, dtype, pad: int):
    """diffusers' examples/textual_inversion/textual_inversion.py step: fp16 UNet and VAE, fp32 text encoder under
    fp16 autocast whose whole (resized) token table is in AdamW, a VAE encode every step, checkpointing on."""
    text, vae, unet = refs["text"].float(), refs["vae"], refs["unet"]
    text.resize_token_embeddings(text.config.vocab_size + 1)
    table = text.requires_grad_(False).get_input_embeddings().weight.requires_grad_(True)
    unet.enable_gradient_checkpointing(), text.activation_checkpointing_enable()   # transformers 5 name
    text.train()   # transformers checkpoints only in training mode
    original, keep = table.detach().clone(), torch.arange(len(table), device=device) != len(table) - 1
    optimizer = torch.optim.AdamW([table], lr=5e-3, weight_decay=1e-2)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    scheduler = diffusers.DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    pixels = (torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(device, dtype)
    ids = torch.tensor([[49406, len(table) - 1, 49407] + [pad] * 74], device=device)   # the model's padding

    def step():
        latents = vae.encode(pixels).latent_dist.sample().detach() * vae.config.scaling_factor
        noise, t = torch.randn_like(latents), torch.randint(0, 1000, (1,), device=device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            context = text(ids)[0].to(dtype)
        prediction = unet(scheduler.add_noise(latents, noise, t), t, context).sample
        scaler.scale(torch.nn.functional.mse_loss(prediction.float(), noise.float())).backward()
        scaler.step(optimizer), scaler.update(), optimizer.zero_grad()
        with torch.no_grad():
            table[keep] = original[keep]
    return step


def diffusers_pipe(refs, prediction="epsilon"):
    scheduler = diffusers.EulerAncestralDiscreteScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                                          beta_schedule="scaled_linear", prediction_type=prediction)
    pipe = diffusers.StableDiffusionPipeline(vae=refs["vae"], text_encoder=None, tokenizer=None, unet=refs["unet"],
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_txt2img(pipe, cond, uncond, batch: int, size: int, steps: int, output="pt"):
    return lambda: pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, guidance_scale=2.0, width=size,
                        height=size, num_inference_steps=steps, num_images_per_prompt=batch, output_type=output,
                        generator=[torch.Generator().manual_seed(i) for i in range(batch)]).images
