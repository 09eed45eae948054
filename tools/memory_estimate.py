"""ESTIMATED peak GPU memory of one textual-inversion training step (and of generation), without a GPU.

    python tools/memory_estimate.py [--model sd15] [--resolution 768] [--batch N] [--no-checkpointing]

--model: a preset (sd2-base, sd21, sd15, sd15-inpainting, ...), a JSON config file or a diffusers folder (only its
config files are read); default SD2 at the --resolution it was trained at. The real code runs on fake tensors
(FakeTensorMode: shapes, dtypes, storages; no data, no memory): the full-size model is
built on the meta device and materialised as fake fp16 tensors, then one training step runs through medti.inversion
(denoising_loss, backward, AdamW). A dispatch mode sums the bytes of each storage while it lives; the peak of that sum
is the estimate (estimate_*() -> {category: bytes}). Not included: the CUDA context (~300-500 MB), the caching
allocator's rounding and fragmentation, cuDNN/cuBLAS workspaces.
Why the fake tensors claim "cpu", not "cuda": on this CPU-only torch, autograd aborts the process in backward over
fake cuda tensors ("PyTorch is not linked with support for cuda devices"). On "cpu", attention runs the CPU flash
kernel which, like CUDA's flash and memory-efficient kernels, never stores the [tokens x tokens] matrix.
"""
import argparse
import contextlib
import sys
import weakref
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import minisd
from bench_models import diffusers_configs  # tools/, the script's folder (not a package)
from medti import embeddings as emb
from medti.inversion import denoising_loss, enable_checkpointing
from medti.pipeline import InitImage, SampleSettings, decode, sample
from minisd.clip import LAYERS
from minisd.config import ModelConfig, parse_config

GiB, GB = 2 ** 30, 10 ** 9
CONTEXT = 0.3 * GB, 0.5 * GB   # CUDA context: outside every tensor, its size depends on driver and GPU
DEVICE = "cpu"                 # what the fake tensors claim (see above)
TOKEN, N_VECTORS = "<medti>", 64
CACHED_IMAGES = 100            # training images whose latents medti/train.py caches, on the CPU
LIMITS = {"required": 8 * GB, "target": 3.5 * GB}   # for training; generation's target is 3 GB


class LiveBytes(TorchDispatchMode):
    """Bytes of live fake storages: each op output's storage counted once (views, in-place results share it), until
    it dies (a weakref finalizer: torch keeps one Python object per storage while anything, autograd included,
    holds it). `peak`: the largest sum; reset it to start a phase."""

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak = {}, 0, 0   # storage address -> bytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for storage in [t.untyped_storage() for t in pytree.tree_leaves(out) if isinstance(t, FakeTensor)]:
            if storage._cdata not in self.live:   # _cdata: the C++ StorageImpl's address, unique while it lives
                self.live[storage._cdata] = storage.nbytes()
                self.now += storage.nbytes()
                self.peak = max(self.peak, self.now)
                weakref.finalize(storage, self.free, storage._cdata)
        return out

    def free(self, key):
        self.now -= self.live.pop(key)


class RealBookkeeping(TorchDispatchMode):
    """What fake tensors cannot do, for the data-dependent lines of medti (none touches a big tensor):
      1. ops without a fake or meta tensor argument run for real: the CPU bookkeeping of a real run (token ids,
         masks, schedules, AdamW's step count, CPU random draws) whose values steer Python (`if not is_new.any()`,
         `.numpy()`). Device tensors come only from on_device()/materialise() and ops on them;
      2. a real boolean-mask index (`spliced[is_new]`) becomes the mask's nonzero(): same gather, known shape;
      3. any()/all() of fake data, i.e. the NaN/inf checks in emb.encode and pipeline.decode, answer "finite"."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
        if all(not isinstance(x, FakeTensor) and x.device.type != "meta" for x in tensors):
            with unset_fake_temporarily():
                out = func(*args, **kwargs)
            big = [x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor) and x.nbytes > 2 ** 20]
            assert all(x.is_meta for x in big), f"{func}: a big real tensor would be missing from the estimate"
            return out
        if func in (torch.ops.aten.any.default, torch.ops.aten.all.default):
            return torch.tensor(func is torch.ops.aten.all.default)
        if func.overloadpacket in (torch.ops.aten.index, torch.ops.aten.index_put, torch.ops.aten.index_put_):
            with unset_fake_temporarily():   # [mask] -> [rows, cols, ...] of its True entries
                indices = [i.nonzero().unbind(1) if isinstance(i, torch.Tensor) and i.dtype == torch.bool
                           and not isinstance(i, FakeTensor) else (i,) for i in args[1]]
            args = (args[0], [j for group in indices for j in group], *args[2:])
        return func(*args, **kwargs)


@contextlib.contextmanager
def fake_device():
    """Fake tensors with real bookkeeping, and a LiveBytes tracker over them (yielded)."""
    with FakeTensorMode(allow_non_fake_inputs=True), RealBookkeeping(), LiveBytes() as tracker:
        yield tracker


def on_device(*shape, dtype=torch.float32):
    """A fake device tensor (inside fake_device()), made like a meta tensor so that rule 1 above does not apply."""
    return torch.zeros_like(torch.empty(shape, dtype=dtype, device="meta"), device=DEVICE)


def materialise(module, dtype):
    """Meta-built module -> frozen fake tensors on DEVICE, floats in `dtype` (to_empty cannot swap meta for fake)."""
    for sub in module.modules():
        for name, p in list(sub.named_parameters(recurse=False)):
            setattr(sub, name, torch.nn.Parameter(torch.zeros_like(p, dtype=dtype, device=DEVICE), False))
        for name, b in list(sub.named_buffers(recurse=False)):
            sub._buffers[name] = torch.zeros_like(b, dtype=dtype if b.is_floating_point() else b.dtype, device=DEVICE)


def adamw(params):
    """AdamW past its first step (state allocated), as in every later step. foreach: the default on CUDA."""
    optimizer = torch.optim.AdamW(params, lr=5e-3, weight_decay=0.0, foreach=True)
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return optimizer


def training_step(mem, loss_fn, params, optimizer) -> dict:
    """Forward, backward, optimizer step: bytes kept after the forward, fwd/bwd peak above what lived before."""
    base = mem.peak = mem.now
    loss = loss_fn()
    saved = mem.now - base
    loss.backward()
    backward_peak, mem.peak = mem.peak, mem.now
    gradient = sum(p.grad.nbytes for p in params)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"saved_for_backward": saved, "activations": backward_peak - base, "gradient": gradient,
            "total": max(backward_peak, mem.peak)}


def model_config(model) -> ModelConfig:
    """A preset name, JSON config (path or dict), ModelConfig or diffusers folder (its config files, checked by
    minisd.diffusers; no weight is read) -> the ModelConfig to build."""
    if isinstance(model, (str, Path)) and Path(model).is_dir():
        from minisd.diffusers import read_config
        return parse_config(read_config(model), str(model))
    return minisd.load_config(model)


def estimate_training(resolution=512, batch=1, checkpointing=True, dtype=torch.float16, config="sd2-base") -> dict:
    """Bytes per category of one step of medti/train.py's loop on the device (the VAE stays off it)."""
    cfg = model_config(config)
    if cfg.inpainting:   # medti.inversion feeds the UNet 4-channel latents: TI trains on the plain model
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
    """medti.pipeline: one sampler step (UNet at batch 2 with CFG, no grad), then the VAE decode; all resident.
    An inpainting model samples from an image and a mask (its VAE encode counts in the sampler step)."""
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


def report(title: str, parts: dict, labels: dict, limits: dict):
    """One recipe's lines, its total and whether each limit is met (also with a 0.5 GB CUDA context on top)."""
    print(f"\n{title}", *(f"  {label:<56} {parts[key] / 2 ** 20:>9.1f} MiB" for key, label in labels.items()), sep="\n")
    total, context = parts["total"], [(parts["total"] + c) / GB for c in CONTEXT]
    print(f"  {'TOTAL: peak of the step (not the sum of the lines)':<56} {total / 2 ** 20:>9.1f} MiB = "
          f"{total / GiB:.2f} GiB = {total / GB:.2f} GB; + CUDA context {context[0]:.1f}-{context[1]:.1f} GB")
    for name, limit in limits.items():
        print(f"  {name} <= {limit / GB:g} GB: {'met' if total <= limit else 'NOT met'} "
              f"(with a 0.5 GB CUDA context: {'met' if total + CONTEXT[1] <= limit else 'NOT met'})")


def describe(cfg: ModelConfig) -> str:
    """SD1 or SD2, in the words of the report lines."""
    t = cfg.text
    if t.tower == "openai":
        return f"SD1 (OpenAI CLIP text tower, {t.num_hidden_layers} layers of {t.width})"
    return f"SD2 (OpenCLIP text tower, {t.layers - LAYERS[t.layer]} of {t.layers} layers of {t.width})"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="preset, JSON config or diffusers folder (default: SD2, sd2-base "
                   "below 768 px, sd2 from 768)")
    p.add_argument("--resolution", type=int, default=512, help="image size; latents are 1/8 of it")
    p.add_argument("--batch", type=int, default=1, help="images per training micro-batch")
    p.add_argument("--no-checkpointing", action="store_true", help="without gradient checkpointing")
    args = p.parse_args(argv)
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
