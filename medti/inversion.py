"""The pieces of textual inversion that medti/trainer.py's loop is made of: initial vectors, the latent cache, the
learning-rate schedule, the denoising loss, gradient checkpointing, per-step randomness, the resumable state file
and the log.

Recipe (the reference study, after Gal et al. 2022 and A1111's implementation): only a [vectors, width] fp32
tensor is trained; it is spliced into the frozen token embeddings wherever the placeholder token appears; the
loss is the usual diffusion MSE on eps (v for v-models) at a uniformly drawn training timestep.
"""
import json
import math
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import nn
from torch.utils.checkpoint import checkpoint

from minisd.errors import UserError, arg
from minisd.load import spoken
from minisd.schedule import alphas_cumprod
from minisd.vae import posterior_sample

from .files import safetensors_bytes, write_atomic


class TrainError(UserError):
    """A training setting we refuse or a run that cannot go on, in one line."""


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


@torch.no_grad()
def cache_latents(sd, images, flip: bool, seed: int) -> dict:
    """Encode every training image once (and its mirror image with --flip): the VAE posterior's mean and
    log-variance, plus one sample drawn now for --latents once. Kept on the CPU in fp32, unscaled."""
    param = next(sd.vae.parameters())
    if flip:
        images = torch.cat([images, images.flip(-1)])   # rows N.. are the mirrored copies
    means, logvars = [], []
    for chunk in images.split(4):
        mean, logvar = sd.vae.encode(chunk.to(param))
        means.append(mean.float().cpu())
        logvars.append(logvar.float().cpu())
    mean, logvar = torch.cat(means), torch.cat(logvars)
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(seed))
    return {"mean": mean, "logvar": logvar, "once": posterior_sample(mean, logvar, noise)}


def parse_lr(spec: str) -> list:
    """A1111's schedule "0.005:1000, 0.001": rate until step, ..., last rate for ever. A plain number = constant."""
    schedule = []
    for part in [p.strip() for p in spec.split(",")]:
        m = re.fullmatch(r"([0-9.eE+-]+)(?:\s*:\s*(\d+))?", part)
        try:
            rate, until = float(m[1]), int(m[2]) if m and m[2] else None
        except (TypeError, ValueError):
            raise TrainError(f"{arg('lr')} {spec!r}: expected 'rate' or 'rate:step, ..., rate'") from None
        if not 0 < rate < math.inf or (schedule and schedule[-1][1] is None) or (until is not None and schedule and
                                                                   until <= schedule[-1][1]):
            raise TrainError(f"{arg('lr')} {spec!r}: rates must be positive and finite, steps increasing, only the "
                             "last without step")
        schedule.append((rate, until))
    return schedule


def lr_at(schedule: list, step: int) -> float:
    return next((rate for rate, until in schedule if until is None or step < until), schedule[-1][0])


# Devices whose torch has the fused AdamW kernel: one pass over each tensor, where the default makes ~10 (a for-loop
# of elementwise ops on the CPU) or, on CUDA, foreach ops whose temporaries are as large as all trained weights.
FUSED_ADAMW = ("cpu", "cuda")


def adamw(params: list, lr: float) -> torch.optim.AdamW:
    """The optimizer of every method: AdamW without weight decay (the reference study's TI recipe; the fine-tunes
    keep it so a method changes what trains, not how), fused where the kernel exists. Fused and unfused compute the
    same update to float rounding. Measured on the full SD2 UNet's 866 M weights (Zen 4, 2 cores): 1.1 s -> 0.37 s
    per step; on CUDA 3 GiB less peak memory (tools/memory_estimate.py --method unet)."""
    fused = all(p.device.type in FUSED_ADAMW and p.dtype.is_floating_point for p in params) or None
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=fused)


def set_lr(optimizer, lr: float) -> float:
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


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


def precision(method, device: torch.device):
    """The method's autocast (a full fine-tune in fp16/bf16 keeps fp32 weights: medti.methods.UNetFineTune), or
    nothing: textual inversion and LoRA run in the model's dtype, their fp32 tensors cast where they enter."""
    return torch.autocast(device.type, dtype=method.autocast or torch.float32, enabled=method.autocast is not None)


def total_norm(grads: list) -> float:
    """The L2 norm of all gradients together (None: a weight the loss does not reach, such as the last text block
    when the penultimate layer conditions). One tensor's own norm when there is one (TI): the norm of the norms
    would round sqrt(x^2) and change the logged number in its last bit, and old logs must match new runs."""
    norms = [g.norm() for g in grads if g is not None]
    return (norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms))).item()


class Checkpointed(nn.Module):
    """Gradient checkpointing: keep only this block's inputs and recompute its activations in the backward pass.
    It holds the block's own children, parameters and buffers (the same dicts, not copies), so every module path and
    state-dict key stays what it was (`input_blocks.1.1.transformer_blocks...`): LoRA files and state files name
    layers by those paths. The block itself sits in a tuple, unregistered, to be called."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = (block,)
        self._modules, self._parameters, self._buffers = block._modules, block._parameters, block._buffers

    def forward(self, *args):
        return checkpoint(self.block[0], *args, use_reentrant=False)


def enable_checkpointing(sd):
    """Wrap every UNet block and every text-tower block (the units that hold most activations)."""
    for blocks in (sd.unet.input_blocks, sd.unet.output_blocks, sd.text.tower.blocks):
        for i, block in enumerate(blocks):
            blocks[i] = Checkpointed(block)
    sd.unet.middle_block = Checkpointed(sd.unet.middle_block)


def _key(kind: str, name: str) -> str:
    """A trained tensor's entries in state.safetensors: `name`, `exp_avg.name`, ... Textual inversion's one tensor,
    "vectors", keeps the bare `exp_avg`, `exp_avg_sq`, `adam_step` of the files earlier runs saved, so they resume."""
    return name if kind == "" else kind if name == "vectors" else f"{kind}.{name}"


def _named(params) -> dict:
    return params if isinstance(params, dict) else {"vectors": params}   # one tensor: textual inversion's vectors


def save_state(path, params, optimizer, scaler: dict, step: int, settings: dict, buffers: dict | None = None):
    """Everything a resumed run needs, pickle-free: the trained tensors (`params`: {name: Parameter}, or TI's one
    tensor), their AdamW moments and step, state that is no parameter (`buffers`: an EMA), the grad scaler's state
    and the run's settings (to refuse resuming a different run). The random draws need no state
    (step_generator). Atomic."""
    tensors = {f"buffer.{name}": t.detach().cpu().contiguous() for name, t in (buffers or {}).items()}
    for name, param in _named(params).items():
        state = optimizer.state[param]
        tensors[_key("", name)] = param.detach().cpu().contiguous()
        if state:
            tensors |= {_key("exp_avg", name): state["exp_avg"].cpu().contiguous(),
                        _key("exp_avg_sq", name): state["exp_avg_sq"].cpu().contiguous(),
                        _key("adam_step", name): torch.as_tensor(state["step"]).reshape(1).float().cpu()}
    write_atomic(path, safetensors_bytes(tensors, {"step": step, "scaler": json.dumps(scaler, sort_keys=True),
                                                   "settings": json.dumps(settings, sort_keys=True)}))


def _damaged(path, e: Exception) -> TrainError:
    return TrainError(f"{arg('resume')}: {path} is damaged ({type(e).__name__}: {str(e)[:80]}); start a new run in "
                      f"another {arg('out')} (what each save learned is in its <name>-<step>.safetensors there)")


def read_state(path) -> tuple:
    """(step, grad scaler state, settings, tensors) of a state file, checked for nothing but being readable. A file
    that is truncated, not safetensors or missing an entry (a crash during a copy, a disk full before our atomic
    writes existed) is a TrainError: it cannot be repaired, but the per-save copies are still there."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
        return int(meta["step"]), json.loads(meta["scaler"]), json.loads(meta["settings"]), tensors
    except (SafetensorError, OSError, KeyError, ValueError) as e:   # JSONDecodeError is a ValueError
        raise _damaged(path, e) from None


def restore_state(path, tensors: dict, params, optimizer, buffers: dict | None = None):
    """Put a state file's tensors (read_state) back: the trained tensors, their AdamW state and `buffers`."""
    params = _named(params)
    try:
        saved = {name: tensors[_key("", name)] for name in params}
        kept = {name: tensors[f"buffer.{name}"] for name in buffers or {}}
    except KeyError as e:
        raise _damaged(path, e) from None
    for name, param in params.items():
        if saved[name].shape != param.shape:
            raise TrainError(f"{arg('resume')}: {path} holds {name} of shape {list(saved[name].shape)}, this run "
                             f"trains {list(param.shape)}; resume with the run's own settings "
                             f"({_same(name, saved[name])}the same model) or start a new run in another {arg('out')}")
        with torch.no_grad():
            param.copy_(saved[name])
        if _key("exp_avg", name) in tensors:
            # the step count lives on the CPU, except for the fused kernel, which reads it where the weight is
            step = tensors[_key("adam_step", name)].reshape(())
            optimizer.state[param] = {"step": step.to(param.device) if optimizer.defaults["fused"] else step,
                                      "exp_avg": tensors[_key("exp_avg", name)].to(param.device),
                                      "exp_avg_sq": tensors[_key("exp_avg_sq", name)].to(param.device)}
    with torch.no_grad():
        for name, tensor in kept.items():
            buffers[name].copy_(tensor)


def load_state(path, params, optimizer, buffers: dict | None = None) -> tuple:
    """read_state, then restore_state in place; returns (step, grad scaler state, settings)."""
    step, scaler, settings, tensors = read_state(path)
    restore_state(path, tensors, params, optimizer, buffers)
    return step, scaler, settings


def _same(name: str, saved: torch.Tensor) -> str:
    """The flag that gave the saved shape, where one flag does (TI's --vectors)."""
    return f"{spoken('vectors', *[str(saved.shape[0])] * 2)}, " if name == "vectors" else ""


def read_log(path) -> list[dict]:
    """The records of log.jsonl, one JSON object per line. A line that does not parse is dropped with a warning:
    an append cut short by a crash or a full disk leaves a torn last line, and refusing to resume over it would
    make the run unresumable for good. A missing log gives no records (the run goes on without its history)."""
    path = Path(path)
    if not path.exists():
        print(f"warning: {path} is missing; the log starts again from here", file=sys.stderr)
        return []
    records, torn = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
        elif line.strip():
            torn += 1
    if torn:
        print(f"warning: {path}: dropped {torn} unreadable line(s) (a write cut short by a crash or a full disk)",
              file=sys.stderr)
    return records


def log_line(record: dict) -> str:
    """One log.jsonl line. Non-finite numbers (the loss of a skipped step) are written as null: strict JSON,
    which json.dumps would otherwise break with a bare NaN."""
    clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
    return json.dumps(clean, allow_nan=False) + "\n"


def write_log(path, records: list[dict]):
    """Rewrite the whole log atomically (on resume: the records up to the last save)."""
    write_atomic(path, "".join(log_line(r) for r in records).encode())
