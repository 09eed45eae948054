"""Checks a generation run makes before it spends minutes sampling: numbers that would give NaN images, seeds
torch cannot take, the torchrun environment, and whether the run fits in the memory this machine has. And the
one check after sampling: a non-finite latent or image stops the run before anything is written."""
import math
from pathlib import Path

import torch
from torch import nn

from minisd.errors import UserError, some
from minisd.packing import PackedConv2d

SEED_LIMIT = 2 ** 64   # torch.Generator.manual_seed takes seeds in [0, 2**64)
# Guidance scale and term weights multiply a difference of two UNet predictions (GuidedDenoiser). A1111's slider
# stops at 30; beyond 1000 the product only walks into fp16's range (65504) and NaN, so such a value is a typo.
MAX_SCALE = 1000.0
# Elements of activations alive at the peak of one step, per unit named below, measured with
# tools/memory_estimate.py (fake tensors, SD2-base, fp16 and fp32 alike, 256² and 512²: linear in pixels):
#   UNet sampler step: 28.2 per (UNet row x latent pixel x model_channels) -- 141 MiB at 512², 2 rows, fp16;
#   VAE decode:         6.0 per (image x pixel x the VAE's ch) -- 384 MiB at 512², fp16.
# SD1.5 measures the same (sampler step 140.7 MiB at 512², 2 rows, fp16: `--model sd15`).
# Rounded up (30 and 6.5) so that the estimate errs towards "needs more".
UNET_PER, VAE_PER = 30, 6.5


class GenerateError(UserError):
    """A generation run that cannot go on, in one line that says why and what to change."""


def check_scale(flag: str, value: float):
    """A finite guidance scale or term weight of at most MAX_SCALE in size, or a GenerateError."""
    if not math.isfinite(value) or abs(value) > MAX_SCALE:
        raise GenerateError(f"{flag} {value:g}: must be a finite number between -{MAX_SCALE:g} and {MAX_SCALE:g} "
                            "(2 is the study's guidance, 7.5 diffusers' default)")


def check_seeds(first: int, count: int):
    """Image i uses seed first + i; every one must be a torch generator seed."""
    if first < 0 or first + count > SEED_LIMIT:
        raise GenerateError(f"--seed {first}: torch takes seeds in [0, 2**64); with --n {count} the seed must be at "
                            f"most {SEED_LIMIT - count}, since image i uses seed + i")


def estimate_bytes(sd, width: int, height: int, rows: int, images: int, packed: bool) -> int:
    """Memory one batch needs beyond the loaded weights: the larger of the UNet step and the VAE decode (they are
    not alive together), plus, on the CPU with packed convs, the second copy of the conv weights made at their
    first call. Not counted: a half-precision decode redone in fp32 after an overflow (pipeline.decode)."""
    element = next(sd.unet.parameters()).element_size()
    factor = sd.config.latent_factor
    unet = UNET_PER * rows * (width // factor) * (height // factor) * sd.config.unet.model_channels
    vae = VAE_PER * images * width * height * sd.config.vae.ch
    convs = [m.weight for net in (sd.unet, sd.vae) for m in net.modules() if isinstance(m, (nn.Conv2d, PackedConv2d))]
    return int(max(unet, vae) * element) + (sum(w.nbytes for w in convs) if packed else 0)


def available_bytes(device: torch.device) -> tuple[int, str]:
    """(bytes free, where): the GPU's free memory, or the kernel's MemAvailable (what can be allocated without
    swapping) on the CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], f"GPU {device}"
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024, "this machine's RAM"
    return 2 ** 62, "RAM"   # no /proc/meminfo (not Linux): nothing to compare with


def gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n < 1e12 else f"{n / 1e12:.1f} TB"


def check_memory(sd, device, width: int, height: int, rows: int, images: int, packed: bool):
    """Refuse, in one line with both numbers, a run that cannot fit (e.g. --size 100000 asks for terabytes)."""
    need = estimate_bytes(sd, width, height, rows, images, packed)
    have, where = available_bytes(torch.device(device))
    if need > have:
        raise GenerateError(f"{width}x{height} pixels, {images} image(s) per batch: needs about {gb(need)} of memory "
                            f"besides the model, but {where} has {gb(have)} available; use a smaller --size (or "
                            f"--width/--height; the model's native size is {sd.config.resolution}) or a smaller "
                            "--batch")


def check_finite(what: str, tensor: torch.Tensor, files: list, dtype: torch.dtype):
    """Stop before writing anything if sampling or decoding produced NaN or inf, naming the likely causes."""
    if bool(torch.isfinite(tensor).all()):
        return
    half = " or half-precision overflow (try --dtype fp32)" if dtype in (torch.float16, torch.bfloat16) else ""
    raise GenerateError(f"the {what} for {some(files)} hold NaN or inf, so nothing was written for them; likely "
                        f"causes: a damaged model file (NaN weights) or a wrong scale_factor in --config{half}, "
                        "or extreme --cfg / term weights")
