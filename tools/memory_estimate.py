"""ESTIMATED peak GPU memory of one textual-inversion training step (and of generation), without a GPU.

    python tools/memory_estimate.py [--resolution 768] [--batch N] [--no-checkpointing]

The real code runs on fake tensors (torch FakeTensorMode: shapes, dtypes and storages, no data, no memory): the
full-size SD2 networks are built on the meta device and materialised as fake fp16 tensors, then one training
step runs through medti.inversion (denoising_loss, backward, AdamW). A dispatch mode adds up the bytes of every
storage while it lives; the peak of that sum is the estimate. Not measured: the CUDA context (~300-500 MB),
the caching allocator's rounding and fragmentation, cuDNN/cuBLAS workspaces.

Why the fake tensors claim "cpu", not "cuda": fake cuda tensors build and run forward on this CPU-only torch,
but the autograd engine aborts the process in backward ("PyTorch is not linked with support for cuda devices").
On "cpu", attention dispatches to the CPU flash kernel, which like CUDA's flash/memory-efficient kernels never
stores the [tokens x tokens] attention matrix. The functions are importable: `estimate_training(...)` etc.
return {category: bytes}.
"""
import argparse
import time
import weakref
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import minisd
from medti import embeddings as emb
from medti.inversion import denoising_loss, enable_checkpointing
from medti.pipeline import decode, sample

GiB = 2 ** 30
DEVICE = "cpu"   # what the fake tensors claim (see the module docstring)
TOKEN, N_VECTORS = "<medti>", 64
CACHED_IMAGES = 100   # training images whose latents medti/train.py caches (on the CPU)


class LiveBytes(TorchDispatchMode):
    """Sum of the bytes of all live fake storages. Every op output's storage is counted once (views and in-place
    results share it) and subtracted when Python's last reference to that storage dies (weakref finalizer:
    torch keeps one Python object per storage). `peak` is the largest sum seen; reset it to start a phase."""

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak = {}, 0, 0   # storage id -> bytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, FakeTensor):
                self.add(t.untyped_storage())
        return out

    def add(self, storage):
        key = storage._cdata   # the C++ StorageImpl's address: unique while it lives
        if key not in self.live:
            self.live[key] = storage.nbytes()
            self.now += self.live[key]
            self.peak = max(self.peak, self.now)
            weakref.finalize(storage, self.free, key)

    def free(self, key):
        self.now -= self.live.pop(key)


def is_integer_dtype(dtype) -> bool:
    return dtype is not None and not dtype.is_floating_point and not dtype.is_complex


class RealBookkeeping(TorchDispatchMode):
    """What fake tensors cannot do, for the data-dependent lines of medti (none of them touches big tensors):
      1. ops on real tensors only, and integer/bool factories, run for real: token ids, placeholder masks, step
         counters and schedules are small CPU values that steer Python control flow (`if not is_new.any()`);
      2. a boolean-mask index (`spliced[is_new]`) becomes the mask's real nonzero() indices, so the result has a
         known shape (the same gather and memory);
      3. whole-tensor any()/all() of fake data, i.e. the NaN/inf checks (`spliced[is_new].isnan().any()` in
         emb.encode, `torch.isfinite(images).all()` in pipeline.decode), answer "all finite": there is no data."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
        fake = [x for x in tensors if isinstance(x, FakeTensor)]
        if not fake and (tensors or is_integer_dtype(kwargs.get("dtype"))):
            with unset_fake_temporarily():
                return func(*args, **kwargs)
        if func in (torch.ops.aten.any.default, torch.ops.aten.all.default):
            return torch.tensor(func is torch.ops.aten.all.default)
        if func.overloadpacket in (torch.ops.aten.index, torch.ops.aten.index_put, torch.ops.aten.index_put_):
            indices = [i.nonzero().unbind(1) if isinstance(i, torch.Tensor) and i.dtype == torch.bool
                       and not isinstance(i, FakeTensor) else (i,) for i in args[1]]
            args = (args[0], [j for group in indices for j in group], *args[2:])
        return func(*args, **kwargs)


@contextmanager
def fake_device():
    """Fake tensors with real bookkeeping, and a LiveBytes tracker over them (yielded)."""
    with FakeTensorMode(allow_non_fake_inputs=True), RealBookkeeping(), LiveBytes() as tracker:
        yield tracker


def materialise(module, dtype, trainable=False):
    """A meta-built module -> fake tensors on DEVICE in `dtype` (inside fake_device()); frozen unless trainable."""
    return module.to(dtype).to_empty(device=DEVICE).requires_grad_(trainable)


def nbytes(*tensors) -> int:
    return sum(t.untyped_storage().nbytes() for t in tensors)


def adamw(params):
    """AdamW as the trainers use it, already past its first step (state allocated), as in every later step.
    foreach=True: the default on CUDA (on the CPU torch would pick the per-tensor loop)."""
    optimizer = torch.optim.AdamW(params, lr=5e-3, weight_decay=0.0, foreach=True)
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return optimizer


def training_step(mem, loss_fn, params, optimizer) -> dict:
    """Forward, backward and optimizer step with the phase peaks: live bytes before (base), kept after the
    forward (saved for backward), forward/backward peak, optimizer-step peak."""
    base = mem.peak = mem.now
    loss = loss_fn()
    saved = mem.now - base
    loss.backward()
    backward_peak, mem.peak = mem.peak, mem.now
    gradient = nbytes(*(p.grad for p in params))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"saved_for_backward": saved, "activations": backward_peak - base, "gradient": gradient,
            "total": max(backward_peak, mem.peak)}


def estimate_training(resolution=512, batch=1, checkpointing=True, dtype=torch.float16, config="sd2-base") -> dict:
    """Bytes per category of one medti training step (medti/train.py's loop body) on the device."""
    sd = minisd.build(minisd.load_config(config), device="meta")
    if checkpointing:
        enable_checkpointing(sd)
    width = sd.text_encoder.cfg.width
    emb.attach(sd, {TOKEN: emb.Embedding(TOKEN, torch.zeros(N_VECTORS, width))})   # real: the start vectors
    h = resolution // sd.config.latent_factor
    with fake_device() as mem:
        for module in (sd.unet, sd.text_encoder):   # the VAE stays off the device: latents are cached
            materialise(module, dtype)
        weights = mem.now
        vectors = torch.nn.Parameter(torch.zeros(N_VECTORS, width))   # fp32 whatever the model's dtype
        optimizer = adamw([vectors])
        trainable = mem.now - weights
        latents, noise = torch.randn(batch, 4, h, h), torch.randn(batch, 4, h, h)   # one micro-batch, fp32
        t = torch.randint(0, 1000, (batch,), dtype=torch.long)
        inputs = mem.now - weights - trainable
        step = training_step(mem, lambda: denoising_loss(sd, TOKEN, vectors, [TOKEN] * batch, latents, noise, t),
                             [vectors], optimizer)
    # medti/train.py cache_latents: mean, logvar and one sample per image, fp32, on the CPU
    cpu = 3 * CACHED_IMAGES * 4 * h * h * 4
    return {"weights": weights, "trainable": trainable, **step, "inputs": inputs, "cpu_cached_latents": cpu}


def sd2_diffusers_configs(resolution):
    """SD2 in diffusers/transformers terms (stabilityai/stable-diffusion-2-base's config files)."""
    down, up = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    unet = dict(sample_size=resolution // 8, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True,
                down_block_types=down, up_block_types=up)
    vae = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
               down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    # 49,408 + 1: the example adds one placeholder token (num_vectors=1) and resizes the table
    text = dict(vocab_size=49409, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=512)
    return unet, vae, text


def estimate_diffusers_recipe(resolution=512, batch=1, checkpointing=True, dtype=torch.float16) -> dict:
    """The same step as diffusers' examples/textual_inversion/textual_inversion.py does it: fp16 UNet and VAE,
    fp32 text encoder under accelerate's fp16 autocast, the WHOLE token table trained by AdamW, a VAE encode
    every step, the table's original copy kept on the device to restore every row but the new token's."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    unet_cfg, vae_cfg, text_cfg = sd2_diffusers_configs(resolution)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(**unet_cfg), AutoencoderKL(**vae_cfg)
        text = CLIPTextModel(CLIPTextConfig(**text_cfg))
    if checkpointing:
        unet.enable_gradient_checkpointing()
        text.gradient_checkpointing_enable()
    unet.train(), text.train()
    with fake_device() as mem:
        materialise(unet, dtype), materialise(vae, dtype), materialise(text, torch.float32)
        table = text.get_input_embeddings().weight.requires_grad_(True)
        weights = mem.now - nbytes(table)
        original = table.detach().clone()   # orig_embeds_params
        optimizer = adamw([table])
        trainable = mem.now - weights
        pixels = torch.randn(batch, 3, resolution, resolution, dtype=dtype)
        ids = torch.zeros(batch, 77, dtype=torch.long)
        keep = torch.ones(len(table), dtype=torch.bool)
        keep[-1] = False   # index_no_updates: every row but the placeholder's
        inputs = mem.now - weights - trainable

        def loss_fn():
            latents = vae.encode(pixels).latent_dist.sample().detach() * 0.18215
            noise = torch.randn_like(latents)
            t = torch.randint(0, 1000, (batch,), dtype=torch.long)
            with torch.autocast(DEVICE, dtype=dtype):   # accelerate wraps the prepared text encoder's forward
                context = text(ids)[0].float().to(dtype)
            prediction = unet(scheduler.add_noise(latents, noise, t), t, context).sample
            return F.mse_loss(prediction.float(), noise.float())

        step = training_step(mem, loss_fn, [table], optimizer)
        with torch.no_grad():
            table[keep] = original[keep]
        step["total"] = max(step["total"], mem.peak)
    return {"weights": weights, "trainable": trainable, **step, "inputs": inputs}


def estimate_generation(resolution=512, cfg=True, dtype=torch.float16, config="sd2-base") -> dict:
    """One sampler step (UNet at batch 2 with CFG, no grad) and the final VAE decode, through medti.pipeline,
    with the UNet, text tower and VAE resident."""
    sd = minisd.build(minisd.load_config(config), device="meta")
    with fake_device() as mem:
        for module in (sd.unet, sd.text_encoder, sd.vae):
            materialise(module, dtype)
        weights = mem.peak = mem.now
        with torch.no_grad():
            cond, uncond = emb.encode(sd, ["chest x-ray"]), emb.encode(sd, [""])
            latents = sample(sd, cond, uncond, [1.0], [0], width=resolution, height=resolution,
                             cfg=2.0 if cfg else 1.0, steps=1)
            sampler_peak, mem.peak = mem.peak, mem.now
            decode(sd, latents)
    return {"weights": weights, "sampler_step": sampler_peak - weights, "vae_decode": mem.peak - weights,
            "total": max(sampler_peak, mem.peak)}
