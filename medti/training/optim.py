"""How the trained parameters are stepped, the same for every method: the learning-rate schedule, AdamW,
mixed precision, the gradient norm and gradient checkpointing.
"""
import math
import re

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from minisd.errors import arg

from . import TrainError


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


def precision(method, device: torch.device):
    """The method's autocast (a full fine-tune in fp16/bf16 keeps fp32 weights: medti.training.methods.UNetFineTune), or
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
